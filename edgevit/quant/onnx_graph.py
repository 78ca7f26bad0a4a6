"""The one ONNX graph helper every ONNX-consuming target shares (onnxruntime's int8, TensorRT's
Q/DQ placement): module names read from node names, producer/consumer look-ups, constants and
attributes, weight channel axes, and the calibration feed onnxruntime's calibrators read."""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np

from edgevit.core.errors import EdgevitError

# onnxruntime's calibration method per edgevit range method (edgevit.quant.spec.METHODS)
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
SHAPE_ONLY_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")  # move no data: fusions see through them


def module_scopes(module: str) -> list[str]:
    """The scope components the torchscript exporter writes for ``module``:
    ``stages.1.0.conv`` → ``["stages", "stages.1", "stages.1.0", "conv"]``."""
    scopes: list[str] = []
    for key in module.split("."):
        scopes.append(f"{scopes[-1]}.{key}" if key.isdigit() and scopes else key)
    return scopes


def node_module(node_name: str) -> str:
    """The deploy-model module a node was exported from, read from its name
    (``/stages/stages.0/blocks/blocks.0/attn/qkv/MatMul`` → ``stages.0.blocks.0.attn.qkv``);
    "" for nodes without a module path (the model's own forward, or added by a tool)."""
    if not node_name.startswith("/"):
        return ""
    scopes = node_name.strip("/").split("/")[:-1]  # the last part names the op
    keys: list[str] = []
    for previous, scope in zip([None] + scopes, scopes):
        keys.append(scope[len(previous) + 1:] if previous and scope.startswith(previous + ".") else scope)
    return ".".join(keys)


def name_nodes_by_module(model) -> None:
    """Give a dynamo-exported graph torchscript-style node and tensor names built from each
    node's ``pkg.torch.onnx.name_scopes`` metadata, so module patterns find its nodes (and
    survive onnxslim, which drops metadata but names fused nodes after their tensors).

    A PT2E program's Quantize/DequantizeLinear nodes have no module scope (the quantizer added
    them outside the model's forward); one that quantizes an activation takes the module of the
    value it quantizes, as onnxruntime's quantizer names them, so a module's output is the
    dequantized value the next block reads."""
    import ast

    graph = model.graph
    keep = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    renamed: dict[str, str] = {}
    module_of: dict[str, str] = {}  # tensor → the module of the node that made it
    counts: collections.Counter = collections.Counter()
    for node in graph.node:
        scopes_text = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        try:
            scopes = ast.literal_eval(scopes_text) if scopes_text else []
        except (ValueError, SyntaxError):
            scopes = []
        module = scopes[-2] if len(scopes) >= 2 else ""
        if not module and node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input:
            module = module_of.get(node.input[0], "")
        module_of.update((output, module) for output in node.output)
        prefix = "/" + "/".join(module_scopes(module)) + "/" if module else "/"
        base = f"{prefix}{node.op_type}"
        counts[base] += 1
        node.name = base if counts[base] == 1 else f"{base}_{counts[base] - 1}"
        for k, output in enumerate(node.output):
            if output and output not in keep:
                renamed[output] = f"{node.name}_output_{k}"
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
    for info in graph.value_info:
        info.name = renamed.get(info.name, info.name)


def in_modules(node_name: str, module_names: frozenset[str]) -> bool:
    """Whether the node belongs to one of ``module_names`` or a module inside one."""
    module = node_module(node_name)
    while module:
        if module in module_names:
            return True
        module = module.rpartition(".")[0]
    return False


