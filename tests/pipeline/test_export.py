"""The export pipeline through its ONNX target: verification, manifest, atomic placement, and
every way input goes wrong. Targets' own tests live beside this file."""
import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from edgevit.cli import main
from edgevit.core.errors import CheckpointError, EdgevitError
from edgevit.targets import TARGETS
from edgevit import runtimes
from edgevit.runtimes.onnxruntime import build_session
from edgevit.core.bundle import MANIFEST_NAME
from edgevit.pipeline.export import ExportRequest, export_model
from edgevit.verify import VerificationFailed
from tests.test_cli import assert_one_line_error
from tests.reference_data import REPO_ROOT, max_relative_error, reference_expected, reference_input, write_as_published

SMALLEST = ["mobilevitv2_050", "efficientformer_l1", "levit_128s", "edgevit_xxs"]


def _leftovers(out_dir):
    return sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("model", SMALLEST)
def test_smallest_sizes_export_and_verify(model, precision, tmp_path):
    outcome = export_model(ExportRequest(model, "onnx", precision, out_dir=tmp_path))
    v = outcome.verification
    assert v["passed"] and v["check"] == "onnxruntime"
    if precision == "fp32":
        assert v["max_rel_error"] < 1e-4
    else:
        assert v["cosine"] >= 0.9999
    assert outcome.artifact.is_file() and (outcome.bundle / MANIFEST_NAME).is_file()
    assert _leftovers(tmp_path) == [outcome.bundle.name]


