"""ViT-aware quantization defaults, one place per family.

What stays float, and why:
- the first convolution sees raw normalised pixels, and the classifier's logits are what top-1
  reads: both are small and the most sensitive layers in every family;
- LayerNorm / GroupNorm and softmax have no int8 kernels worth their accuracy cost on the
  targets here, and their inputs have outlier channels (norm) or tiny probabilities (softmax)
  that one int8 scale cannot hold;
- LeViT and EfficientFormer add a learned position bias to the attention logits: quantizing the
  sum with the logits' scale erases the bias's fine structure.
Targets differ in what int8 costs: onnxruntime has int8 kernels for Conv/MatMul but none for
norms or GELU, and a residual sum there mostly feeds a float norm, so quantizing it adds a Q/DQ
pair that costs accuracy and buys no speed (LeViT has no norm left after BatchNorm fusion: its sums
feed int8 linears and stay int8). XNNPACK (ExecuTorch, and Core ML through the same PT2E program)
and TensorRT fuse the add into int8 kernels. ``target_float_ops`` maps a target to its own set;
targets not named there use ``float_ops``.
A recipe's ``[quantization]`` table replaces ``float_ops`` and extends ``float_modules``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgevit.core.errors import EdgevitError


@dataclass(frozen=True)
class FamilyQuantDefaults:
    float_ops: tuple[str, ...]
    float_modules: tuple[str, ...]  # fnmatch patterns over deploy-model module names
    notes: str = ""
    target_float_ops: dict[str, tuple[str, ...]] = field(default_factory=dict)  # target → float_ops there
    # target → how many of the layers most hurt by pair-safe int8 weights keep full 8-bit weights
    # (stored as uint8, exact on every CPU, on slower u8·u8 kernels): see edgevit.targets.onnx.int8
    full_range_weights: dict[str, int] = field(default_factory=dict)

    def float_ops_for(self, target: str | None) -> tuple[str, ...]:
        return self.target_float_ops.get(target, self.float_ops)


_COMMON_FLOAT_OPS = ("norm", "softmax", "attention_bias_add")

FAMILY_DEFAULTS: dict[str, FamilyQuantDefaults] = {
    "mobilevitv2": FamilyQuantDefaults(
        float_ops=("norm", "softmax"),
        float_modules=("stem.conv", "head.fc"),
        notes="GroupNorm(1) before each linear attention; context-score softmax over tokens.",
        # the context product (scores × keys, summed over tokens) needs finer steps than one int8 scale
        target_float_ops={"onnx": ("norm", "softmax", "attention_matmul", "residual_add")},
        # Reference weights, 100 natural photos, held-out mean cosine of ONNX int8 with the 0/4/8/64
        # most hurt layers at 8 bits: 0.978 / 0.986 / 0.990 / 0.991, at 7.61 / 7.94 / 8.30 / 10.24 ms
        # (AVX-512 VNNI, 2 threads). The other families stay ≥ 0.988 with none.
        full_range_weights={"onnx": 8}),
    "efficientformer": FamilyQuantDefaults(
        float_ops=_COMMON_FLOAT_OPS,
        float_modules=("stem.0", "head"),
        notes="Pooling mixer blocks are conv-only; the last stage's attention carries a position bias.",
        target_float_ops={"onnx": _COMMON_FLOAT_OPS + ("residual_add",)}),
    "levit": FamilyQuantDefaults(
        float_ops=_COMMON_FLOAT_OPS,
        float_modules=("stem.conv1", "head"),
        notes="Every linear is followed by a fused BatchNorm; the merged distillation head stays float "
              "(an int8 head collapsed stock LeViT to two distinct outputs on XNNPACK)."),
    "edgevit": FamilyQuantDefaults(
        # residual sums float on every target: on XNNPACK, Fashion-MNIST EdgeViT-XXS's static int8
        # cosine went 0.989 -> 0.999 with them float (one trained model lost 1.1 pt top-1 without)
        float_ops=("norm", "softmax", "residual_add"),
        float_modules=("patch_embed1.proj", "head"),
        notes="Local-Global-Local: depthwise local aggregation, sparse global attention, transposed-conv propagation.",
        # TensorRT fuses a residual add into the producing conv's int8 epilogue (Q/DQ on the skip input)
        target_float_ops={"tensorrt": ("norm", "softmax")}),
}


def family_defaults(family: str) -> FamilyQuantDefaults:
    try:
        return FAMILY_DEFAULTS[family]
    except KeyError:
        raise EdgevitError(f"no quantization defaults for family {family!r}") from None


def quant_settings(family: str, table: dict[str, Any], target: str | None = None) -> dict[str, Any]:
    """The QuantSpec fields for ``family`` on ``target`` under a recipe's ``[quantization]`` table."""
    defaults = family_defaults(family)
    float_ops = tuple(table["float_ops"]) if "float_ops" in table else defaults.float_ops_for(target)
    extra_modules = tuple(m for m in table.get("float_modules", ()) if m not in defaults.float_modules)
    return {"mode": table["mode"], "method": table.get("method", "minmax"),
            "per_channel": table.get("per_channel", True), "float_ops": float_ops,
            "float_modules": defaults.float_modules + extra_modules,
            "full_range_weights": int(table.get("full_range_weights", defaults.full_range_weights.get(target, 0)))}
