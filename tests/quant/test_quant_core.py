"""Recipes' [quantization] table, family defaults, calibration files, the collapse rule and the
sensitivity analysis — the parts of quantization that every target shares."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgevit.core.errors import EdgevitError
from edgevit.pipeline.export import build_quant_spec
from edgevit.verify import collapse_failure, compare_outputs
from edgevit.targets.recipes import parse_recipe, presets, resolve_recipe
from edgevit.models import create_model, get_model_cfg, to_deploy
from edgevit.quant.calibration import Calibration, activation_ranges, load_calibration, preprocessing_of
from edgevit.quant.recipes import FAMILY_DEFAULTS
from edgevit.quant.sensitivity import keep_float_until, layer_sensitivity
from edgevit.quant.spec import OP_KINDS, QuantSpec


def _int8_recipe(**quantization):
    return {"name": "mine", "target": "onnx", "precision": "int8", "quantization": {"mode": "static", **quantization}}


def test_int8_presets_cover_every_mode_their_target_offers():
    from edgevit.targets import TARGETS

    for target in TARGETS.values():
        if "int8" not in target.precisions:
            continue
        for mode in target.quant_modes:
            recipe = resolve_recipe(None, target.name, None, None, mode)
            assert recipe.precision == "int8" and recipe.quantization["mode"] == mode


@pytest.mark.parametrize("table, message", [
    ({"mode": "sometimes"}, "mode must be one of"),
    ({"mode": "static", "method": "median"}, "method must be one of"),
    ({"mode": "static", "float_ops": ["layernorm"]}, "unknown float_ops layernorm"),
    ({"mode": "static", "per_channel": "yes"}, "per_channel must be bool"),
    ({"mode": "static", "granularity": 3}, "unknown [quantization] keys granularity"),
    ({"mode": "static", "calibration_images": 0}, "at least 1"),
])
def test_bad_quantization_tables_are_named(table, message):
    data = _int8_recipe()
    data["quantization"] = table
    with pytest.raises(EdgevitError, match=None) as error:
        parse_recipe(data, source="mine.toml")
    assert message in str(error.value)


def test_int8_needs_a_table_and_fp32_refuses_one():
    with pytest.raises(EdgevitError, match="needs a \\[quantization\\] table"):
        parse_recipe({"name": "x", "target": "onnx", "precision": "int8"}, source="x.toml")
    with pytest.raises(EdgevitError, match="int8 only"):
        parse_recipe({"name": "x", "target": "onnx", "precision": "fp32", "quantization": {"mode": "static"}}, source="x.toml")


def test_mode_with_a_float_precision_is_refused():
    with pytest.raises(EdgevitError, match="cannot be combined with precision fp16"):
        resolve_recipe(None, "onnx", "fp16", None, "static")


def test_family_defaults_name_real_modules_and_known_ops():
    for family, defaults in FAMILY_DEFAULTS.items():
        assert set(defaults.float_ops) <= set(OP_KINDS)
        name = {"mobilevitv2": "mobilevitv2_050", "efficientformer": "efficientformer_l1",
                "levit": "levit_128s", "edgevit": "edgevit_xxs"}[family]
        model = to_deploy(create_model(name))
        spec = QuantSpec(mode="dynamic", float_modules=defaults.float_modules)
        matched = spec.float_module_names(model)
        for pattern in defaults.float_modules:  # every pattern keeps something float
            assert any(n == pattern or n.startswith(pattern + ".") for n in matched), (family, pattern)


def test_family_float_ops_per_target_reach_the_spec():
    cfg = get_model_cfg("mobilevitv2_050")
    calibration = Calibration(inputs=torch.zeros(2, *cfg.input_size), summary={"images": 2})
    on_onnx = build_quant_spec(cfg, resolve_recipe(None, "onnx", "int8", mode="static"), calibration)
    on_xnnpack = build_quant_spec(cfg, resolve_recipe(None, "executorch", "int8", mode="static"), calibration)
    assert on_onnx.float_ops == FAMILY_DEFAULTS["mobilevitv2"].target_float_ops["onnx"]
    assert "residual_add" in on_onnx.float_ops and "residual_add" not in on_xnnpack.float_ops
    assert on_xnnpack.float_ops == FAMILY_DEFAULTS["mobilevitv2"].float_ops
    for defaults in FAMILY_DEFAULTS.values():
        for ops in defaults.target_float_ops.values():
            assert set(ops) <= set(OP_KINDS)


def test_recipe_table_replaces_ops_and_extends_modules():
    cfg = get_model_cfg("levit_128s")
    recipe = parse_recipe(_int8_recipe(float_ops=["softmax"], float_modules=["stages.0.*"]), source="mine.toml")
    calibration = Calibration(inputs=torch.zeros(2, *cfg.input_size), summary={"images": 2})
    spec = build_quant_spec(cfg, recipe, calibration, extra_float_modules=("stages.1.blocks.0.mlp.ln1",))
    assert spec.float_ops == ("softmax",)
    assert spec.float_modules == FAMILY_DEFAULTS["levit"].float_modules + ("stages.0.*", "stages.1.blocks.0.mlp.ln1")
    with pytest.raises(EdgevitError, match="needs calibration images"):
        build_quant_spec(cfg, recipe, None)


def test_collapse_rule_catches_few_distinct_outputs_only():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(16, 10)).astype(np.float32)
    collapsed = np.where(reference > 0, 0.5, -0.5).astype(np.float32)  # two values, sign kept
    assert collapse_failure(reference, compare_outputs(reference, collapsed)).startswith("output collapsed: only 2")
    # int8 logits on a 256-level grid are not a collapse
    scale = np.abs(reference).max() / 127
    on_grid = (np.round(reference / scale) * scale).astype(np.float32)
    assert collapse_failure(reference, compare_outputs(reference, on_grid)) is None


def test_calibration_file_round_trip_and_mismatch(tmp_path):
    cfg = get_model_cfg("mobilevitv2_050")
    model = to_deploy(create_model("mobilevitv2_050"))
    inputs = torch.randn(3, *cfg.input_size)
    ranges = activation_ranges(model, inputs)
    assert "head.fc" in ranges and all(r[0] <= r[2] <= r[3] <= r[1] for r in ranges.values())
    saved = Calibration(inputs, {"images": 3, "preprocessing": preprocessing_of(cfg)}, ranges).save(tmp_path / "c.safetensors")
    loaded = load_calibration(saved, cfg)
    assert torch.equal(loaded.inputs, inputs) and loaded.ranges.keys() == ranges.keys()
    assert np.allclose(loaded.ranges["head.fc"], ranges["head.fc"])
    with pytest.raises(EdgevitError, match="uses .*re-run  edgevit calibrate"):
        load_calibration(saved, get_model_cfg("levit_128s"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EdgevitError, match="is not an edgevit calibration stats file"):
        load_calibration(tmp_path / "junk.safetensors", cfg)
    with pytest.raises(EdgevitError, match="does not exist"):
        load_calibration(tmp_path / "missing.safetensors", cfg)


def test_sensitivity_ranks_the_layer_with_an_outlier_input_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        model[2].weight[:, 0] = 0.0  # the outlier feature must not matter to the output...
        model[0].weight[0] *= 400.0  # ...but it stretches layer 2's input range, wasting its int8 levels
    inputs = torch.randn(64, 16)
    ranking = layer_sensitivity(model, inputs)
    assert ranking[0].module == "2"
    assert [r.relative_error for r in ranking] == sorted((r.relative_error for r in ranking), reverse=True)
    with torch.no_grad():  # the model itself is left as it was
        assert torch.equal(model(inputs), model(inputs))
    assert model[0].weight[0].abs().max() > 10


def test_keep_float_until_finds_the_fewest_float_layers():
    ranking = [f"layer{i}" for i in range(20)]
    exported = []

    def export_with_float(layers):
        exported.append(len(layers))
        return len(layers)

    chosen, tried = keep_float_until(ranking, export_with_float, lambda k: max(0.0, 3.0 - 0.4 * k), max_drop=0.5)
    assert chosen.float_layers == 7  # 3.0 - 0.4*7 = 0.2 ≤ 0.5 < 3.0 - 0.4*6 = 0.6
    assert len(exported) == len(set(exported)) < 20  # doubling then bisecting, never twice
    chosen, _ = keep_float_until(ranking, export_with_float, lambda k: 1.0, max_drop=0.5)
    assert chosen.float_layers == 20 and chosen.drop > 0.5  # the caller reports that it cannot fit


def test_shipped_presets_parse():
    assert {"onnx-int8", "onnx-int8-dynamic", "executorch-xnnpack-int8", "coreml-ios17-w8a8"} <= set(presets())


def test_a_mode_the_preset_lacks_gets_its_own_recipe_and_bundle_name():
    from edgevit.core.bundle import bundle_name

    # QAT on the static preset must not replace that preset's bundle in the same --out.
    qat = resolve_recipe(None, "onnx", "int8", mode="qat")
    assert qat.name == "onnx-int8-qat" and qat.quantization["mode"] == "qat"
    assert resolve_recipe(None, "onnx", "int8", mode="static").name == "onnx-int8"
    assert resolve_recipe(None, "onnx", "int8", mode="dynamic").name == "onnx-int8-dynamic"  # a preset of its own
    assert resolve_recipe(qat, "onnx", "int8", mode="qat") == qat  # resolving again changes nothing
    assert bundle_name("levit_128s", qat.name, {}) == "levit_128s-onnx-int8-qat"
