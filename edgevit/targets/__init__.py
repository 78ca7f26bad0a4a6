"""Export targets. ``TARGETS`` is the single table that drives the CLI's argument checks and
``--help``, the README's support matrix, the recipes and the tests."""
from __future__ import annotations

from edgevit.core.errors import EdgevitError
from edgevit.targets.base import ExportResult, OptionSpec, TargetSpec

_TARGET_LIST = (
    TargetSpec(
        name="onnx",
        description="ONNX graph, verified in onnxruntime",
        suffix=".onnx",
        precisions=("fp32", "fp16", "int8"),
        quant_modes=("dynamic", "static", "qat"),
        runtime="onnxruntime",
        runs_in="onnxruntime",
        extra="onnx",
        requires=("onnx", "onnxruntime", "onnxslim"),
        options=(
            OptionSpec("opset", 18, "ONNX opset (>= 17).", minimum=17),
            OptionSpec("dynamic_batch", False, "Leave the batch dimension free."),
            OptionSpec("exporter", "torchscript", "torch.onnx exporter.", ("torchscript", "dynamo")),
            OptionSpec("simplify", True, "Simplify the graph with onnxslim."),
            OptionSpec("fp16_io", False, "With fp16: float16 inputs/outputs too (default keeps them float32)."),
        ),
    ),
    TargetSpec(
        name="executorch",
        description="ExecuTorch .pte, lowered to XNNPACK (or Core ML), verified in executorch.runtime",
        suffix=".pte",
        precisions=("fp32", "int8"),
        quant_modes=("dynamic", "static", "qat"),
        runtime="executorch.runtime",
        runs_in="executorch",
        extra="executorch",
        requires=("executorch",),
        options=(
            OptionSpec("backend", "xnnpack", "Delegate backend: xnnpack (any CPU), or coreml (Apple; lowers "
                       "anywhere, runs on macOS/iOS only).", ("xnnpack", "coreml")),
        ),
    ),
    TargetSpec(
        name="coreml",
        description="Core ML ML program (.mlpackage); runs on macOS, numerics pre-checked elsewhere",
        suffix=".mlpackage",
        precisions=("fp16", "fp32", "int8"),
        # dynamic: 8-bit weights (W8, no calibration); static/qat: 8-bit weights and activations (W8A8)
        quant_modes=("dynamic", "static", "qat"),
        runtime="coremltools (MLModel.predict, macOS only)",
        runs_in="coreml",
        extra="coreml",
        requires=("coremltools",),
        options=(
            OptionSpec("deployment_target", "iOS17", "Minimum OS the model runs on.",
                       ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")),
            OptionSpec("image_input", False, "Take an RGB image with 0-255 pixels (normalisation folded into the model)."),
            OptionSpec("labels_file", "", "Class labels, one per line, embedded as a Core ML classifier "
                       "(ImageNet names are not bundled: without it the output is logits)."),
        ),
    ),
    TargetSpec(
        name="tensorrt",
        description="TensorRT: the ONNX TensorRT consumes (precision in the graph), verified in onnxruntime; "
                    "the engine too where TensorRT and a CUDA GPU are present",
        suffix=".engine",  # .onnx (plus build-engine.sh) where no engine could be built
        precisions=("fp16", "fp32", "int8"),
        quant_modes=("static", "qat"),  # int8 from calibrated Q/DQ only: TensorRT has no dynamic quantization
        runtime="TensorRT (engine, CUDA GPU)",
        runs_in="tensorrt",
        # What the ONNX needs; TensorRT itself ([tensorrt] extra) only builds and runs the engine.
        extra="onnx",
        requires=("onnx", "onnxruntime", "onnxslim"),
        options=(
            OptionSpec("opset", 18, "ONNX opset (>= 17).", minimum=17),
            OptionSpec("dynamic_batch", False, "Leave the batch dimension free."),
            OptionSpec("opt_batch", 1, "With --dynamic-batch: the batch TensorRT tunes for (optimisation profile "
                       "min/opt/max = 1/opt/max).", minimum=1),
            OptionSpec("max_batch", 8, "With --dynamic-batch: the largest batch the engine takes.", minimum=1),
            OptionSpec("workspace_mb", 1024, "TensorRT builder workspace limit, MiB.", minimum=16),
            OptionSpec("timing_cache", "", "TensorRT timing cache read before the build and updated after it "
                       "(default: one per GPU and TensorRT version in ~/.cache/edgevit/tensorrt); a copy is kept "
                       "beside the engine."),
        ),
    ),
)
TARGETS: dict[str, TargetSpec] = {t.name: t for t in _TARGET_LIST}


def get_target(name: str) -> TargetSpec:
    try:
        return TARGETS[name]
    except KeyError:
        raise EdgevitError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}") from None


def all_options() -> dict[str, OptionSpec]:
    """Every target option by name (for the CLI, which offers the union and checks per target)."""
    options: dict[str, OptionSpec] = {}
    for target in _TARGET_LIST:
        for option in target.options:
            options.setdefault(option.name, option)
    return options


__all__ = ["TARGETS", "ExportResult", "OptionSpec", "TargetSpec", "all_options", "get_target"]
