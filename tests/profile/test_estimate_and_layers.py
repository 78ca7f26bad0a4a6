"""Roofline estimates and per-layer profiles keyed by module names."""
import pytest
import torch

from edgevit.models import create_model, to_deploy
from edgevit.models.summary import count_macs
from edgevit.profile import estimate, layers
from edgevit.profile.profiles import resolve_profile


def test_estimate_counts_the_same_macs_as_the_model_summary():
    model = to_deploy(create_model("levit_128s")).eval()
    costs = estimate.layer_costs(model, torch.zeros(1, 3, 224, 224), "fp32", 1e11, 1e10)
    assert sum(c.flops for c in costs.values()) == 2 * count_macs(model)
    assert all(name in dict(model.named_modules()) for name in costs)


def test_estimate_is_labelled_and_needs_peak_figures():
    result = estimate.estimate("levit_128s", resolve_profile("raspberry-pi-5", None), "fp32")
    assert result["kind"] == "estimate" and result["p50_ms"] > 0 and "source" in result["peak_flops"]
    with pytest.raises(Exception, match="no peak figures for an int8 estimate"):
        estimate.estimate("levit_128s", resolve_profile("raspberry-pi-5", None), "int8")


def test_onnx_node_names_map_back_to_modules():
    names = {"stages", "stages.0", "stages.0.0", "stages.0.0.conv1_1x1", "stages.0.0.conv1_1x1.act", "head"}
    assert layers.module_of_node("/stages/stages.0/stages.0.0/conv1_1x1/act/Mul/QuickGeluFusion/", names) == "stages.0.0.conv1_1x1.act"
    assert layers.module_of_node("/head/fc/Gemm", names) == "head"
    assert layers.module_of_node("Reshape_3", names) == ""


def test_onnxruntime_layers_cover_the_model(artifacts_dir):
    model = to_deploy(create_model("levit_128s"))
    names = {n for n, _ in model.named_modules() if n}
    profile = layers.onnxruntime_layers(artifacts_dir / "levit_128s-onnx-fp32" / "levit_128s.onnx", 1, 3, names)
    mapped = sum(ms for name, ms in profile["modules"].items() if name)
    assert mapped > 0.8 * sum(profile["modules"].values())  # most time lands on a named module
    stages = ["stages.0", "stages.1", "stages.2"]
    assert set(stages) <= set(layers.sum_to_blocks(profile["modules"], stages))
    assert "Gemm" in profile["ops"] or "MatMul" in profile["ops"]


def test_executorch_etdump_times_each_operator(tiny_pte):
    profile = layers.executorch_layers(tiny_pte, 1, 3)
    assert any("Convolution" in op for op in profile["ops"]) and all(ms >= 0 for ms in profile["ops"].values())
