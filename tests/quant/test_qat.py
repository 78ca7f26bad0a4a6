"""QAT with PT2E: a small model trained for a few steps on Fashion-MNIST is fine-tuned with fake
quantization, converted at batch 1, and lowered to a fully delegated .pte, a W8A8 Core ML
program and an ONNX graph carrying its trained scales; the fine-tuned float weights come back
under the deploy model's own names."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("executorch", reason="the executorch extra is not installed (pip install -e '.[executorch]')")

from edgevit.data.fashion_mnist import data_dir, load_fashion_mnist  # noqa: E402
from edgevit.core.errors import EdgevitError  # noqa: E402
from edgevit.targets import coreml, executorch, onnx as onnx_target  # noqa: E402
from edgevit.verify import compare_outputs  # noqa: E402
from edgevit.quant.pt2e import run_graph  # noqa: E402
from edgevit.quant import pt2e  # noqa: E402
from edgevit.quant.qat import (PROGRAM_STATE_FILE, program_from_state, read_program_state, run_qat,  # noqa: E402
                               write_program_state)
from edgevit.quant.spec import QuantSpec  # noqa: E402
from edgevit.training import fine_tune  # noqa: E402
from edgevit import runtimes  # noqa: E402
from tests.quant.test_pt2e import COREML, XNNPACK, _TinyViT  # noqa: E402

if not (data_dir() / "train-images-idx3-ubyte.gz").is_file():
    if os.environ.get("CI"):  # .ci/run installs the package: its absence there is a broken set-up
        raise RuntimeError(f"Fashion-MNIST not found in {data_dir()}: .ci/run must install dataset-fashion-mnist")
    pytest.skip(f"Fashion-MNIST not found in {data_dir()} (apt-get install dataset-fashion-mnist)", allow_module_level=True)


def _trained_model():
    torch.manual_seed(0)
    model = _GroupNormViT()
    train = load_fashion_mnist("train", model.cfg, limit=2048)
    fine_tune(model, train, steps=120, batch_size=64, lr=3e-3, progress=False)
    return model.eval().requires_grad_(False), train


class _GroupNormViT(_TinyViT):
    """The tiny ViT with MobileViT v2's one-group GroupNorm after the stem (its decomposed form
    for XNNPACK stores the affine vectors as (C, 1, 1), the deploy model as (C,))."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(self.stem, nn.GroupNorm(1, 32))


@pytest.fixture(scope="module")
def qat_result():
    model, train = _trained_model()
    calibration = train.batch(list(range(16)))[0]
    spec = QuantSpec(mode="qat", calibration=calibration, float_ops=("norm", "softmax"), float_modules=("head",))
    result = run_qat(model, train, calibration, spec, steps=8, batch_size=32, lr=1e-4)
    return model, spec.with_changes(qat_model=result.converted_model), result


def test_qat_trains_and_gives_back_the_fine_tuned_float_weights(qat_result):
    model, _spec, result = qat_result
    figures = result.figures
    assert figures["training"]["steps"] == 8 and figures["training"]["batch_size"] == 32
    assert figures["quantization"]["mode"] == "qat" and "fake-quantized" in figures["quantization"]["activations"]
    float_model = result.fine_tuned_float_model
    assert type(float_model) is type(model) and isinstance(float_model.stem[1], nn.GroupNorm)
    before, after = model.state_dict(), float_model.state_dict()
    assert before.keys() == after.keys()
    assert after["stem.1.weight"].shape == (32,)  # GroupNorm's own shape, not the decomposed (32, 1, 1)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert "qkv.weight" in moved and "stem.1.weight" in moved and "head.weight" in moved


def test_qat_model_lowers_to_a_delegated_pte_that_agrees_with_its_float_model(qat_result, tmp_path):
    _model, spec, result = qat_result
    test = load_fashion_mnist("test", result.fine_tuned_float_model.cfg, limit=64)
    images, labels = test.batch(list(range(64)))
    artifact = executorch.export(result.fine_tuned_float_model, images[:1], "int8", XNNPACK, tmp_path, quant=spec)
    details = artifact.details
    assert details["delegated_share"] == 1.0 and details["delegated_subgraphs"] == 1
    assert details["quantization"]["mode"] == "qat" and details["quantization"]["pt2e_ops"]["quantize_per_tensor"] > 0
    with torch.no_grad():
        expected = result.fine_tuned_float_model(images)
    got = runtimes.load("executorch", artifact.path, options=XNNPACK).run(images.numpy())
    figures = compare_outputs(expected.numpy(), got)
    # Measured: cosine 0.9998, top-1 agreement 1.0; 38 of 64 right in float and in int8.
    assert figures["cosine"] > 0.99 and figures["top1_agreement"] >= 0.95, figures
    float_correct = int((expected.argmax(1) == labels).sum())
    int8_correct = int((torch.from_numpy(got).argmax(1) == labels).sum())
    assert float_correct >= 28 and abs(int8_correct - float_correct) <= 4  # it learned; int8 keeps it


