"""Per-block times in onnxruntime and ExecuTorch, one row per listed module (real runtimes; the
figures themselves are not asserted: this host's load moves them)."""
import json

import pytest
import torch
from torch import nn

from edgevit.models import create_model, to_deploy
from edgevit.profile import layers
from tests.profile.conftest import FAST


def assert_rows_add_up(result, modules):
    assert set(result["blocks"]) <= set(modules) and result["p50_ms"] > 0
    rows = [*result["blocks"].values(), *result["other_ms"].values()]
    assert sum(rows) == pytest.approx(result["total_ms"])
    # Prefix differences can dip below zero with noise, never by much of the whole.
    assert all(ms > -0.25 * result["p50_ms"] for ms in rows), result


def test_blocks_cover_every_layer_once():
    names = [name for name, _ in to_deploy(create_model("levit_128s")).named_modules()]
    assert layers.blocks_at_depth(names, 1) == ["stem", "stages", "head"]
    deep = layers.blocks_at_depth(names, 3)
    assert "stem.conv1" in deep and "head" in deep and "stages.0.blocks" in deep and "stages.0" not in deep
    assert layers.sum_to_blocks({"stem.conv1": 1.0, "stem.act1": 0.5, "stages.0.blocks.1.attn": 2.0, "": 0.25},
                                ["stem.conv1", "stages.0.blocks"]) == \
        {"stem.conv1": 1.0, "stages.0.blocks": 2.0, layers.BETWEEN_BLOCKS: 0.75}


def test_onnxruntime_block_ms_times_a_prefix_per_block(artifacts_dir):
    names = [name for name, _ in to_deploy(create_model("levit_128s")).named_modules()]
    blocks = layers.blocks_at_depth(names, 2)
    result = layers.onnxruntime_block_ms(artifacts_dir / "levit_128s-onnx-fp32" / "levit_128s.onnx", blocks, 1, 3)
    assert_rows_add_up(result, blocks)
    assert {"stem.conv1", "stages.0", "stages.1", "stages.2", "head"} <= set(result["blocks"])
    assert set(result["other_ms"]) == {layers.AFTER_LAST_BLOCK}
    assert result["total_ms"] == pytest.approx(result["p50_ms"])  # the rows telescope to the whole graph


class _Branches(nn.Module):
    """A trunk, then two heads that both read it: the second head's time is what it adds to the
    trunk, not to the first head."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU())
        self.wide = nn.Sequential(nn.Conv2d(16, 64, 3), nn.ReLU(), nn.Conv2d(64, 16, 3))
        self.narrow = nn.Conv2d(16, 16, 5)

    def forward(self, x):
        x = self.trunk(x)
        return self.wide(x).mean((2, 3)) + self.narrow(x).mean((2, 3))


def test_executorch_block_ms_lowers_a_prefix_per_block():
    pytest.importorskip("executorch")
    from edgevit.targets.executorch.probe import as_graph

    example = torch.randn(1, 3, 32, 32)
    messages = []
    modules = ["trunk", "wide", "narrow", "absent"]
    result = layers.executorch_block_ms(as_graph(_Branches().eval(), example), example, "xnnpack", modules, 1, 5,
                                        progress=messages.append)
    assert list(result["blocks"]) == ["trunk", "wide", "narrow"]  # a module the graph does not run: absent
    assert set(result["other_ms"]) == {layers.AFTER_LAST_BLOCK}
    assert_rows_add_up(result, modules)
    assert result["total_ms"] == pytest.approx(result["p50_ms"])  # the rows telescope to the whole program
    assert sum("lowering the prefix" in m for m in messages) == 3 and any("whole program" in m for m in messages)


@pytest.mark.slow  # an ExecuTorch export and two prefix lowerings of levit_128s: about a minute here
def test_profile_layers_has_a_column_per_runtime(cli, artifacts_dir, tmp_path):
    pytest.importorskip("executorch")
    saved = tmp_path / "layers.json"
    code, out, err = cli("profile", "levit_128s", "--device", "host-cpu", "--targets", "onnx,executorch", "--threads", "1",
                         "--layers", "--layer-depth", "1", "--artifacts", str(artifacts_dir), "--save", str(saved),
                         *FAST, "--repeats", "1", "--in-process")
    assert code == 0, err
    document = json.loads(saved.read_text())
    assert document["layer_blocks"] == ["stem", "stages", "head"]
    for measurement in document["measurements"]:
        assert set(measurement["layers"]["per_block"]["blocks"]) == {"stem", "stages", "head"}, measurement["runtime"]
        assert measurement["layers"]["ops"]
    header = next(line for line in out.splitlines() if "onnxruntime ms" in line and "executorch ms" in line)
    assert "roofline estimate ms" in header
    assert "per operator kind" in out


def test_an_int8_pte_keeps_operator_kinds_and_says_why_it_has_no_block_column(tiny_pte):
    """An int8 program cut at each block would have to be quantized again: the profile says so."""
    from rich.console import Console

    from edgevit.profile.profiler import _layers

    found = _layers("levit_128s", "executorch", tiny_pte, {"precision": "int8"}, 1, 2, ["stem"], lambda _: None)
    assert found["per_block"] is None and "calibration images" in found["per_block_missing"] and found["ops"]
    document = {"model": "levit_128s", "layer_depth": 1, "layer_blocks": ["stem"],
                "measurements": [{"runtime": "executorch", "layers": found}]}
    console = Console(width=400, record=True)
    for table in layers.comparison_tables(document):
        console.print(table)
    assert "executorch: no per-block column for the int8 .pte" in console.export_text()
