"""Pieces shared by the families: BatchNorm folding, head merging, attention-bias tables.

Module *names* stay in the family files (they follow each reference implementation's keys);
what is shared here is the arithmetic, so it is written and tested once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


def _bn_scale_shift(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm in eval as ``y = x * scale + shift`` per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
        shift = bn.bias - bn.running_mean * scale
    else:
        shift = -bn.running_mean * scale
    return scale, shift


def _bias_of(layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
    if layer.bias is not None:
        return layer.bias
    return torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device)


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
        dtype=weight.dtype, device=weight.device,
    )
    fused.weight.data.copy_(weight)
    fused.bias.data.copy_(bias)
    return fused


def _linear_like(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=True, dtype=weight.dtype, device=weight.device)
    fused.weight.data.copy_(weight)
    fused.bias.data.copy_(bias)
    return fused


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: _BatchNorm) -> nn.Conv2d:
    """``bn(conv(x))`` as one convolution."""
    scale, shift = _bn_scale_shift(bn)
    weight = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    return _conv_like(conv, weight, _bias_of(conv) * scale + shift)


@torch.no_grad()
def fuse_bn_conv(bn: _BatchNorm, conv: nn.Conv2d) -> nn.Conv2d:
    """``conv(bn(x))`` as one convolution.

    Exact only when the convolution sees no zero padding (the padded zeros would not pass
    through the BatchNorm's shift); refused otherwise.
    """
    padding = conv.padding
    if padding == "same" or (isinstance(padding, tuple) and any(padding)):
        raise ValueError("a BatchNorm before a padded convolution cannot be folded exactly")
    scale, shift = _bn_scale_shift(bn)
    groups = conv.groups
    out_ch, in_per_group = conv.weight.shape[:2]
    # Per input channel scale; with groups, input channel of weight[o, i] is g*in_per_group + i.
    w = conv.weight.reshape(groups, out_ch // groups, in_per_group, *conv.weight.shape[2:])
    scale_g = scale.reshape(groups, 1, in_per_group, *([1] * (conv.weight.dim() - 2)))
    shift_g = shift.reshape(groups, 1, in_per_group, *([1] * (conv.weight.dim() - 2)))
    weight = (w * scale_g).reshape_as(conv.weight)
    bias = _bias_of(conv) + (w * shift_g).flatten(2).sum(-1).reshape(out_ch)
    return _conv_like(conv, weight, bias)


@torch.no_grad()
def fuse_linear_bn(linear: nn.Linear, bn: _BatchNorm) -> nn.Linear:
    """``bn(linear(x))`` (BatchNorm over the output features) as one linear layer."""
    scale, shift = _bn_scale_shift(bn)
    return _linear_like(linear.weight * scale[:, None], _bias_of(linear) * scale + shift)


@torch.no_grad()
def fuse_bn_linear(bn: _BatchNorm, linear: nn.Linear) -> nn.Linear:
    """``linear(bn(x))`` (BatchNorm over the input features) as one linear layer."""
    scale, shift = _bn_scale_shift(bn)
    return _linear_like(linear.weight * scale[None, :], _bias_of(linear) + linear.weight @ shift)


@torch.no_grad()
def merge_heads(heads: list[nn.Linear]) -> nn.Linear:
    """The mean of several linear heads on the same features, as one linear layer.

    Distilled models (EfficientFormer, LeViT) average their class and distillation heads at
    inference; averaging the weights gives the same output with one matmul.
    """
    weight = torch.stack([h.weight for h in heads]).mean(0)
    bias = torch.stack([_bias_of(h) for h in heads]).mean(0)
    return _linear_like(weight, bias)


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch for whole samples while training."""

    def __init__(self, prob: float) -> None:
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        keep = 1.0 - self.prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def drop_path_layer(prob: float) -> nn.Module:
    """A DropPath, or an Identity when nothing is dropped (so eval graphs carry no no-op)."""
    return DropPath(prob) if prob > 0.0 else nn.Identity()


def attention_bias_index(resolution: int, stride: int = 1) -> tuple[torch.Tensor, int]:
    """Index table for learned attention biases over absolute 2-D offsets.

    Keys lie on a ``resolution``² grid, queries on the same grid sampled every ``stride``
    points. Offset (|dy|, |dx|) gets column ``|dy| * resolution + |dx|``, which is the order in
    which both facebookresearch/LeViT and snap-research/EfficientFormer enumerate offsets, so
    their published index buffers equal this table. Returns ``(index[Nq, Nk], num_offsets)``.
    """
    axis = torch.arange(resolution)
    keys = torch.stack(torch.meshgrid(axis, axis, indexing="ij")).flatten(1)
    queries = torch.stack(torch.meshgrid(axis[::stride], axis[::stride], indexing="ij")).flatten(1)
    offset = (queries[:, :, None] - keys[:, None, :]).abs()
    return offset[0] * resolution + offset[1], resolution * resolution


def batched_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 4-D ``(B, H, M, K) @ (B, H, K, N)`` as one ``bmm`` on 3-D views.

    A 4-D matmul exports as expand + bmm; XNNPACK does not take the expand, so every attention
    matmul would cut the delegated graph. Same arithmetic, same result.
    """
    batch, heads, rows, inner = a.shape
    out = torch.bmm(a.reshape(batch * heads, rows, inner), b.reshape(batch * heads, inner, b.shape[-1]))
    return out.reshape(batch, heads, rows, b.shape[-1])


def mean_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, N, C).mean(1)`` written as the 4-D global average pool that every backend takes."""
    return x.transpose(1, 2).unsqueeze(-1).mean((2, 3), keepdim=True).flatten(1)


class LayerNormAsMatmul(nn.Module):
    """``nn.LayerNorm`` over the last dimension with both means as a matmul by a 1/C row.

    For backends without a layer-norm kernel (XNNPACK): two-pass variance, so it stays as
    accurate as the fused op where a one-pass fallback kernel would not.
    """

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        (channels,) = norm.normalized_shape
        self.eps = norm.eps
        self.register_buffer("mean_row", torch.full((1, channels), 1.0 / channels), persistent=False)
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - F.linear(x, self.mean_row)
        variance = F.linear(centred * centred, self.mean_row)
        out = centred * torch.rsqrt(variance + self.eps)
        return out * self.weight + self.bias if self.weight is not None else out


class GroupNorm1AsConv(nn.Module):
    """``nn.GroupNorm(1, C)`` on NCHW with the mean over (C, H, W) as a global average pool and
    a 1×1 convolution by 1/C (two-pass variance), for backends without a group-norm kernel."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        if norm.num_groups != 1:
            raise ValueError("only GroupNorm with one group is a layer norm over (C, H, W)")
        channels = norm.num_channels
        self.eps = norm.eps
        self.register_buffer("mean_kernel", torch.full((1, channels, 1, 1), 1.0 / channels), persistent=False)
        self.weight = nn.Parameter(norm.weight.detach().reshape(channels, 1, 1))
        self.bias = nn.Parameter(norm.bias.detach().reshape(channels, 1, 1))

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.mean((2, 3), keepdim=True), self.mean_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self._mean(x)
        return centred * torch.rsqrt(self._mean(centred * centred) + self.eps) * self.weight + self.bias


def decompose_norms(model: nn.Module) -> nn.Module:
    """Replace, in place, every last-dim ``LayerNorm`` and one-group ``GroupNorm`` by the forms
    above (an export patch for XNNPACK; other runtimes are better served by their fused kernels)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1 and child.elementwise_affine:
            setattr(model, name, LayerNormAsMatmul(child))
        elif isinstance(child, nn.GroupNorm) and child.num_groups == 1 and child.affine:
            setattr(model, name, GroupNorm1AsConv(child))
        else:
            decompose_norms(child)
    return model
