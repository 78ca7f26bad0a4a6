"""The checkpoint loader on real files: formats, wrappers, sources, and every way input goes wrong."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from edgevit.core.errors import CheckpointError
from edgevit.models import create_model, load_checkpoint, read_state_dict
from tests.reference_data import (
    REPO_ROOT,
    max_relative_error,
    reference_expected,
    reference_input,
    reference_state_dict,
    write_as_published,
)

STEM, MODEL = "timm__levit_128s", "levit_128s"


class _RunsCodeWhenUnpickled:
    """What a malicious checkpoint smuggles in: unpickling it calls Path.touch(marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _assert_matches_reference(model, stem=STEM):
    with torch.no_grad():
        assert max_relative_error(model(reference_input(stem)), reference_expected(stem)) < 1e-4


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    return write_as_published(STEM, tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("wrapper", ["plain", "model", "state_dict", "ddp-prefix"])
def test_torch_files_in_every_wrapper_load(wrapper, tmp_path):
    sd = reference_state_dict(STEM)
    payload = {
        "plain": sd,
        "model": {"model": sd, "epoch": 300},
        "state_dict": {"state_dict": sd, "optimizer_name": "adamw"},
        "ddp-prefix": {f"module.{k}": v for k, v in sd.items()},
    }[wrapper]
    path = tmp_path / "weights.pt"
    torch.save(payload, path)
    _assert_matches_reference(create_model(MODEL, pretrained=str(path)))


def test_report_names_format_and_hash(timm_file):
    model = create_model(MODEL)
    report = load_checkpoint(model, timm_file)
    assert report.key_format == "timm"
    assert report.sha256 == hashlib.sha256(timm_file.read_bytes()).hexdigest()
    assert not (report.missing or report.unexpected or report.dropped_classifier)


def test_pickle_that_runs_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        create_model(MODEL, pretrained=str(path))
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_truncated_file_is_reported(kind, tmp_path, timm_file):
    if kind == "safetensors":
        data = timm_file.read_bytes()
    else:
        torch.save({"model": reference_state_dict(STEM)}, tmp_path / "full.pth")
        data = (tmp_path / "full.pth").read_bytes()
    path = tmp_path / f"cut.{kind}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        create_model(MODEL, pretrained=str(path))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not weights")
    with pytest.raises(CheckpointError, match="neither a safetensors file nor a torch checkpoint"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="not found"):
        create_model(MODEL, pretrained=str(tmp_path / "missing.safetensors"))


def test_checkpoint_of_another_family_is_named(tmp_path):
    path = write_as_published("timm__efficientformer_l1", tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint of efficientformer_l1 \(timm format\), not of levit_128s"):
        create_model(MODEL, pretrained=str(path))


def test_checkpoint_of_another_size_is_named(timm_file):
    with pytest.raises(CheckpointError, match="does not fit levit_192.*it fits levit_128s"):
        create_model("levit_192", pretrained=str(timm_file))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = reference_state_dict(STEM)
    removed = sorted(sd)[3]
    del sd[removed]
    sd["stages.9.extra.weight"] = torch.zeros(2)
    path = tmp_path / "edited.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as excinfo:
        create_model(MODEL, pretrained=str(path))
    assert f"1 missing ({removed})" in str(excinfo.value)
    assert "1 unexpected (stages.9.extra.weight)" in str(excinfo.value)
    report = load_checkpoint(create_model(MODEL), path, strict=False)
    assert report.missing == [removed] and report.unexpected == ["stages.9.extra.weight"]


def test_other_num_classes_drops_classifier_with_a_message(timm_file):
    full = create_model(MODEL, pretrained=str(timm_file))
    model = create_model(MODEL, num_classes=10)
    report = load_checkpoint(model, timm_file)
    assert report.dropped_classifier and "num_classes=10" in report.messages[0]
    x = reference_input(STEM)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), full.forward_features(x))
        assert model(x).shape == (2, 10)


def test_file_url_is_downloaded_once_into_the_cache(tmp_path, monkeypatch, timm_file):
    monkeypatch.setenv("EDGEVIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "served" / "levit_128s.safetensors"
    source.parent.mkdir()
    source.write_bytes(timm_file.read_bytes())
    _assert_matches_reference(create_model(MODEL, pretrained=source.as_uri()))
    source.unlink()  # a second load must come from the cache
    _assert_matches_reference(create_model(MODEL, pretrained=source.as_uri()))
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_url_whose_hash_does_not_match_its_name_is_not_kept(tmp_path, monkeypatch, timm_file):
    monkeypatch.setenv("EDGEVIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "levit_128s-deadbeef.safetensors"
    source.write_bytes(timm_file.read_bytes())
    with pytest.raises(CheckpointError, match="does not match the hash"):
        create_model(MODEL, pretrained=source.as_uri())
    assert list((tmp_path / "cache").iterdir()) == []


def test_hf_hub_id_loads_through_huggingface_hub_cache(tmp_path, timm_file):
    # Lay the file out exactly as huggingface_hub stores a download, then load offline in a fresh
    # process so huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE as a user's shell sets them.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--timm--levit_128s.fb_dist_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(timm_file.read_bytes())
    script = textwrap.dedent(
        f"""
        import json, torch
        from edgevit.models import create_model
        from tests.reference_data import reference_input
        model = create_model("{MODEL}", pretrained="hf-hub:timm/levit_128s.fb_dist_in1k")
        with torch.no_grad():
            print(json.dumps(model(reference_input("{STEM}")).tolist()))
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    output = torch.tensor(json.loads(done.stdout))
    assert max_relative_error(output, reference_expected(STEM)) < 1e-4


def test_hf_hub_id_that_is_not_cached_offline_fails_clearly(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"not-downloaded is not in the local Hugging Face cache .*HF_HUB_OFFLINE is set"):
        create_model(MODEL, pretrained="hf-hub:timm/not-downloaded")
    with pytest.raises(CheckpointError, match="hf-hub:org/repo"):
        create_model(MODEL, pretrained="hf-hub:no-slash")


def test_hub_out_of_reach_fails_at_once_in_one_line(tmp_path, monkeypatch, capsys):
    """No network (here: an endpoint nobody listens on): one connection attempt decides, and the
    cache alone answers, instead of huggingface_hub's minute of retries and retry lines."""
    from huggingface_hub import constants

    from edgevit.cli import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    code = main(["export", MODEL, "--weights", "pretrained", "--out", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    error = [line for line in err.splitlines() if line.startswith("edgevit: error:")]
    assert code == 2 and len(error) == 1 and "Retry" not in err
    assert "hf-hub:timm/levit_128s.fb_dist_in1k is not in the local Hugging Face cache" in error[0]
    assert "127.0.0.1:9" in error[0] and not (tmp_path / "out" / f"{MODEL}-onnx-fp32").exists()


def test_url_that_returns_a_web_page_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEVIT_CACHE", str(tmp_path / "cache"))
    page = tmp_path / "drive-share-page.pth"
    page.write_text("<!DOCTYPE html><html><body>Sign in to download</body></html>")
    with pytest.raises(CheckpointError, match="did not return a checkpoint"):
        create_model(MODEL, pretrained=page.as_uri())
    assert list((tmp_path / "cache").iterdir()) == []
