"""The TensorRT target: the ONNX TensorRT consumes for each precision, verified in onnxruntime
here; Q/DQ placed as TensorRT fuses it (checked by walking the graph); the trtexec line that
builds the same engine. Engine build and run need TensorRT and a CUDA GPU: those tests skip
elsewhere with that reason."""
import collections
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install -e '.[onnx]')")

from edgevit.cli import main  # noqa: E402
from edgevit.core.errors import EdgevitError  # noqa: E402
from edgevit.targets import TARGETS  # noqa: E402
from edgevit.runtimes import RuntimeUnavailable  # noqa: E402
from edgevit.pipeline.export import ExportRequest, export_model  # noqa: E402
from tests.test_cli import assert_one_line_error  # noqa: E402
from edgevit.targets.recipes import resolve_recipe  # noqa: E402
from edgevit.targets.tensorrt import (  # noqa: E402
    BUILD_SCRIPT, trtexec_command,
)
from edgevit.models import create_model, get_model_cfg, load_checkpoint, to_deploy  # noqa: E402
from edgevit.quant.calibration import calibration_from_folder  # noqa: E402
from edgevit.quant.recipes import quant_settings  # noqa: E402
from edgevit.quant.spec import QuantSpec  # noqa: E402
from edgevit.quant.onnx_graph import node_module  # noqa: E402
from edgevit.targets.tensorrt.int8 import plan_qdq  # noqa: E402
from edgevit import runtimes  # noqa: E402
from edgevit.profile import timing  # noqa: E402
from edgevit.runtimes.tensorrt import engine_mismatch, unavailable_reason  # noqa: E402
from tests.reference_data import write_as_published  # noqa: E402

# The smallest size of each family, with the shared reference checkpoint it loads (random
# initialisation leaves LeViT's logits at 1e-5, where int8 figures mean nothing).
SMALLEST = [
    ("mobilevitv2_050", "timm__mobilevitv2_050"),
    ("efficientformer_l1", "timm__efficientformer_l1"),
    ("levit_128s", "timm__levit_128s"),
    ("edgevit_xxs", "saic__edgevit_xxs"),
]
CALIBRATION_IMAGES = 8  # CI-sized; the preset draws 64
ENGINE_SKIP = unavailable_reason()
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Calibration images as --calib-data reads them: random crops (and flips) of a photo shipped
    with matplotlib, saved as JPEG files."""
    import matplotlib
    from PIL import Image

    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(CALIBRATION_IMAGES):
        side = int(min(photo.size) * rng.uniform(0.3, 1.0))
        left, top = rng.integers(0, photo.size[0] - side + 1), rng.integers(0, photo.size[1] - side + 1)
        crop = photo.crop((left, top, left + side, top + side))
        (crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop).save(folder / f"crop{i}.jpg")
    return folder


def _calibration(model: str, folder: Path):
    """The model's own preprocessing of the photos, as `edgevit quantize --calib-data` takes them."""
    return calibration_from_folder(folder, get_model_cfg(model), CALIBRATION_IMAGES)


def _int8_spec(model: str) -> QuantSpec:
    """The spec the pipeline builds from the tensorrt-int8 preset and the family's defaults
    (for what it keeps float; the calibration images do not matter here)."""
    cfg = get_model_cfg(model)
    settings = quant_settings(cfg.family, resolve_recipe(None, "tensorrt", "int8").quantization)
    return QuantSpec(**settings, calibration=torch.zeros(1, *cfg.input_size))


def _deploy_model(model: str, stem: str, directory: Path):
    eval_model = create_model(model)
    load_checkpoint(eval_model, str(write_as_published(stem, directory)))
    return to_deploy(eval_model)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, photo_folder):
    """Each (model, precision) exported once through the pipeline, shared by the tests below."""
    outcomes = {}

    def get(model: str, stem: str, precision: str):
        if (model, precision) not in outcomes:
            directory = tmp_path_factory.mktemp(f"{model}-{precision}")
            weights = write_as_published(stem, directory)
            calibration = _calibration(model, photo_folder) if precision == "int8" else None
            outcomes[model, precision] = export_model(ExportRequest(model, "tensorrt", precision, weights=str(weights), out_dir=directory / "out", calibration=calibration))
        return outcomes[model, precision]

    return get


