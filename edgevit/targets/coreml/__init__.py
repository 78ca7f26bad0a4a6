"""Core ML target: ``torch.export`` → coremltools ML program (``.mlpackage``).

The artifact runs in Core ML, which exists only on Apple systems: there
:mod:`edgevit.runtimes.coreml` calls ``MLModel.predict``. Elsewhere that runtime is unavailable
and the pipeline falls back to :func:`precheck`, a float16 numerics check of the deploy model in PyTorch (Core ML's fp16
compute overflows silently where float32 does not: QKᵀ, softmax inputs, LayerNorm statistics).

With ``image_input`` the model takes an RGB image with pixel values 0–255. Core ML's
``ImageType`` applies ``scale * pixel + bias[c]`` with one scalar scale, while the ImageNet
normalisation ``(pixel / 255 − mean[c]) / std[c]`` divides by a per-channel std. We fold the
exact part that fits — ``scale = 1/255``, ``bias[c] = −mean[c]`` — into the ImageType and put the
per-channel ``1/std[c]`` in the model as one multiply in front of it (left out when std is 1).

``int8`` takes a :class:`~edgevit.quant.spec.QuantSpec`; the ML program computes in float16:

- ``dynamic`` → **W8**: the converted program's conv and linear weights become int8 with
  ``coremltools.optimize.coreml.linear_quantize_weights`` (symmetric, per output channel or per
  tensor; tensors of up to ``W8_WEIGHT_THRESHOLD`` elements and ``float_modules`` stay float16);
- ``static`` / ``qat`` → **W8A8**: the PT2E program of :mod:`edgevit.quant.pt2e` (calibrated in
  PyTorch, or QAT's converted model) is converted as it is: its quantize/dequantize pairs become
  Core ML ``quantize``/``dequantize`` ops, its int8 weights ``constexpr_affine_dequantize``.

Their pre-check runs what the ML program holds in PyTorch, with every float op's output rounded to
float16: W8, the deploy model with the ML program's own dequantized int8 weights (read back from
the program); W8A8, the PT2E program. Both also fail if the ML program holds no int8 weights
(or, for W8A8, no activation quantization).
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import edgevit
from edgevit.core.errors import EdgevitError
from edgevit.core.quiet import quiet
from edgevit.runtimes.coreml import CLASS_LABEL_NAME, METADATA_PREFIX, OUTPUT_NAME, operations
from edgevit.targets.base import ExportResult, PrecheckResult
from edgevit.quant import pt2e
from edgevit.quant.spec import QuantSpec

INPUT_NAME, IMAGE_INPUT_NAME = "input", "image"
FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
FP16_TINY = float(torch.finfo(torch.float16).tiny)  # smallest normal float16, 6.1e-5
PIXEL_SCALE = 1.0 / 255.0

# W8: weight tensors of more elements than this become int8 (coremltools' own default: the
# small ones, e.g. depthwise kernels, save little and are the most sensitive).
W8_WEIGHT_THRESHOLD = 2048
_W8_OP_TYPES = ("conv", "linear")
# int8 programs need iOS 17 / macOS 14 for activation quantize/dequantize ops.
_W8A8_TARGETS = ("iOS17", "iOS18", "macOS14", "macOS15")

# What each pre-check calls itself (verification's "check", inspect's note).
FP32_PRECHECK = "fp32 pre-check: converted torch.export program vs eager deploy model (PyTorch)"
FP16_PRECHECK = "fp16 numerics pre-check (PyTorch float16 emulation)"
W8_PRECHECK = "W8 pre-check: the ML program's int8 weights, float16 emulation (PyTorch)"
W8A8_PRECHECK = "W8A8 pre-check: the converted PT2E int8 program, float16 emulation (PyTorch)"


@dataclass
class _Int8Program:
    """What an int8 export converted, for its pre-check."""

    mode: str  # "w8" or "w8a8"
    facts: dict[str, Any]  # int8 contents of the ML program (see int8_facts)
    graph: torch.fx.GraphModule | None = None  # W8A8: the converted PT2E program
    weights: dict[str, torch.Tensor] | None = None  # W8: dequantized int8 weights by parameter name


# ---------------------------------------------------------------------------------------- export

def export(model: nn.Module, example: torch.Tensor, precision: str, options: dict[str, Any], out_dir: Path,
           quant: QuantSpec | None = None) -> ExportResult:
    cfg = model.cfg
    labels = _read_labels(options["labels_file"], cfg.num_classes)
    ct = _coremltools()
    int8_mode = _int8_mode(precision, quant, options["deployment_target"])
    image_input = bool(options["image_input"])
    inv_std = _inverse_std(cfg.std) if image_input else None
    quantized = pt2e.quantize(model, example, quant) if int8_mode == "w8a8" else None
    core = quantized.graph_module if quantized else model
    module = _DivideByStd(core, inv_std) if inv_std is not None else core
    # The program sees what the ImageType hands over, pixel/255 − mean, i.e. example · std.
    sample = example * torch.tensor(cfg.std).view(1, -1, 1, 1) if image_input else example

    with quiet():
        program = torch.export.export(module, (sample.contiguous(),)).run_decompositions({})
        if image_input:
            scale, bias = image_scale_bias(cfg.mean)
            inputs = [ct.ImageType(name=IMAGE_INPUT_NAME, shape=tuple(sample.shape), scale=scale, bias=bias,
                                   color_layout=ct.colorlayout.RGB)]
        else:
            inputs = [ct.TensorType(name=INPUT_NAME, shape=tuple(sample.shape), dtype=np.float32)]
        mlmodel = ct.convert(
            program,
            inputs=inputs,
            outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
            classifier_config=ct.ClassifierConfig(labels, predicted_feature_name=CLASS_LABEL_NAME) if labels else None,
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
            minimum_deployment_target=getattr(ct.target, options["deployment_target"]),
            # Loading compiles the model with the Core ML framework, which exists only on Apple
            # systems; edgevit.runtimes.coreml loads the saved package there instead.
            skip_model_load=True,
            pass_pipeline=_pass_pipeline(ct, int8_mode),
        )
    evidence: dict[str, Any] = {}
    if precision == "fp32":
        evidence["program"] = (program, torch.tensor(cfg.std).view(1, -1, 1, 1) if image_input else None)
    quantization: dict[str, Any] = {}
    if int8_mode == "w8":
        mlmodel, quantization, weights = _quantize_weights(mlmodel, program, quant, model)
        evidence["int8"] = _Int8Program("w8", int8_facts(mlmodel.get_spec()), weights=weights)
    elif int8_mode == "w8a8":
        quantization = quantized.details
        evidence["int8"] = _Int8Program("w8a8", int8_facts(mlmodel.get_spec()), graph=quantized.graph_module)

    _describe(mlmodel, cfg, precision, image_input, labels)
    path = out_dir / f"{cfg.name}.mlpackage"
    with quiet():
        mlmodel.save(str(path))

    spec = mlmodel.get_spec()
    details: dict[str, Any] = {
        "source": ("PT2E int8 program (edgevit.quant.pt2e) → " if int8_mode == "w8a8" else "")
        + "torch.export + run_decompositions({}) → coremltools ML program"
        + (" → linear_quantize_weights (int8)" if int8_mode == "w8" else ""),
        "deployment_target": options["deployment_target"],
        "compute_precision": "fp16" if int8_mode else precision,
        "specification_version": spec.specificationVersion,
        "compiled": False,  # Core ML compiles the package when it is first loaded on a device
    }
    details.update(program_facts(spec))
    if int8_mode:
        details["int8"] = {"scheme": "W8 (int8 weights, float16 activations)" if int8_mode == "w8"
                           else "W8A8 (int8 weights and activations)", **evidence["int8"].facts}
        details["quantization"] = quantization
    if image_input:
        scale, bias = image_scale_bias(cfg.mean)
        details["input"] = {"name": IMAGE_INPUT_NAME, "kind": "image", "color": "RGB", "pixel_range": [0, 255],
                            "shape": list(sample.shape)}
        details["image_preprocessing"] = {
            "pixels": "RGB, 0-255", "scale": scale, "bias": bias,
            "in_model_multiply": None if inv_std is None else inv_std.flatten().tolist(),
            "formula": "(scale * pixel + bias[c]) * in_model_multiply[c] = (pixel/255 - mean[c]) / std[c]",
        }
    if labels:
        details["labels"] = {"embedded": True, "count": len(labels), "source": Path(options["labels_file"]).name,
                             "note": f"{CLASS_LABEL_NAME}_probs holds the logits (no softmax)"}
    else:
        details["labels"] = {"embedded": False, "note": _labels_note(cfg.labels)}
    return ExportResult(path, details, evidence)


def _pass_pipeline(ct, int8_mode: str | None):
    """coremltools' default passes; for W8A8 without ``fuse_linear_bias``, which crashes on a
    linear with one output followed by a scalar add (coremltools 9: ``bias.shape[-1]`` of a
    scalar) — the mean of a decomposed LayerNorm plus eps, in QAT programs made for XNNPACK.
    PT2E programs' linears carry their bias already, so the pass has nothing to fuse there."""
    if int8_mode != "w8a8":
        return None  # ct.convert's own default
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(["common::fuse_linear_bias"])
    return pipeline