class OnnxGraph:
    """Producer/consumer look-ups over an ONNX graph (``model``: a ModelProto)."""

    def __init__(self, model) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants = set(self.initializers) | {o for n in self.nodes if n.op_type == "Constant" for o in n.output}
        self.outputs = {o.name for o in graph.output}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = collections.defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)
        self._ancestors: dict[str, frozenset[str]] = {}

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def dynamic_inputs(self, node) -> list[str]:
        return [i for i in node.input if i and i not in self.constants]

    def source_op(self, tensor: str, through: tuple[str, ...] = SHAPE_ONLY_OPS):
        """The node that computes ``tensor``'s values, looking through ``through`` ops."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in through:
            node = self.producer.get(node.input[0])
        return node

    def ancestors(self, tensor: str) -> frozenset[str]:
        """Every tensor ``tensor`` is computed from (itself included)."""
        cached = self._ancestors.get(tensor)
        if cached is not None:
            return cached
        found = {tensor}
        stack = [tensor]
        while stack:
            node = self.producer.get(stack.pop())
            if node is None:
                continue
            for name in node.input:
                if name and name not in found:
                    found.add(name)
                    stack.append(name)
        self._ancestors[tensor] = frozenset(found)
        return self._ancestors[tensor]


def attribute(node, name: str, default: Any) -> Any:
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def channel_axis(node, ndim: int) -> int:
    """The output-channel axis of a weighted op's ``ndim``-D weight; the reduction runs over the
    others."""
    if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
        return 0  # (Cout, Cin/g, kh, kw)
    if node.op_type in ("Gemm", "QGemm"):
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return ndim - 1  # MatMul-like: (…, K, N), per output column N


def constant_value(graph, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for tensor in graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


class CalibrationReader:
    """Feeds ``images`` (NCHW float32) to onnxruntime's calibrator in batches of ``batch``."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int) -> None:
        self._feeds = [{input_name: np.ascontiguousarray(images[i:i + batch])} for i in range(0, len(images), batch)]
        self._next = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._next, None)




CALIBRATION_CHUNK = 8  # images per collect_data call (see calibrated_ranges)


def calibrated_ranges(source: Path, op_types: list[str], work: Path, method: str, options: dict[str, Any],
                      images: np.ndarray, input_name: str, static_batch: int | None, tensors: set[str] | None = None):
    """onnxruntime's calibration ranges (``TensorsData``) of the graph at ``source`` on ``images``
    with edgevit's range ``method``, fed :data:`CALIBRATION_CHUNK` images at a time.

    Each ``collect_data`` call holds every tensor of every image it ran until it folds them in
    (mobilevitv2_050 at 256², 36 images in one call: 4.5 GB peak). Folding histograms chunk by
    chunk is not what one call computes, though: a later chunk with larger values re-bins the
    counts so far (MobileViT v2's worst int8 cosine moved from 0.983 to 0.966). So for the
    histogram methods a first pass over the same chunks measures each tensor's extremes and fixes
    its histogram's bins; the counts then add up to the one-call histograms. ``tensors`` restricts
    calibration to those tensors. A static-batch graph takes whole batches only."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(source, op_types, augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                                   extra_options=options)
    if tensors is not None and getattr(calibrator, "tensors_to_calibrate", None) is not None:
        calibrator.tensors_to_calibrate = set(tensors) & set(calibrator.tensors_to_calibrate)
    batch = static_batch or CALIBRATION_CHUNK
    chunk = max(batch, CALIBRATION_CHUNK // batch * batch)
    chunks = [part[:len(part) // batch * batch] if static_batch else part
              for part in (images[i:i + chunk] for i in range(0, len(images), chunk))]
    chunks = [part for part in chunks if len(part)]
    if not chunks:
        raise EdgevitError(f"this graph takes batches of {static_batch} images and calibration has {len(images)}; "
                           "give more calibration images")
    if method != "minmax":
        _fix_histogram_bins(calibrator, [{input_name: np.ascontiguousarray(part[i:i + batch])}
                                         for part in chunks for i in range(0, len(part), batch)])
    for part in chunks:
        calibrator.collect_data(CalibrationReader(part, input_name, batch))
    return calibrator.compute_data()


def _fix_histogram_bins(calibrator, feeds: list[dict[str, np.ndarray]]) -> None:
    """Run ``feeds`` through ``calibrator``'s augmented graph once, keeping only each tensor's
    extremes, and give its collector empty histograms over those, laid out as onnxruntime 1.32's
    HistogramCollector lays out the first batch it sees (absolute values for symmetric
    percentile, signed values over ±max|x| otherwise): later batches then only add counts."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    names = [o.name for o in calibrator.infer_session.get_outputs()]
    wanted = [i for i, name in enumerate(names) if name in calibrator.tensors_to_calibrate]
    low, high = {}, {}  # per tensor: min and max of the values, and of their magnitudes
    for feed in feeds:
        outputs = calibrator.infer_session.run(None, feed)
        for i in wanted:
            values = np.asarray(outputs[i]).reshape(-1)
            if values.size == 0:
                continue
            magnitudes = np.abs(values)
            found = (np.nanmin(values), np.nanmax(values), np.nanmin(magnitudes), np.nanmax(magnitudes))
            old_low, old_high = low.get(names[i]), high.get(names[i])
            low[names[i]] = found[::2] if old_low is None else tuple(map(min, old_low, found[::2]))
            high[names[i]] = found[1::2] if old_high is None else tuple(map(max, old_high, found[1::2]))
    collector = HistogramCollector(method=calibrator.method, symmetric=calibrator.symmetric,
                                   num_bins=calibrator.num_bins, num_quantized_bins=calibrator.num_quantized_bins,
                                   percentile=calibrator.percentile, scenario=calibrator.scenario)
    absolute = calibrator.method == "percentile" and calibrator.symmetric
    for name in low:
        (least, least_magnitude), (most, most_magnitude) = low[name], high[name]
        seed_low, seed_high = np.array(np.inf, least.dtype), np.array(-np.inf, most.dtype)  # min()/max() then take the data's
        if absolute:
            counts, edges = np.histogram(np.array([least_magnitude, most_magnitude]), bins=calibrator.num_bins)
            collector.histogram_dict[name] = (np.zeros_like(counts), edges.astype(most.dtype), seed_low, seed_high)
        else:
            threshold = np.array(max(abs(least), abs(most)), dtype=most.dtype)
            counts, edges = np.histogram(np.empty(0, most.dtype), calibrator.num_bins, range=(-threshold, threshold))
            collector.histogram_dict[name] = (counts, edges, seed_low, seed_high, threshold)
    calibrator.collector = collector