# ------------------------------------------------------------ every family: fp16 and int8 verify

@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.parametrize("model,stem", SMALLEST)
def test_tensorrt_ready_onnx_verifies_in_onnxruntime(model, stem, precision, exported):
    outcome = exported(model, stem, precision)
    verification, details = outcome.verification, outcome.manifest["target_details"]
    assert verification["passed"], verification["failures"]
    if precision == "fp16":
        assert verification["cosine"] >= 0.999
    else:
        assert verification["cosine"] >= 0.97 and verification["distinct_values"] > 100
    assert details["tensorrt"]["consumes"] == f"{model}.onnx"
    assert (outcome.bundle / f"{model}.onnx").is_file() and (outcome.bundle / BUILD_SCRIPT).is_file()
    engine = details["tensorrt"]["engine"]
    if ENGINE_SKIP:
        # Honest about what ran: the ONNX in onnxruntime, not an engine.
        assert outcome.artifact.suffix == ".onnx" and engine == {"built": False, "reason": ENGINE_SKIP}
        assert "onnxruntime" in verification["check"] and "artifact not run" in verification["check"]
    else:
        assert outcome.artifact.suffix == ".engine" and engine["built"] and verification["check"].startswith("TensorRT")


@pytest.mark.parametrize("model,stem", SMALLEST)
def test_fp16_graph_is_strongly_typed_with_float32_io_and_float32_norms(model, stem, exported):
    graph = onnx.load(str(exported(model, stem, "fp16").bundle / f"{model}.onnx"))
    inferred = onnx.shape_inference.infer_shapes(graph, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in
             (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types |= {t.name: t.data_type for t in graph.graph.initializer}
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [types[i.name] for i in graph.graph.input] == [float32] and [types[o.name] for o in graph.graph.output] == [float32]
    kinds = collections.Counter()
    for node in graph.graph.node:
        floats = [types[name] for name in node.input if name and types.get(name) in (float32, float16)]
        if node.op_type in ("LayerNormalization", "InstanceNormalization", "Softmax", "ReduceMean"):
            assert floats and set(floats) == {float32}, f"{node.name} is not float32"
        elif node.op_type in WEIGHTED:
            kinds[types[node.input[1]]] += 1
        if node.op_type != "Cast":
            # Strongly typed: no op mixes float16 and float32 data without an explicit Cast.
            assert len(set(floats)) <= 1, f"{node.name} mixes float types"
    assert kinds[float16] >= 1 and kinds[float32] == 0  # every conv/linear computes in float16


def test_range_precheck_keeps_ops_beyond_float16_in_float32(tmp_path):
    """A conv whose outputs reach 2e5 (float16 stops at 65504), scaled back down: the pre-check
    keeps the conv and its consumer in float32, so the float16 graph stays finite and exact."""
    from onnx import TensorProto, helper, numpy_helper

    from edgevit.runtimes.onnxruntime import build_session
    from edgevit.targets.tensorrt import to_float16

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["input", "w"], ["big"], name="/conv/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["big", "small"], ["scaled"], name="/scale/Mul"),
             helper.make_node("Relu", ["scaled"], ["act"], name="/act/Relu"),
             helper.make_node("GlobalAveragePool", ["act"], ["pooled"], name="/pool/GlobalAveragePool"),
             helper.make_node("Flatten", ["pooled"], ["logits"], name="/flatten/Flatten")]
    weights = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 2e4).astype(np.float32), "w"),
               numpy_helper.from_array(np.array(1e-4, np.float32), "small")]
    graph = helper.make_model(helper.make_graph(
        nodes, "overflow", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], weights),
        opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    sample = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    converted, kept = to_float16(graph, sample)
    assert set(kept["kept_float32_for_range"]) == {"/conv/Conv", "/scale/Mul"}
    assert min(kept["kept_float32_for_range"].values()) > 65504 / 2
    assert kept["float16_round_trips_removed"] == 2  # input → conv and conv → mul stay float32

    def run(model, name):
        onnx.save(model, str(tmp_path / name))
        return build_session(tmp_path / name).run(None, {"input": sample})[0]

    reference = run(graph, "fp32.onnx")
    np.testing.assert_allclose(run(converted, "fp16.onnx"), reference, rtol=1e-2, atol=1e-2 * np.abs(reference).max())


