"""ONNX int8 through the target's own export(): static (and qat) Q/DQ graphs and dynamic
DynamicQuantizeMatMul graphs, run in onnxruntime and compared with the float32 eval model."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgevit.core.errors import EdgevitError
from edgevit.targets import onnx as onnx_target
from edgevit.verify import collapse_failure, compare_outputs
from edgevit.models import create_model, to_deploy
from edgevit.core.host import ARM_NO_DOT, INT8_KERNEL_CLASSES, X86_NO_VNNI
from edgevit.quant.onnx_graph import module_scopes, node_module
from edgevit.targets.onnx.int8 import PAIR_LIMIT, kernel_exactness, node_kinds
from edgevit.targets.recipes import resolve_recipe
from edgevit.quant.recipes import quant_settings
from edgevit.quant.spec import QuantSpec
from edgevit import runtimes

SMALLEST = ["mobilevitv2_050", "efficientformer_l1", "levit_128s", "edgevit_xxs"]
OPTIONS = {"opset": 18, "dynamic_batch": False, "exporter": "torchscript", "simplify": True, "fp16_io": False}
# Worst-sample cosine of int8 logits against the fp32 eval model on photo-like images with random
# weights, measured: mobilevitv2_050 0.9985, efficientformer_l1 0.99997, edgevit_xxs 0.9997,
# levit_128s 0.94-0.97 (its residual branches start at zero, so its logits are 1e-4-sized and
# the int8 error of the stem and downsampling attention is a larger share of them; trained
# LeViT keeps 0.985 top-1 agreement and fp32's top-1).
MIN_COSINE = {"mobilevitv2": 0.99, "efficientformer": 0.999, "levit": 0.9, "edgevit": 0.995}


def photo_like(model, count: int, seed: int) -> torch.Tensor:
    """Images with a photo's statistics, preprocessed like the model's own: 8-bit pixels from
    smooth random fields at several scales (neighbouring pixels correlate, as in photos, unlike
    uniform noise), normalised with the model's mean and std."""
    generator = torch.Generator().manual_seed(seed)
    channels, height, width = model.cfg.input_size
    field = torch.zeros(count, channels, height, width)
    for cells, weight in ((2, 1.0), (8, 0.5), (32, 0.25), (height, 0.1)):
        coarse = torch.rand(count, channels, cells, cells, generator=generator)
        field += weight * torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    low, high = field.amin((1, 2, 3), keepdim=True), field.amax((1, 2, 3), keepdim=True)
    pixels = torch.round(255 * (field - low) / (high - low)) / 255
    mean = torch.tensor(model.cfg.mean).view(1, -1, 1, 1)
    std = torch.tensor(model.cfg.std).view(1, -1, 1, 1)
    return (pixels - mean) / std


def seeded_model(name: str):
    torch.manual_seed(0)
    return create_model(name)


def export_int8(model, tmp_path, mode="static", calibration=None, options=None, **overrides):
    preset = resolve_recipe("onnx-int8", "onnx", "int8", mode=mode).quantization
    settings = quant_settings(model.cfg.family, preset, "onnx") | overrides
    spec = QuantSpec(**settings, calibration=calibration)
    out = tmp_path / f"{model.cfg.name}-{mode}"
    out.mkdir()
    return onnx_target.export(to_deploy(model), torch.zeros(1, *model.cfg.input_size), "int8",
                              {**OPTIONS, **(options or {})}, out, quant=spec)


def figures(model, artifact, images: torch.Tensor) -> dict:
    with torch.no_grad():
        reference = model(images).numpy()
    candidate = runtimes.load("onnxruntime", artifact).run(images.numpy())
    return compare_outputs(reference, candidate) | {"decided_top1_kept": decided_top1_kept(reference, candidate)}


def decided_top1_kept(reference: np.ndarray, candidate: np.ndarray) -> tuple[int, int]:
    """(kept, decided): samples whose fp32 top-1 leads the runner-up by more than twice the
    sample's largest int8 error must keep their class. Random-weight logits are nearly flat, so
    plain top-1 agreement there measures rounding noise, not the artifact."""
    ordered = np.sort(reference, axis=1)
    margin = ordered[:, -1] - ordered[:, -2]
    decided = margin > 2 * np.abs(candidate - reference).max(axis=1)
    kept = reference.argmax(1) == candidate.argmax(1)
    return int((kept & decided).sum()), int(decided.sum())


