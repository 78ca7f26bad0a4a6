"""The shared fusion arithmetic and the attention-bias index table, against direct computation."""
import itertools

import pytest
import torch
from torch import nn

from edgevit.models import layers


def _random_bn(channels: int, dims: int = 2) -> nn.Module:
    bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn.eval()


@pytest.mark.parametrize("groups", [1, 4])
def test_fuse_conv_bn_equals_sequence(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=groups, bias=groups == 1).eval()
    bn = _random_bn(16)
    x = torch.randn(2, 8, 11, 11)
    torch.testing.assert_close(layers.fuse_conv_bn(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_fuse_bn_conv_equals_sequence(groups):
    torch.manual_seed(0)
    bn = _random_bn(8)
    conv = nn.Conv2d(8, 12, 1, groups=groups).eval()
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(layers.fuse_bn_conv(bn, conv)(x), conv(bn(x)), rtol=1e-5, atol=1e-5)


def test_fuse_bn_conv_refuses_padded_conv():
    with pytest.raises(ValueError, match="padded"):
        layers.fuse_bn_conv(_random_bn(4), nn.Conv2d(4, 4, 3, padding=1))


def test_fuse_linear_bn_and_bn_linear_equal_sequences():
    torch.manual_seed(0)
    linear = nn.Linear(6, 10)
    x = torch.randn(7, 6)
    bn_out = _random_bn(10, dims=1)
    torch.testing.assert_close(layers.fuse_linear_bn(linear, bn_out)(x), bn_out(linear(x)), rtol=1e-5, atol=1e-5)
    bn_in = _random_bn(6, dims=1)
    torch.testing.assert_close(layers.fuse_bn_linear(bn_in, linear)(x), linear(bn_in(x)), rtol=1e-5, atol=1e-5)


def test_merge_heads_is_the_mean_of_the_heads():
    torch.manual_seed(0)
    heads = [nn.Linear(5, 3), nn.Linear(5, 3)]
    x = torch.randn(4, 5)
    torch.testing.assert_close(layers.merge_heads(heads)(x), (heads[0](x) + heads[1](x)) / 2)


@pytest.mark.parametrize("resolution,stride", [(7, 1), (14, 2), (4, 2), (7, 2)])
def test_attention_bias_index_matches_offset_enumeration(resolution, stride):
    # The authors enumerate offsets in a dict, numbering each new (|dy|, |dx|) as first seen.
    keys = list(itertools.product(range(resolution), range(resolution)))
    queries = list(itertools.product(range(0, resolution, stride), range(0, resolution, stride)))
    offsets: dict[tuple[int, int], int] = {}
    expected = []
    for q in queries:
        row = []
        for k in keys:
            offset = (abs(q[0] - k[0]), abs(q[1] - k[1]))
            row.append(offsets.setdefault(offset, len(offsets)))
        expected.append(row)
    index, num_offsets = layers.attention_bias_index(resolution, stride)
    assert index.tolist() == expected
    assert num_offsets == len(offsets)


def test_fused_layers_keep_dtype():
    conv = nn.Conv2d(4, 4, 1).double().eval()
    bn = _random_bn(4).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    fused = layers.fuse_conv_bn(conv, bn)
    assert fused.weight.dtype == torch.float64
    torch.testing.assert_close(fused(x), bn(conv(x)))


def test_batched_matmul_and_mean_tokens_equal_the_plain_ops():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(layers.batched_matmul(a, b), a @ b)
    tokens = torch.randn(2, 7, 5)
    torch.testing.assert_close(layers.mean_tokens(tokens), tokens.mean(1))


def test_decomposed_norms_equal_the_fused_ones_even_far_from_zero_mean():
    torch.manual_seed(0)
    model = nn.Sequential(nn.GroupNorm(1, 8), nn.Flatten(2), nn.LayerNorm(12))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[2].bias.normal_()
    x = 100 + torch.randn(2, 8, 3, 4)  # a large mean is where one-pass variance kernels fail
    expected = model(x)
    layers.decompose_norms(model)
    assert isinstance(model[0], layers.GroupNorm1AsConv) and isinstance(model[2], layers.LayerNormAsMatmul)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