# --------------------------------------------------------------------- Q/DQ placement, walked

def _producers(graph):
    return {out: node for node in graph.node for out in node.output}


def _dequantized(name, producers):
    node = producers.get(name)
    return node is not None and node.op_type == "DequantizeLinear"


@pytest.mark.parametrize("model,stem", SMALLEST)
def test_qdq_placement_follows_tensorrt_fusion_rules(model, stem, exported, tmp_path):
    graph = onnx.load(str(exported(model, stem, "int8").bundle / f"{model}.onnx")).graph
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    producers = _producers(graph)
    spec = _int8_spec(model)
    float_modules = set(spec.float_module_names(_deploy_model(model, stem, tmp_path)))

    def in_float_module(node):
        module = node_module(node.name)
        return any(module == m or module.startswith(m + ".") for m in float_modules)

    def is_constant(name):
        return name in initializers or _dequantized(name, producers) and producers[name].input[0] in initializers

    weighted_int8 = residual_skips = 0
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            scale, zero = initializers[node.input[1]], initializers[node.input[2]]
            # Activations: one symmetric int8 scale per tensor.
            assert scale.shape == () and scale > 0 and zero.dtype == np.int8 and zero == 0
        elif node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            weight, scale = initializers[node.input[0]], initializers[node.input[1]]
            assert weight.dtype == np.int8 and np.abs(weight.astype(int)).max() <= 127
            assert not initializers[node.input[2]].any()
            if scale.ndim == 1:  # per channel: one scale per output channel along the axis
                axis = next(a.i for a in node.attribute if a.name == "axis")
                assert weight.shape[axis] == len(scale)
        elif node.op_type in WEIGHTED and is_constant(node.input[1]):
            quantized = _dequantized(node.input[1], producers)
            assert quantized != in_float_module(node), f"{node.name}: float module {in_float_module(node)}"
            if quantized:
                weighted_int8 += 1
                assert _dequantized(node.input[0], producers), f"{node.name}: activation input has no Q/DQ"
                dq = producers[node.input[1]]
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                if node.op_type != "ConvTranspose" or group == 1:
                    assert initializers[dq.input[1]].ndim == 1, f"{node.name}: weights not per channel"
        elif node.op_type in ("LayerNormalization", "InstanceNormalization", "Softmax"):
            # norm and softmax are in the family's float_ops: no Q/DQ around them.
            assert not any(_dequantized(name, producers) for name in node.input), node.name
        elif node.op_type == "Add" and not any(is_constant(name) for name in node.input):
            first, second = node.input
            dequantized = [_dequantized(first, producers), _dequantized(second, producers)]
            if any(dequantized):
                # Residual add: Q/DQ on the skip only; the branch is a weighted op's own output,
                # which TensorRT fuses the add into.
                assert dequantized.count(True) == 1, node.name
                skip, branch = (first, second) if dequantized[0] else (second, first)
                source = producers[branch]
                # through reshapes and a bias add (a linear with a free batch is MatMul + Add)
                while source.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze") or (
                        source.op_type == "Add" and any(is_constant(name) for name in source.input)):
                    source = producers[next(name for name in source.input if not is_constant(name))]
                assert source.op_type in WEIGHTED and _dequantized(source.input[1], producers), node.name
                skip_float = producers[producers[skip].input[0]].input[0]  # DQ ← Q ← the float skip tensor
                assert _reaches(skip_float, branch, producers), f"{node.name}: skip is not upstream of the branch"
                residual_skips += 1
    assert weighted_int8 >= 20 and residual_skips >= 3