def _int8_mode(precision: str, quant: QuantSpec | None, deployment_target: str) -> str | None:
    """"w8" (dynamic), "w8a8" (static, qat) or None (float precisions); checks the combination."""
    if precision != "int8":
        return None
    if quant is None:
        raise EdgevitError("int8 export needs a quantization spec (edgevit.quant.spec.QuantSpec)")
    if quant.mode == "dynamic":
        return "w8"
    if deployment_target not in _W8A8_TARGETS:
        raise EdgevitError(f"8-bit activations (int8 {quant.mode}) need Core ML's quantize/dequantize ops, from "
                           f"iOS17/macOS14 on, not {deployment_target}: raise --deployment-target or use dynamic (W8)")
    return "w8a8"


def _quantize_weights(mlmodel, program: torch.export.ExportedProgram, quant: QuantSpec, model: nn.Module):
    """W8: int8 conv/linear weights in the ML program. Returns the new model, its quantization
    details and the dequantized int8 weights by parameter name (what the pre-check runs)."""
    import coremltools.optimize.coreml as cto

    parameter_of = _parameter_names(program)
    float_names = quant.float_module_names(model)
    kept_float: list[str] = []
    op_name_configs: dict[str, Any] = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        weight = op.inputs.get("weight") if op.op_type in _W8_OP_TYPES else None
        parameter = parameter_of.get(_source_name(weight.name)) if weight is not None else None
        if parameter and any(parameter == f"{m}.weight" or parameter.startswith(f"{m}.") for m in float_names):
            op_name_configs[op.name] = None
            kept_float.append(parameter)
    config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                         granularity="per_channel" if quant.per_channel else "per_tensor",
                                         weight_threshold=W8_WEIGHT_THRESHOLD)
    with quiet():
        quantized = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(
            op_type_configs={op_type: config for op_type in _W8_OP_TYPES}, op_name_configs=op_name_configs))
    weights = dequantized_weights(quantized._mil_program, parameter_of)
    details = {
        "quantizer": "coremltools.optimize.coreml.linear_quantize_weights",
        "mode": "dynamic",
        "weights": f"int8 symmetric, {'per output channel' if quant.per_channel else 'per tensor'}, conv and linear "
                   f"weights of more than {W8_WEIGHT_THRESHOLD} elements",
        "activations": "float16 (not quantized)",
        "float_modules": float_names,
        "float_weights": sorted(kept_float),
        "not_applicable": {"float_ops": "W8 quantizes weights only; every op computes in float16"} if quant.float_ops else {},
    }
    return quantized, details, weights


