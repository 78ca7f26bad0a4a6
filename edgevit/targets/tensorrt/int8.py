"""Explicit int8 for TensorRT: Q/DQ nodes placed in a float32 ONNX graph the way TensorRT fuses them.

TensorRT ≥ 10 builds int8 from QuantizeLinear/DequantizeLinear pairs in a strongly typed network
(11 has no other way). Its fusions decide where the pairs belong (TensorRT developer guide,
"Q/DQ layer-placement recommendations"), and :func:`plan_qdq` follows them:

- **weighted ops** — Conv, ConvTranspose, Gemm, and MatMul with a constant B: Q/DQ on the
  activation input (per tensor) and on the weights (int8 initializer → DequantizeLinear, per
  output channel with ``per_channel``), never on the output. The consumer's input Q/DQ becomes
  the fused op's int8 output, and activations after the op (GELU, Hardswish, SiLU) run in its
  epilogue, so they get no Q/DQ of their own whatever ``float_ops`` says.
- **attention matmuls** (``attention_matmul``) — activation × activation MatMul: Q/DQ on both
  inputs, unless one reads a softmax kept in float (int8 would zero its small probabilities, and
  a matmul with one float input is no int8 matmul).
- **residual adds** (``residual_add``) — ``Add(skip, branch)`` where ``skip`` is an ancestor of
  ``branch`` and ``branch`` comes straight (through reshapes and a bias add) from a quantized
  weighted op:
  Q/DQ on ``skip`` only, which lets TensorRT fuse the add into that op's epilogue with an int8
  residual input ("xf1" in NVIDIA's guide); the branch keeps no Q/DQ.
- **norm / softmax / pooling / attention_bias_add** — in float unless the spec leaves the kind
  out of ``float_ops``; then Q/DQ on the op's activation input.

Nodes of modules matched by ``float_modules`` get no Q/DQ at all. Activations are symmetric int8
(zero point 0, scale = amax/127) with amax from onnxruntime's calibrators (``QuantSpec.method``)
on ``QuantSpec.calibration``; weights are symmetric int8 in [-127, 127].
"""
from __future__ import annotations

import collections
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edgevit.core.errors import EdgevitError
from edgevit.core.quiet import quiet
from edgevit.quant.onnx_graph import (SHAPE_ONLY_OPS, OnnxGraph, attribute, calibrated_ranges,
                                        channel_axis, in_modules)
from edgevit.quant.spec import QuantSpec

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
NORM_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization")
POOLING_OPS = ("AveragePool", "GlobalAveragePool", "MaxPool", "GlobalMaxPool")
LAYOUT_OPS = (*SHAPE_ONLY_OPS, "Transpose", "Slice", "Split")  # change no value
INT8_MAX = 127

# Why an activation tensor is quantized for a consumer (QuantizedInput.rule).
RULE_WEIGHTED_INPUT = "weighted-op input"
RULE_ATTENTION_MATMUL = "attention matmul input"
RULE_RESIDUAL_SKIP = "residual add skip input"
RULE_OP_INPUT = "{kind} input"  # norm / softmax / pooling / attention_bias_add not kept in float


@dataclass(frozen=True)
class QuantizedInput:
    node: str
    index: int  # which input of the node reads the dequantized tensor
    tensor: str
    rule: str


@dataclass(frozen=True)
class QuantizedWeight:
    node: str
    index: int
    initializer: str
    axis: int | None  # per-channel axis; None: one scale for the tensor


@dataclass
class Placement:
    """Where the Q/DQ pairs go, and which weighted ops stay float (``float_modules``)."""

    inputs: list[QuantizedInput] = field(default_factory=list)
    weights: list[QuantizedWeight] = field(default_factory=list)
    float_weighted: list[str] = field(default_factory=list)

    @property
    def tensors(self) -> list[str]:
        return sorted({q.tensor for q in self.inputs})


