"""edgevit: mobile vision transformers from PyTorch to devices, verified and measured."""
from edgevit.models import create_model, list_models, load_checkpoint, to_deploy

__version__ = "0.1.0"

# The heavier entry points load on first use, so `import edgevit` stays quick.
_LAZY = {"export_model": "edgevit.export.pipeline", "quantize_model": "edgevit.quant",
         "evaluate": "edgevit.evaluate", "fine_tune": "edgevit.train"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgevit' has no attribute {name!r}")


__all__ = ["create_model", "list_models", "load_checkpoint", "to_deploy", "__version__", *_LAZY]