def dequantized_weights(mil_program, parameter_of: dict[str, str]) -> dict[str, torch.Tensor]:
    """The compressed (constexpr) weights of a MIL program, dequantized, by the parameter name
    ``parameter_of`` (:func:`_parameter_names`) gives their placeholder."""
    weights: dict[str, torch.Tensor] = {}
    for op in mil_program.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            parameter = parameter_of.get(_source_name(op.name))
            if parameter is not None:
                weights[parameter] = torch.from_numpy(np.asarray(op.materialized_val_inference(), dtype=np.float32))
    return weights


def _parameter_names(program: torch.export.ExportedProgram) -> dict[str, str]:
    """torch.export placeholder name → the module's parameter name (as the ML program's consts
    are named after the placeholder), without the image-input wrapper's ``model.`` prefix."""
    names = {}
    for spec in program.graph_signature.input_specs:
        if spec.target:
            target = spec.target[len("model."):] if spec.target.startswith("model.") else spec.target
            names[spec.arg.name] = target
    return names


def _source_name(mil_name: str) -> str:
    """The placeholder a const of the ML program comes from (coremltools appends what it did)."""
    for suffix in ("_quantized", "_to_fp16"):
        if mil_name.endswith(suffix):
            mil_name = mil_name[: -len(suffix)]
    return mil_name


