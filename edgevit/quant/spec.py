"""What a target receives when it is asked for an int8 artifact.

The pipeline builds one :class:`QuantSpec` from the recipe's ``[quantization]`` table, the
family's ViT-aware defaults (``edgevit.quant.recipes``) and the calibration sample, and hands it
to the target's ``export(..., quant=spec)``. Each target translates it to its own tool:
onnxruntime's quantizer, PT2E's XNNPACK quantizer, coremltools, TensorRT's Q/DQ placement.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgevit.core.errors import EdgevitError

if TYPE_CHECKING:  # the CLI reads the tables below for --help, which must not load torch
    import torch
    from torch import nn

MODES = ("dynamic", "static", "qat")
METHODS = ("minmax", "percentile", "entropy")  # how activation ranges are chosen from calibration

# Op kinds a recipe may keep in float. Each target maps a kind to its own graph's ops:
#   norm                LayerNorm / GroupNorm (and any BatchNorm left after fusion)
#   softmax             attention (and MobileViT's context-score) softmax
#   activation          GELU / Hardswish / SiLU
#   residual_add        the add of a block's input to its branch output
#   attention_bias_add  the add of LeViT/EfficientFormer's learned position bias to attention logits
#   attention_matmul    activation × activation products (q·kᵀ, attn·v, MobileViT's context)
#   pooling             average pooling / token means
OP_KINDS = ("norm", "softmax", "activation", "residual_add", "attention_bias_add", "attention_matmul", "pooling")


def check_choices(mode: Any, method: Any = None, float_ops: Any = (), where: str = "") -> None:
    """The one check of a quantization mode, range method and float op kinds, for recipes
    (``where`` names the file) and for the command line and Python API (``where`` empty)."""
    prefix = f"{where}: [quantization] " if where else ""
    if mode not in MODES:
        raise EdgevitError(f"{prefix}mode must be one of {', '.join(MODES)}, got {mode!r}")
    if method is not None and method not in METHODS:
        raise EdgevitError(f"{prefix}method must be one of {', '.join(METHODS)}, got {method!r}")
    unknown = sorted(map(str, set(float_ops or ()) - set(OP_KINDS)))
    if unknown:
        raise EdgevitError(f"{prefix}unknown float_ops {', '.join(unknown)} (known: {', '.join(OP_KINDS)})")


@dataclass(frozen=True)
class QuantSpec:
    mode: str
    method: str = "minmax"
    per_channel: bool = True  # per-output-channel weight scales
    float_ops: tuple[str, ...] = ()  # OP_KINDS kept in float
    float_modules: tuple[str, ...] = ()  # fnmatch patterns over the deploy model's module names kept in float
    # ONNX: the layers most hurt by pair-safe int8 weights that keep full 8-bit (uint8) weights
    full_range_weights: int = 0
    calibration: torch.Tensor | None = field(default=None, compare=False)  # preprocessed NCHW float32 sample
    # Images of the user's sample that calibration never saw: what the artifact is verified on.
    held_out: torch.Tensor | None = field(default=None, compare=False)
    calibration_summary: dict[str, Any] = field(default_factory=dict, compare=False)
    # mode "qat": the fine-tuned model after PT2E convert (ExecuTorch and Core ML lower it as is,
    # ONNX exports it; TensorRT quantizes the fine-tuned float weights with the same calibration).
    qat_model: Any = field(default=None, compare=False)
    # mode "qat": the trained state qat_model is made from (edgevit.quant.qat.program_from_state),
    # which the bundle keeps.
    qat_state: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_choices(self.mode, self.method, self.float_ops)
        # QAT starts its ranges from calibration images; a QAT program made again from its bundle
        # (its trained state, or the program itself) carries them.
        needs_images = self.mode == "static" or (self.mode == "qat" and self.qat_model is None and self.qat_state is None)
        if needs_images and self.calibration is None:
            raise EdgevitError(f"{self.mode} quantization needs calibration images: give --calib-data DIR or --calib-stats FILE")

    @property
    def needs_calibration(self) -> bool:
        return self.mode != "dynamic"

    def float_module_names(self, model: nn.Module) -> list[str]:
        """The model's module names (leaves and containers) matched by ``float_modules``."""
        names = [name for name, _ in model.named_modules() if name]
        return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.float_modules)]

    def with_changes(self, **changes: Any) -> "QuantSpec":
        import dataclasses
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_summary(cls, summary: dict[str, Any], calibration: torch.Tensor | None = None,
                     held_out: torch.Tensor | None = None, qat_state: Any = None) -> "QuantSpec":
        """The spec a manifest's :meth:`summary` records, with its calibration images (static) or
        its QAT program's trained state (qat) read by the caller — how an int8 program is made
        again from its bundle."""
        return cls(mode=summary["mode"], method=summary.get("method") or "minmax", per_channel=summary["per_channel"],
                   float_ops=tuple(summary["float_ops"]), float_modules=tuple(summary["float_modules"]),
                   full_range_weights=summary.get("full_range_weights", 0), calibration=calibration,
                   held_out=held_out, calibration_summary=summary.get("calibration") or {}, qat_state=qat_state)

    def summary(self) -> dict[str, Any]:
        """For the manifest."""
        return {"mode": self.mode, "method": self.method if self.needs_calibration else None,
                "per_channel": self.per_channel, "full_range_weights": self.full_range_weights,
                "float_ops": list(self.float_ops),
                "float_modules": list(self.float_modules), "calibration": (self.calibration_summary | {
                    "calibrated_on": len(self.calibration), "held_out_for_verification": len(self.held_out)
                    if self.held_out is not None else 0}) if self.calibration_summary else None}