def _reaches(tensor, target, producers):
    """Whether ``target`` is computed from ``tensor``."""
    stack, seen = [target], set()
    while stack:
        name = stack.pop()
        if name == tensor:
            return True
        node = producers.get(name)
        if node is not None and name not in seen:
            seen.add(name)
            stack.extend(node.input)
    return False


@pytest.fixture(scope="module")
def levit_fp32_dynamic(tmp_path_factory):
    """LeViT at fp32 with a free batch dimension (random weights)."""
    return export_model(ExportRequest("levit_128s", "tensorrt", "fp32", out_dir=tmp_path_factory.mktemp("fp32"), options={"dynamic_batch": True}))


@pytest.fixture(scope="module")
def levit_fp32_graph(levit_fp32_dynamic):
    """The float32 graph the Q/DQ placement starts from (placement needs no calibration)."""
    return onnx.load(str(levit_fp32_dynamic.bundle / "levit_128s.onnx"))


def test_spec_decides_what_stays_float(levit_fp32_graph):
    model = create_model("levit_128s")
    base = QuantSpec(mode="static", float_ops=("norm", "softmax"), calibration=torch.zeros(1, 3, 224, 224))

    def rules(spec, modules=()):
        placement = plan_qdq(levit_fp32_graph, spec, spec.float_module_names(model) if modules else ())
        return collections.Counter(q.rule for q in placement.inputs), placement

    default, placement = rules(base)
    constants = {t.name for t in levit_fp32_graph.graph.initializer}
    weighted = [n for n in levit_fp32_graph.graph.node if n.op_type in WEIGHTED and n.input[1] in constants]
    assert default["weighted-op input"] == len(placement.weights) == len(weighted) == 51
    assert default["residual add skip input"] == 20 and "softmax input" not in default
    assert default["attention matmul input"] == 22  # q·kᵀ; attn·v reads the float softmax
    unquantized_softmax, _ = rules(base.with_changes(float_ops=("norm",)))
    assert unquantized_softmax["softmax input"] == 11 and unquantized_softmax["attention matmul input"] == 44
    no_residual, _ = rules(base.with_changes(float_ops=("norm", "softmax", "residual_add", "attention_matmul")))
    assert "residual add skip input" not in no_residual and "attention matmul input" not in no_residual
    per_tensor = plan_qdq(levit_fp32_graph, base.with_changes(per_channel=False))
    assert {w.axis for w in per_tensor.weights} == {None}
    stage0_float, kept = rules(base.with_changes(float_modules=("stages.0*",)), modules=True)
    assert kept.float_weighted and all(node_module(n).startswith("stages.0") for n in kept.float_weighted)
    assert not any(node_module(q.node).startswith("stages.0") for q in kept.inputs)


# ------------------------------------------------------------------------------------ trtexec

# trtexec's build options (TensorRT 10.x `trtexec --help`) that edgevit may print.
TRTEXEC_FLAGS = {"--onnx", "--saveEngine", "--stronglyTyped", "--memPoolSize", "--timingCacheFile", "--skipInference",
                 "--minShapes", "--optShapes", "--maxShapes", "--noTF32"}


def _parse_trtexec(command: str) -> dict[str, str]:
    argv = shlex.split(command)
    assert argv[0] == "trtexec"
    flags = {}
    for argument in argv[1:]:
        flag, _, value = argument.partition("=")
        assert flag in TRTEXEC_FLAGS and flag not in flags, f"unexpected or repeated flag {flag}"
        flags[flag] = value
    return flags