class _DivideByStd(nn.Module):
    """The model behind an ImageType that already applied 1/255 and −mean: divides by std."""

    def __init__(self, model: nn.Module, inv_std: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("inv_std", inv_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.inv_std)


def image_scale_bias(mean: tuple[float, ...]) -> tuple[float, list[float]]:
    """ImageType's scalar scale and per-channel bias for 0–255 pixels: pixel/255 − mean."""
    return PIXEL_SCALE, [0.0 - float(m) for m in mean]  # 0.0 - m: no -0.0 in the manifest


def _inverse_std(std: tuple[float, ...]) -> torch.Tensor | None:
    if all(s == 1.0 for s in std):
        return None
    return torch.tensor([1.0 / s for s in std], dtype=torch.float32).view(1, -1, 1, 1)


def _read_labels(labels_file: str, num_classes: int) -> list[str] | None:
    if not labels_file:
        return None
    try:
        lines = Path(labels_file).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EdgevitError(f"cannot read labels file {labels_file}: {exc.strerror or exc}; "
                           "give a text file with one label per line") from None
    labels = [line.strip() for line in lines]
    while labels and not labels[-1]:
        labels.pop()
    if len(labels) != num_classes or not all(labels):
        raise EdgevitError(
            f"labels file {labels_file} has {len(labels)} lines (blank ones included) but the model has "
            f"{num_classes} classes; give exactly one non-empty label per class, in class order"
        )
    if len(set(labels)) != len(labels):
        raise EdgevitError(f"labels file {labels_file} repeats a label; Core ML classifier labels must be unique")
    return labels


def _labels_note(labels: str | None) -> str:
    if labels is None:
        return "the model has no named label set; output is logits"
    return (f"the {labels} label names are not bundled with edgevit or its dependencies, so none were embedded; "
            f"output is logits (give --labels-file to embed them as a Core ML classifier)")


def _describe(mlmodel, cfg, precision: str, image_input: bool, labels: list[str] | None) -> None:
    """Metadata Xcode shows, and what edgevit.runtimes.coreml needs to feed the model correctly."""
    mlmodel.short_description = f"{cfg.name} ({cfg.family}) image classifier, {cfg.num_classes} classes, {precision} compute"
    _, height, width = cfg.input_size
    if image_input:
        mlmodel.input_description[IMAGE_INPUT_NAME] = (
            f"RGB image {width}x{height}, pixel values 0-255 (resize the short side by 1/{cfg.crop_pct:g}, "
            f"{cfg.interpolation}, then centre-crop); normalisation is inside the model")
    else:
        mlmodel.input_description[INPUT_NAME] = (
            f"float32 NCHW 1x3x{height}x{width}: RGB in [0, 1], minus mean {list(cfg.mean)}, divided by std {list(cfg.std)}")
    if labels:
        mlmodel.output_description[CLASS_LABEL_NAME] = "the class with the largest logit"
        mlmodel.output_description[f"{CLASS_LABEL_NAME}_probs"] = "logits per class (no softmax)"
    else:
        mlmodel.output_description[OUTPUT_NAME] = f"logits, {cfg.num_classes} classes"
    metadata = {"model": cfg.name, "precision": precision, "mean": json.dumps(list(cfg.mean)),
                "std": json.dumps(list(cfg.std)), "image_input": json.dumps(image_input),
                "version": edgevit.__version__}
    for key, value in metadata.items():
        mlmodel.user_defined_metadata[METADATA_PREFIX + key] = str(value)


# ------------------------------------------------------------------------ ML program inspection

def program_facts(spec) -> dict[str, Any]:
    """What the saved ML program contains: I/O, op counts, and the dtype each op computes in."""
    from coremltools.proto import MIL_pb2

    function = spec.mlProgram.functions["main"]
    ops = list(operations(function.block_specializations[function.opset]))
    counts = collections.Counter(op.type for op in ops if op.type != "const")
    compute_dtypes: collections.Counter[str] = collections.Counter()
    weight_dtypes: collections.Counter[str] = collections.Counter()
    float32_ops: collections.Counter[str] = collections.Counter()
    for op in ops:
        if not op.outputs or not op.outputs[0].type.HasField("tensorType"):
            continue
        tensor = op.outputs[0].type.tensorType
        dtype = MIL_pb2.DataType.Name(tensor.dataType).lower()
        if op.type == "const":
            if dtype.startswith("float") and _numel(tensor) > 1:
                weight_dtypes[dtype] += 1
        elif dtype.startswith("float"):
            compute_dtypes[dtype] += 1
            if dtype == "float32" and op.type != "cast":
                float32_ops[op.type] += 1
    return {
        "inputs": [_feature(f) for f in spec.description.input],
        "outputs": [_feature(f) for f in spec.description.output],
        "opset": function.opset,
        "ops": sum(counts.values()),
        "op_counts": dict(sorted(counts.items())),
        "compute_dtypes": dict(sorted(compute_dtypes.items())),  # non-const ops by output dtype
        "float32_compute_ops": dict(sorted(float32_ops.items())),  # casts excluded
        "weight_dtypes": dict(sorted(weight_dtypes.items())),  # const tensors by dtype
    }


def int8_facts(spec) -> dict[str, Any]:
    """What an ML program holds in 8 bits: weight tensors stored as int8/uint8 (constexpr ops, or
    int8 consts that one dequantizes), and its activation quantize/dequantize ops."""
    from coremltools.proto import MIL_pb2

    function = spec.mlProgram.functions["main"]
    ops = list(operations(function.block_specializations[function.opset]))
    const_dtypes = {}
    for op in ops:
        if op.type == "const" and op.outputs and op.outputs[0].type.HasField("tensorType"):
            const_dtypes[op.outputs[0].name] = MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType).lower()

    def stored_dtype(op) -> str | None:
        for key in ("quantized_data", "data", "indices"):
            if key in op.attributes and op.attributes[key].type.HasField("tensorType"):
                return MIL_pb2.DataType.Name(op.attributes[key].type.tensorType.dataType).lower()
            if key in op.inputs and op.inputs[key].arguments:
                return const_dtypes.get(op.inputs[key].arguments[0].name)
        return None

    stored = collections.Counter(stored_dtype(op) or "unknown" for op in ops if op.type.startswith("constexpr_"))
    counts = collections.Counter(op.type for op in ops)
    return {
        "int8_weight_tensors": stored.get("int8", 0) + stored.get("uint8", 0),
        "compressed_weight_storage": dict(sorted(stored.items())),
        "quantize_ops": counts.get("quantize", 0),
        "dequantize_ops": counts.get("dequantize", 0),
    }


