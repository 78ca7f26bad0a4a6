"""The ExecuTorch target: .pte programs lowered to XNNPACK run in executorch.runtime and agree
with PyTorch; the manifest says how much of the graph the delegate took; the Core ML delegate
lowers anywhere and runs only where Core ML does."""
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("executorch", reason="the executorch extra is not installed (pip install -e '.[executorch]')")

from edgevit.core.errors import EdgevitError  # noqa: E402
from edgevit.runtimes import RuntimeUnavailable  # noqa: E402
from edgevit import runtimes  # noqa: E402
from edgevit.targets.executorch import export  # noqa: E402
from edgevit.core.bundle import MANIFEST_NAME  # noqa: E402
from edgevit.pipeline.export import ExportRequest, export_model  # noqa: E402
from tests.reference_data import max_relative_error, reference_expected, reference_input, write_as_published  # noqa: E402

# The smallest size of each family, with the shared reference checkpoint it loads (so norms and
# attention biases are not at their trivial initial values).
SMALLEST = [
    ("mobilevitv2_050", "timm__mobilevitv2_050"),
    ("efficientformer_l1", "timm__efficientformer_l1"),
    ("levit_128s", "timm__levit_128s"),
    ("edgevit_xxs", "saic__edgevit_xxs"),
]


def _check_stats(details):
    assert details["delegated_subgraphs"] >= 1
    assert details["delegated_ops"] + sum(details["non_delegated_ops"].values()) == details["total_ops"]
    assert details["delegated_share"] == round(details["delegated_ops"] / details["total_ops"], 4)
    assert "getitem" not in details["non_delegated_ops"]


@pytest.mark.parametrize("model,stem", SMALLEST)
def test_smallest_sizes_export_verify_and_match_the_reference(model, stem, tmp_path):
    weights = write_as_published(stem, tmp_path)
    outcome = export_model(ExportRequest(model, "executorch", weights=str(weights), out_dir=tmp_path / "out"))
    v = outcome.verification
    assert v["passed"] and v["check"] == "executorch.runtime" and v["batch"] == 4
    assert v["max_rel_error"] < 1e-4
    assert outcome.artifact.suffix == ".pte" and (outcome.bundle / MANIFEST_NAME).is_file()
    details = outcome.manifest["target_details"]
    assert details["backend"] == "xnnpack" and details["static_batch"] == 1
    _check_stats(details)
    # The artifact reproduces the reference implementation's own outputs (timm / the authors').
    run = runtimes.load("executorch", outcome.artifact, options=outcome.manifest["recipe"]["options"]).run
    assert max_relative_error(torch.from_numpy(run(reference_input(stem).numpy())), reference_expected(stem)) < 1e-4


