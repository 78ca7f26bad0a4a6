"""LeViT specifics: the authors' checkpoint in both forms, their index tables, the two forms
agreeing, the deploy form's shape, and format detection that leaves other families alone."""
import re

import pytest
import torch
from torch import nn

from edgevit.core.errors import CheckpointError, EdgevitError
from edgevit.models import create_model, to_deploy
from edgevit.models.layers import attention_bias_index
from edgevit.models.levit import Subsample, detect_format
from tests.reference_data import (
    load_reference,
    max_relative_error,
    reference_expected,
    reference_input,
    reference_state_dict,
    write_as_published,
)

FB = "fb__LeViT_128S"
TOLERANCE = 1e-4


def _bias_layers(model: nn.Module) -> list[nn.Module]:
    """Attention layers in forward order (the order of the authors' flat ``blocks`` list)."""
    return [m for m in model.modules() if hasattr(m, "attention_bias_idxs")]


@pytest.fixture(scope="module")
def fb_conv(tmp_path_factory):
    """The authors' (Linear-only) checkpoint loaded into the 1×1-conv form."""
    path = write_as_published(FB, tmp_path_factory.mktemp("fb"))
    return create_model("levit_conv_128s", pretrained=str(path))


def test_fb_checkpoint_into_conv_form_matches_reference(fb_conv):
    x, expected = reference_input(FB), reference_expected(FB)
    with torch.no_grad():
        assert max_relative_error(fb_conv(x), expected) < TOLERANCE
        assert max_relative_error(to_deploy(fb_conv)(x), expected) < TOLERANCE


def test_published_index_tables_equal_ours():
    state_dict = reference_state_dict(FB)
    published = sorted(
        (k for k in state_dict if k.endswith("attention_bias_idxs")),
        key=lambda k: int(re.match(r"blocks\.(\d+)\.", k).group(1)),
    )
    layers = _bias_layers(create_model("levit_128s"))
    assert len(published) == len(layers)
    subsampling = 0
    for key, layer in zip(published, layers):
        table = state_dict[key]
        assert torch.equal(table, layer.attention_bias_idxs), key
        assert torch.equal(table, attention_bias_index(layer.resolution, layer.stride)[0]), key
        subsampling += layer.stride == 2
    assert subsampling == 2  # both AttentionSubsample tables were compared


@pytest.mark.parametrize("key", ["blocks.0.m.attention_bias_idxs", "blocks.12.attention_bias_idxs"])
def test_tampered_index_table_is_refused(key, tmp_path):
    state_dict = reference_state_dict(FB)
    state_dict[key] = state_dict[key].clone()
    state_dict[key][0, 1] = state_dict[key][0, 2]
    path = write_as_published(FB, tmp_path, state_dict)
    with pytest.raises(CheckpointError, match=re.escape(key) + ".*index table differs"):
        create_model("levit_128s", pretrained=str(path))


@pytest.mark.parametrize("stem", ["timm__levit_128s", "timm__levit_conv_128s"])
def test_linear_and_conv_forms_agree_on_the_same_timm_weights(stem, tmp_path):
    path = write_as_published(stem, tmp_path)
    linear = create_model("levit_128s", pretrained=str(path))
    conv = create_model("levit_conv_128s", pretrained=str(path))
    x = reference_input(stem)[:1]  # one image is enough to compare the forms
    with torch.no_grad():
        tokens, feature_map = linear.forward_features(x), conv.forward_features(x)
        torch.testing.assert_close(tokens, feature_map.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-4)
        logits = conv.forward_head(feature_map)
        assert max_relative_error(logits, linear.forward_head(tokens)) < 1e-5
        assert max_relative_error(logits, reference_expected(stem)[:1]) < TOLERANCE


@pytest.mark.parametrize("name", ["levit_128s", "levit_conv_128s"])
def test_deploy_form_is_fused_frozen_and_merged(name):
    deployed = to_deploy(create_model(name))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    assert not any("attention_biases" in n for n, _ in deployed.named_parameters())
    assert isinstance(deployed.head, nn.Linear) and deployed.head_dist is None
    downsample_q = deployed.stages[1].downsample.attn_downsample.q
    if name.startswith("levit_conv_"):
        # Query subsampling folded into the fused 1×1 convolution's stride.
        assert isinstance(downsample_q, nn.Conv2d) and downsample_q.stride == (2, 2)
    else:
        assert isinstance(downsample_q.ln, nn.Linear)


@pytest.mark.parametrize("stem", ["timm__efficientformer_l1", "saic__edgevit_xxs", "timm__mobilevitv2_050"])
def test_other_families_keys_are_not_levit(stem):
    assert detect_format(load_reference(stem)["state_dict"].keys()) is None


@pytest.mark.parametrize(
    "stem,fmt", [("timm__levit_128s", "timm"), ("timm__levit_conv_128s", "timm"), (FB, "fb")]
)
def test_levit_formats_are_detected(stem, fmt):
    assert detect_format(load_reference(stem)["state_dict"].keys()) == fmt


def test_input_size_sets_the_bias_tables_and_other_sizes_are_refused():
    model = create_model("levit_conv_128s", input_size=(3, 256, 256))
    shapes = [tuple(m.attention_bias_idxs.shape) for m in _bias_layers(model)]
    assert shapes[:3] == [(256, 256), (256, 256), (64, 256)]  # 16² tokens, then queries on 8²
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1000)
        with pytest.raises(EdgevitError, match="built for 256x256 inputs, got 224x224"):
            model(torch.randn(1, 3, 224, 224))


@pytest.mark.parametrize("side,stride", [(14, 2), (7, 2), (4, 2), (1, 2), (7, 3), (9, 3)])
def test_token_subsample_equals_the_strided_slice(side, stride):
    """The stride-1-slice form (for XNNPACK) keeps exactly the grid's every ``stride``-th point."""
    x = torch.randn(2, side * side, 5)
    expected = x.reshape(2, side, side, 5)[:, ::stride, ::stride].reshape(2, -1, 5)
    assert torch.equal(Subsample(stride, side, use_conv=False)(x), expected)
