"""EdgeViT specifics: the authors' checkpoint format, the LGL structure, sparse sampling,
inputs other than 224², and what the deploy form folds."""
import copy

import pytest
import torch
from torch import nn

from edgevit.core.errors import EdgevitError
from edgevit.models import create_model, to_deploy
from edgevit.models.edgevit import GlobalSparseAttn, LocalAgg, TokenSpread
from edgevit.models.layers import DropPath
from edgevit.models.registry import get_family
from edgevit.models.summary import stage_shapes
from tests.reference_data import (
    REFERENCE_MODELS,
    load_reference,
    max_relative_error,
    reference_expected,
    reference_input,
    reference_state_dict,
)

STEM, MODEL = "saic__edgevit_xxs", "edgevit_xxs"


@pytest.fixture(scope="module")
def xxs(tmp_path_factory):
    """edgevit_xxs with the reference weights, so every BatchNorm has non-trivial statistics."""
    path = tmp_path_factory.mktemp("saic") / "edgevit_xxs.pth"
    torch.save({"model": reference_state_dict(STEM)}, path)
    return create_model(MODEL, pretrained=str(path))


def test_native_keys_and_shapes_are_the_authors(xxs):
    published = {k: tuple(v["shape"]) for k, v in load_reference(STEM)["state_dict"].items()}
    ours = {k: tuple(v.shape) for k, v in xxs.state_dict().items()}
    assert list(ours.items()) == list(published.items())


@pytest.mark.parametrize("stem", sorted(REFERENCE_MODELS))
def test_detect_format_claims_only_edgevit_checkpoints(stem):
    keys = load_reference(stem)["state_dict"].keys()
    expected = "saic" if REFERENCE_MODELS[stem].startswith("edgevit_") else None
    assert get_family("edgevit").detect_format(keys) == expected


@pytest.mark.parametrize("wrapper", ["ddp-prefix", "ddp-prefix-in-state_dict"])
def test_authors_checkpoint_loads_in_training_wrappers(wrapper, tmp_path):
    prefixed = {f"module.{k}": v for k, v in reference_state_dict(STEM).items()}
    payload = {
        "ddp-prefix": prefixed,
        "ddp-prefix-in-state_dict": {"state_dict": prefixed, "epoch": 299},
    }[wrapper]
    path = tmp_path / "checkpoint.pth"
    torch.save(payload, path)
    model = create_model(MODEL, pretrained=str(path))
    with torch.no_grad():
        assert max_relative_error(model(reference_input(STEM)), reference_expected(STEM)) < 1e-4


@pytest.mark.parametrize("name, heads", [("edgevit_xs", (1, 2, 5, 8)), ("edgevit_s", (1, 2, 5, 8))])
def test_lgl_structure(name, heads):
    with torch.device("meta"):
        model = create_model(name)
    arch = model.cfg.arch
    for stage, (depth, dim, sr, num_heads) in enumerate(
        zip(arch["depths"], arch["embed_dims"], arch["sr_ratios"], heads), 1
    ):
        blocks = getattr(model, f"blocks{stage}")
        assert len(blocks) == depth
        for block in blocks:
            attn = block.SelfAttn.attn
            assert isinstance(attn, GlobalSparseAttn) and attn.num_heads == num_heads
            if sr == 1:
                # Dense attention: no local aggregation, no sampler, no propagation, no norm.
                assert isinstance(block.LocalAgg, nn.Identity)
                assert not any(hasattr(attn, n) for n in ("sampler", "LocalProp", "norm"))
                params = {n for n, _ in attn.named_parameters()}
                assert params == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
            else:
                assert isinstance(block.LocalAgg, LocalAgg)
                assert (attn.sampler.kernel_size, attn.sampler.stride) == (1, sr)
                prop = attn.LocalProp
                assert isinstance(prop, nn.ConvTranspose2d)
                assert (prop.kernel_size, prop.stride, prop.groups) == ((sr, sr), (sr, sr), dim)


def test_attention_sees_only_the_delegate_pixels():
    torch.manual_seed(0)
    attn = GlobalSparseAttn(dim=8, num_heads=2, sr_ratio=2).eval()
    height, width = 4, 6
    x = torch.randn(1, height * width, 8)
    off_grid = x.clone()
    off_grid.view(1, height, width, 8)[:, 1::2, :, :] += 1.0  # odd rows hold no delegate
    off_grid.view(1, height, width, 8)[:, :, 1::2, :] += 1.0  # nor do odd columns
    on_grid = x.clone()
    on_grid.view(1, height, width, 8)[:, 2, 4, :] += 1.0
    with torch.no_grad():
        out = attn(x, height, width)
        assert torch.equal(attn(off_grid, height, width), out)
        assert not torch.allclose(attn(on_grid, height, width), out)