class _NormBetweenConvs(nn.Module):
    """conv → LayerNorm over channels → conv: XNNPACK has no layer_norm kernel."""

    def __init__(self):
        super().__init__()
        self.conv1, self.norm, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm(8), nn.Conv2d(8, 4, 1)
        self.cfg = types.SimpleNamespace(name="tiny")

    def forward(self, x):
        x = self.norm(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(x).mean((2, 3), keepdim=True).flatten(1)


class _SumBetweenConvs(_NormBetweenConvs):
    """conv → sum over channels → conv: XNNPACK has no sum, so the graph splits in two."""

    def forward(self, x):
        x = self.conv1(x)
        x = x - x.sum(1, keepdim=True)
        return self.conv2(x).mean((2, 3), keepdim=True).flatten(1)


def test_ops_left_outside_the_delegate_are_named_and_batches_are_fed_one_by_one(tmp_path):
    torch.manual_seed(0)
    model = _SumBetweenConvs().eval()
    result = export(model, torch.randn(1, 3, 8, 8), "fp32", {"backend": "xnnpack"}, tmp_path)
    details = result.details
    _check_stats(details)
    assert details["non_delegated_ops"] == {"aten_sum_dim_int_list": 1}
    assert details["delegated_subgraphs"] == 2 and details["delegated_share"] < 1
    batch = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = model(batch).numpy()
    got = runtimes.load("executorch", result.path).run(batch.numpy())
    assert got.shape == (3, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_layer_norm_is_rewritten_so_xnnpack_takes_the_whole_graph(tmp_path):
    torch.manual_seed(0)
    model = _NormBetweenConvs().eval()
    result = export(model, torch.randn(1, 3, 8, 8), "fp32", {"backend": "xnnpack"}, tmp_path)
    assert result.details["non_delegated_ops"] == {}
    assert result.details["delegated_subgraphs"] == 1 and result.details["delegated_share"] == 1
    assert isinstance(model.norm, nn.LayerNorm)  # the patch works on a copy
    batch = 50 + torch.randn(2, 3, 8, 8)  # far from zero mean, where one-pass variance kernels drift
    with torch.no_grad():
        expected = model(batch).numpy()
    got = runtimes.load("executorch", result.path).run(batch.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


class _SoftmaxOverConvOutput(nn.Module):
    """MobileViT v2's pattern: a softmax over the last dim of a convolution's output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 5, 1)
        self.cfg = types.SimpleNamespace(name="softmax")

    def forward(self, x):
        y = self.conv(x)
        return (y.softmax(dim=-1) * y).flatten(1)


def test_softmax_over_a_convolution_output_is_right(tmp_path):
    # ExecuTorch's XNNPACK softmax runs on the convolution's NHWC layout and normalises the
    # wrong axis unless the target routes it through a 3-D view.
    torch.manual_seed(0)
    model = _SoftmaxOverConvOutput().eval()
    result = export(model, torch.randn(1, 8, 4, 16), "fp32", {"backend": "xnnpack"}, tmp_path)
    assert result.details["delegated_share"] == 1.0 and result.details["delegated_subgraphs"] == 1
    batch = torch.randn(2, 8, 4, 16)
    with torch.no_grad():
        expected = model(batch).numpy()
    np.testing.assert_allclose(runtimes.load("executorch", result.path).run(batch.numpy()), expected, rtol=1e-5, atol=1e-5)


def test_a_damaged_program_is_one_clear_error(tmp_path):
    result = export(_SoftmaxOverConvOutput().eval(), torch.randn(1, 8, 4, 16), "fp32", {"backend": "xnnpack"}, tmp_path)
    result.path.write_bytes(result.path.read_bytes()[:1000])
    with pytest.raises(EdgevitError, match="cannot load softmax.pte"):
        runtimes.load("executorch", result.path)


def test_coreml_backend_lowers_here_and_runs_only_where_core_ml_does(tmp_path, capsys):
    weights = write_as_published("timm__levit_128s", tmp_path)
    outcome = export_model(ExportRequest("levit_128s", recipe="executorch-coreml-fp32", weights=str(weights),
                                         out_dir=tmp_path))
    details = outcome.manifest["target_details"]
    assert details["backend"] == "coreml" and details["coreml_compute_precision"] == "float32"
    _check_stats(details)
    v = outcome.verification
    if sys.platform == "darwin" and v["passed"] is not None:
        assert v["passed"] and v["max_rel_error"] < 1e-4
    elif sys.platform == "darwin":  # an executorch build without the Core ML runtime
        assert "CoreMLBackend" in v["check"]
    else:
        assert v["passed"] is None and v["check"].startswith("not run:") and "macOS" in v["check"]
        with pytest.raises(RuntimeUnavailable, match="macOS"):
            runtimes.load("executorch", outcome.artifact, options={"backend": "coreml"})
        # Inspecting it here: its runtime is missing — one line, the missing-runtime exit code.
        from edgevit.cli import main
        from tests.test_cli import assert_one_line_error

        code = main(["inspect", str(outcome.bundle)])
        assert_one_line_error(code, *capsys.readouterr(), "macOS")
        assert code == 4