def _numel(tensor) -> int:
    return math.prod(d.constant.size for d in tensor.dimensions) if tensor.dimensions else 1


def _feature(feature) -> dict[str, Any]:
    kind = feature.type.WhichOneof("Type")
    described: dict[str, Any] = {"name": feature.name, "type": kind}
    if kind == "multiArrayType":
        array = feature.type.multiArrayType
        described["shape"] = list(array.shape)
        described["dtype"] = type(array).ArrayDataType.Name(array.dataType).lower()
    elif kind == "imageType":
        image = feature.type.imageType
        described["shape"] = [image.height, image.width]
        described["color_space"] = type(image).ColorSpace.Name(image.colorSpace)
    return described


# ------------------------------------------------------------------------- numerics pre-check

def precheck(result: ExportResult | None, model: nn.Module, example: torch.Tensor, precision: str) -> PrecheckResult:
    """The next best check where Core ML cannot run (see the module doc); ``result`` is what
    export() returned for ``model`` (int8 needs it; fp32 re-exports without it).

    fp16: the deploy model with float16 weights and every op's output rounded to float16 —
    float16 storage with float32 accumulation inside ops, the best case for the Neural Engine
    and GPU — against float32; GroupNorm, which coremltools lowers to reduce_mean, square, sqrt …,
    runs as those float16 steps. Notes name intermediates beyond the float16 range (found on
    every ATen op, so QKᵀ inside an attention module is seen too, and GroupNorm's square(x − mean)),
    LayerNorm inputs whose mean square overflows float16 (a risk: Core ML's layer_norm does not
    say how it computes), and the modules with the largest op-local error.

    fp32: the decomposed torch.export program that coremltools converted, run in PyTorch,
    against the eager deploy model; the ML program's own float32 arithmetic cannot be run here.
    """
    with one_thread(), torch.no_grad():
        evidence = result.evidence if result is not None else {}
        if precision == "int8":
            return _precheck_int8(model, example, evidence.get("int8"))
        if precision == "fp16":
            return _precheck_fp16(model, example)
        return _precheck_fp32(model, example, evidence.get("program"))