@pytest.mark.parametrize("size", [(256, 256), (224, 192)])
def test_other_input_sizes_run(xxs, size):
    shapes = dict(stage_shapes(xxs, torch.randn(1, 3, *size)))
    for info in xxs.feature_info:
        reduction = info["reduction"]
        assert shapes[info["module"]] == (1, info["num_chs"], size[0] // reduction, size[1] // reduction)


def test_non_square_input_deploys_and_exports(xxs):
    deployed = to_deploy(xxs)
    x = torch.randn(1, 3, 224, 192)
    exported = torch.export.export(deployed, (x,))
    with torch.no_grad():
        fused = deployed(x)
        assert max_relative_error(fused, xxs(x)) < 1e-5
        torch.testing.assert_close(exported.module()(x), fused, rtol=1e-5, atol=1e-5)


def test_size_that_cannot_be_sampled_is_refused(xxs):
    with pytest.raises(EdgevitError, match="divisible by 32"):
        xxs(torch.randn(1, 3, 240, 240))
    with pytest.raises(EdgevitError, match="divisible by 32"):
        create_model(MODEL, input_size=(3, 240, 240))


def test_deploy_folds_every_batchnorm_into_a_neighbour(xxs):
    deployed = to_deploy(xxs)
    local = deployed.blocks1[0].LocalAgg
    assert isinstance(local.norm1, nn.Identity) and isinstance(local.norm2, nn.Identity)
    assert isinstance(deployed.norm, nn.Identity)
    # The eval model is untouched.
    assert isinstance(xxs.norm, nn.BatchNorm2d) and isinstance(xxs.blocks1[0].LocalAgg.norm1, nn.BatchNorm2d)


def test_headless_deploy_keeps_the_final_normalisation(tmp_path):
    path = tmp_path / "edgevit_xxs.pth"
    torch.save(reference_state_dict(STEM), path)
    model = create_model(MODEL, pretrained=str(path), num_classes=0)
    x = reference_input(STEM)[:1]
    with torch.no_grad():
        features = model(x)
        deployed = to_deploy(model)
        assert max_relative_error(deployed(x), features) < 1e-5
    # With no head to fold into, the final BatchNorm becomes a per-channel (depthwise 1×1) conv.
    assert isinstance(deployed.norm, nn.Conv2d) and deployed.norm.groups == model.num_features


def test_drop_path_rate_rises_linearly_over_blocks():
    model = create_model(MODEL, drop_path_rate=0.1)
    rates = [m.prob for m in model.modules() if isinstance(m, DropPath)]
    # LocalAgg and SelfAttn of a block share its rate; the first block's is 0, so it has none.
    blocks = sum(model.cfg.arch["depths"])
    assert rates == sorted(rates)
    assert sorted(set(rates)) == pytest.approx([0.1 * i / (blocks - 1) for i in range(1, blocks)])


@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_attention_and_head_are_in_forms_every_backend_delegates(sr_ratio):
    """Slices instead of unbind, bmm on 3-D views instead of 4-D matmuls (whose expand XNNPACK
    does not take), and the head mean as a keepdim global average pool: the plain forms' numbers."""
    torch.manual_seed(0)
    attention = GlobalSparseAttn(64, num_heads=4, sr_ratio=sr_ratio).eval()
    height = width = 4
    x = torch.randn(2, height * width, 64)
    with torch.no_grad():
        tokens = x
        if sr_ratio > 1:
            tokens = attention.sampler(x.transpose(1, 2).reshape(2, 64, height, width)).flatten(2).transpose(1, 2)
        count = tokens.shape[1]
        q, k, v = attention.qkv(tokens).reshape(2, count, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * attention.scale).softmax(dim=-1)
        plain = (attn @ v).transpose(1, 2).reshape(2, count, 64)
        if sr_ratio > 1:
            plain = attention.LocalProp(plain.transpose(1, 2).reshape(2, 64, height // 2, width // 2))
            plain = attention.norm(plain.flatten(2).transpose(1, 2))
        torch.testing.assert_close(attention(x, height, width), attention.proj(plain), rtol=1e-6, atol=1e-6)


def test_exported_graph_has_no_op_xnnpack_leaves_out():
    deployed = to_deploy(create_model(MODEL))
    # Core ATen, as ExecuTorch lowers it (a 4-D matmul decomposes to expand + bmm there).
    graph = torch.export.export(deployed, (torch.randn(1, 3, 224, 224),)).run_decompositions().graph
    ops = [n for n in graph.nodes if n.op == "call_function"]
    names = {str(n.target) for n in ops}
    assert "aten.bmm.default" in names
    assert not {"aten.expand.default", "aten.unbind.int", "aten.squeeze.dims", "aten.select.int"} & names
    # LocalProp's depthwise deconvolution became a multiply-add on the tokens (TokenSpread).
    assert not [n for n in ops if str(n.target) == "aten.convolution.default" and n.args[6]]
    means = [n for n in ops if str(n.target) == "aten.mean.dim"]
    assert means and all(list(n.args[1]) == [2, 3] and n.args[2] for n in means)
    with torch.no_grad():
        features = torch.randn(2, 288, 7, 7)
        torch.testing.assert_close(deployed.forward_head(features, pre_logits=True), features.mean((2, 3)))


def test_deploy_spreads_delegates_on_tokens_with_the_deconvolutions_values():
    torch.manual_seed(0)
    attention = GlobalSparseAttn(16, num_heads=2, sr_ratio=4).eval()
    with torch.no_grad():  # a bias and taps far from zero, so a wrong tap order shows
        attention.LocalProp.weight.normal_()
        attention.LocalProp.bias.normal_()
    deployed = copy.deepcopy(attention).deploy()
    assert isinstance(deployed.LocalProp, TokenSpread)
    x = torch.randn(2, 8 * 12, 16)
    with torch.no_grad():
        # kernel = stride: one multiply-add per output, so the same bits
        assert torch.equal(deployed(x, 8, 12), attention(x, 8, 12))
