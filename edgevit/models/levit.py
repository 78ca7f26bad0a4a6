"""LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference (arXiv 2104.01136).

One code base for both of timm's forms: tokens through Linear+BatchNorm layers (``levit_*``) or
NCHW maps through 1×1 Conv+BatchNorm layers (``levit_conv_*``), switched by ``use_conv``. Native
state-dict keys are timm 1.0.31's, shared by the two forms (only the weight layouts differ: 2-D
for linear layers, 4-D 1×1 kernels for convolutions). The authors' checkpoints
(facebookresearch/LeViT, "fb" format: one flat ``blocks`` list) are remapped into either form.

Choices made for export: attention biases are gathered from a non-persistent index buffer in
forward (nothing cached), and frozen into one constant buffer by ``deploy()``; q/k/v come out of
one projection and are separated with plain slices of the per-head channel dim after one reshape
(no ``split``, whose multi-output node fragments XNNPACK delegation in ExecuTorch); in the conv
form's deploy form the query subsampling becomes the stride of the fused 1×1 query convolution.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from edgevit.core.errors import CheckpointError, EdgevitError
from edgevit.models import layers
from edgevit.models.registry import Family, ModelCfg, PaperFigures, register_family, register_model

__all__ = ["Levit"]


class ConvNorm(nn.Module):
    """Convolution without bias followed by BatchNorm2d (fused into one conv by ``deploy``)."""

    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.linear = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))

    def deploy(self) -> nn.Conv2d:
        return layers.fuse_conv_bn(self.linear, self.bn)


class LinearNorm(nn.Module):
    """Linear without bias followed by BatchNorm1d over the features of every token."""

    def __init__(self, in_features: int, out_features: int, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        # BatchNorm1d wants (N, C): tokens of all images are one batch. Gone once fused.
        return self.bn(x.flatten(0, 1)).reshape_as(x)

    def deploy(self) -> nn.Linear:
        return layers.fuse_linear_bn(self.linear, self.bn)


class NormLinear(nn.Module):
    """Classifier head: BatchNorm1d then Linear (fused into one Linear by ``deploy``)."""

    def __init__(self, in_features: int, out_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(in_features, out_features)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(x)))

    def deploy(self) -> nn.Linear:
        return layers.fuse_bn_linear(self.bn, self.linear)


def _norm_layer(use_conv: bool, in_chs: int, out_chs: int, bn_weight_init: float = 1.0) -> nn.Module:
    if use_conv:
        return ConvNorm(in_chs, out_chs, bn_weight_init=bn_weight_init)
    return LinearNorm(in_chs, out_chs, bn_weight_init=bn_weight_init)


class Stem16(nn.Sequential):
    """Four 3×3 stride-2 conv+BN layers with Hardswish between them: /16, to ``out_chs``."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        widths = (in_chs, out_chs // 8, out_chs // 4, out_chs // 2, out_chs)
        for i in range(4):
            self.add_module(f"conv{i + 1}", ConvNorm(widths[i], widths[i + 1], 3, stride=2, padding=1))
            if i < 3:
                self.add_module(f"act{i + 1}", nn.Hardswish())