def test_the_program_is_made_again_bit_for_bit_from_its_saved_state(qat_result, tmp_path):
    model, spec, result = qat_result
    path = tmp_path / PROGRAM_STATE_FILE
    write_program_state(result.program_state, path)
    images = load_fashion_mnist("test", model.cfg, limit=8).batch(list(range(8)))[0]
    # As inspect does it: the manifest's record of the spec, and the file.
    saved = QuantSpec.from_summary(spec.summary(), qat_state=read_program_state(path))
    again = program_from_state(model, tuple(model.cfg.input_size), saved)
    assert torch.equal(run_graph(again, images), run_graph(result.converted_model, images))
    assert pt2e.qdq_counts(again) == pt2e.qdq_counts(result.converted_model)

    # Another model's state is refused in one line.
    other = QuantSpec.from_summary(spec.summary(), qat_state={k: v for k, v in result.program_state.items()
                                                              if not k.startswith("qkv")})
    with pytest.raises(EdgevitError, match="does not take the state") as raised:
        program_from_state(model, tuple(model.cfg.input_size), other)
    assert "\n" not in str(raised.value)
    (tmp_path / "torn.safetensors").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(EdgevitError, match="not a readable QAT program state"):
        read_program_state(tmp_path / "torn.safetensors")


def test_qat_model_converts_to_a_w8a8_coreml_program(qat_result, tmp_path):
    model, spec, result = qat_result
    float_model = result.fine_tuned_float_model
    images = load_fashion_mnist("test", float_model.cfg, limit=8).batch(list(range(8)))[0]
    artifact = coreml.export(float_model, images[:1], "int8", COREML, tmp_path, quant=spec)
    assert artifact.details["int8"]["scheme"].startswith("W8A8") and artifact.details["int8"]["int8_weight_tensors"] > 0
    check = coreml.precheck(artifact, float_model, images, "int8")
    assert not check.failures and compare_outputs(check.reference, check.candidate)["cosine"] > 0.98

    # inspect's view of it: each block as the pre-check computes it, from the program made again
    # from its state; the head's output is the pre-check's own.
    from edgevit.targets.coreml.inspection import precheck_block_outputs

    again = QuantSpec.from_summary(spec.summary(), qat_state=result.program_state)
    again = again.with_changes(qat_model=program_from_state(model, tuple(model.cfg.input_size), again))
    manifest = {"target": "coreml", "precision": "int8", "quantization": spec.summary()}
    values, note = precheck_block_outputs(artifact.path, manifest, float_model, images, ["stem", "qkv", "head"], again)
    assert note["variant"] == "w8a8" and list(values) == ["stem", "qkv", "head"] and "trained state" in note["weights"]
    assert np.array_equal(values["head"], check.candidate)


def test_qat_model_exports_to_onnx_with_its_trained_scales(qat_result, tmp_path):
    import onnx
    from onnx import numpy_helper

    _model, spec, result = qat_result
    float_model = result.fine_tuned_float_model
    images = load_fashion_mnist("test", float_model.cfg, limit=64).batch(list(range(64)))[0]
    options = {"opset": 18, "dynamic_batch": True, "exporter": "torchscript", "simplify": True, "fp16_io": False}
    artifact = onnx_target.export(float_model, images[:1], "int8", options, tmp_path, quant=spec)
    details = artifact.details
    assert details["exporter"] == "dynamo" and details["dynamic_batch"] is False
    assert details["quantization"]["source"].startswith("the QAT int8 program")
    graph = onnx.load(str(artifact.path)).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    activations = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants]
    assert activations and all(constants[n.input[2]].dtype == np.uint8 for n in activations)
    # The scales are the ones the program trained with, not recalibrated ones.
    program_scales = {round(float(n.args[1]), 9) for n in spec.qat_model.graph.nodes
                      if "quantize_per_tensor" in str(n.target) and isinstance(n.args[1], float)}
    assert {round(float(constants[n.input[1]]), 9) for n in activations} <= program_scales
    # The trained int8 weights are stored as uint8 (zero point 128: the same values), which
    # onnxruntime's widening u8·u8 kernels run exactly on every CPU.
    weight_slots = {n.input[1] for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}
    # the dynamo exporter writes a Linear on tokens as DequantizeLinear → Transpose → MatMul
    weight_slots |= {t.input[0] for t in graph.node if t.op_type == "Transpose" and t.output[0] in weight_slots}
    weights = [constants[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants
               and n.output[0] in weight_slots]
    assert weights and all(w.dtype == np.uint8 for w in weights), [w.dtype for w in weights]
    kernels = onnx_target.int8_exactness(artifact)  # read from the file written
    assert not kernels["not_exact_on"] and kernels["checked_weights"] == len(weights), kernels
    got = runtimes.load("onnxruntime", artifact.path, options=options).run(images.numpy())
    figures = compare_outputs(run_graph(spec.qat_model, images).numpy(), got)
    assert figures["cosine"] > 0.995 and figures["top1_agreement"] >= 0.95, figures


def test_qat_needs_calibration_images():
    model = _GroupNormViT().eval()
    with pytest.raises(EdgevitError, match="QAT needs calibration images"):
        run_qat(model, (torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)), torch.empty(0, 3, 16, 16),
                QuantSpec(mode="dynamic"), steps=1)