class _QdqGraph(OnnxGraph):
    """The look-ups the placement rules need beyond the shared ones."""

    def is_attention_logits(self, tensor: str) -> bool:
        """Computed by an activation × activation MatMul (q·kᵀ), through reshapes and a constant scale."""
        node = self.producer.get(tensor)
        while node is not None and (node.op_type in SHAPE_ONLY_OPS or
                                    (node.op_type in ("Mul", "Div") and self.is_constant(node.input[1]))):
            node = self.producer.get(node.input[0])
        return (node is not None and node.op_type == "MatMul"
                and not any(self.is_constant(name) for name in node.input))

    def linear_source(self, tensor: str):
        """The op computing ``tensor`` through reshapes and a constant bias add (a linear layer
        with a free batch dimension exports as MatMul + Add)."""
        node = self.source_op(tensor)
        if node is not None and node.op_type == "Add" and any(self.is_constant(name) for name in node.input):
            node = self.source_op(next(name for name in node.input if not self.is_constant(name)))
        return node


def _weight_axis(node, weight, per_channel: bool) -> int | None:
    """The output-channel axis of a weighted op's weight (None: per-tensor)."""
    if not per_channel:
        return None
    if node.op_type == "ConvTranspose":
        # (Cin, Cout/g, kh, kw): per output channel is axis 1, which a grouped (depthwise)
        # transposed conv does not have whole; one scale keeps it valid for TensorRT.
        return 1 if attribute(node, "group", 1) == 1 else None
    return channel_axis(node, len(weight.dims))


def plan_qdq(model, spec: QuantSpec, float_module_names: Iterable[str] = ()) -> Placement:
    """Where TensorRT wants Q/DQ in ``model`` (an ONNX ModelProto from the TorchScript
    exporter) under ``spec``; see the module doc for the rules."""
    graph = _QdqGraph(model)
    float_modules = frozenset(float_module_names)
    keep_float = set(spec.float_ops)
    placement = Placement()
    quantized_weighted: set[str] = set()

    def quantize_input(node, index: int, rule: str) -> None:
        tensor = node.input[index]
        if tensor and not graph.is_constant(tensor):
            placement.inputs.append(QuantizedInput(node.name, index, tensor, rule))

    for node in model.graph.node:
        in_float_module = in_modules(node.name, float_modules)
        if node.op_type in WEIGHTED_OPS:
            weight_name = node.input[1] if len(node.input) > 1 else ""
            has_constant_weight = weight_name in graph.initializers
            if node.op_type == "MatMul" and not has_constant_weight:
                # A softmax kept in float hands the matmul float probabilities (int8 would zero the
                # small ones); a matmul with one float input is no int8 matmul, so both stay float.
                reads_float_softmax = "softmax" in keep_float and any(
                    (source := graph.source_op(name, LAYOUT_OPS)) is not None and source.op_type == "Softmax"
                    for name in node.input)
                if "attention_matmul" not in keep_float and not in_float_module and not reads_float_softmax:
                    quantize_input(node, 0, RULE_ATTENTION_MATMUL)
                    quantize_input(node, 1, RULE_ATTENTION_MATMUL)
                continue
            if not has_constant_weight:
                continue  # a conv with a computed weight: TensorRT has no int8 for it
            if in_float_module:
                placement.float_weighted.append(node.name)
                continue
            quantize_input(node, 0, RULE_WEIGHTED_INPUT)
            weight = graph.initializers[weight_name]
            placement.weights.append(QuantizedWeight(node.name, 1, weight_name,
                                                     _weight_axis(node, weight, spec.per_channel)))
            quantized_weighted.add(node.name)
        elif in_float_module:
            continue
        elif node.op_type in NORM_OPS and "norm" not in keep_float:
            quantize_input(node, 0, RULE_OP_INPUT.format(kind="norm"))
        elif node.op_type == "Softmax" and "softmax" not in keep_float:
            quantize_input(node, 0, RULE_OP_INPUT.format(kind="softmax"))
        elif node.op_type in POOLING_OPS and "pooling" not in keep_float:
            quantize_input(node, 0, RULE_OP_INPUT.format(kind="pooling"))

    for node in model.graph.node:
        if node.op_type != "Add" or in_modules(node.name, float_modules) or len(node.input) != 2:
            continue
        first, second = node.input
        constant = [graph.is_constant(first), graph.is_constant(second)]
        if any(constant):
            logits = 1 if constant[0] else 0
            if "attention_bias_add" not in keep_float and graph.is_attention_logits(node.input[logits]):
                quantize_input(node, logits, RULE_OP_INPUT.format(kind="attention_bias_add"))
            continue
        if "residual_add" in keep_float:
            continue
        for skip, branch, skip_index in ((first, second, 0), (second, first, 1)):
            source = graph.linear_source(branch)
            if skip in graph.ancestors(branch) and source is not None and source.name in quantized_weighted:
                quantize_input(node, skip_index, RULE_RESIDUAL_SKIP)
                break
    return placement