class Subsample(nn.Module):
    """Keep every ``stride``-th position of the ``resolution``² grid (the shrinking queries)."""

    def __init__(self, stride: int, resolution: int, use_conv: bool) -> None:
        super().__init__()
        self.stride = stride
        self.resolution = resolution
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_conv:  # folded into the query convolution's stride by deploy()
            return x[:, :, :: self.stride, :: self.stride]
        # x[:, ::s, ::s] on the grid, with stride-1 slices only (XNNPACK takes no strided slice):
        # pad the side to a multiple of s (never selected), fold each group of s rows into one
        # row and keep its first part, then the same for columns. Only selects: exact.
        batch, _, channels = x.shape
        side, stride = self.resolution, self.stride
        grid = x.reshape(batch, side, side, channels)
        padded = -(-side // stride) * stride
        if padded != side:
            grid = F.pad(grid, (0, 0, 0, padded - side, 0, padded - side))
        kept = padded // stride
        rows = grid.reshape(batch, kept, stride * padded * channels)[:, :, : padded * channels]
        cells = rows.reshape(batch, kept, kept, stride * channels)[..., :channels]
        return cells.reshape(batch, -1, channels)


class QuerySubsample(nn.Module):
    """Queries of the shrinking attention: subsample, then project (``q.down``, ``q.ln``)."""

    def __init__(self, in_dim: int, out_dim: int, stride: int, resolution: int, use_conv: bool) -> None:
        super().__init__()
        self.down = Subsample(stride, resolution, use_conv)
        self.ln = _norm_layer(use_conv, in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.down(x))

    def deploy(self) -> nn.Module:
        # A 1×1 conv of the subsampled map is that conv with the subsampling as its stride.
        if isinstance(self.ln, nn.Conv2d):
            self.ln.stride = (self.down.stride, self.down.stride)
            return self.ln
        return self


class _BiasedAttention(nn.Module):
    """Shared bias handling: one learned bias per head and absolute 2-D query–key offset."""

    def _init_biases(self, num_heads: int, resolution: int, stride: int) -> None:
        self.resolution = resolution
        self.stride = stride
        index, num_offsets = layers.attention_bias_index(resolution, stride)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, num_offsets))
        self.register_buffer("attention_bias_idxs", index, persistent=False)
        self.bias_frozen = False

    def bias_index(self) -> torch.Tensor:
        """This layer's index table, computed afresh (checkpoint filter; safe on meta models)."""
        with torch.device("cpu"):
            return layers.attention_bias_index(self.resolution, self.stride)[0]

    def attention_bias(self) -> torch.Tensor:
        if self.bias_frozen:
            return self.frozen_bias
        return self.attention_biases[:, self.attention_bias_idxs]

    def deploy(self) -> nn.Module:
        table = self.attention_biases[:, self.attention_bias_idxs].detach().clone()
        del self.attention_biases
        del self.attention_bias_idxs
        self.register_buffer("frozen_bias", table)
        self.bias_frozen = True
        return self