@contextlib.contextmanager
def one_thread():
    """PyTorch on one thread: the probes do Python work between a few thousand small ops, where a
    second thread gains little and, on a busy machine, stalls every op waiting for its core
    (measured: 0.7 s single-threaded vs 24 s with two threads for edgevit_xxs next to another job)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _precheck_int8(model: nn.Module, example: torch.Tensor, program: _Int8Program | None) -> PrecheckResult:
    """int8: what the ML program holds, run in PyTorch with float16 outputs (see the module doc)."""
    if program is None:
        raise EdgevitError("the int8 pre-check runs what export() converted: pass the ExportResult of an int8 export")
    facts = program.facts
    failures = []
    if not facts["int8_weight_tensors"]:
        failures.append("the ML program holds no int8 weights")
    if program.mode == "w8a8" and not (facts["quantize_ops"] and facts["dequantize_ops"]):
        failures.append("the ML program holds no activation quantize/dequantize ops")
    contents = (f"ML program contents: {facts['int8_weight_tensors']} int8 weight tensors, "
                f"{facts['quantize_ops']} quantize and {facts['dequantize_ops']} dequantize ops")
    reference = model(example)
    if program.mode == "w8":
        emulated, replaced = _with_weights(model, program.weights)
        result = _precheck_fp16(emulated, example)
        notes = [contents, f"the deploy model with the {replaced} int8 weights read back from the ML program "
                           "(dequantized), in float16 emulation, against the float32 deploy model", *result.notes]
        return PrecheckResult(name=W8_PRECHECK,
                              reference=reference.numpy(), candidate=result.candidate, notes=notes,
                              failures=failures + result.failures)
    with float16_emulation(program.graph) as rounding:
        candidate = pt2e.run_graph(program.graph, _to_float16_values(example))
    notes = [contents, "the PT2E int8 program that was converted (quantize/dequantize as PyTorch defines them, "
                       "int8 weights), every float op's output rounded to float16, against the float32 deploy model"]
    if rounding.first_non_finite:
        notes.append(f"NaN/Inf first appears in float16 at {rounding.first_non_finite}")
    return PrecheckResult(name=W8A8_PRECHECK,
                          reference=reference.numpy(), candidate=candidate.numpy(), notes=notes, failures=failures)


def _with_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> tuple[nn.Module, int]:
    """A copy of ``model`` with the given parameters replaced (shapes as the model's own)."""
    import copy

    emulated = copy.deepcopy(model)
    state = emulated.state_dict()
    for name, value in weights.items():
        if name not in state or state[name].numel() != value.numel():
            raise EdgevitError(f"the ML program's int8 weight {name} {tuple(value.shape)} matches no parameter of "
                               f"{type(model).__name__}; cannot pre-check it")
        state[name].copy_(value.reshape(state[name].shape))
    return emulated, len(weights)


def _precheck_fp32(model: nn.Module, example: torch.Tensor, exported=None) -> PrecheckResult:
    if exported is None:
        with quiet():
            exported = (torch.export.export(model, (example[:1],)).run_decompositions({}), None)
    program, std = exported
    graph = program.module()
    reference = model(example)
    feed = example * std if std is not None else example
    candidate = torch.cat([graph(feed[i:i + 1]) for i in range(len(feed))])
    return PrecheckResult(
        name=FP32_PRECHECK,
        reference=reference.numpy(), candidate=candidate.numpy(),
        notes=["compares the decomposed ATen program handed to ct.convert with the eager model; "
               "the ML program itself runs only in Core ML (macOS)"],
    )


def _precheck_fp16(model: nn.Module, example: torch.Tensor) -> PrecheckResult:
    names = _ModuleStack(model)
    try:
        probe = _Float32Probe(names)
        with probe:
            reference = model(example)
        emulated = _float16_copy(model)
        with float16_emulation(emulated) as rounding:
            candidate = emulated(_to_float16_values(example))
    finally:
        names.remove()
    notes = ["fp16 emulation in PyTorch: float16 weights, every op's output rounded to float16 (GroupNorm "
             "step by step as coremltools lowers it), float32 accumulation inside ops (Core ML's own kernels "
             "may accumulate in float16)"]
    notes += probe.notes()
    if rounding.first_non_finite:
        notes.append(f"NaN/Inf first appears in float16 at {rounding.first_non_finite}")
    return PrecheckResult(name=FP16_PRECHECK,
                          reference=reference.numpy(), candidate=candidate.numpy(), notes=notes,
                          failures=probe.failures())


def _float16_copy(model: nn.Module) -> nn.Module:
    """A copy whose float parameters and buffers hold float16-representable float32 values."""
    import copy

    emulated = copy.deepcopy(model)
    for tensor in [*emulated.parameters(), *emulated.buffers()]:
        if tensor.dtype == torch.float32:
            tensor.data = tensor.data.to(torch.float16).to(torch.float32)
    return emulated


@contextlib.contextmanager
def float16_emulation(module: nn.Module):
    """Runs of ``module`` (an eager model, a GraphModule) inside this block compute as Core ML's
    float16 program: every op's output rounded to float16 (:class:`_Float16Rounding`, which it
    yields, naming where NaN/Inf first appeared). Weights and inputs are the caller's to round
    (:func:`_float16_copy`, :func:`_to_float16_values`)."""
    names = _ModuleStack(module)
    try:
        with _Float16Rounding(names) as rounding:
            yield rounding
    finally:
        names.remove()


class _ModuleStack:
    """The dotted name of the innermost module running, kept by hooks on every module."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            label = f"{name} ({type(module).__name__})" if name else type(module).__name__
            self.handles.append(module.register_forward_pre_hook(lambda _m, _a, label=label: self._enter(label)))
            self.handles.append(module.register_forward_hook(lambda _m, _a, _o: self._leave()))

    def _enter(self, label: str) -> None:
        self.stack.append(label)

    def _leave(self) -> None:  # a hook that returned a value would replace the module's output
        self.stack.pop()

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else "<top>"

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _is_float32(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32


def _float32_outputs(out: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    tree_map(lambda v: found.append(v) if _is_float32(v) and v.numel() else None, out)
    return found


def _to_float16_values(value: Any) -> Any:
    return value.to(torch.float16).to(torch.float32) if _is_float32(value) else value


def _run_as_lowered(func, args: tuple, kwargs: dict) -> Any:
    """An ATen op, or for GroupNorm the float16 steps coremltools lowers it to."""
    if _op_name(func) == "aten.native_group_norm":
        return _group_norm_like_coremltools(args)
    return func(*args, **kwargs)


class _Float16Rounding(TorchDispatchMode):
    """Rounds every float32 op output to float16 in place (values beyond 65504 become ±inf);
    GroupNorm runs as the float16 steps coremltools lowers it to."""

    def __init__(self, names: _ModuleStack) -> None:
        super().__init__()
        self.names = names
        self.first_non_finite: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = _run_as_lowered(func, args, kwargs or {})
        if getattr(func, "is_view", False):
            return out  # shares storage with an already rounded tensor
        for tensor in _float32_outputs(out):
            tensor.copy_(tensor.to(torch.float16))
            if self.first_non_finite is None and not _all_finite(tensor):
                self.first_non_finite = f"{self.names.current} ({_op_name(func)})"
        return out


class _Float32Probe(TorchDispatchMode):
    """Watches a float32 run: values beyond float16's range, norm statistics beyond it, and each
    op's own float16 error (the op rerun on float16-rounded inputs, its output rounded)."""

    def __init__(self, names: _ModuleStack) -> None:
        super().__init__()
        self.names = names
        self.largest = (0.0, "")
        self.overflows: dict[str, float] = {}
        self.norm_risks: dict[str, float] = {}
        self.errors: dict[str, tuple[float, str, float]] = {}  # module → (error, op, max |x|)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "is_view", False):
            return out
        outputs = _float32_outputs(out)
        if not outputs:
            return out
        where, op = self.names.current, _op_name(func)
        for tensor in outputs:
            peak = _peak(tensor)
            if peak > self.largest[0]:
                self.largest = (peak, f"{where} ({op})")
            if peak > FP16_MAX:
                key = f"{where} ({op})"
                self.overflows[key] = max(peak, self.overflows.get(key, 0.0))
        if op == "aten.native_group_norm":
            # coremltools lowers GroupNorm to reduce_mean/sub/square/…: an explicit float16 tensor.
            grouped = _grouped(args)
            square = float((grouped - grouped.mean(-1, keepdim=True)).square().max())
            if square > FP16_MAX:
                key = f"{where} (square(x - mean) of GroupNorm in Core ML)"
                self.overflows[key] = max(square, self.overflows.get(key, 0.0))
        elif op == "aten.native_layer_norm":
            # One Core ML op whose internal precision is not documented: its statistics may be float16.
            square = _layer_norm_mean_square(args)
            if square > FP16_MAX:
                self.norm_risks[f"{where} ({op})"] = square
        if any(_is_float32(a) for a in (*args, *kwargs.values())) and not op.endswith("_"):
            rerun = _run_as_lowered(func, tree_map(_to_float16_values, args), tree_map(_to_float16_values, kwargs))
            reran = _float32_outputs(rerun)
            if len(reran) == len(outputs):
                error = max(_relative_error(r.to(torch.float16).to(torch.float32), o) for r, o in zip(reran, outputs))
                if error > self.errors.get(where, (-1.0, "", 0.0))[0]:
                    self.errors[where] = (error, op, max(_peak(o) for o in outputs))
        return out

    def failures(self) -> list[str]:
        """Definite float16 overflows fail verification even where the outputs survive them."""
        if not self.overflows:
            return []
        worst = max(self.overflows.items(), key=lambda kv: kv[1])
        return [f"{len(self.overflows)} intermediate(s) overflow float16, worst {worst[0]} at {worst[1]:.3g}"]

    def notes(self) -> list[str]:
        notes = []
        if self.overflows:
            worst = sorted(self.overflows.items(), key=lambda kv: -kv[1])
            listed = "; ".join(f"{name} max |x| {peak:.3g}" for name, peak in worst[:5])
            notes.append(f"OVERFLOW: {len(worst)} intermediate(s) beyond the float16 range ({FP16_MAX:g}): {listed}")
        else:
            notes.append(f"no intermediate beyond the float16 range; largest |x| {self.largest[0]:.3g} at {self.largest[1]}")
        if self.norm_risks:
            worst = sorted(self.norm_risks.items(), key=lambda kv: -kv[1])
            listed = "; ".join(f"{name} mean square {value:.3g}" for name, value in worst[:5])
            notes.append(f"OVERFLOW RISK: normalisation statistics beyond float16 if computed in float16: {listed}")
        ranked = sorted(self.errors.items(), key=lambda kv: -kv[1][0])
        normal = [(name, error, op) for name, (error, op, peak) in ranked if peak >= FP16_TINY]
        tiny = [(name, error, op) for name, (error, op, peak) in ranked if peak < FP16_TINY]
        if normal:
            listed = "; ".join(f"{name} {op} {error:.2e}" for name, error, op in normal[:5])
            notes.append(f"largest op-local float16 relative error by module (top 5): {listed}")
        if tiny:
            listed = "; ".join(f"{name} {op} {error:.2e}" for name, error, op in tiny[:3])
            notes.append(f"float16 underflow: {len(tiny)} module(s) whose values all lie below {FP16_TINY:.2g} "
                         f"(subnormal or zero in float16), largest errors: {listed}")
        return notes


def _op_name(func) -> str:
    return str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)


