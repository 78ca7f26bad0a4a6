"""The shared ONNX calibration: fed a few images at a time (bounded memory), its ranges are
exactly those of onnxruntime's calibrator given every image at once."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install -e '.[onnx]')")

from onnxruntime.quantization import CalibrationMethod, create_calibrator  # noqa: E402

from edgevit.quant.onnx_graph import CALIBRATION_CHUNK, CalibrationReader, calibrated_ranges  # noqa: E402


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.proj = nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(torch.nn.functional.gelu(self.norm(self.conv(x)))).softmax(-1)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("graph") / "small.onnx"
    torch.onnx.export(_Small().eval(), (torch.randn(1, 3, 16, 16),), str(path), input_names=["input"], dynamo=False)
    return path


@pytest.mark.parametrize("method,options", [
    ("minmax", {}),
    ("percentile", {"num_bins": 2048, "percentile": 99.999}),  # the onnx-int8 preset's
    ("percentile", {"symmetric": True}),  # TensorRT's: histograms of magnitudes
    ("entropy", {"num_bins": 512, "num_quantized_bins": 128}),
])
def test_chunked_calibration_equals_one_pass(graph, tmp_path, method, options):
    # Later images are larger, so chunk by chunk the histograms would have to grow (and re-bin).
    rng = np.random.default_rng(0)
    images = np.stack([rng.standard_normal((3, 16, 16)) * (1 + i / 4) for i in range(3 * CALIBRATION_CHUNK - 3)])
    images = images.astype(np.float32)
    once = create_calibrator(graph, ["Conv", "MatMul", "Gemm", "Add", "Softmax"], augmented_model_path=str(tmp_path / "a.onnx"),
                             calibrate_method=getattr(CalibrationMethod, {"minmax": "MinMax"}.get(method, method.capitalize())),
                             extra_options=options)
    once.collect_data(CalibrationReader(images, "input", 1))
    expected = once.compute_data()
    chunked = calibrated_ranges(graph, ["Conv", "MatMul", "Gemm", "Add", "Softmax"], tmp_path, method, options,
                                images, "input", static_batch=1)
    assert set(chunked.data) == set(expected.data) and len(expected.data) > 3
    for name, ranges in expected.data.items():
        np.testing.assert_array_equal(np.asarray(chunked.data[name].range_value, dtype=np.float64),
                                      np.asarray(ranges.range_value, dtype=np.float64), err_msg=name)
