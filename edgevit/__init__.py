"""edgevit: mobile vision transformers from PyTorch to devices, verified and measured."""
from edgevit.models import create_model, list_models, load_checkpoint, to_deploy

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load_checkpoint", "to_deploy", "__version__"]
