"""Every registered size: builds, has its reference implementation's exact parameter count,
runs at its native resolution, keeps its outputs in deploy form, and exports with torch.export."""
import pytest
import torch
from torch import nn

from edgevit.models import create_model, get_model_cfg, list_families, list_models, to_deploy
from edgevit.models.summary import count_params, stage_shapes

EXPECTED_NAMES = (
    [f"mobilevitv2_{w}" for w in ("050", "075", "100", "125", "150", "175", "200")]
    + [f"efficientformer_{s}" for s in ("l1", "l3", "l7")]
    + [f"levit_{s}" for s in ("128s", "128", "192", "256", "384")]
    + [f"levit_conv_{s}" for s in ("128s", "128", "192", "256", "384")]
    + [f"edgevit_{s}" for s in ("xxs", "xs", "s")]
)
DEPLOY_TOLERANCE = 1e-5  # relative to the largest output magnitude


def test_registry_holds_exactly_the_issue_names():
    assert sorted(list_models()) == sorted(EXPECTED_NAMES)
    assert {f.name for f in list_families()} == {"mobilevitv2", "efficientformer", "levit", "edgevit"}


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_size_builds_runs_deploys_and_exports(name):
    torch.manual_seed(0)
    model = create_model(name)
    cfg = model.cfg
    assert count_params(model) == cfg.source_params

    x = torch.randn(2, *cfg.input_size)
    deployed = to_deploy(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    with torch.no_grad():
        reference = model(x)
        fused = deployed(x)
    assert reference.shape == (2, cfg.num_classes)
    assert torch.isfinite(reference).all()
    error = float((fused - reference).abs().max() / reference.abs().max())
    assert error < DEPLOY_TOLERANCE, f"deploy form changed the output by {error:.2e}"

    exported = torch.export.export(deployed, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), fused, rtol=1e-5, atol=1e-5)
    graph_ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not any(op in graph_ops for op in ("aten.im2col.default", "aten.col2im.default"))


@pytest.mark.parametrize("family", ["mobilevitv2", "efficientformer", "levit", "edgevit"])
def test_eval_model_exports_and_stages_are_described(family):
    name = list_models(family=family)[0]
    model = create_model(name)
    x = torch.randn(1, *model.cfg.input_size)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)
    shapes = stage_shapes(model, x)
    assert len(shapes) == len(model.feature_info) + 1
    for info, (_, shape) in zip(model.feature_info, shapes):
        # Stage outputs are NCHW maps or token sequences; either way the channel count is declared.
        assert info["num_chs"] in shape


@pytest.mark.parametrize("family", ["mobilevitv2", "efficientformer", "levit", "edgevit"])
def test_num_classes_override(family):
    name = list_models(family=family)[0]
    x = torch.randn(1, *get_model_cfg(name).input_size)
    with torch.no_grad():
        assert create_model(name, num_classes=10)(x).shape == (1, 10)
        headless = create_model(name, num_classes=0)
        features = headless(x)
    assert features.shape == (1, headless.num_features)
    assert to_deploy(headless)(x).shape == features.shape