class _QdqGraph:
    """How the nodes of a QDQ graph will run in onnxruntime."""

    def __init__(self, path) -> None:
        self.model = onnx.load(str(path))
        self.nodes = list(self.model.graph.node)
        self.weights = {t.name for t in self.model.graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def _dequantized(self, name: str) -> bool:
        return self.producer.get(name) is not None and self.producer[name].op_type == "DequantizeLinear"

    def _activations(self, node) -> list[str]:
        return [i for i in node.input if i and i not in self.weights]

    def fed_by_int8(self, node) -> bool:
        inputs = self._activations(node)
        return bool(inputs) and all(self._dequantized(i) for i in inputs)

    def kept_float(self, node) -> bool:
        """Not fused into an int8 kernel (onnxruntime fuses a node whose inputs all come from
        Dequantize and whose outputs all go to Quantize), no quantized weights, and no rounding
        of its own: a dequantized input must come from an int8 producer, whose output is 8-bit."""
        outputs = [c for o in node.output for c in self.consumers.get(o, [])]
        fused = self.fed_by_int8(node) and outputs and all(c.op_type == "QuantizeLinear" for c in outputs)
        weights_int8 = any(self._dequantized(i) and self.producer[i].input[0] in self.weights for i in node.input)
        rounded = False
        for name in self._activations(node):
            if self._dequantized(name):
                quantizer = self.producer.get(self.producer[name].input[0])
                source = self.producer.get(quantizer.input[0]) if quantizer is not None else None
                rounded |= source is not None and not self.fed_by_int8(source)
        return not (fused or weights_int8 or rounded)

    def count(self, op_type: str) -> int:
        return sum(1 for n in self.nodes if n.op_type == op_type)


@pytest.fixture(scope="module")
def static_artifacts(tmp_path_factory):
    """Each family's smallest size, static int8 with the recommended settings and 4 calibration images."""
    made = {}
    for name in SMALLEST:
        model = seeded_model(name)
        result = export_int8(model, tmp_path_factory.mktemp(name), calibration=photo_like(model, 4, seed=1))
        made[name] = (model, result)
    return made


@pytest.mark.parametrize("name", SMALLEST)
def test_static_int8_matches_float32_on_photo_like_images(static_artifacts, name):
    model, result = static_artifacts[name]
    found = figures(model, result.path, photo_like(model, 8, seed=2))  # not the calibration images
    assert found["finite"]
    assert found["cosine"] >= MIN_COSINE[model.cfg.family], found
    kept, decided = found["decided_top1_kept"]
    assert kept == decided, found
    details = result.details["quantization"]
    assert details["format"] == "QDQ" and details["activation_type"] == "uint8" and details["weight_type"] == "int8"
    assert details["qdq_nodes"]["QuantizeLinear"] > 0
    assert details["quantized_op_types"].get("Conv", 0) + details["quantized_op_types"].get("Gemm", 0) > 0


def test_static_graph_runs_gelu_as_one_node_and_keeps_logits_float(static_artifacts):
    _, result = static_artifacts["efficientformer_l1"]
    graph = _QdqGraph(result.path)
    assert graph.count("Gelu") > 0 and graph.count("Erf") == 0
    logits = graph.producer[graph.model.graph.output[0].name]
    assert logits.op_type != "DequantizeLinear"


def test_float_modules_and_float_ops_are_honoured(tmp_path):
    model = seeded_model("levit_128s")
    block = "stages.1.blocks.1"
    result = export_int8(model, tmp_path, calibration=photo_like(model, 4, seed=1),
                         float_ops=("norm", "softmax", "attention_bias_add", "residual_add", "attention_matmul"),
                         float_modules=("head", block + "*"))
    graph = _QdqGraph(result.path)
    in_block = [n for n in graph.nodes if node_module(n.name).startswith(block + ".")]
    assert in_block and all(graph.kept_float(n) for n in in_block)
    head = [n for n in graph.nodes if node_module(n.name).startswith("head")]
    assert head and all(graph.kept_float(n) for n in head)
    kinds = node_kinds(onnx.load(str(result.path)))
    by_kind = [n for n in graph.nodes if kinds.get(n.name) in ("residual_add", "attention_matmul")]
    assert len(by_kind) > 20 and all(graph.kept_float(n) for n in by_kind)
    # and the rest is still int8
    assert result.details["quantization"]["quantized_op_types"].get("Gemm", 0) > 20
    found = figures(model, result.path, photo_like(model, 4, seed=2))
    assert found["cosine"] >= MIN_COSINE["levit"]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_dynamic_int8_on_both_exporters(tmp_path, exporter):
    model = seeded_model("levit_128s")
    excluded = "stages.2"
    result = export_int8(model, tmp_path, mode="dynamic", options={"exporter": exporter},
                         float_modules=("head", excluded))
    details = result.details["quantization"]
    assert details["mode"] == "dynamic" and details["quantized_op_types"].get("MatMulInteger", 0) > 10
    graph = _QdqGraph(result.path)
    # the dynamo graph's nodes were named after their modules, so the pattern found them
    in_stage = [n for n in graph.nodes if node_module(n.name).startswith(excluded + ".")]
    assert in_stage and not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in in_stage)
    assert any(n.op_type == "MatMul" for n in in_stage)
    found = figures(model, result.path, photo_like(model, 4, seed=2))
    assert found["cosine"] >= 0.999 and found["decided_top1_kept"][0] == found["decided_top1_kept"][1]
    assert onnx_target.int8_exactness(result)["not_exact_on"] == {}


