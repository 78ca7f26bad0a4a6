"""int8 for the ONNX target: onnxruntime's quantizer, steered to the graphs onnxruntime's CPU
kernels run fast.

Measured on the four families' smallest sizes (AVX-512 VNNI CPU, onnxruntime 1.31), stock
``quantize_static`` / ``quantize_dynamic`` run 1.1-6.8x *slower* than float32: every op without
an int8 kernel gets wrapped in Quantize/Dequantize pairs and the float kernels ORT would have
fused stop fusing. What this module does instead:

- static: QDQ graph, uint8 activations / int8 weights (the u8·s8 VNNI kernels; s8 activations measured
  2-4x slower), weights per channel as ``QuantSpec.per_channel`` says (no speed cost measured).
  Quantized: Conv, Gemm, MatMul, and the ops with int8 kernels (Add, Mul, Sigmoid, Softmax,
  AveragePool, Concat, data movement) unless their op kind is in ``QuantSpec.float_ops``; never
  the ops onnxruntime has no int8 kernel for (norms, GELU, HardSwish, Sub, Div, ReduceMean,
  ConvTranspose …), which would only gain a Q/DQ pair. (Depthwise convolutions stay int8: their
  int8 kernels are 3-5x slower than the float ones node for node, but a float one between int8
  neighbours costs more in Q/DQ and layout changes, measured 1.41x → 1.22x on MobileViT v2,
  no change on EdgeViT.) A Gemm/MatMul whose consumers all run in
  float keeps a float output (QGemm / MatMulIntegerToFloat) instead of a Quantize→Dequantize
  round trip, and the logits stay float. ReLU/Clip fold into the uint8 range (exact), so they
  are no "activation" to keep float.
- qat: the QAT int8 program itself (:func:`from_pt2e_program`), exported with the scales and
  weights it trained with. (Recalibrating the fine-tuned float weights instead, as an earlier
  version did, lost what QAT learned: Fashion-MNIST EdgeViT-XXS after 0.2 QAT epochs, cosine
  0.94 against the QAT program.) Its op selection is the XNNPACK quantizer's, not tuned for
  onnxruntime as static's is.
- dynamic: MatMul with constant weights only (Gemm rewritten to MatMul + Add first, since
  onnxruntime's dynamic quantizer has no Gemm), activations quantized per call
  (DynamicQuantizeMatMul); convolutions stay float (ConvInteger measured slower than float Conv).

Weights are exact on every CPU (:func:`kernel_exactness` checks it on the finished graph):
onnxruntime's u8·s8 kernels on x86 without VNNI (AVX2, AVX-512BW) add two u8·s8 products into a
*saturating* int16 (VPMADDUBSW), so two int8 weights with |w₁|+|w₂| > 128 along the reduction
can clip there. Static and dynamic graphs get **pair-safe per-channel scales**
(:func:`pair_safe_weight_ranges`: each channel's scale leaves its two largest weights summing
to at most 128, i.e. 8 bits where a channel has one outlier, ~7 where it has none). Measured on
the four families' smallest sizes (random weights, photo-like images, worst-sample cosine
against float32): full-range int8 gave 0.83-0.98 under ``qemu-x86_64 -cpu Haswell`` (AVX2)
against 0.94-1.00 on an AVX-512 VNNI host; pair-safe scales give bit-identical outputs on both,
within 0.0011 of full range on VNNI (MobileViT v2 0.9975 vs 0.9986, where 7-bit weights give
0.9935), at the same speed. QAT graphs, whose int8 weights are what was trained, keep those
values and store them as uint8 (zero point 128), which onnxruntime runs on its widening u8·u8
kernels: exact everywhere, at 25-48 % more whole-model time on a VNNI host (static graphs with
uint8 weights, measured).

Both first replace the exporter's erf-GELU pattern with one ``Gelu`` node (ONNX opset 20): in a
QDQ graph onnxruntime can no longer fuse the five-node pattern (each consumer gets its own
Dequantize), and the unfused GELU alone cost more than the int8 convolutions saved.

Node selection: op kinds (``edgevit.quant.spec.OP_KINDS``) are found from the graph's structure
(:func:`node_kinds`); module patterns map to nodes through the module path the exporter writes
into node names (``/stages/stages.0/blocks/blocks.0/mlp/fc1/Conv`` is module
``stages.0.blocks.0.mlp.fc1``, see :func:`node_module`; the dynamo exporter's graphs get such
names from their ``name_scopes`` metadata before simplification, :func:`name_nodes_by_module`).
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
from edgevit.quant.onnx_graph import (CALIBRATION_METHODS, OnnxGraph, calibrated_ranges, channel_axis, constant_value,
                                        node_module)
from edgevit.quant.spec import QuantSpec

GELU_OPSET = 20  # first ONNX opset with a Gelu operator

# Ops quantized in a static graph when their kind is not kept float: the ones onnxruntime's CPU
# provider runs in int8 (QLinearConv, QGemm, QLinearMatMul, QLinearAdd/Mul, QLinearSigmoid,
# QLinearSoftmax, QLinearAveragePool, QLinearConcat) and data movement it runs on uint8 tensors.
LINEAR_OPS = ("Conv", "Gemm", "MatMul")
_INT8_KERNEL_OPS = ("Add", "Mul", "Sigmoid", "Softmax", "AveragePool", "GlobalAveragePool", "Concat",
                    "Relu", "Clip", "MaxPool")
_DATA_MOVEMENT = ("Reshape", "Transpose", "Slice", "Split", "Squeeze", "Unsqueeze", "Flatten", "Gather", "Pad", "Resize")
STATIC_OP_TYPES = LINEAR_OPS + _INT8_KERNEL_OPS + _DATA_MOVEMENT

_NORM_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "BatchNormalization")
_ACTIVATION_OPS = ("Gelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "LeakyRelu", "Elu")
_POOLING_OPS = ("AveragePool", "GlobalAveragePool", "ReduceMean", "MaxPool", "GlobalMaxPool")
# Between an attention product and its softmax (or a norm and its affine) only these appear.
_PASS_THROUGH = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")

# Histogram sizes: onnxruntime's defaults for percentile; for entropy more bins than levels
# (onnxruntime's default of 128 and 128 leaves no threshold to search, i.e. equals min/max).
# Measured on Fashion-MNIST LeViT-128S (fp32 70.6 %): percentile 70.6, minmax 69.7, entropy 60.2
# (its KL thresholds clip these activations too hard, and it takes minutes): prefer percentile.
_CALIBRATOR_OPTIONS = {"minmax": {}, "percentile": {"num_bins": 2048, "percentile": 99.999},
                       "entropy": {"num_bins": 512, "num_quantized_bins": 256}}


@dataclass
class Int8Graph:
    """A quantized graph and what the manifest says about it."""

    model: Any  # onnx.ModelProto
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- names and kinds


def node_kinds(model) -> dict[str, str]:
    """Each node's op kind (``edgevit.quant.spec.OP_KINDS``) by name; nodes of no kind (linear
    layers, data movement, arithmetic with no int8 kernel) are absent."""
    g = OnnxGraph(model)
    kinds: dict[str, str] = {}
    for node in g.nodes:
        op, inputs = node.op_type, g.dynamic_inputs(node)
        if op in _NORM_OPS:
            kinds[node.name] = "norm"
        elif op == "Softmax":
            kinds[node.name] = "softmax"
        elif op in _ACTIVATION_OPS:
            kinds[node.name] = "activation"
        elif op in _POOLING_OPS:
            kinds[node.name] = "pooling"
        elif op == "MatMul" and len(inputs) == 2:
            kinds[node.name] = "attention_matmul"
        elif op == "Mul" and len(inputs) == 2:
            producers = [g.producer.get(i) for i in inputs]
            silu = any(p is not None and p.op_type == "Sigmoid" and p.input[0] in inputs for p in producers)
            # x·sigmoid(x) is SiLU; other products of two activations are attention (MobileViT's
            # context scores × keys, ReLU(values) × context).
            kinds[node.name] = "activation" if silu else "attention_matmul"
        elif op == "Add" and len(inputs) == 2:
            kinds[node.name] = "residual_add"
    # Arithmetic with a constant takes the kind of what it belongs to: the affine of a norm,
    # the scale and position bias of attention logits (on the way into a softmax).
    for node in g.nodes:
        if node.op_type in _PASS_THROUGH or not _steps_through(g, node):
            continue
        origin = _walk_back(g, node, stop=lambda n: n.op_type in _NORM_OPS or n.op_type in ("MatMul", "Conv", "Gemm"))
        if origin is not None and origin.op_type in _NORM_OPS:
            kinds[node.name] = "norm"
        elif _feeds_softmax(g, node):
            kinds[node.name] = "attention_bias_add" if node.op_type in ("Add", "Sub") else "softmax"
    return kinds


def _steps_through(g: OnnxGraph, node) -> bool:
    """Reshapes and arithmetic with a constant: what lies between an attention product and its
    softmax, or a norm and its affine."""
    return node.op_type in _PASS_THROUGH or (node.op_type in ("Add", "Mul", "Div", "Sub") and len(g.dynamic_inputs(node)) == 1)


def _walk_back(g: OnnxGraph, node, stop):
    """The first producer up the single dynamic input chain that ``stop`` accepts, passing only
    through :func:`_steps_through` nodes (None if the chain leaves them first)."""
    for _ in range(16):
        inputs = g.dynamic_inputs(node)
        node = g.producer.get(inputs[0]) if len(inputs) == 1 else None
        if node is None or stop(node):
            return node
        if not _steps_through(g, node):
            return None
    return None


def _feeds_softmax(g: OnnxGraph, node) -> bool:
    """Whether ``node`` leads into a Softmax through :func:`_steps_through` nodes alone."""
    for _ in range(16):
        consumers = g.consumers.get(node.output[0], [])
        if len(consumers) != 1:
            return False
        node = consumers[0]
        if node.op_type == "Softmax":
            return True
        if not _steps_through(g, node):
            return False
    return False


def float_nodes(model, quant: QuantSpec, float_modules: Iterable[str]) -> dict[str, str]:
    """Nodes ``quant`` keeps in float, by name, with the reason (an op kind or a module)."""
    modules = tuple(float_modules)
    kinds = node_kinds(model)
    chosen: dict[str, str] = {}
    for node in model.graph.node:
        module = node_module(node.name)
        owner = next((m for m in modules if module == m or module.startswith(m + ".")), None)
        if owner is not None:
            chosen[node.name] = f"module {owner}"
        elif kinds.get(node.name) in quant.float_ops:
            chosen[node.name] = kinds[node.name]
    return chosen


# --------------------------------------------------------------------------- graph rewrites


def _is_scalar(graph, name: str, value: float, tolerance: float = 1e-5) -> bool:
    array = constant_value(graph, name)
    return array is not None and array.size == 1 and abs(float(array.reshape(())) - value) <= tolerance


def fuse_gelu(model) -> int:
    """Replace ``x/√2 → Erf → +1 → ·x → ·0.5`` (the exporters' exact GELU) with one ``Gelu``
    node and raise the default opset to 20 if any was found; returns how many were fused."""
    from onnx import helper

    graph = model.graph
    g = OnnxGraph(model)
    replaced: dict[int, Any] = {}
    dropped: set[int] = set()
    for div in g.nodes:
        if div.op_type != "Div" or not _is_scalar(graph, div.input[1], 2 ** 0.5):
            continue
        x = div.input[0]
        chain = [div]
        for op in ("Erf", "Add", "Mul", "Mul"):
            consumers = g.consumers.get(chain[-1].output[0], [])
            if len(consumers) != 1 or consumers[0].op_type != op:
                break
            chain.append(consumers[0])
        if len(chain) != 5:
            continue
        _, erf, add, times_x, half = chain
        other = lambda node, known: next(i for i in node.input if i != known)  # noqa: E731
        if not (_is_scalar(graph, other(add, erf.output[0]), 1.0) and x in times_x.input
                and _is_scalar(graph, other(half, times_x.output[0]), 0.5)):
            continue
        name = div.name.rsplit("/", 1)[0] + "/Gelu" if "/" in div.name else f"{div.name}_gelu"
        replaced[id(div)] = helper.make_node("Gelu", [x], [half.output[0]], name=name)
        dropped.update(id(n) for n in chain)
    if not replaced:
        return 0
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) in replaced or id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_constants(model)
    _require_opset(model, GELU_OPSET)
    return len(replaced)


def gemm_to_matmul(model) -> int:
    """Rewrite Gemm with a constant weight as MatMul (+ Add of the bias), the form onnxruntime's
    dynamic quantizer handles; returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        if node.op_type != "Gemm" or node.input[1] not in weights or not plain:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        weight = weight.T if attrs.get("transB", 0) else weight
        weight_name = f"{node.input[1]}_matmul"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), weight_name))
        if len(node.input) > 2 and node.input[2]:
            product = f"{node.output[0]}_matmul"
            nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [product], name=f"{node.name}_MatMul"))
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_Add"))
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [node.output[0]], name=node.name))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_constants(model)
    return count