def test_trtexec_command_is_well_formed_and_matches_the_script(exported):
    outcome = exported("levit_128s", "timm__levit_128s", "fp16")
    command = outcome.manifest["target_details"]["tensorrt"]["trtexec"]
    flags = _parse_trtexec(command)
    assert flags["--onnx"] == "levit_128s.onnx" and flags["--saveEngine"] == "levit_128s.engine"
    assert flags["--memPoolSize"] == "workspace:1024M" and flags["--timingCacheFile"] == "levit_128s.timing.cache"
    assert "--stronglyTyped" in flags and "--fp16" not in command and "--int8" not in command  # precision is in the ONNX
    assert not {"--minShapes", "--noTF32"} & set(flags)  # static batch 1; fp16
    script = (outcome.bundle / BUILD_SCRIPT).read_text()
    assert script.startswith("#!/bin/sh\n") and os.access(outcome.bundle / BUILD_SCRIPT, os.X_OK)
    assert script.rstrip().endswith(f'cd "$(dirname "$0")" && exec {command}')


def test_dynamic_batch_gives_an_optimisation_profile():
    options = {**resolve_recipe(None, "tensorrt", "fp32").options, "dynamic_batch": True, "opt_batch": 4, "max_batch": 16}
    flags = _parse_trtexec(shlex.join(trtexec_command("m.onnx", "m.engine", "m.timing.cache", (3, 224, 224), "fp32", options)))
    shapes = {k: [int(d) for d in flags[k].split(":")[1].split("x")] for k in ("--minShapes", "--optShapes", "--maxShapes")}
    assert all(flags[k].startswith("input:") for k in shapes)
    assert shapes == {"--minShapes": [1, 3, 224, 224], "--optShapes": [4, 3, 224, 224], "--maxShapes": [16, 3, 224, 224]}
    assert "--noTF32" in flags  # fp32 means fp32, not TensorRT's default TF32


def test_dynamic_batch_onnx_runs_any_batch_in_onnxruntime(levit_fp32_dynamic):
    outcome = levit_fp32_dynamic
    assert outcome.verification["passed"] and outcome.verification["max_rel_error"] < 1e-4
    from edgevit.runtimes.onnxruntime import build_session

    sess = build_session(outcome.bundle / "levit_128s.onnx")
    assert sess.get_inputs()[0].shape[0] == "batch"
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    assert sess.run(None, {"input": x})[0].shape == (3, 1000)
    assert "--maxShapes=input:8x3x224x224" in outcome.manifest["target_details"]["tensorrt"]["trtexec"]


# ------------------------------------------------------------------------------- bad input