def test_qat_without_its_program_is_refused(tmp_path):
    # ONNX QAT exports the trained program (tests/quant/test_qat.py); recalibrating float weights
    # instead would quietly drop what QAT learned.
    model = seeded_model("levit_128s")
    with pytest.raises(EdgevitError, match="--mode qat"):
        export_int8(model, tmp_path, mode="qat", calibration=photo_like(model, 4, seed=1))


def test_a_collapsed_artifact_is_caught(static_artifacts, tmp_path):
    model, result = static_artifacts["levit_128s"]
    graph = onnx.load(str(result.path))
    scales = {t.name: t for t in graph.graph.initializer}
    # An activation scale far above the tensor's range: every value rounds to the zero point.
    last_q = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"][-1]
    scales[last_q.input[1]].CopyFrom(numpy_helper.from_array(np.array(1e6, dtype=np.float32), last_q.input[1]))
    broken = tmp_path / "collapsed.onnx"
    onnx.save(graph, str(broken))
    images = photo_like(model, 8, seed=2)
    with torch.no_grad():
        reference = model(images).numpy()
    collapsed = compare_outputs(reference, runtimes.load("onnxruntime", broken).run(images.numpy()))
    healthy = figures(model, result.path, images)
    assert collapsed["distinct_values"] < 0.1 * healthy["distinct_values"]
    assert collapse_failure(reference, collapsed) is not None
    assert collapse_failure(reference, healthy) is None


def test_int8_without_settings_is_refused(tmp_path):
    model = seeded_model("levit_128s")
    with pytest.raises(EdgevitError, match="edgevit quantize levit_128s"):
        onnx_target.export(to_deploy(model), torch.zeros(1, 3, 224, 224), "int8", OPTIONS, tmp_path)


def test_module_paths_round_trip_through_node_names():
    for module in ("stem.conv1", "stages.1.0.conv1_1x1.act", "stages.0.blocks.0.attn.qkv", "head"):
        name = "/" + "/".join(module_scopes(module)) + "/Conv"
        assert node_module(name) == module
    assert node_module("Transpose_token_77") == ""


def _int8_weights(model, dtype=np.int8) -> dict[str, tuple[np.ndarray, int]]:
    """The ``dtype`` weight tensors of a QDQ graph's linear ops with their channel axis (the
    DequantizeLinear's per-channel axis), by initializer name."""
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weight_slots = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}
    found = {}
    for node in model.graph.node:
        values = constants.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.output[0] in weight_slots else None
        if values is not None and values.dtype == dtype and values.ndim >= 2:
            found[node.input[0]] = (values, next((a.i for a in node.attribute if a.name == "axis"), 1))
    return found


@pytest.mark.parametrize("name", SMALLEST)
def test_static_weights_are_exact_on_every_cpu(static_artifacts, name):
    # No two int8 weights of an output channel sum to more than 128 in magnitude, so the u8·s8
    # kernels of x86 without VNNI (VPMADDUBSW's saturating int16 pair sums) compute exactly.
    model, result = static_artifacts[name]
    kernels = onnx_target.int8_exactness(result)  # read from the file written
    assert kernels["not_exact_on"] == {} and set(kernels["exact_on"]) == set(INT8_KERNEL_CLASSES)
    assert 0 < kernels["worst_weight_pair"] <= PAIR_LIMIT
    graph = onnx.load(str(result.path))
    weights, full_range = _int8_weights(graph), _int8_weights(graph, np.uint8)
    assert len(weights) + len(full_range) == kernels["checked_weights"]
    # The family's most weight-sensitive layers keep all 8 bits, as uint8 (u8·u8 kernels: exact).
    expected = quant_settings(model.cfg.family, {"mode": "static"}, "onnx")["full_range_weights"]
    assert len(result.details["quantization"]["full_range_weights"]) == len(full_range) == expected
    for values, axis in weights.values():
        rows = np.moveaxis(np.abs(values.astype(np.int32)), axis, 0).reshape(values.shape[axis], -1)
        assert (np.sort(rows, axis=1)[:, -2:].sum(axis=1) <= PAIR_LIMIT).all() and values.min() > -128
    # Not a blanket 7 bits (which stop at 64): a channel whose largest weight stands out uses more
    # levels (measured on these random weights: 65 LeViT, 83 EfficientFormer, 95-96 the others).
    assert max(int(np.abs(v).max()) for v, _ in weights.values()) > 64


