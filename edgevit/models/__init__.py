"""Model families. Importing this package registers every family and size."""
from edgevit.models import edgevit, efficientformer, levit, mobilevitv2  # noqa: F401  (registration)
from edgevit.models.checkpoints import LoadReport, load_checkpoint, read_state_dict
from edgevit.models.deploy import is_deploy, to_deploy
from edgevit.models.registry import (
    Family,
    ModelCfg,
    PaperFigures,
    create_model,
    get_model_cfg,
    list_families,
    list_models,
    register_family,
    register_model,
)

__all__ = [
    "Family", "LoadReport", "ModelCfg", "PaperFigures", "create_model", "get_model_cfg",
    "is_deploy", "list_families", "list_models", "load_checkpoint", "read_state_dict",
    "register_family", "register_model", "to_deploy",
]