def unshare_weights(model) -> int:
    """Give every Conv/Gemm/MatMul its own copy of a weight or bias initializer it shares with
    another node (the exporters deduplicate equal tensors, e.g. zero biases): onnxruntime's
    quantizer replaces a quantized node's initializer for every reader, so a node kept float
    would read another node's int8-rounded weights. Returns the copies made."""
    from onnx import TensorProto

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers: collections.Counter = collections.Counter(i for n in graph.node for i in n.input)
    copies = 0
    for node in graph.node:
        if node.op_type not in LINEAR_OPS:
            continue
        for slot, name in enumerate(node.input):
            if slot == 0 or name not in initializers or readers[name] < 2:
                continue
            copy = TensorProto()
            copy.CopyFrom(initializers[name])
            copy.name = f"{name}_{node.name or copies}"
            graph.initializer.append(copy)
            node.input[slot] = copy.name
            readers[name] -= 1
            copies += 1
    return copies


def _drop_unused_constants(model) -> None:
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    initializers = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    nodes = [n for n in graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)


def _require_opset(model, version: int) -> None:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < version:
            opset.version = version


def keep_float_outputs(model) -> int:
    """Remove the Quantize→Dequantize pairs after a Gemm/MatMul (and after the reshapes and
    transposes between it and its consumers) when every consumer runs in float: onnxruntime
    then emits float directly (QGemm, MatMulIntegerToFloat) instead of rounding to 8 bits and
    back. Graph outputs are left to :func:`_float_logits`. Returns the pairs removed."""
    graph = model.graph
    g = OnnxGraph(model)
    removed: set[int] = set()
    rewire: dict[str, str] = {}
    for producer in g.nodes:
        if producer.op_type not in ("Gemm", "MatMul"):
            continue
        pairs = _float_region(g, producer.output[0])
        if pairs is None:
            continue
        for q, dqs in pairs:
            removed.update(id(n) for n in [q, *dqs])
            rewire.update({d.output[0]: q.input[0] for d in dqs})
    for node in graph.node:
        node.input[:] = [rewire.get(i, i) for i in node.input]
    nodes = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_constants(model)
    return sum(1 for n in g.nodes if id(n) in removed and n.op_type == "QuantizeLinear")