def test_tensorrt_offers_no_dynamic_quantization(tmp_path):
    assert TARGETS["tensorrt"].quant_modes == ("static", "qat")
    spec = QuantSpec(mode="dynamic")
    with pytest.raises(EdgevitError, match="TensorRT has no dynamic quantization"):
        export_model(ExportRequest("levit_128s", "tensorrt", "int8", out_dir=tmp_path, quant=spec, verify=False))
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_an_inverted_profile_in_one_line(capsys, tmp_path):
    code = main(["export", "levit_128s", "-t", "tensorrt", "--dynamic-batch", "--opt-batch", "9", "--max-batch", "4",
                 "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert_one_line_error(code, "", err, "--opt-batch 9 is larger than --max-batch 4")
    assert code == 2
    assert list(tmp_path.iterdir()) == []


def test_engine_for_another_gpu_or_version_is_refused():
    built = {"gpu": "NVIDIA Jetson Orin Nano", "compute_capability": "8.7", "tensorrt": "10.3.0"}
    assert engine_mismatch(built, dict(built)) is None
    message = engine_mismatch(built, {"gpu": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "tensorrt": "10.3.0"})
    assert "compute capability 8.7 (here 8.9)" in message and "Jetson Orin Nano" in message and BUILD_SCRIPT in message
    assert "TensorRT 10.3.0 (here 11.4.0)" in engine_mismatch(built, {**built, "tensorrt": "11.4.0"})


@pytest.mark.skipif(not ENGINE_SKIP, reason="TensorRT and a CUDA GPU are present: the engine runs instead")
def test_bundle_without_engine_says_why(exported):
    outcome = exported("levit_128s", "timm__levit_128s", "fp16")
    with pytest.raises(RuntimeUnavailable, match=f"{ENGINE_SKIP}; {BUILD_SCRIPT}"):
        runtimes.load("tensorrt", outcome.artifact)


# ---------------------------------------------------------------------- engine (GPU + TensorRT)

engine_only = pytest.mark.skipif(bool(ENGINE_SKIP), reason=f"TensorRT engine tests need TensorRT and a CUDA GPU: {ENGINE_SKIP}")


@engine_only
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_builds_runs_and_matches_pytorch(precision, tmp_path, photo_folder):
    weights = write_as_published("timm__levit_128s", tmp_path)
    calibration = _calibration("levit_128s", photo_folder) if precision == "int8" else None
    options = {"dynamic_batch": True, "opt_batch": 2, "max_batch": 4, "timing_cache": str(tmp_path / "shared.cache")}
    outcome = export_model(ExportRequest("levit_128s", "tensorrt", precision, weights=str(weights), out_dir=tmp_path / "out", options=options, calibration=calibration))
    engine = outcome.manifest["target_details"]["tensorrt"]["engine"]
    assert outcome.artifact.suffix == ".engine" and outcome.verification["check"] == TARGETS["tensorrt"].runtime
    assert engine["built"] and engine["gpu"] == torch.cuda.get_device_name() and engine["tensorrt"]
    assert (outcome.bundle / engine["timing_cache"]).stat().st_size > 0 and (tmp_path / "shared.cache").is_file()
    session = runtimes.load("tensorrt", outcome.artifact, batch=2)
    x = np.random.default_rng(0).standard_normal((6, 3, 224, 224)).astype(np.float32)
    assert session.run(x).shape == (6, 1000)  # chunks of the profile's max batch, 4
    assert session.input_shape[0] == 2 and timing.measure(session.bench, runs=5, clock=timing.cuda_event_clock).p50_ms > 0


@engine_only
def test_engine_refuses_metadata_of_another_gpu(tmp_path):
    outcome = export_model(ExportRequest("levit_128s", "tensorrt", "fp16", out_dir=tmp_path))
    metadata = outcome.bundle / f"{outcome.artifact.name}.json"
    metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "compute_capability": "1.0"}))
    with pytest.raises(EdgevitError, match=r"compute capability 1.0 \(here"):
        runtimes.load("tensorrt", outcome.artifact)


def test_int8_precheck_runs_the_qdq_pairs_in_float(exported, tmp_path):
    """The pre-check must not depend on the host's int8 kernels (issue #13: on an AVX2 host the
    fused ones saturate): it runs the graph as ONNX defines it, every optimisation off. (With
    onnxruntime's optimisations, even with its Q/DQ fusion off, the logits moved by 4 % of their
    range.)"""
    import onnxruntime as ort

    from edgevit.targets import tensorrt
    from edgevit.targets.base import ExportResult

    outcome = exported("mobilevitv2_050", "timm__mobilevitv2_050", "int8")
    path = outcome.bundle / "mobilevitv2_050.onnx"
    batch = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 256, 256)).astype(np.float32))
    deploy = _deploy_model("mobilevitv2_050", "timm__mobilevitv2_050", tmp_path)
    simulated = tensorrt.precheck(ExportResult(path, {}, evidence={"onnx": path}), deploy, batch, "int8").candidate
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = plain.get_inputs()[0].name
    reference = np.concatenate([plain.run(None, {name: batch[i:i + 1].numpy()})[0] for i in range(len(batch))])
    assert np.abs(simulated - reference).max() <= 1e-4 * np.abs(reference).max()
