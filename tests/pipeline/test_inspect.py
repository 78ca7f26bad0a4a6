"""`edgevit inspect`: a fault planted in one block of the checkpoint (the test's only) is named as
the first block where the error jumps, in the real runtimes; the same model without it has no jump."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from edgevit.cli import main
from edgevit.pipeline.inspect import InspectRequest, inspect
from edgevit.pipeline.quantize import QuantizeRequest, quantize_model
from tests.reference_data import reference_state_dict
from tests.test_cli import assert_one_line_error

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install -e '.[onnx]')")

MODEL, STEM, FAULTY = "levit_128s", "timm__levit_128s", "stages.1"
LOOSE = {"min_cosine": 0.0, "max_rel_error": 1e9}  # the faulty model must be written to be inspected


def _checkpoint(folder, fault: bool):
    """The reference checkpoint; with ``fault``, one output channel of the first linear layer of
    ``FAULTY`` scaled 300×: its block's activations get outliers that int8 cannot hold."""
    state = reference_state_dict(STEM)
    if fault:
        key = next(k for k in state if k.startswith(FAULTY + ".") and k.endswith("weight") and state[k].dim() == 2)
        state[key] = state[key].clone()
        state[key][0] *= 300
    path = folder / f"{'faulty' if fault else 'clean'}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from tests.quant.test_pt2e import photo_crops
    from edgevit.models import get_model_cfg
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    cfg = get_model_cfg(MODEL)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    for i, crop in enumerate(photo_crops(cfg, 24)):
        pixels = ((crop * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("inspect")
    made = {}
    for fault in (False, True):
        weights = _checkpoint(folder, fault)
        for target in ("onnx", "tensorrt") if fault else ("onnx",):
            request = QuantizeRequest(MODEL, target, "static", calib_data=str(photos), weights=str(weights),
                                      out_dir=folder / f"{target}-{fault}", tolerances=LOOSE)
            made[(target, fault)] = quantize_model(request).export.bundle
    return made


@pytest.mark.parametrize("target", ["onnx", "tensorrt"])
def test_a_planted_fault_is_the_first_jump(bundles, photos, target):
    result = inspect(InspectRequest((str(bundles[(target, True)]),), data=str(photos), depth=2))
    row = result["bundles"][0]
    assert row["first_jump"] == FAULTY, row["blocks"]
    before = result["modules"][result["modules"].index(FAULTY) - 1]
    assert row["blocks"][before]["sqnr_db"] - row["blocks"][FAULTY]["sqnr_db"] > 10


def test_without_the_fault_no_block_jumps_and_bundles_line_up(bundles, photos, capsys, tmp_path):
    clean, faulty = bundles[("onnx", False)], bundles[("onnx", True)]
    code = main(["inspect", str(clean), "--data", str(photos), "--depth", "2", "--json", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    modules, jump = result["modules"], result["bundles"][0]["first_jump"]
    # These deterministic reference weights are hard on int8 further on (verification refuses
    # them at cosine 0.958), but nothing jumps at or before the block the fault goes into.
    assert jump is None or modules.index(jump) > modules.index(FAULTY), jump
    assert modules[:2] == ["stem.conv1", "stem.act1"] and FAULTY in out
    # Bundles of different checkpoints do not line up: one line, non-zero exit.
    assert_one_line_error(main(["inspect", str(clean), str(faulty)]), *capsys.readouterr(), "another model or checkpoint")


def test_bad_input_is_one_line(bundles, tmp_path, capsys):
    clean = str(bundles[("onnx", False)])
    (tmp_path / "empty").mkdir()
    random = tmp_path / "random"
    assert main(["export", MODEL, "--out", str(random)]) == 0
    capsys.readouterr()
    for argv, fragment in [
        ([clean, "--depth", "9"], "--depth 9 is beyond levit_128s"),
        ([clean, "--data", str(tmp_path / "empty")], "no image files"),
        ([str(random / f"{MODEL}-onnx-fp32")], "random weights"),
        ([str(tmp_path)], "is not a bundle"),
    ]:
        code = main(["inspect", *argv])
        assert_one_line_error(code, *capsys.readouterr(), fragment)
        assert code == 2