def test_manifest_records_source_preprocessing_precision_and_error(tmp_path):
    weights = write_as_published("snap__efficientformer_l1", tmp_path)
    outcome = export_model(ExportRequest("efficientformer_l1", "onnx", weights=str(weights), out_dir=tmp_path / "out"))
    manifest = json.loads((outcome.bundle / MANIFEST_NAME).read_text())
    assert manifest["model"]["name"] == "efficientformer_l1"
    assert manifest["checkpoint"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["checkpoint"]["key_format"] == "snap" and manifest["random_weights"] is False
    assert manifest["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert manifest["precision"] == "fp32" and manifest["recipe"]["name"] == "onnx-fp32"
    assert manifest["artifact"]["sha256"] == hashlib.sha256(outcome.artifact.read_bytes()).hexdigest()
    assert manifest["tools"]["onnxruntime"] and manifest["verification"]["max_rel_error"] < 1e-4


@pytest.mark.parametrize("stem,model", [("fb__LeViT_128S", "levit_128s"), ("saic__edgevit_xxs", "edgevit_xxs")])
def test_artifact_from_reference_checkpoint_gives_reference_output(stem, model, tmp_path):
    weights = write_as_published(stem, tmp_path)
    outcome = export_model(ExportRequest(model, "onnx", weights=str(weights), out_dir=tmp_path / "out"))
    output = runtimes.load("onnxruntime", outcome.artifact).run(reference_input(stem).numpy())
    assert max_relative_error(torch.from_numpy(output), reference_expected(stem)) < 1e-4


def test_dynamic_batch_runs_at_batch_1_and_4(tmp_path):
    outcome = export_model(ExportRequest("levit_128s", "onnx", out_dir=tmp_path, options={"dynamic_batch": True}))
    sess = build_session(outcome.artifact)
    assert sess.get_inputs()[0].shape[0] == "batch"
    x = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
    four = sess.run(None, {"input": x})[0]
    one = sess.run(None, {"input": x[:1]})[0]
    assert four.shape == (4, 1000) and one.shape == (1, 1000)
    np.testing.assert_allclose(one[0], four[0], rtol=1e-4, atol=1e-4)


def test_failed_verification_leaves_nothing(tmp_path):
    with pytest.raises(VerificationFailed, match="max relative error .* > 1e-12"):
        export_model(ExportRequest("levit_128s", "onnx", out_dir=tmp_path, tolerances={"max_rel_error": 1e-12}))
    assert _leftovers(tmp_path) == []


def test_killed_export_leaves_nothing_and_is_cleaned_up_later(tmp_path):
    out = tmp_path / "out"
    script = f"from edgevit.pipeline.export import ExportRequest, export_model; export_model(ExportRequest('efficientformer_l1', 'onnx', out_dir={str(out)!r}))"
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        # Kill once the artifact is being written into the staging folder.
        while not any(p.is_dir() and any(p.iterdir()) for p in out.glob(".edgevit-partial-*")):
            assert process.poll() is None, "export finished before it could be killed"
            assert time.monotonic() < deadline, "export never started writing"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (out / "efficientformer_l1-onnx-fp32").exists()
    assert all(name.startswith(".edgevit-partial-") for name in _leftovers(out))
    export_model(ExportRequest("levit_128s", "onnx", out_dir=out))  # the next export removes the dead staging
    assert _leftovers(out) == ["levit_128s-onnx-fp32"]


def test_reexport_replaces_the_bundle_and_overrides_get_their_own(tmp_path):
    first = export_model(ExportRequest("levit_128s", "onnx", out_dir=tmp_path))
    again = export_model(ExportRequest("levit_128s", "onnx", out_dir=tmp_path))
    assert first.bundle == again.bundle and _leftovers(tmp_path) == [first.bundle.name]
    dynamic = export_model(ExportRequest("levit_128s", "onnx", out_dir=tmp_path, options={"dynamic_batch": True}))
    assert dynamic.bundle.name == "levit_128s-onnx-fp32+dynamic_batch"
    assert json.loads((dynamic.bundle / MANIFEST_NAME).read_text())["input"]["shape"][0] == "batch"
    assert _leftovers(tmp_path) == sorted([first.bundle.name, dynamic.bundle.name])


def test_missing_backend_names_the_extra(monkeypatch, tmp_path):
    spec = dataclasses.replace(TARGETS["coreml"], requires=("edgevit_no_such_backend",))
    monkeypatch.setitem(TARGETS, "coreml", spec)
    with pytest.raises(EdgevitError, match=r'needs edgevit_no_such_backend: install it with .*"\.\[coreml\]"'):
        export_model(ExportRequest("levit_128s", "coreml", out_dir=tmp_path))
    assert _leftovers(tmp_path) == []


def test_weights_of_another_model_write_nothing(tmp_path):
    weights = write_as_published("timm__mobilevitv2_050", tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint of mobilevitv2_050"):
        export_model(ExportRequest("levit_128s", "onnx", weights=str(weights), out_dir=tmp_path / "out"))
    assert _leftovers(tmp_path / "out") == []


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,message", [
    (["-t", "tflite"], "'tflite' is not one of"),
    (["-t", "executorch", "-p", "fp16"], "target executorch has no precision 'fp16'"),
    (["-t", "coreml", "--dynamic-batch"], "--dynamic-batch does not apply to target coreml"),
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--opset", "13"], "option opset must be at least 17, got 13"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(argv, message, capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = _cli(capsys, "export", "levit_128s", "--out", str(out), *argv)
    assert_one_line_error(code, stdout, err, message)
    assert code == 2
    assert _leftovers(out) == []


def test_cli_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = _cli(capsys, "export", "levit_128s", "--out", str(blocker / "out"))
    assert_one_line_error(code, "", err, "cannot write to output directory")
    assert code == 2


def test_cli_recipe_file_and_one_line_result(capsys, tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text('name = "mine"\ntarget = "onnx"\nprecision = "fp32"\n[options]\ndynamic_batch = true\n[verify]\nbatch = 2\nmax_rel_error = 1e-4\n')
    code, stdout, err = _cli(capsys, "export", "levit_128s", "--recipe", str(recipe), "--out", str(tmp_path / "out"))
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and "levit_128s → onnx fp32" in lines[0] and "top-1 agreement 2/2" in lines[0]
    manifest = json.loads((tmp_path / "out" / "levit_128s-mine" / MANIFEST_NAME).read_text())
    assert manifest["recipe"]["source"] == str(recipe) and manifest["input"]["shape"][0] == "batch"
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\ntarget = "onnx"\nprecision = "fp32"\n[options]\nbackend = "xnnpack"\n')
    code, _, err = _cli(capsys, "export", "levit_128s", "--recipe", str(bad), "--out", str(tmp_path / "out"))
    assert code == 2 and "target onnx has no option 'backend'" in err


def test_no_verify_is_recorded(tmp_path):
    outcome = export_model(ExportRequest("levit_128s", "onnx", out_dir=tmp_path, verify=False))
    assert outcome.manifest["verification"] == {"check": "skipped (--no-verify)", "passed": None}


@pytest.mark.parametrize("count, verify_batch, calibrated, held", [
    (1, 16, 1, 0),  # one image cannot be split
    (2, 16, 1, 1),
    (8, 16, 6, 2),  # a quarter held out
    (100, 16, 84, 16),  # at most the verification batch
])
def test_calibration_sample_is_split_for_held_out_verification(count, verify_batch, calibrated, held):
    from edgevit.quant.calibration import split_held_out

    images = torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1)
    calibrate_on, held_out = split_held_out(images, verify_batch)
    assert len(calibrate_on) == calibrated and (0 if held_out is None else len(held_out)) == held
    if held_out is not None:  # disjoint, and together the whole sample
        assert torch.equal(torch.cat([calibrate_on, held_out]), images)


@pytest.mark.parametrize("target, count, fragment", [
    ("onnx", -1, "full_range_weights is a count >= 0"),
    ("executorch", 4, "for the onnx target only"),
])
def test_full_range_weights_is_checked_in_a_recipe(tmp_path, target, count, fragment):
    from edgevit.targets.recipes import load_recipe_file

    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "r"\ntarget = "{target}"\nprecision = "int8"\n[quantization]\nmode = "static"\n'
                      f'full_range_weights = {count}\n')
    with pytest.raises(EdgevitError, match=fragment):
        load_recipe_file(recipe)
