"""`edgevit calibrate` and `edgevit quantize` end to end: bad input is one line, a non-zero exit
and nothing written; a calibration run is saved once and reused by every target."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgevit.core.bundle import MANIFEST_NAME
from edgevit.core.host import int8_kernel_class
from tests.test_cli import assert_one_line_error, run

MODEL = "levit_128s"


def _photos(folder, count, size=(96, 80)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        # smooth gradients plus noise: image-like statistics, not uniform noise
        y, x = np.mgrid[0:size[1], 0:size[0]]
        base = np.stack([(x * (i + 1)) % 256, (y * 3 + i * 20) % 256, (x + y) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i}.png")
    return folder


def _nothing_written(out):
    return not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d / "missing", "not found"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "no image"),
    (lambda d: ((d / "junk").mkdir(), (d / "junk" / "a.jpg").write_text("not an image"))[0] or d / "junk", "no readable"),
])
def test_bad_calibration_folders(capsys, tmp_path, make, fragment):
    folder = make(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "quantize", MODEL, "--target", "onnx", "--calib-data", str(folder), "--out", str(out),
                            "--random-weights")
    assert_one_line_error(code, stdout, err)
    assert fragment in err.lower()
    assert _nothing_written(out)


@pytest.mark.parametrize("argv, fragment", [
    (["--mode", "static"], "needs calibration images"),
    (["--mode", "qat", "--calib-data", "."], "qat needs labelled training data"),
    (["--float-ops", "norm,layernorm", "--mode", "dynamic"], "unknown float_ops layernorm"),
    (["--max-drop", "-1", "--mode", "dynamic"], "--max-drop must be >= 0"),
    (["--mode", "dynamic", "--recipe", "onnx-fp32"], "quantization needs an int8 recipe"),
    (["--mode", "dynamic", "--target", "executorch", "--recipe", "onnx-int8"], "is for target onnx"),
    (["--mode", "dynamic"], "int8 of random weights is not meaningful"),
    (["--mode", "dynamic", "--weights", "w.safetensors", "--random-weights"], "not both"),
])
def test_bad_quantize_arguments(capsys, tmp_path, argv, fragment):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "quantize", MODEL, *argv, "--out", str(out))
    assert_one_line_error(code, stdout, err, fragment)
    assert _nothing_written(out)


def test_modes_a_target_lacks_are_refused(capsys, tmp_path):
    from edgevit.targets import TARGETS

    lacking = [(t.name, m) for t in TARGETS.values() for m in ("dynamic", "static", "qat") if m not in t.quant_modes]
    if not lacking:
        pytest.skip("every target offers every mode")
    for target, mode in lacking:
        code, stdout, err = run(capsys, "quantize", MODEL, "--target", target, "--mode", mode,
                                "--calib-data", str(tmp_path), "--out", str(tmp_path / "out"))
        assert_one_line_error(code, stdout, err, f"has no {mode} quantization")


def test_calibrate_once_quantize_from_stats_with_fewer_images_than_asked(capsys, tmp_path):
    photos = _photos(tmp_path / "photos", 6)
    stats = tmp_path / "levit.safetensors"
    code, stdout, err = run(capsys, "calibrate", MODEL, "--calib-data", str(photos), "--images", "10", "--out", str(stats))
    assert code == 0, err
    assert "asked for 10 images" in err and "using 6" in err
    assert stats.is_file() and "6 images used" in stdout

    out = tmp_path / "out"
    code, stdout, err = run(capsys, "quantize", MODEL, "--target", "onnx", "--calib-stats", str(stats),
                            "--out", str(out), "--json", "--random-weights")
    assert code == 0, err
    manifest = json.loads(stdout)
    quantization = manifest["quantization"]
    assert manifest["precision"] == "int8" and quantization["mode"] == "static"
    assert quantization["calibration"]["images"] == 6 and quantization["calibration"]["stats_file"] == str(stats)
    assert "head" in quantization["float_modules"]
    # A quarter of the sample (at least one image) is held out: calibrated on 5, verified on 1,
    # and the figures on the images calibration saw are recorded beside.
    verification = manifest["verification"]
    assert manifest["random_weights"] is True and verification["fidelity"] == "reported, not enforced (random weights)"
    assert "random weights (no --weights)" not in stdout  # --json prints the manifest only
    assert quantization["calibration"]["calibrated_on"] == 5 and quantization["calibration"]["held_out_for_verification"] == 1
    assert verification["passed"] is True and verification["batch"] == 1
    assert verification["images"] == "held out from calibration" and verification["calibration_images"]["batch"] == 5
    assert verification["host"]["int8_kernels"] == int8_kernel_class()
    assert verification["int8_kernels"]["not_exact_on"] == {}
    bundle = out / "levit_128s-onnx-int8"
    assert (bundle / MANIFEST_NAME).is_file()


def test_random_weights_report_fidelity_without_enforcing_it(tmp_path):
    """--random-weights (latency work): a bound the artifact misses is recorded, not enforced;
    the same request with the bound enforced is refused and writes nothing."""
    from edgevit.pipeline.quantize import QuantizeRequest, quantize_model
    from edgevit.verify import VerificationFailed

    request = QuantizeRequest(MODEL, "onnx", "dynamic", out_dir=tmp_path / "out", random_weights=True,
                              tolerances={"min_cosine": 1.5})
    verification = quantize_model(request).export.manifest["verification"]
    assert verification["passed"] is True and verification["failures"] == []
    assert any("< 1.5" in failure for failure in verification["unenforced_failures"])
    assert verification["fidelity"] == "reported, not enforced (random weights)"
    from edgevit.pipeline.export import ExportRequest, export_model

    with pytest.raises(VerificationFailed, match="< 1.5"):
        export_model(ExportRequest(MODEL, "onnx", "int8", mode="dynamic", out_dir=tmp_path / "enforced",
                                   tolerances={"min_cosine": 1.5}))
    assert _nothing_written(tmp_path / "enforced")