# ---------------------------------------------------------------------------------- calibration

def activation_amax(model_path: Path, tensors: list[str], calibration, method: str,
                    input_name: str, static_batch: int | None) -> dict[str, float]:
    """Largest magnitude to keep per activation tensor, from onnxruntime's calibrator for
    ``method`` run on the fp32 graph over ``calibration`` (NCHW float32)."""
    images = np.ascontiguousarray(np.asarray(calibration, dtype=np.float32))
    if images.ndim != 4 or len(images) == 0:
        raise EdgevitError(f"calibration images must be a non-empty NCHW batch, got shape {images.shape}")
    # Symmetric ranges: TensorRT's int8 has zero point 0; minmax needs no histogram either way.
    # Entropy as TensorRT's own calibrator does it (2048-bin histogram, 128 quantized bins); with
    # onnxruntime's default 128 bins the KL search has a single candidate, the min-max range.
    extra = {"symmetric": True, "num_bins": 512, "num_quantized_bins": 128} if method == "entropy" else {"symmetric": True}
    op_types = sorted({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", *NORM_OPS, "Softmax", *POOLING_OPS})
    with tempfile.TemporaryDirectory(prefix="edgevit-calibration-") as scratch, quiet():
        # Histograms (and their threshold searches) only for the tensors that get a Q/DQ pair.
        ranges = calibrated_ranges(Path(model_path), op_types, Path(scratch), method, extra, images, input_name,
                                   static_batch, tensors=set(tensors))
    amax = {}
    for tensor in tensors:
        if tensor not in ranges.data:
            raise EdgevitError(f"the calibrator collected no range for {tensor}; calibrate with more images")
        low, high = ranges.data[tensor].range_value
        amax[tensor] = float(max(np.abs(low).max(), np.abs(high).max()))
    return amax


# ------------------------------------------------------------------------------ graph surgery

def _scale(amax: np.ndarray | float) -> np.ndarray:
    # A tensor that was all zeros in calibration still needs a positive scale (TensorRT checks).
    return np.maximum(np.asarray(amax, dtype=np.float32), np.float32(1e-12)) / np.float32(INT8_MAX)


def quantize_weight(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights in [-127, 127] and their scales (one per channel along ``axis``)."""
    weight = weight.astype(np.float32)
    if axis is None:
        scale = _scale(np.abs(weight).max())
        broadcast = scale
    else:
        reduce = tuple(i for i in range(weight.ndim) if i != axis)
        scale = _scale(np.abs(weight).max(axis=reduce))
        shape = [1] * weight.ndim
        shape[axis] = -1
        broadcast = scale.reshape(shape)
    quantized = np.clip(np.rint(weight / broadcast), -INT8_MAX, INT8_MAX).astype(np.int8)
    return quantized, scale.astype(np.float32)


def insert_qdq(model, placement: Placement, amax: dict[str, float]):
    """A copy of ``model`` with the Q/DQ pairs of ``placement`` (activation scales from ``amax``)."""
    import onnx
    from onnx import helper, numpy_helper

    quantized = onnx.ModelProto()
    quantized.CopyFrom(model)
    graph = quantized.graph
    initializers = {t.name: t for t in graph.initializer}
    new_initializers = []
    weight_outputs: dict[tuple[str, int | None], str] = {}
    weight_nodes = []
    for weight in placement.weights:
        key = (weight.initializer, weight.axis)
        if key not in weight_outputs:
            values, scale = quantize_weight(numpy_helper.to_array(initializers[weight.initializer]), weight.axis)
            base = weight.initializer
            new_initializers += [
                numpy_helper.from_array(values, f"{base}_int8"),
                numpy_helper.from_array(scale if weight.axis is not None else scale.reshape(()), f"{base}_scale"),
                numpy_helper.from_array(np.zeros(scale.shape if weight.axis is not None else (), np.int8), f"{base}_zero_point"),
            ]
            attributes = {"axis": weight.axis} if weight.axis is not None else {}
            weight_outputs[key] = f"{base}_dequantized"
            weight_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_int8", f"{base}_scale", f"{base}_zero_point"],
                                                 [weight_outputs[key]], name=f"{base}_DequantizeLinear", **attributes))
    activation_nodes: dict[str, list] = {}
    for tensor in placement.tensors:
        scale_name, zero_name = f"{tensor}_scale", f"{tensor}_zero_point"
        new_initializers += [numpy_helper.from_array(_scale(amax[tensor]).reshape(()), scale_name),
                             numpy_helper.from_array(np.zeros((), np.int8), zero_name)]
        activation_nodes[tensor] = [
            helper.make_node("QuantizeLinear", [tensor, scale_name, zero_name], [f"{tensor}_quantized"],
                             name=f"{tensor}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{tensor}_quantized", scale_name, zero_name], [f"{tensor}_dequantized"],
                             name=f"{tensor}_DequantizeLinear"),
        ]
    rewired = {(q.node, q.index): f"{q.tensor}_dequantized" for q in placement.inputs}
    rewired |= {(w.node, w.index): weight_outputs[(w.initializer, w.axis)] for w in placement.weights}

    ordered = list(weight_nodes)
    graph_inputs = {i.name for i in graph.input}
    ordered += [n for tensor in placement.tensors if tensor in graph_inputs for n in activation_nodes[tensor]]
    for node in graph.node:
        for index in range(len(node.input)):
            if (node.name, index) in rewired:
                node.input[index] = rewired[(node.name, index)]
        ordered.append(node)
        for output in node.output:
            ordered += activation_nodes.get(output, [])
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(new_initializers)
    # Weights now live as int8 initializers; drop float originals nothing reads any more.
    still_read = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in still_read]
    for tensor in unused:
        graph.initializer.remove(tensor)
    return quantized


def qdq_counts(model) -> dict[str, Any]:
    """What the Q/DQ graph holds, for the manifest and the tests."""
    from onnx import numpy_helper

    graph = _QdqGraph(model)
    ops = collections.Counter(node.op_type for node in model.graph.node)
    per_channel = 0
    quantized_ops: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in graph.initializers:
            if numpy_helper.to_array(graph.initializers[node.input[1]]).ndim == 1:
                per_channel += 1
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(
                (p := graph.producer.get(name)) is not None and p.op_type == "DequantizeLinear" for name in node.input):
            quantized_ops[node.op_type] += 1
    return {"quantize_linear": ops["QuantizeLinear"], "dequantize_linear": ops["DequantizeLinear"],
            "per_channel_weights": per_channel, "ops_reading_dequantized": dict(sorted(quantized_ops.items()))}


def _name_nodes(graph) -> None:
    """Unique node names: the placement addresses inputs by (node name, index)."""
    seen: set[str] = set()
    for position, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}_{position}"
        seen.add(node.name)


def quantize_for_tensorrt(fp32_path: Path, spec: QuantSpec, float_module_names: Iterable[str], input_name: str,
                          static_batch: int | None):
    """The fp32 ONNX at ``fp32_path`` with TensorRT's Q/DQ placement and calibrated scales;
    returns (quantized ModelProto, placement)."""
    import onnx

    if spec.calibration is None:
        raise EdgevitError("TensorRT int8 needs calibration images: give --calib-data DIR or --calib-stats FILE")
    model = onnx.load(str(fp32_path))
    _name_nodes(model.graph)
    placement = plan_qdq(model, spec, float_module_names)
    if not placement.weights:
        raise EdgevitError("no convolution or linear layer is left to quantize (float_modules keeps them all float); "
                           "narrow float_modules in the recipe's [quantization] table")
    calibration = spec.calibration.detach().cpu().numpy() if hasattr(spec.calibration, "detach") else spec.calibration
    amax = activation_amax(fp32_path, placement.tensors, calibration, spec.method, input_name, static_batch)
    return insert_qdq(model, placement, amax), placement
