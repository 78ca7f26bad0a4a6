"""Model registry: one ``ModelCfg`` per size, one ``Family`` per model file.

A family file registers itself once with :func:`register_family` (its checkpoint filter lives
there) and each size with :func:`register_model`, whose config is data that can be listed
without building anything.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from edgevit.core.errors import EdgevitError, UnknownModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PaperFigures:
    """What the paper (or the authors' release) reports; shown, never used as a measurement."""

    params_m: float
    gmacs: float
    top1: float
    latency_ms: float | None = None
    latency_device: str | None = None
    reference: str = ""


@dataclass(frozen=True)
class ModelCfg:
    """Everything needed to build a size and feed it correctly, without building it."""

    name: str
    family: str
    # Exact parameter count of the reference implementation at 1000 classes (timm where timm has
    # the model, else the authors' code); a test holds every size to it.
    source_params: int
    paper: PaperFigures
    input_size: tuple[int, int, int] = (3, 224, 224)
    fixed_input_size: bool = False
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 1000
    labels: str | None = "imagenet-1k"
    checkpoint_formats: tuple[str, ...] = ("timm",)
    hf_hub_id: str | None = None  # "hf-hub:…" id of the published weights in timm's format
    url: str | None = None  # the authors' own release, in their key format
    arch: Mapping[str, Any] = field(default_factory=dict)  # family-specific architecture args

    def replace(self, **changes: Any) -> "ModelCfg":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Family:
    """A model family's checkpoint handling: the one place its key formats are known.

    ``detect_format(keys)`` names the key format of a state dict of this family (e.g. ``"timm"``,
    ``"snap"``), or returns None when the keys are not this family's. ``remap_checkpoint(sd, fmt,
    model)`` turns a state dict in that format into edgevit's keys and layouts for ``model``.
    ``classifier_prefixes`` name (in edgevit's keys) the layers that depend on ``num_classes``.
    """

    name: str
    detect_format: Callable[[Iterable[str]], str | None]
    remap_checkpoint: Callable[[dict[str, "torch.Tensor"], str, "nn.Module"], dict[str, "torch.Tensor"]]
    classifier_prefixes: tuple[str, ...]


@dataclass(frozen=True)
class _Entry:
    cfg: ModelCfg
    builder: Callable[..., "nn.Module"]


_FAMILIES: dict[str, Family] = {}
_MODELS: dict[str, _Entry] = {}


def register_family(family: Family) -> Family:
    if family.name in _FAMILIES:
        raise ValueError(f"family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def register_model(cfg: ModelCfg) -> Callable[[Callable[..., "nn.Module"]], Callable[..., "nn.Module"]]:
    """Register ``builder(cfg, **arch_kwargs) -> nn.Module`` under ``cfg.name``."""

    def decorator(builder: Callable[..., "nn.Module"]) -> Callable[..., "nn.Module"]:
        if cfg.name in _MODELS:
            raise ValueError(f"model {cfg.name!r} is registered twice")
        if cfg.family not in _FAMILIES:
            raise ValueError(f"register family {cfg.family!r} before its models")
        _MODELS[cfg.name] = _Entry(cfg, builder)
        builder.cfg = cfg  # type: ignore[attr-defined]
        return builder

    return decorator


def _entry(name: str) -> _Entry:
    _ensure_families_imported()
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _MODELS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else " Run `edgevit list` for the names."
        raise UnknownModelError(f"unknown model {name!r}.{hint}") from None


def get_model_cfg(name: str) -> ModelCfg:
    return _entry(name).cfg


def get_family(name: str) -> Family:
    _ensure_families_imported()
    return _FAMILIES[name]


def list_families() -> list[Family]:
    _ensure_families_imported()
    return list(_FAMILIES.values())


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Registered names matching a shell-style pattern (``"levit_*"``), in registration order."""
    _ensure_families_imported()
    return [
        name
        for name, entry in _MODELS.items()
        if fnmatch.fnmatchcase(name, pattern) and (family is None or entry.cfg.family == family)
    ]


def build_model(cfg: ModelCfg, **arch_kwargs: Any) -> "nn.Module":
    """Build ``cfg``'s architecture with random weights (no checkpoint), in eval mode."""
    model = _entry(cfg.name).builder(cfg, **arch_kwargs)
    model.cfg = cfg
    return model.eval()


def create_model(
    name: str,
    pretrained: str | None = None,
    num_classes: int | None = None,
    strict: bool = True,
    **overrides: Any,
) -> "nn.Module":
    """Build a registered model, optionally loading a checkpoint.

    ``pretrained`` is a local file (safetensors or torch), an http(s)/file URL, or an
    ``hf-hub:org/repo`` id; timm's keys and the authors' own are both accepted. ``overrides``
    that name ``ModelCfg`` fields (``input_size``, ``mean``, …) change the config; the rest go to
    the family's builder (``drop_path_rate``, …). The model is returned in eval mode.
    """
    cfg = get_model_cfg(name)
    cfg_fields = {f.name for f in dataclasses.fields(ModelCfg)}
    cfg_changes = {k: v for k, v in overrides.items() if k in cfg_fields}
    arch_kwargs = {k: v for k, v in overrides.items() if k not in cfg_fields}
    if num_classes is not None:
        if num_classes < 0:
            raise EdgevitError(f"num_classes must be >= 0 (0 removes the classifier), got {num_classes}")
        cfg_changes["num_classes"] = num_classes
        if num_classes != cfg.num_classes:
            cfg_changes.setdefault("labels", None)
    if cfg_changes:
        cfg = cfg.replace(**cfg_changes)
    model = build_model(cfg, **arch_kwargs)
    if pretrained:
        from edgevit.models.checkpoints import load_checkpoint

        load_checkpoint(model, pretrained, strict=strict)
    return model


def _ensure_families_imported() -> None:
    # Family files register themselves on import; importing the package imports them all.
    import edgevit.models  # noqa: F401