def _relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    if not _all_finite(candidate):
        return math.inf
    return float(torch.linalg.vector_norm(candidate - reference)) / max(float(torch.linalg.vector_norm(reference)), 1e-30)


def _peak(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor, ord=math.inf))


def _all_finite(tensor: torch.Tensor) -> bool:
    # One reduction instead of isfinite().all(): a sum of float16-range values cannot overflow
    # float32, so it is finite exactly when every element is.
    return bool(torch.isfinite(tensor.sum()))


def _layer_norm_mean_square(args: tuple) -> float:
    """native_layer_norm(input, normalized_shape, …): the largest mean of x² over a normalised row,
    what a float16 variance computed as E[x²] − E[x]² overflows on."""
    x = args[0].double()
    return float(x.reshape(-1, math.prod(args[1])).square().mean(-1).max())


def _grouped(args: tuple) -> torch.Tensor:
    """native_group_norm(input, weight, bias, N, C, HxW, group, eps): input as (N, group, -1)."""
    return args[0].reshape(args[3], args[6], -1)


def _group_norm_like_coremltools(args: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm as coremltools lowers it (reduce_mean, sub, square, reduce_mean, add, sqrt,
    real_div, mul, add), each result rounded to float16; returns native_group_norm's outputs."""
    x, weight, bias, n, channels, _, groups, eps = args

    def fp16(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float16).to(torch.float32)

    grouped = _grouped(args)
    mean = fp16(grouped.mean(-1, keepdim=True))
    centred = fp16(grouped - mean)
    std = fp16(torch.sqrt(fp16(fp16(fp16(centred.square()).mean(-1, keepdim=True)) + eps)))
    out = fp16(centred / std).reshape(x.shape)
    affine = (1, channels) + (1,) * (x.dim() - 2)
    if weight is not None:
        out = fp16(out * weight.reshape(affine))
    if bias is not None:
        out = fp16(out + bias.reshape(affine))
    return out, mean.reshape(n, groups), fp16(1.0 / std).reshape(n, groups)


# --------------------------------------------------------------------------------------- quiet

_COREMLTOOLS = None


def _coremltools():
    """coremltools, imported once without its import-time warnings (missing macOS-only parts,
    untested torch/scikit-learn versions)."""
    global _COREMLTOOLS
    if _COREMLTOOLS is None:
        with quiet():
            import coremltools

        _COREMLTOOLS = coremltools
    return _COREMLTOOLS