def module_boundaries(model, modules: list[str]) -> dict[str, str]:
    """For each module name, the tensor of ``model`` (an ONNX ModelProto exported with module
    scopes in its node names) that carries the module's output to the rest of the graph: the
    last tensor its nodes produce that a node outside it (or the graph's output) reads. Q/DQ
    nodes a quantizer added carry their tensor's scope, so in an int8 graph this is the
    dequantized value the next block sees. Modules with no node of their own are left out."""
    graph = OnnxGraph(model)
    inside: dict[str, set[int]] = {name: set() for name in modules}
    for index, node in enumerate(graph.nodes):
        owner = node_module(node.name)
        for name in modules:
            if owner == name or owner.startswith(name + "."):
                inside[name].add(index)
    position = {id(node): index for index, node in enumerate(graph.nodes)}
    found: dict[str, str] = {}
    for name, members in inside.items():
        crossing = [(index, tensor) for index in members for tensor in graph.nodes[index].output
                    if tensor in graph.outputs
                    or any(position[id(user)] not in members for user in graph.consumers.get(tensor, []))]
        if crossing:
            found[name] = max(crossing)[1]
    return found


def floors_at_zero(model, tensor: str, graph: OnnxGraph | None = None) -> bool:
    """Whether ``tensor`` comes out of a DequantizeLinear whose zero point is its integer type's
    lowest value, so it holds no negative values: the quantizer folded a ReLU after it into its
    range (a conv's output, before its ReLU, then exists in the int8 graph only clipped).
    ``graph``: ``OnnxGraph(model)``, when the caller asks of several tensors."""
    graph = graph or OnnxGraph(model)
    node = graph.producer.get(tensor)
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return False
    zero_point = constant_value(model.graph, node.input[2])
    if zero_point is None or zero_point.dtype.kind not in "iu":
        return False
    return bool(np.all(zero_point == np.iinfo(zero_point.dtype).min))


def prefix_model(model, tensor: str, graph: OnnxGraph | None = None):
    """The part of ``model`` that computes ``tensor``, with ``tensor`` its only output: the nodes it
    needs, in order, and their initializers (what ``inspect --latency`` times block by block).
    ``graph``: ``OnnxGraph(model)``, when the caller cuts several prefixes."""
    import onnx

    graph = graph or OnnxGraph(model)
    needed = graph.ancestors(tensor)
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.node[:]
    cut.graph.node.extend(node for node in model.graph.node if any(o in needed for o in node.output))
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(t for t in model.graph.initializer if t.name in needed)
    del cut.graph.output[:]
    cut.graph.output.extend([next((o for o in model.graph.output if o.name == tensor), onnx.ValueInfoProto(name=tensor))])
    return cut