def test_a_planted_saturating_pair_and_a_minus_128_weight_are_caught(static_artifacts):
    _, result = static_artifacts["efficientformer_l1"]
    graph = onnx.load(str(result.path))
    name, (values, axis) = next((k, v) for k, v in _int8_weights(graph).items() if v[1] == 0)  # a Conv's
    planted = values.copy()
    planted.reshape(len(planted), -1)[0, :2] = (127, -100)  # |127| + |-100| = 227 > 128 in channel 0
    tensor = next(t for t in graph.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(planted, name))
    found = kernel_exactness(graph)
    assert X86_NO_VNNI in found["not_exact_on"] and found["worst_weight_pair"] == 227
    assert "VPMADDUBSW" in found["not_exact_on"][X86_NO_VNNI] and X86_NO_VNNI not in found["exact_on"]
    assert ARM_NO_DOT in found["exact_on"]
    planted[0] = 0
    planted.reshape(len(planted), -1)[0, 0] = -128
    tensor.CopyFrom(numpy_helper.from_array(planted, name))
    found = kernel_exactness(graph)
    assert ARM_NO_DOT in found["not_exact_on"] and "-128" in found["not_exact_on"][ARM_NO_DOT]
    assert X86_NO_VNNI in found["exact_on"]  # |-128| + |0| = 128 does not saturate


def _matmul_through_transpose(weight: np.ndarray):
    """input (1, 4, K) · Transpose(DequantizeLinear(weight (N, K))): a Linear as the dynamo
    exporter writes it in a QDQ graph."""
    from onnx import TensorProto, helper

    n, k = weight.shape
    nodes = [helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["w_float"], axis=0),
             helper.make_node("Transpose", ["w_float"], ["w_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w_t"], ["y"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, n])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "w_scale"),
                               numpy_helper.from_array(np.zeros(n, np.int8), "w_zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_weight_behind_a_transpose_is_checked_along_its_own_channels():
    weight = np.zeros((3, 8), np.int8)  # (N out, K in): the pairs a kernel sums lie along K
    weight[1, 2], weight[1, 5] = 127, -100
    found = kernel_exactness(_matmul_through_transpose(weight))
    assert found["checked_weights"] == 1 and found["worst_weight_pair"] == 227 and X86_NO_VNNI in found["not_exact_on"]
    # The same values spread over two channels pair with nothing: exact.
    weight[1, 5], weight[2, 5] = 0, -100
    found = kernel_exactness(_matmul_through_transpose(weight))
    assert found["worst_weight_pair"] == 127 and found["not_exact_on"] == {}


def test_the_pipeline_refuses_an_artifact_not_exact_on_every_cpu(static_artifacts, tmp_path):
    from edgevit.targets.base import ExportResult
    from edgevit.pipeline.export import _check_int8_kernels

    _, result = static_artifacts["efficientformer_l1"]
    graph = onnx.load(str(result.path))
    name, (values, _axis) = next((k, v) for k, v in _int8_weights(graph).items() if v[1] == 0)
    planted = values.copy()
    planted.reshape(len(planted), -1)[0, :2] = (127, 127)
    next(t for t in graph.graph.initializer if t.name == name).CopyFrom(numpy_helper.from_array(planted, name))
    path = tmp_path / "planted.onnx"
    onnx.save(graph, str(path))
    verification = {"passed": True, "failures": []}
    _check_int8_kernels(onnx_target, ExportResult(path, result.details), verification, enforce=True)
    assert verification["passed"] is False and verification["failures"][0].startswith(f"not exact on {X86_NO_VNNI}")
    # --no-verify records the reading but does not judge
    skipped = {"passed": None}
    _check_int8_kernels(onnx_target, ExportResult(path, result.details), skipped, enforce=False)
    assert skipped["passed"] is None and X86_NO_VNNI in skipped["int8_kernels"]["not_exact_on"]


def test_pair_safe_ranking_rounds_weights_as_the_onnx_quantizer_does(static_artifacts):
    """sensitivity.pair_safe_fake_quant_weight (which ranks the layers that keep 8 bits) and the
    ranges given to onnxruntime describe the same int8 grid."""
    from edgevit.targets.onnx.int8 import pair_safe_weight_ranges
    from edgevit.quant.sensitivity import pair_safe_fake_quant_weight

    weight = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    weight[2, 0, 0, 0] = 9.0  # a channel with one outlier
    from onnx import helper
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="/conv/Conv")
    graph = helper.make_graph([node], "g", [], [], [numpy_helper.from_array(weight.numpy(), "w")])
    ranges = pair_safe_weight_ranges(helper.make_model(graph), per_channel=True)["w"]
    scales = torch.tensor([r["rmax"] / 127 for r in ranges]).view(-1, 1, 1, 1)
    expected = (weight / scales).round().clamp(-127, 127) * scales
    assert torch.allclose(pair_safe_fake_quant_weight(weight), expected, atol=1e-6)