def _float_region(g: OnnxGraph, tensor: str, depth: int = 0):
    """The Q/DQ pairs from ``tensor`` through data movement up to its consumers, if all those
    consumers run in float (else None)."""
    quantizers = g.consumers.get(tensor, [])
    if depth > 8 or len(quantizers) != 1 or quantizers[0].op_type != "QuantizeLinear" or tensor in g.outputs:
        return None
    q = quantizers[0]
    dqs = g.consumers.get(q.output[0], [])
    if not dqs or any(d.op_type != "DequantizeLinear" or d.output[0] in g.outputs for d in dqs):
        return None
    pairs = [(q, dqs)]
    for consumer in (c for d in dqs for c in g.consumers.get(d.output[0], [])):
        if consumer.op_type in _DATA_MOVEMENT and _runs_int8(g, consumer):
            inner = [_float_region(g, o, depth + 1) for o in consumer.output]
            if any(r is None for r in inner):
                return None
            pairs += [p for r in inner for p in r]
        elif _runs_int8(g, consumer):
            return None
    return pairs


def read_float_inputs(model, names: set[str]) -> int:
    """Let the nodes in ``names`` (kept float) read a float producer's tensor instead of its
    dequantized copy: onnxruntime's quantizer points every reader of a tensor it quantizes for
    one consumer at the Dequantize output, which would round e.g. a float residual stream to 8
    bits anyway. (The output of an int8 producer is its 8-bit value; reading it directly would
    also stop onnxruntime fusing that producer.) Returns the inputs rewired."""
    g = OnnxGraph(model)
    rewired = 0
    for node in g.nodes:
        if node.name not in names:
            continue
        for slot, name in enumerate(node.input):
            dq = g.producer.get(name)
            q = g.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                continue
            source = g.producer.get(q.input[0])
            if source is not None and source.op_type in STATIC_OP_TYPES and all(
                    g.producer.get(i) is not None and g.producer[i].op_type == "DequantizeLinear"
                    for i in g.dynamic_inputs(source)):
                continue  # an int8 kernel's output
            node.input[slot] = q.input[0]
            rewired += 1
    if rewired:
        _drop_dangling_qdq(model)
    return rewired