class Attention(_BiasedAttention):
    """Multi-head self-attention with attention biases; values are ``attn_ratio`` × wider keys."""

    def __init__(
        self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: int, use_conv: bool,
    ) -> None:
        super().__init__()
        self.use_conv = use_conv
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.scale = key_dim**-0.5
        # Output channels are grouped by head: [q_h, k_h, v_h] for h = 0 … num_heads-1.
        self.qkv = _norm_layer(use_conv, dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Sequential()
        self.proj.add_module("act", nn.Hardswish())
        self.proj.add_module("ln", _norm_layer(use_conv, self.val_attn_dim, dim, bn_weight_init=0.0))
        self._init_biases(num_heads, resolution, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Matmuls as batched_matmul (bmm on 3-D views): XNNPACK does not take the expand of a 4-D @.
        kd = self.key_dim
        if self.use_conv:
            batch, _, height, width = x.shape
            qkv = self.qkv(x).reshape(batch, self.num_heads, -1, height * width)
            q, k, v = qkv[:, :, :kd], qkv[:, :, kd : 2 * kd], qkv[:, :, 2 * kd :]
            attn = layers.batched_matmul(q.transpose(-2, -1), k) * self.scale + self.attention_bias()
            attn = attn.softmax(dim=-1)
            x = layers.batched_matmul(v, attn.transpose(-2, -1))
            x = x.reshape(batch, self.val_attn_dim, height, width)
        else:
            batch, tokens, _ = x.shape
            qkv = self.qkv(x).reshape(batch, tokens, self.num_heads, -1)
            q = qkv[..., :kd].permute(0, 2, 1, 3)
            k = qkv[..., kd : 2 * kd].permute(0, 2, 3, 1)
            v = qkv[..., 2 * kd :].permute(0, 2, 1, 3)
            attn = layers.batched_matmul(q, k) * self.scale + self.attention_bias()
            attn = attn.softmax(dim=-1)
            x = layers.batched_matmul(attn, v).transpose(1, 2).reshape(batch, tokens, self.val_attn_dim)
        return self.proj(x)


class AttentionDownsample(_BiasedAttention):
    """Shrinking attention: keys/values on the full grid, queries on every ``stride``-th point."""

    def __init__(
        self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: float,
        stride: int, resolution: int, use_conv: bool,
    ) -> None:
        super().__init__()
        self.use_conv = use_conv
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.scale = key_dim**-0.5
        self.out_resolution = (resolution - 1) // stride + 1
        # Output channels grouped by head: [k_h, v_h].
        self.kv = _norm_layer(use_conv, in_dim, num_heads * (key_dim + self.val_dim))
        self.q = QuerySubsample(in_dim, num_heads * key_dim, stride, resolution, use_conv)
        self.proj = nn.Sequential()
        self.proj.add_module("act", nn.Hardswish())
        self.proj.add_module("ln", _norm_layer(use_conv, self.val_attn_dim, out_dim))
        self._init_biases(num_heads, resolution, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Matmuls as batched_matmul (bmm on 3-D views): XNNPACK does not take the expand of a 4-D @.
        kd = self.key_dim
        if self.use_conv:
            batch, _, height, width = x.shape
            kv = self.kv(x).reshape(batch, self.num_heads, -1, height * width)
            k, v = kv[:, :, :kd], kv[:, :, kd:]
            q = self.q(x).reshape(batch, self.num_heads, kd, -1)
            attn = layers.batched_matmul(q.transpose(-2, -1), k) * self.scale + self.attention_bias()
            attn = attn.softmax(dim=-1)
            side = self.out_resolution
            x = layers.batched_matmul(v, attn.transpose(-2, -1))
            x = x.reshape(batch, self.val_attn_dim, side, side)
        else:
            batch, tokens, _ = x.shape
            kv = self.kv(x).reshape(batch, tokens, self.num_heads, -1)
            k = kv[..., :kd].permute(0, 2, 3, 1)
            v = kv[..., kd:].permute(0, 2, 1, 3)
            q = self.q(x).reshape(batch, -1, self.num_heads, kd).permute(0, 2, 1, 3)
            attn = layers.batched_matmul(q, k) * self.scale + self.attention_bias()
            attn = attn.softmax(dim=-1)
            x = layers.batched_matmul(attn, v).transpose(1, 2).reshape(batch, -1, self.val_attn_dim)
        return self.proj(x)


class LevitMlp(nn.Module):
    """Expansion MLP: norm-linear, Hardswish, norm-linear."""

    def __init__(self, dim: int, hidden: int, use_conv: bool) -> None:
        super().__init__()
        self.ln1 = _norm_layer(use_conv, dim, hidden)
        self.act = nn.Hardswish()
        self.ln2 = _norm_layer(use_conv, hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln2(self.act(self.ln1(x)))


class LevitDownsample(nn.Module):
    """Between stages: shrinking attention (no residual: shapes change), then a residual MLP."""

    def __init__(
        self, in_dim: int, out_dim: int, key_dim: int, resolution: int, use_conv: bool,
        attn_ratio: float = 4.0, mlp_ratio: float = 2.0, drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        # The paper takes N = C / D heads here to make up for the missing residual connection.
        self.attn_downsample = AttentionDownsample(
            in_dim, out_dim, key_dim, in_dim // key_dim, attn_ratio, 2, resolution, use_conv,
        )
        self.mlp = LevitMlp(out_dim, int(out_dim * mlp_ratio), use_conv)
        self.drop_path = layers.drop_path_layer(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_downsample(x)
        return x + self.drop_path(self.mlp(x))


class LevitBlock(nn.Module):
    """Residual attention then residual MLP."""

    def __init__(
        self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, mlp_ratio: float,
        resolution: int, use_conv: bool, drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, key_dim, num_heads, attn_ratio, resolution, use_conv)
        self.drop_path1 = layers.drop_path_layer(drop_path)
        self.mlp = LevitMlp(dim, int(dim * mlp_ratio), use_conv)
        self.drop_path2 = layers.drop_path_layer(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(x))
        return x + self.drop_path2(self.mlp(x))


class LevitStage(nn.Module):
    def __init__(
        self, in_dim: int, out_dim: int, key_dim: int, depth: int, num_heads: int, attn_ratio: float,
        mlp_ratio: float, resolution: int, downsample: bool, use_conv: bool, drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if downsample:
            self.downsample: nn.Module = LevitDownsample(
                in_dim, out_dim, key_dim, resolution, use_conv, drop_path=drop_path,
            )
            resolution = (resolution - 1) // 2 + 1
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            LevitBlock(out_dim, key_dim, num_heads, attn_ratio, mlp_ratio, resolution, use_conv, drop_path)
            for _ in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class Levit(nn.Module):
    """LeViT with its distillation head; both heads are averaged (in training too)."""

    def __init__(
        self,
        embed_dims: tuple[int, ...],
        key_dim: int,
        num_heads: tuple[int, ...],
        depths: tuple[int, ...],
        use_conv: bool = False,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        attn_ratio: float = 2.0,
        mlp_ratio: float = 2.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.use_conv = use_conv
        self.img_size = img_size
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        self.stem = Stem16(in_chans, embed_dims[0])
        resolution = img_size
        for _ in range(4):  # each stem conv: 3×3, stride 2, padding 1
            resolution = (resolution - 1) // 2 + 1
        stride = 16
        stages = []
        self.feature_info: list[dict[str, Any]] = []
        in_dim = embed_dims[0]
        for i, (dim, depth, heads) in enumerate(zip(embed_dims, depths, num_heads)):
            stages.append(LevitStage(
                in_dim, dim, key_dim, depth, heads, attn_ratio, mlp_ratio, resolution,
                downsample=i > 0, use_conv=use_conv, drop_path=drop_path_rate,
            ))
            if i > 0:
                resolution = (resolution - 1) // 2 + 1
                stride *= 2
            self.feature_info.append({"module": f"stages.{i}", "num_chs": dim, "reduction": stride})
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        if num_classes > 0:
            self.head: nn.Module = NormLinear(self.num_features, num_classes, drop_rate)
            self.head_dist: nn.Module | None = NormLinear(self.num_features, num_classes, drop_rate)
        else:
            self.head, self.head_dist = nn.Identity(), nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise EdgevitError(
                f"LeViT's attention biases are built for {self.img_size}x{self.img_size} inputs, "
                f"got {x.shape[-2]}x{x.shape[-1]}; resize the input or build with input_size"
            )
        x = self.stem(x)
        if not self.use_conv:
            x = x.flatten(2).transpose(1, 2)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # Both means as a 4-D global average pool (the only mean XNNPACK takes).
        x = x.mean((2, 3), keepdim=True).flatten(1) if self.use_conv else layers.mean_tokens(x)
        if pre_logits:
            return x
        if self.head_dist is None:  # deploy form: the two heads merged into one
            return self.head(x)
        return (self.head(x) + self.head_dist(x)) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def deploy(self) -> nn.Module:
        # Children are already fused, so both heads are plain Linear layers (or Identity).
        if isinstance(self.head, nn.Linear) and isinstance(self.head_dist, nn.Linear):
            self.head = layers.merge_heads([self.head, self.head_dist])
        self.head_dist = None
        return self


# ----------------------------------------------------------------------------- checkpoints

_FB_BLOCK = re.compile(r"blocks\.(\d+)\.(?:m\.)?(.+)")


def detect_format(keys) -> str | None:
    keys = set(keys)
    if "stem.conv1.linear.weight" in keys and any(
        k.startswith("stages.") and k.endswith(".attn.qkv.linear.weight") for k in keys
    ):
        return "timm"
    if "patch_embed.0.c.weight" in keys and any(
        re.fullmatch(r"blocks\.\d+\.m\.qkv\.c\.weight", k) for k in keys
    ):
        return "fb"
    return None


def _fb_block_targets(model: Levit) -> list[tuple[str, str]]:
    """The authors' flat ``blocks`` list in order, as (native prefix, kind) pairs."""
    targets = []
    for i, stage in enumerate(model.stages):
        if isinstance(stage.downsample, LevitDownsample):
            prefix = f"stages.{i}.downsample"
            targets += [(f"{prefix}.attn_downsample", "attn"), (f"{prefix}.mlp", "mlp")]
        for j in range(len(stage.blocks)):
            targets += [(f"stages.{i}.blocks.{j}.attn", "attn"), (f"stages.{i}.blocks.{j}.mlp", "mlp")]
    return targets


def _fb_key(key: str, targets: list[tuple[str, str]]) -> str:
    """One authors' key in timm's naming (unknown keys are returned unchanged)."""
    if key.startswith("patch_embed."):  # Sequential(conv, act, conv, act, …): convs at 0, 2, 4, 6
        index, rest = key[len("patch_embed."):].split(".", 1)
        return f"stem.conv{int(index) // 2 + 1}." + re.sub(r"^c\.", "linear.", rest)
    if key.startswith(("head.l.", "head_dist.l.")):
        return key.replace(".l.", ".linear.", 1)
    match = _FB_BLOCK.fullmatch(key)
    if match is None or int(match.group(1)) >= len(targets):
        return key
    prefix, kind = targets[int(match.group(1))]
    rest = match.group(2)
    if kind == "mlp":  # Sequential(Linear_BN, act, Linear_BN)
        rest = re.sub(r"^0\.", "ln1.", re.sub(r"^2\.", "ln2.", rest))
    else:
        rest = re.sub(r"^(proj|q)\.1\.", r"\1.ln.", rest)
    return f"{prefix}." + re.sub(r"(^|\.)c\.", r"\1linear.", rest)


def _check_bias_index(source_key: str, key: str, published: torch.Tensor, model: nn.Module) -> None:
    """Refuse a published index table whose values differ from ours for the same layer.

    A table of another shape, or one landing on no attention layer, belongs to another size or
    resolution: it is only dropped, and the loader reports the weights that do not fit.
    """
    try:
        module = model.get_submodule(key[: -len(".attention_bias_idxs")])
    except AttributeError:
        return
    if not isinstance(module, _BiasedAttention):
        return
    ours = module.bias_index()
    if published.shape == ours.shape and not torch.equal(published.to(torch.long), ours):
        raise CheckpointError(
            f"{source_key}: the checkpoint's attention-bias index table differs from the one edgevit "
            "computes for that layer; its biases would land on the wrong offsets, so it is not loaded"
        )


def remap_checkpoint(
    state_dict: dict[str, torch.Tensor], fmt: str, model: nn.Module,
) -> dict[str, torch.Tensor]:
    """Turn a timm or authors' (fb) LeViT checkpoint into native keys and ``model``'s layouts.

    Published index tables are checked against ours, then dropped (ours are computed). Weights
    of the stages' 1×1 layers are reshaped to the model's form, so a checkpoint of either form
    (and the authors' Linear-only one) loads into both. Only shapes and Python attributes of
    ``model`` are read, so it also works on the meta device.
    """
    if fmt not in ("timm", "fb"):
        raise CheckpointError(f"unknown LeViT checkpoint format {fmt!r}")
    targets = _fb_block_targets(model) if fmt == "fb" else []
    out = {}
    for source_key, value in state_dict.items():
        key = _fb_key(source_key, targets) if fmt == "fb" else source_key
        if key.endswith(".attention_bias_idxs"):
            _check_bias_index(source_key, key, value, model)
            continue
        if key.startswith("stages.") and key.endswith(".linear.weight"):
            if model.use_conv and value.dim() == 2:
                value = value[:, :, None, None]
            elif not model.use_conv and value.dim() == 4 and value.shape[2:] == (1, 1):
                value = value.flatten(1)
        out[key] = value
    return out


register_family(Family(
    name="levit",
    detect_format=detect_format,
    remap_checkpoint=remap_checkpoint,
    classifier_prefixes=("head.", "head_dist."),
))


# ----------------------------------------------------------------------------- sizes

_FB_URL = "https://dl.fbaipublicfiles.com/LeViT/"
# name suffix: (arch, source params, paper figures (params M, GMACs, top-1), authors' weights file)
_SIZES = {
    "128s": (dict(embed_dims=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8), depths=(2, 3, 4)),
             7777058, (7.8, 0.305, 76.6), "LeViT-128S-96703c44.pth"),
    "128": (dict(embed_dims=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12), depths=(4, 4, 4)),
            9213936, (9.2, 0.406, 78.6), "LeViT-128-b88c2750.pth"),
    "192": (dict(embed_dims=(192, 288, 384), key_dim=32, num_heads=(3, 5, 6), depths=(4, 4, 4)),
            10947069, (11.0, 0.658, 80.0), "LeViT-192-92712e41.pth"),
    "256": (dict(embed_dims=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8), depths=(4, 4, 4)),
            18893876, (18.9, 1.120, 81.6), "LeViT-256-13b5763e.pth"),
    "384": (dict(embed_dims=(384, 512, 768), key_dim=32, num_heads=(6, 9, 12), depths=(4, 4, 4)),
            39128836, (39.1, 2.353, 82.6), "LeViT-384-9bdaf2e2.pth"),
}


def _cfg(name: str) -> ModelCfg:
    """``levit_<size>`` or ``levit_conv_<size>``: the same network, weights and figures."""
    use_conv = name.startswith("levit_conv_")
    arch, params, (params_m, gmacs, top1), weights = _SIZES[name.rsplit("_", 1)[1]]
    return ModelCfg(
        name=name,
        family="levit",
        source_params=params,
        # The paper gives speed as throughput (images/s on GPU, Intel CPU, ARM), not as latency.
        paper=PaperFigures(params_m=params_m, gmacs=gmacs, top1=top1, reference="arXiv:2104.01136, Table 3"),
        input_size=(3, 224, 224),
        fixed_input_size=True,
        crop_pct=0.9,
        interpolation="bicubic",
        checkpoint_formats=("timm", "fb"),
        hf_hub_id=f"hf-hub:timm/{name}.fb_dist_in1k",
        url=_FB_URL + weights,
        arch={**arch, "use_conv": use_conv},
    )


def _create(cfg: ModelCfg, **kwargs: Any) -> Levit:
    channels, height, width = cfg.input_size
    if height != width:
        raise EdgevitError(
            f"LeViT needs a square input_size (its bias tables are square), got {height}x{width}"
        )
    return Levit(**{**cfg.arch, **kwargs}, img_size=height, in_chans=channels, num_classes=cfg.num_classes)


# Linear forms first: a checkpoint that fits both forms is named after the Linear one.
@register_model(_cfg("levit_128s"))
def levit_128s(cfg: ModelCfg, **kwargs: Any) -> Levit:
    return _create(cfg, **kwargs)


@register_model(_cfg("levit_128"))
def levit_128(cfg: ModelCfg, **kwargs: Any) -> Levit:
    return _create(cfg, **kwargs)


@register_model(_cfg("levit_192"))
def levit_192(cfg: ModelCfg, **kwargs: Any) -> Levit:
    return _create(cfg, **kwargs)


@register_model(_cfg("levit_256"))
def levit_256(cfg: ModelCfg, **kwargs: Any) -> Levit:
    return _create(cfg, **kwargs)


@register_model(_cfg("levit_384"))
def levit_384(cfg: ModelCfg, **kwargs: Any) -> Levit:
    return _create(cfg, **kwargs)


@register_model(_cfg("levit_conv_128s"))
def levit_conv_128s(cfg: ModelCfg, **kwargs: Any) -> Levit:
    return _create(cfg, **kwargs)


@register_model(_cfg("levit_conv_128"))
def levit_conv_128(cfg: ModelCfg, **kwargs: Any) -> Levit:
    return _create(cfg, **kwargs)


@register_model(_cfg("levit_conv_192"))
def levit_conv_192(cfg: ModelCfg, **kwargs: Any) -> Levit:
    return _create(cfg, **kwargs)


@register_model(_cfg("levit_conv_256"))
def levit_conv_256(cfg: ModelCfg, **kwargs: Any) -> Levit:
    return _create(cfg, **kwargs)


@register_model(_cfg("levit_conv_384"))
def levit_conv_384(cfg: ModelCfg, **kwargs: Any) -> Levit:
    return _create(cfg, **kwargs)
