"""MobileViT v2: MobileNetV2 blocks plus separable (linear-complexity) self-attention.

Paper: "Separable Self-attention for Mobile Vision Transformers", Mehta & Rastegari, arXiv 2206.02680.
Authors' code: apple/ml-cvnets (``cvnets/models/classification/mobilevit_v2.py``).

Native state-dict keys are timm 1.0.31's (``stem``, ``stages.N.M``, ``head.fc``), which timm
builds through its byobnet: every stage is a ``Sequential`` of inverted-residual blocks
(``conv1_1x1`` / ``conv2_kxk`` / ``conv3_1x1``), the last three stages ending in a MobileViT v2
block. The authors' ml-cvnets keys are the ``"cvnets"`` format, remapped by
:func:`checkpoint_filter`.
"""
from __future__ import annotations

import math
import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from edgevit.models.layers import fuse_conv_bn
from edgevit.models.registry import Family, ModelCfg, PaperFigures, register_family, register_model

__all__ = ["MobileViTV2", "MobileViTV2Block", "LinearSelfAttention", "LinearTransformerBlock"]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor``, never more than 10 % below ``value`` (timm's and cvnets' rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# ----------------------------------------------------------------------------- modules


class ConvNormAct(nn.Module):
    """Bias-free convolution, BatchNorm, optional SiLU; ``deploy()`` folds the BatchNorm."""

    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(out_chs)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def deploy(self) -> "ConvNormAct":
        self.conv = fuse_conv_bn(self.conv, self.bn)
        self.bn = nn.Identity()
        return self


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand, depthwise 3×3 (strided), linear 1×1 project.

    The residual is used only when the shape is unchanged (timm's byobnet with ``downsample=''``
    and cvnets' ``InvertedResidual`` agree on this).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expand_ratio: float = 2.0) -> None:
        super().__init__()
        mid_chs = make_divisible(in_chs * expand_ratio)
        self.conv1_1x1 = ConvNormAct(in_chs, mid_chs, 1)
        self.conv2_kxk = ConvNormAct(mid_chs, mid_chs, 3, stride=stride, groups=mid_chs)
        self.conv3_1x1 = ConvNormAct(mid_chs, out_chs, 1, act=False)
        self.has_residual = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        return out + x if self.has_residual else out


class LinearSelfAttention(nn.Module):
    """Separable self-attention on ``[B, C, P, N]`` (P pixels per patch, N patches).

    One query channel gives each patch a context score (softmax over the N patches); the context
    vector is the score-weighted sum of the keys, broadcast back onto ReLU(values). Cost is
    linear in N: the weighted sum is a matrix-vector product per pixel, no N×N attention map.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.qkv_proj = nn.Conv2d(dim, 1 + 2 * dim, 1)
        self.out_proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        # Slices rather than split(): ExecuTorch's XNNPACK delegate takes slices, not split_with_sizes.
        query, key, value = qkv[:, :1], qkv[:, 1 : 1 + self.dim], qkv[:, 1 + self.dim :]
        batch, channels, pixels, patches = key.shape
        # Softmax on a 3-D view: ExecuTorch's XNNPACK softmax on a conv output (NHWC inside the
        # delegate) normalises the wrong axis. The score-weighted sum over patches as bmm:
        # XNNPACK has no sum. context[b, c, p] = sum_n key[b, c, p, n] * scores[b, p, n].
        scores = query.reshape(batch * pixels, 1, patches).softmax(dim=-1)
        keys = key.permute(0, 2, 1, 3).reshape(batch * pixels, channels, patches)
        context = torch.bmm(keys, scores.transpose(1, 2))
        context = context.reshape(batch, pixels, channels, 1).permute(0, 2, 1, 3)
        return self.out_proj(F.relu(value) * context)


class ConvMlp(nn.Module):
    """Feed-forward network as two 1×1 convolutions (the tensor stays channels-first)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LinearTransformerBlock(nn.Module):
    """Pre-norm transformer block; the norm is GroupNorm with one group (cvnets' ``layer_norm_2d``)."""

    def __init__(self, dim: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.attn = LinearSelfAttention(dim)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MobileViTV2Block(nn.Module):
    """Local depthwise conv, then global separable attention over patches, then a 1×1 projection.

    Patching is a reshape/permute (``F.unfold``/``F.fold`` would export as im2col/col2im). A
    feature map whose side is not a multiple of the patch size is first resized up to the next
    multiple (bilinear, ``align_corners=True``) and, as in ml-cvnets and timm, the block's output
    keeps that resized size.
    """

    def __init__(
        self, in_chs: int, attn_dim: int, depth: int, patch_size: int = 2, mlp_ratio: float = 2.0
    ) -> None:
        super().__init__()
        self.conv_kxk = ConvNormAct(in_chs, in_chs, 3, groups=in_chs)
        self.conv_1x1 = nn.Conv2d(in_chs, attn_dim, 1, bias=False)
        self.transformer = nn.Sequential(*[LinearTransformerBlock(attn_dim, mlp_ratio) for _ in range(depth)])
        self.norm = nn.GroupNorm(1, attn_dim)
        self.conv_proj = ConvNormAct(attn_dim, in_chs, 1, act=False)
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        height, width = x.shape[-2:]
        new_h, new_w = math.ceil(height / p) * p, math.ceil(width / p) * p
        if (new_h, new_w) != (height, width):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=True)
        x = self.conv_1x1(self.conv_kxk(x))

        batch, channels = x.shape[:2]
        num_h, num_w = new_h // p, new_w // p
        # [B, C, H, W] -> [B, C, P, N], pixel-in-patch major, the order F.unfold would give.
        x = x.reshape(batch, channels, num_h, p, num_w, p).permute(0, 1, 3, 5, 2, 4)
        x = x.reshape(batch, channels, p * p, num_h * num_w)
        x = self.norm(self.transformer(x))
        x = x.reshape(batch, channels, p, p, num_h, num_w).permute(0, 1, 4, 2, 5, 3)
        x = x.reshape(batch, channels, new_h, new_w)
        return self.conv_proj(x)


class ClassifierHead(nn.Module):
    """Global average pool and a linear classifier (``nn.Identity`` when there are no classes)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # keepdim + flatten: the form of a spatial mean that XNNPACK delegates.
        x = x.mean(dim=(2, 3), keepdim=True).flatten(1)
        return x if pre_logits else self.fc(x)


class MobileViTV2(nn.Module):
    """MobileViT v2 classifier: 3×3 stem, five stages (the last three end in attention), head."""

    def __init__(
        self,
        stem_chs: int,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        strides: tuple[int, ...],
        attn_dims: tuple[int, ...],
        attn_depths: tuple[int, ...],
        expand_ratio: float = 2.0,
        mlp_ratio: float = 2.0,
        patch_size: int = 2,
        num_classes: int = 1000,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.stem = ConvNormAct(in_chans, stem_chs, 3, stride=2)
        stages: list[nn.Module] = []
        self.feature_info: list[dict] = []
        prev_chs, reduction = stem_chs, 2
        for idx, (width, depth, stride, attn_dim, attn_depth) in enumerate(
            zip(widths, depths, strides, attn_dims, attn_depths)
        ):
            blocks: list[nn.Module] = []
            for block_idx in range(depth):
                blocks.append(InvertedResidual(prev_chs, width, stride if block_idx == 0 else 1, expand_ratio))
                prev_chs = width
            if attn_depth:
                blocks.append(MobileViTV2Block(width, attn_dim, attn_depth, patch_size, mlp_ratio))
            stages.append(nn.Sequential(*blocks))
            reduction *= stride
            self.feature_info.append({"module": f"stages.{idx}", "num_chs": width, "reduction": reduction})
        self.stages = nn.Sequential(*stages)
        self.num_features = prev_chs
        self.num_classes = num_classes
        self.head = ClassifierHead(prev_chs, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------- checkpoints

_TIMM_MARKER = re.compile(r"^stages\.\d+\.\d+\.transformer\.\d+\.attn\.qkv_proj\.weight$")
_CVNETS_MARKER = re.compile(r"^layer_\d+\.\d+\.global_rep\.\d+\.pre_norm_attn\.1\.qkv_proj\.block\.conv\.weight$")

# ml-cvnets -> timm key rewrites, applied in order to every key. ConvLayer2d wraps its layers in
# ``block.{conv,norm}``; LinearAttnFFN is ``pre_norm_attn = (norm, attn, drop)`` and
# ``pre_norm_ffn = (norm, conv+act, drop, conv, drop)``; the last entry of ``global_rep`` is the
# closing norm, the only one whose parameters sit directly under its index.
_CVNETS_RULES: tuple[tuple[re.Pattern, object], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^conv_1\.", "stem."),
        (r"^layer_(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}."),
        (r"\.block\.exp_1x1\.", ".conv1_1x1."),
        (r"\.block\.conv_3x3\.", ".conv2_kxk."),
        (r"\.block\.red_1x1\.", ".conv3_1x1."),
        (r"\.local_rep\.0\.", ".conv_kxk."),
        (r"\.local_rep\.1\.block\.conv\.", ".conv_1x1."),
        (r"\.global_rep\.(\d+)\.pre_norm_attn\.0\.", r".transformer.\1.norm1."),
        (r"\.global_rep\.(\d+)\.pre_norm_attn\.1\.(qkv_proj|out_proj)\.block\.conv\.", r".transformer.\1.attn.\2."),
        (r"\.global_rep\.(\d+)\.pre_norm_ffn\.0\.", r".transformer.\1.norm2."),
        (r"\.global_rep\.(\d+)\.pre_norm_ffn\.1\.block\.conv\.", r".transformer.\1.mlp.fc1."),
        (r"\.global_rep\.(\d+)\.pre_norm_ffn\.3\.block\.conv\.", r".transformer.\1.mlp.fc2."),
        (r"\.global_rep\.\d+\.(weight|bias)$", r".norm.\1"),
        (r"\.block\.conv\.", ".conv."),
        (r"\.block\.norm\.", ".bn."),
        (r"^classifier\.1\.", "head.fc."),
    )
)


def detect_format(keys: Iterable[str]) -> str | None:
    """``"timm"`` or ``"cvnets"`` (apple/ml-cvnets) for a MobileViT v2 state dict, else None."""
    keys = set(keys)
    if "stem.conv.weight" in keys and any(_TIMM_MARKER.match(k) for k in keys):
        return "timm"
    if "conv_1.block.conv.weight" in keys and any(_CVNETS_MARKER.match(k) for k in keys):
        return "cvnets"
    return None


def _cvnets_key(key: str) -> str:
    for pattern, replacement in _CVNETS_RULES:
        key = pattern.sub(replacement, key)
    return key


def checkpoint_filter(state_dict: dict[str, torch.Tensor], fmt: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Turn a ``fmt`` checkpoint into native keys. Layouts are identical; only names differ."""
    if fmt == "timm":
        return state_dict
    if fmt == "cvnets":
        return {_cvnets_key(k): v for k, v in state_dict.items()}
    raise ValueError(f"unknown MobileViT v2 checkpoint format {fmt!r}")


register_family(
    Family(
        name="mobilevitv2",
        detect_format=detect_format,
        remap_checkpoint=checkpoint_filter,
        classifier_prefixes=("head.fc.",),
    )
)


# ----------------------------------------------------------------------------- sizes


def _arch(multiplier: float) -> dict:
    """Channel plan of a width multiplier, as timm's ``_mobilevitv2_cfg`` (and cvnets) derive it."""
    widths = tuple(make_divisible(int(c * multiplier)) for c in (64, 128, 256, 384, 512))
    return {
        "stem_chs": int(32 * multiplier),
        "widths": widths,
        "depths": (1, 2, 1, 1, 1),
        "strides": (1, 2, 2, 2, 2),
        # The attention runs at half the stage width.
        "attn_dims": tuple(make_divisible(0.5 * w) if d else 0 for w, d in zip(widths, (0, 0, 2, 4, 3))),
        "attn_depths": (0, 0, 2, 4, 3),
        "expand_ratio": 2.0,
        "mlp_ratio": 2.0,
        "patch_size": 2,
    }


_APPLE_URL = (
    "https://docs-assets.developer.apple.com/ml-research/models/cvnets-v2/classification/"
    "mobilevitv2/imagenet1k/256x256/mobilevitv2-{tag}.pt"
)
# Params and top-1 as the authors publish them (ml-cvnets model zoo, ImageNet-1k at 256x256);
# the paper's "FLOPs" are multiply-adds. No per-width latency is recorded here.
_PAPER_REF = "arXiv 2206.02680; apple/ml-cvnets model zoo (ImageNet-1k, 256x256)"


def _cfg(name: str, multiplier: float, tag: str, source_params: int, paper: PaperFigures) -> ModelCfg:
    return ModelCfg(
        name=name,
        family="mobilevitv2",
        source_params=source_params,
        paper=paper,
        input_size=(3, 256, 256),
        fixed_input_size=False,
        crop_pct=0.888,
        interpolation="bicubic",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        num_classes=1000,
        labels="imagenet-1k",
        checkpoint_formats=("timm", "cvnets"),
        hf_hub_id=f"hf-hub:timm/{name}.cvnets_in1k",
        url=_APPLE_URL.format(tag=tag),
        arch=_arch(multiplier),
    )


def _build(cfg: ModelCfg, **kwargs) -> MobileViTV2:
    return MobileViTV2(**cfg.arch, num_classes=cfg.num_classes, **kwargs)


@register_model(_cfg("mobilevitv2_050", 0.5, "0.5", 1370593, PaperFigures(1.4, 0.5, 70.18, reference=_PAPER_REF)))
def mobilevitv2_050(cfg: ModelCfg, **kwargs) -> MobileViTV2:
    return _build(cfg, **kwargs)


@register_model(_cfg("mobilevitv2_075", 0.75, "0.75", 2866009, PaperFigures(2.9, 1.0, 75.56, reference=_PAPER_REF)))
def mobilevitv2_075(cfg: ModelCfg, **kwargs) -> MobileViTV2:
    return _build(cfg, **kwargs)


@register_model(_cfg("mobilevitv2_100", 1.0, "1.0", 4901841, PaperFigures(4.9, 1.8, 78.09, reference=_PAPER_REF)))
def mobilevitv2_100(cfg: ModelCfg, **kwargs) -> MobileViTV2:
    return _build(cfg, **kwargs)


@register_model(_cfg("mobilevitv2_125", 1.25, "1.25", 7478089, PaperFigures(7.5, 2.8, 79.65, reference=_PAPER_REF)))
def mobilevitv2_125(cfg: ModelCfg, **kwargs) -> MobileViTV2:
    return _build(cfg, **kwargs)


@register_model(_cfg("mobilevitv2_150", 1.5, "1.5", 10594753, PaperFigures(10.6, 4.0, 80.38, reference=_PAPER_REF)))
def mobilevitv2_150(cfg: ModelCfg, **kwargs) -> MobileViTV2:
    return _build(cfg, **kwargs)


@register_model(_cfg("mobilevitv2_175", 1.75, "1.75", 14251833, PaperFigures(14.3, 5.5, 80.84, reference=_PAPER_REF)))
def mobilevitv2_175(cfg: ModelCfg, **kwargs) -> MobileViTV2:
    return _build(cfg, **kwargs)


@register_model(_cfg("mobilevitv2_200", 2.0, "2.0", 18449329, PaperFigures(18.4, 7.2, 81.17, reference=_PAPER_REF)))
def mobilevitv2_200(cfg: ModelCfg, **kwargs) -> MobileViTV2:
    return _build(cfg, **kwargs)