def _drop_dangling_qdq(model) -> None:
    """Remove Quantize/Dequantize nodes nothing reads any more."""
    graph = model.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dangling = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                    and not any(o in used for o in n.output)]
        if not dangling:
            break
        for node in dangling:
            graph.node.remove(node)
    _drop_unused_constants(model)


def _runs_int8(g: OnnxGraph, node) -> bool:
    """A node of a QDQ graph that onnxruntime fuses into an int8 kernel: an op it has one for,
    whose outputs are all quantized again (a float op between Q/DQ pairs stays float)."""
    outputs = [c for o in node.output for c in g.consumers.get(o, [])]
    return node.op_type in STATIC_OP_TYPES and bool(outputs) and all(c.op_type == "QuantizeLinear" for c in outputs) \
        and not any(o in g.outputs for o in node.output)


def _float_logits(model) -> int:
    """Drop the Quantize→Dequantize pair on graph outputs: logits are compared and ranked in
    float, and 256 levels would merge close classes."""
    graph = model.graph
    g = OnnxGraph(model)
    removed = 0
    for output in graph.output:
        dq = g.producer.get(output.name)
        q = g.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or len(g.consumers.get(q.output[0], [])) != 1 \
                or len(g.consumers.get(q.input[0], [])) != 1:
            continue
        source = g.producer.get(q.input[0])
        if source is None:
            continue
        source.output[:] = [output.name if o == q.input[0] else o for o in source.output]
        graph.node.remove(q)
        graph.node.remove(dq)
        removed += 1
    if removed:
        _drop_unused_constants(model)
    return removed


# --------------------------------------------------------------------------- weights exact on every CPU

PAIR_LIMIT = 128  # |w₁|+|w₂| ≤ 128: 255·128 = 32640 fits VPMADDUBSW's int16 (32767)
WEIGHT_SCALES = "pair-safe per channel: the two largest |int8 weights| of a channel sum to ≤ 128"
# Integer ops with a weight operand, and its input slot.
_INTEGER_WEIGHT_SLOTS = {"MatMulInteger": 1, "ConvInteger": 1, "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1,
                         "QLinearConv": 3, "QLinearMatMul": 3, "QGemm": 3}
# Ops between a weight's DequantizeLinear and the op that multiplies it (the dynamo exporter
# writes a Linear on 3-D input as DequantizeLinear → Transpose → MatMul).
_WEIGHT_PATH_OPS = ("Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten")


