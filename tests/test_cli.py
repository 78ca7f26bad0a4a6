"""The edgevit command: output people read, and bad input as one line with a non-zero exit."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgevit.cli import main
from edgevit.models import list_models
from tests.reference_data import write_as_published


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


PROGRESS_LINE = re.compile(r"^\[ *\d+\.\d s\] ")  # off a terminal, long work reports its stages on stderr


def assert_one_line_error(code, out, err, *fragments):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("edgevit: error: "), err
    assert err.strip().splitlines()[-1] == lines[0], err  # the error is the last word
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in lines[0]


def test_list_shows_every_model(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for name in list_models():
        assert name in out


def test_list_pattern_and_json(capsys):
    code, out, _ = run(capsys, "list", "levit_conv_*", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == [n for n in list_models() if n.startswith("levit_conv_")]
    assert all(r["family"] == "levit" and r["source_params"] > 0 for r in rows)


def test_info_shows_preprocessing_and_stage_shapes(capsys):
    code, out, _ = run(capsys, "info", "efficientformer_l1", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["cfg"]["input_size"] == [3, 224, 224]
    assert info["measured"]["params"] == info["cfg"]["source_params"]
    assert info["stages"][-1] == {"module": "logits", "shape": [1, 1000]}
    code, out, _ = run(capsys, "info", "efficientformer_l1")
    assert code == 0 and "stage outputs" in out and "crop" in out


def test_info_with_weights_reports_the_checkpoint(capsys, tmp_path):
    path = write_as_published("snap__efficientformer_l1", tmp_path)
    code, out, _ = run(capsys, "info", "efficientformer_l1", "--weights", str(path), "--json")
    assert code == 0
    assert json.loads(out)["checkpoint"]["key_format"] == "snap"


def test_unknown_model_suggests_names(capsys):
    assert_one_line_error(*run(capsys, "info", "levit_128z"), "unknown model 'levit_128z'", "Did you mean", "levit_128s")


def test_checkpoint_of_other_family(capsys, tmp_path):
    path = write_as_published("timm__mobilevitv2_050", tmp_path)
    assert_one_line_error(*run(capsys, "info", "levit_128s", "--weights", str(path)),
                          "checkpoint of mobilevitv2_050", "not of levit_128s")


def test_checkpoint_of_other_size(capsys, tmp_path):
    path = write_as_published("timm__mobilevitv2_050", tmp_path)
    assert_one_line_error(*run(capsys, "info", "mobilevitv2_100", "--weights", str(path)),
                          "does not fit mobilevitv2_100", "it fits mobilevitv2_050")


def test_truncated_checkpoint(capsys, tmp_path):
    path = write_as_published("timm__levit_128s", tmp_path)
    path.write_bytes(path.read_bytes()[:10_000])
    assert_one_line_error(*run(capsys, "info", "levit_128s", "--weights", str(path)), "truncated or corrupt")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_runs_code(capsys, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": _Payload(marker)}, path)
    assert_one_line_error(*run(capsys, "info", "levit_128s", "--weights", str(path)), "refusing to load")
    assert not marker.exists()


def test_usage_errors_are_one_line(capsys):
    assert_one_line_error(*run(capsys, "info"), "Missing argument")
    assert_one_line_error(*run(capsys, "list", "--bogus"), "No such option")
    assert_one_line_error(*run(capsys, "list", "nothing_*"), "no model matches")
    assert_one_line_error(*run(capsys, "list", "--family", "resnet"), "unknown family")


def test_installed_console_script_runs():
    exe = shutil.which("edgevit")
    if exe is None:
        pytest.skip("the edgevit console script is not on PATH (package not installed with pip)")
    done = subprocess.run([exe, "info", "nope"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["edgevit: error: unknown model 'nope'. Run `edgevit list` for the names."]
    done = subprocess.run([sys.executable, "-m", "edgevit", "list", "edgevit_*"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "edgevit_xxs" in done.stdout


def test_exit_codes_tell_bad_input_failed_verification_and_missing_runtime_apart(capsys, tmp_path):
    """2: bad input; 3: the artifact failed verification (nothing written); 4: its runtime is not here."""
    code, out, err = run(capsys, "export", "levit_128s", "--precision", "fp64")
    assert code == 2 and "fp64" in err
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "export", "levit_128s", "--min-cosine", "1.5", "--out", str(out_dir))
    assert_one_line_error(code, out, err, "failed verification", "nothing was written")
    assert code == 3 and not (out_dir / "levit_128s-onnx-fp32").exists()
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the missing-runtime path cannot be shown with TensorRT")
    code, out, err = run(capsys, "export", "levit_128s", "--target", "tensorrt", "--out", str(out_dir))
    assert code == 0 and "random weights (no --weights)" in out, err
    code, out, err = run(capsys, "eval", str(out_dir / "levit_128s-tensorrt-fp16"), "--data", "fashion-mnist")
    assert_one_line_error(code, out, err, "cannot run levit_128s.onnx here")
    assert code == 4


def test_version_and_help_state_the_exit_codes(capsys):
    import edgevit

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"edgevit {edgevit.__version__}"
    for command in ([], ["export"], ["quantize"], ["eval"], ["profile", "measure"]):
        code, out, _ = run(capsys, *command, "--help")
        assert code == 0 and "3 verification failed" in " ".join(out.split())