def _two_largest(values: np.ndarray, axis: int | None) -> np.ndarray:
    """Per channel along ``axis``: the two largest magnitudes over the other axes, shape (C, 2);
    ``axis=None``: the whole tensor as one channel (where a reshape hides which axis is which)."""
    magnitudes = np.abs(values.astype(np.float64))
    rows = magnitudes.reshape(1, -1) if axis is None else np.moveaxis(magnitudes, axis, 0).reshape(values.shape[axis], -1)
    if rows.shape[1] == 1:
        return np.concatenate([rows, np.zeros_like(rows)], axis=1)
    return -np.sort(-rows, axis=1)[:, :2]


def pair_safe_weight_ranges(model, per_channel: bool, full_range_modules: Iterable[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """onnxruntime ``TensorQuantOverrides`` giving every Conv/Gemm/MatMul weight symmetric int8
    scales under which no two of a channel's weights sum to more than 128 in magnitude, wherever
    a kernel pairs them: range r = m₁ + m₂ (the two largest |w|), so after rounding
    q₁ + q₂ ≤ round(127·m₁/r) + round(127·m₂/r) ≤ 128. A channel with one outlier keeps 8 bits.
    Weights of ``full_range_modules`` keep all 8 bits as uint8 instead (the u8·u8 kernels widen
    before they multiply: exact, and slower)."""
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType

    full_range = set(full_range_modules)
    g = OnnxGraph(model)
    weights = {t.name: t for t in model.graph.initializer}
    overrides: dict[str, list[dict[str, Any]]] = {}
    for node in g.nodes:
        if node.op_type not in LINEAR_OPS or len(node.input) < 2 or node.input[1] not in weights:
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        if weight.ndim < 2 or not np.issubdtype(weight.dtype, np.floating):
            continue
        axis = channel_axis(node, weight.ndim)
        if node_module(node.name) in full_range:
            overrides[node.input[1]] = [{"quant_type": QuantType.QUInt8, **({"axis": axis} if per_channel else {})}]
            continue
        top = _two_largest(weight, axis)
        ranges = np.maximum(top.sum(axis=1), 1e-12)
        if per_channel:
            overrides[node.input[1]] = [{"axis": axis, "rmin": -float(r), "rmax": float(r)} for r in ranges]
        else:
            overrides[node.input[1]] = [{"rmin": -float(ranges.max()), "rmax": float(ranges.max())}]
    return overrides


def _multiplying_ops(g: OnnxGraph, tensor: str, ndim: int):
    """The linear ops that multiply ``tensor``, following it through :data:`_WEIGHT_PATH_OPS`:
    (op, input slot, axes) where ``axes[j]`` is the stored tensor's axis that the op sees as its
    axis j (None once a reshape has mixed them)."""
    stack = [(tensor, list(range(ndim)))]
    while stack:
        name, axes = stack.pop()
        for user in g.consumers.get(name, []):
            if user.op_type in LINEAR_OPS:
                yield user, list(user.input).index(name), axes
            elif user.op_type == "Transpose" and axes is not None:
                perm = next((list(a.ints) for a in user.attribute if a.name == "perm"), list(reversed(range(len(axes)))))
                stack.append((user.output[0], [axes[p] for p in perm]))
            elif user.op_type in _WEIGHT_PATH_OPS:
                stack.append((user.output[0], axes if user.op_type == "Identity" else None))


def _integer_weights(g: OnnxGraph, constant):
    """Every stored int8/uint8 tensor that an op multiplies with (through a DequantizeLinear in
    QDQ graphs, or as the weight of an integer op): (tensor name, values, op, the stored axis of
    the op's output channels, None where a reshape hides it)."""
    for node in g.nodes:
        if node.op_type in _INTEGER_WEIGHT_SLOTS:
            name = node.input[_INTEGER_WEIGHT_SLOTS[node.op_type]]
            values = constant(name)
            if values is not None and values.dtype in (np.int8, np.uint8) and values.ndim >= 2:
                yield name, values, node, channel_axis(node, values.ndim)
        elif node.op_type == "DequantizeLinear":
            values = constant(node.input[0])
            if values is None or values.dtype not in (np.int8, np.uint8) or values.ndim < 2:
                continue
            for op, slot, axes in _multiplying_ops(g, node.output[0], values.ndim):
                # The weight operand's output channels; a constant first operand (A of A·B) sums
                # along its last axis, one row per output row.
                seen_axis = channel_axis(op, values.ndim) if slot == 1 else values.ndim - 2 if op.op_type == "MatMul" else None
                if seen_axis is not None:
                    yield node.input[0], values, op, None if axes is None else axes[seen_axis]


def kernel_exactness(model) -> dict[str, Any]:
    """Which classes of CPU (``edgevit.core.host.INT8_KERNEL_CLASSES``) run this int8 ONNX graph
    without losing values in a 16-bit step, read from the graph alone, so a host of one class
    can tell whether an artifact is exact on another:

    - x86 without VNNI: onnxruntime feeds (uint8 activations, int8 weights) to VPMADDUBSW, which
      saturates when |w₁|+|w₂| > 128 for two weights of a row; uint8 weights take the widening
      u8·u8 kernel. An activation × activation product with a signed (int8) second operand
      can saturate too, depending on the data.
    - arm64 without dot product: SMULL+SMLAL add two s8·s8 products in int16, which wraps only
      for (-128)·(-128): safe unless a weight is -128.
    - VNNI/AMX and Arm dot-product kernels accumulate in int32.
    (Depthwise convolutions widen to 16 bits first; they are checked all the same, conservatively.)
    """
    from onnx import numpy_helper

    from edgevit.core.host import ARM_DOT, ARM_NO_DOT, INT8_KERNEL_CLASSES, X86_NO_VNNI, X86_VNNI

    g = OnnxGraph(model)
    tensors = {t.name: t for t in model.graph.initializer} | {
        n.output[0]: n.attribute[0].t for n in g.nodes if n.op_type == "Constant" and n.attribute}

    def constant(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(tensors[name]) if name in tensors else None

    checked, worst_pair, over_limit, minus_128 = 0, 0, [], []
    for _name, values, node, axis in _integer_weights(g, constant):
        checked += 1
        if values.dtype == np.int8:  # uint8 weights take the widening u8·u8 kernels
            pair = int(_two_largest(values, axis).sum(axis=1).max())
            worst_pair = max(worst_pair, pair)
            if pair > PAIR_LIMIT:
                over_limit.append(node.name)
            if values.min() == -128:
                minus_128.append(node.name)
    signed_products = []  # activation × activation products whose second operand is int8
    for node in g.nodes:
        dq = g.producer.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in tensors or len(dq.input) < 3:
            continue  # no int8 operand, or a stored weight (checked above)
        zero_point = constant(dq.input[2])
        if zero_point is not None and zero_point.dtype == np.int8:
            signed_products.append(node.name)
    not_exact: dict[str, str] = {}
    if over_limit or signed_products:
        reasons = []
        if over_limit:
            reasons.append(f"{len(over_limit)} weights have two int8 values with |w1|+|w2| > {PAIR_LIMIT} "
                           f"(worst {worst_pair}, first {over_limit[0]}): VPMADDUBSW saturates")
        if signed_products:
            reasons.append(f"{len(signed_products)} activation products read a signed int8 operand "
                           f"(first {signed_products[0]}): can saturate, depending on the data")
        not_exact[X86_NO_VNNI] = "; ".join(reasons)
    if minus_128:
        not_exact[ARM_NO_DOT] = (f"{len(minus_128)} weights hold -128 (first {minus_128[0]}): "
                                 "two (-128)·(-128) products wrap in int16")
    return {"checked_weights": checked, "worst_weight_pair": worst_pair, "pair_limit": PAIR_LIMIT,
            "exact_on": [c for c in (X86_VNNI, X86_NO_VNNI, ARM_DOT, ARM_NO_DOT) if c not in not_exact],
            "not_exact_on": {c: f"{INT8_KERNEL_CLASSES[c]}; {why}" for c, why in not_exact.items()}}


# --------------------------------------------------------------------------- quantization


def quantize_onnx(model, quant: QuantSpec, float_modules: Iterable[str] = (), input_name: str = "input",
                  full_range_modules: Iterable[str] = ()) -> Int8Graph:
    """Quantize an fp32 ONNX graph (``onnx.ModelProto``, not modified) as ``quant`` says.

    ``float_modules``: the deploy model's module names to keep float (what
    ``quant.float_module_names(model)`` resolves); ``full_range_modules``: those whose weights keep
    all 8 bits (see :func:`pair_safe_weight_ranges`). Static needs ``quant.calibration``; a QAT
    program is exported by :func:`from_pt2e_program` instead."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's graph stays as it was
    steps = []
    unshared = unshare_weights(model)
    if unshared:
        steps.append(f"{unshared} shared weight/bias tensors copied per node")
    fused = fuse_gelu(model)
    if fused:
        steps.append(f"{fused} erf-GELU patterns → Gelu (opset {GELU_OPSET})")
    if quant.mode == "dynamic":
        rewritten = gemm_to_matmul(model)
        if rewritten:
            steps.append(f"{rewritten} Gemm → MatMul + Add (the dynamic quantizer has no Gemm)")
        result = _quantize_dynamic(model, quant, tuple(float_modules), tuple(full_range_modules))
    elif quant.mode == "qat":
        raise EdgevitError("ONNX QAT int8 is the QAT program itself; run  edgevit quantize MODEL --mode qat")
    else:
        if quant.calibration is None:
            raise EdgevitError(f"{quant.mode} int8 needs calibration images: give --calib-data DIR")
        result = _quantize_static(model, quant, tuple(float_modules), input_name, tuple(full_range_modules))
    result.details["preprocessing"] = steps
    result.details.setdefault("postprocessing", [])
    _check(result.model)
    result.details.update(_graph_facts(result.model))
    return result


def _quantize_static(model, quant: QuantSpec, float_modules: tuple[str, ...], input_name: str,
                     full_range_modules: tuple[str, ...]) -> Int8Graph:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    excluded = float_nodes(model, quant, float_modules)
    images = quant.calibration.detach().cpu().numpy().astype(np.float32)
    first_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    static_batch = first_dim.dim_value if first_dim.HasField("dim_value") else None
    method = getattr(CalibrationMethod, CALIBRATION_METHODS[quant.method])
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgevit-int8-") as work, quiet():
        source, target, ranges = Path(work) / "fp32.onnx", Path(work) / "int8.onnx", Path(work) / "ranges.json"
        onnx.save(model, str(source))
        feed = (images, input_name, static_batch)
        try:
            _calibrate(source, Path(work), quant.method, _CALIBRATOR_OPTIONS[quant.method], feed, ranges)
        except ValueError as exc:
            if "bins" not in str(exc):
                raise
            # numpy cannot bin a tensor whose values barely vary (seen on random-weight models)
            notes.append(f"{quant.method} calibration could not bin a near-constant tensor; min/max ranges used")
            method = CalibrationMethod.MinMax
            _calibrate(source, Path(work), "minmax", {}, feed, ranges)
        quantize_static(
            str(source), str(target), None, calibration_cache_path=ranges,
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(STATIC_OP_TYPES),
            per_channel=quant.per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(excluded), calibrate_method=method,
            # Relu/Clip stay in the graph (onnxruntime still folds them into the uint8 range): a
            # node kept float that reads the Quantize input must not see pre-ReLU values.
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "QDQKeepRemovableActivations": True,
                           "TensorQuantOverrides": pair_safe_weight_ranges(model, quant.per_channel, full_range_modules)},
        )
        quantized = onnx.load(str(target))
    read_float_inputs(quantized, set(excluded))
    logits = _float_logits(quantized)
    float_out = keep_float_outputs(quantized)
    post = notes
    if float_out:
        post.append(f"{float_out} Gemm/MatMul outputs kept float (their consumers run in float)")
    if logits:
        post.append("logits kept float")
    by_reason = collections.Counter(r if not r.startswith("module ") else "float_modules" for r in excluded.values())
    g = OnnxGraph(quantized)
    # A node kept float whose inputs are all int8 values and whose output only int8 consumers
    # read computes the same in int8; onnxruntime then runs it on its int8 kernel.
    between_int8 = sum(1 for n in g.nodes if n.name in excluded and _runs_int8(g, n) and all(
        g.producer.get(i) is not None and g.producer[i].op_type == "DequantizeLinear" for i in g.dynamic_inputs(n)))
    if between_int8:
        post.append(f"{between_int8} nodes kept float sit between int8 producers and int8 consumers: "
                    "onnxruntime runs them on int8 kernels, which compute the same values")
    return Int8Graph(quantized, {
        "mode": quant.mode, "format": "QDQ", "activation_type": "uint8", "weight_type": "int8",
        "weight_scales": WEIGHT_SCALES, "full_range_weights": list(full_range_modules),
        "per_channel": quant.per_channel, "method": quant.method,
        "calibration_images": len(images),
        "excluded_nodes": sum(by_reason.values()), "excluded_by": dict(sorted(by_reason.items())),
        "postprocessing": post,
    })


def from_pt2e_program(model) -> Int8Graph:
    """A PT2E int8 program exported to ONNX (a QAT program: the scales and weights it trained
    with, nothing recalibrated), made ready for onnxruntime's fast kernels, in place.

    PT2E (XNNPACK's quantizer) gives activations int8 with a zero point; onnxruntime's fast
    kernels are u8·s8, and some of its fusions insist on uint8 activations (onnxruntime 1.31
    refuses the int8 ones: "... INT8 does not match y_zero_point UINT8"). uint8 with the zero
    point + 128 and the same scale is the same grid, so every value stays what it was. The
    weights become uint8 the same way, for exactness (see the module doc); other int8
    constants (e.g. a position bias quantized as an activation) stay int8.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    g = OnnxGraph(model)
    # Constant tensors by name, decoded only when read (zero points: a few bytes; weights are skipped).
    constants = {t.name: t for t in graph.initializer} | {
        n.output[0]: n.attribute[0].t for n in g.nodes if n.op_type == "Constant" and n.attribute}
    shifted: dict[str, str] = {}  # int8 zero point → its uint8 twin (the int8 one may also serve weights)

    def uint8_zero_point(name: str) -> str:
        if name not in shifted:
            shifted[name] = f"{name}_uint8"
            zero_point = numpy_helper.to_array(constants[name]).astype(np.int16) + 128
            graph.initializer.append(numpy_helper.from_array(zero_point.astype(np.uint8), shifted[name]))
        return shifted[name]

    rewritten: set[str] = set()
    for node in g.nodes:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[0] in g.constants:
            continue
        zero_point = constants.get(node.input[2])
        if zero_point is None or zero_point.data_type != onnx.TensorProto.INT8:
            continue
        node.input[2] = uint8_zero_point(node.input[2])
        rewritten.add(node.output[0])
        for reader in g.consumers[node.output[0]]:
            if reader.op_type != "DequantizeLinear":
                raise EdgevitError(f"the QAT program's ONNX graph reads an int8 activation with {reader.op_type}; "
                                   "export the QAT model to ExecuTorch instead")
            reader.input[2] = uint8_zero_point(reader.input[2])
    for info in (*graph.value_info, *graph.output):
        if info.name in rewritten:
            info.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    # The trained int8 weights span [-127, 127]; as uint8 (zero point + 128, the same values) they
    # run on onnxruntime's widening u8·u8 kernels, exact on every CPU (see kernel_exactness).
    value = lambda name: numpy_helper.to_array(constants[name]) if name in constants else None  # noqa: E731
    weights = {name: values for name, values, _op, _axis in _integer_weights(g, value) if values.dtype == np.int8}
    for dq in g.nodes:
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in weights or len(dq.input) < 3:
            continue
        unsigned = f"{dq.input[0]}_uint8"
        if not any(t.name == unsigned for t in graph.initializer):
            values = weights[dq.input[0]].astype(np.int16) + 128
            graph.initializer.append(numpy_helper.from_array(values.astype(np.uint8), unsigned))
        dq.input[0] = unsigned
        dq.input[2] = uint8_zero_point(dq.input[2])
    _drop_unused_constants(model)
    _check(model)
    return Int8Graph(model, {
        "mode": "qat", "format": "QDQ", "source": "the QAT int8 program (PT2E), exported with its trained scales",
        "activation_type": "uint8 (PT2E's int8 activations, zero point + 128: the same grid)",
        "weight_type": "uint8 (the trained int8 weights, zero point + 128: the same values)",
        "postprocessing": [f"{len(rewritten)} int8 activations → uint8", f"{len(weights)} int8 weights → uint8"],
        **_graph_facts(model),
    })


def _calibrate(source: Path, work: Path, method: str, options: dict[str, Any], feed: tuple, ranges: Path) -> None:
    """Activation ranges of ``source`` on ``feed`` (images, input name, static batch or None),
    saved where quantize_static reads them. (Calibrated here rather than inside quantize_static,
    which cannot pass histogram sizes through: its entropy search then has nothing to choose
    from and equals min/max.)"""
    from onnxruntime.quantization import save_tensors_data

    save_tensors_data(calibrated_ranges(source, list(STATIC_OP_TYPES), work, method, options, *feed), ranges)


def _quantize_dynamic(model, quant: QuantSpec, float_modules: tuple[str, ...], full_range_modules: tuple[str, ...]) -> Int8Graph:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = float_nodes(model, quant, float_modules)
    with tempfile.TemporaryDirectory(prefix="edgevit-int8-") as work, quiet():
        source, target = Path(work) / "fp32.onnx", Path(work) / "int8.onnx"
        onnx.save(model, str(source))
        quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul"], per_channel=quant.per_channel,
                         weight_type=QuantType.QInt8, nodes_to_exclude=sorted(excluded),
                         extra_options={"MatMulConstBOnly": True,
                                        "TensorQuantOverrides": pair_safe_weight_ranges(model, quant.per_channel, full_range_modules)})
        quantized = onnx.load(str(target))
    return Int8Graph(quantized, {
        "mode": "dynamic", "format": "dynamic (DynamicQuantizeMatMul)", "activation_type": "uint8 (per call)",
        "weight_type": "int8", "weight_scales": WEIGHT_SCALES, "full_range_weights": list(full_range_modules),
        "per_channel": quant.per_channel, "method": None,
        "excluded_nodes": len(excluded),
        "float_convolutions": "kept: onnxruntime's ConvInteger is slower than its float Conv",
    })


def _check(model) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:  # a quantizer bug, not the user's input
        raise RuntimeError(f"the int8 ONNX graph is invalid: {exc}") from exc


def _graph_facts(model) -> dict[str, Any]:
    """Q/DQ counts, the op types that run in int8, and the compute nodes left float."""
    g = OnnxGraph(model)
    ops = collections.Counter(n.op_type for n in g.nodes)
    int8_types: collections.Counter = collections.Counter()
    float_types: collections.Counter = collections.Counter()
    for node in g.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant") or node.op_type in _DATA_MOVEMENT:
            continue
        if node.op_type in ("DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"):
            int8_types[node.op_type] += 1
            continue
        operands = node.input[:2] if node.op_type in LINEAR_OPS else g.dynamic_inputs(node)
        dequantized = [g.producer.get(i) is not None and g.producer[i].op_type == "DequantizeLinear" for i in operands]
        # A linear op with both operands dequantized runs in int8 even with a float output
        # (QGemm, MatMulIntegerToFloat); other ops only between a Dequantize and a Quantize.
        if dequantized and all(dequantized) and (node.op_type in LINEAR_OPS or _runs_int8(g, node)):
            int8_types[node.op_type] += 1
        else:
            float_types[node.op_type] += 1
    return {"quantized_op_types": dict(sorted(int8_types.items())), "float_op_types": dict(sorted(float_types.items())),
            "float_nodes": sum(float_types.values()),
            "qdq_nodes": {"QuantizeLinear": ops["QuantizeLinear"], "DequantizeLinear": ops["DequantizeLinear"]},
            "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)}
