"""EfficientFormer (v1): vision transformers at MobileNet speed.

Li et al., "EfficientFormer: Vision Transformers at MobileNet Speed", NeurIPS 2022 (arXiv 2206.01191).
Authors' code and weights: github.com/snap-research/EfficientFormer.

A conv stem, then four stages of Meta4D blocks (pooling token mixer, Conv-BN MLP) on NCHW
feature maps; the last ``num_vit`` blocks of the last stage are Meta3D blocks (attention with
learned biases over the 7×7 grid, LayerNorm, linear MLP) on flattened tokens. Module names follow
timm 1.0.31, so timm checkpoints load unchanged; the authors' (snap) keys are remapped.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from edgevit.core.errors import CheckpointError, EdgevitError
from edgevit.models.layers import (
    attention_bias_index, batched_matmul, drop_path_layer, fuse_conv_bn, mean_tokens, merge_heads,
)
from edgevit.models.registry import Family, ModelCfg, PaperFigures, register_family, register_model

__all__ = ["EfficientFormer"]

# The stem and the three downsamplings each halve the resolution (3×3, stride 2, padding 1).
_NUM_STRIDE2 = 5


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch on tokens ``(B, N, C)``."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class LayerScale2d(LayerScale):
    """Per-channel scale of a residual branch on feature maps ``(B, C, H, W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class Stem4(nn.Sequential):
    """Two 3×3 stride-2 Conv-BN-ReLU layers (stride 4 in all)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(out_chs // 2)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs // 2, out_chs, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU()

    def deploy(self) -> nn.Module:
        return nn.Sequential(
            fuse_conv_bn(self.conv1, self.norm1), self.act1, fuse_conv_bn(self.conv2, self.norm2), self.act2
        )


class Downsample(nn.Module):
    """3×3 stride-2 Conv-BN between stages."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))

    def deploy(self) -> nn.Module:
        return fuse_conv_bn(self.conv, self.norm)


class Flat(nn.Module):
    """``(B, C, H, W)`` feature map to ``(B, H*W, C)`` tokens, before the first Meta3D block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class Pooling(nn.Module):
    """PoolFormer's token mixer; the identity is subtracted since the block adds it back."""

    def __init__(self, pool_size: int = 3) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


class ConvMlpWithNorm(nn.Module):
    """1×1 Conv-BN, GELU, 1×1 Conv-BN on feature maps."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.norm1: nn.Module = nn.BatchNorm2d(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.norm2: nn.Module = nn.BatchNorm2d(dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.norm1(self.fc1(x))))
        return self.drop(self.norm2(self.fc2(x)))

    def deploy(self) -> nn.Module:
        self.fc1, self.norm1 = fuse_conv_bn(self.fc1, self.norm1), nn.Identity()
        self.fc2, self.norm2 = fuse_conv_bn(self.fc2, self.norm2), nn.Identity()
        return self


class Mlp(nn.Module):
    """Linear, GELU, linear on tokens (Meta3D's MLP)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention over a fixed ``resolution``² grid with learned offset biases.

    ``attention_biases[h, o]`` is the bias of head ``h`` for 2-D offset ``o`` (|dy|, |dx|);
    ``attention_bias_idxs`` (computed here, never loaded) maps each query-key pair to its offset.
    Deploy gathers the table once into ``frozen_bias``.
    """

    def __init__(
        self, dim: int, key_dim: int = 32, num_heads: int = 8, attn_ratio: float = 4.0, resolution: int = 7
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.resolution = resolution
        self.qkv = nn.Linear(dim, (2 * key_dim + self.val_dim) * num_heads)
        self.proj = nn.Linear(self.val_attn_dim, dim)
        index, num_offsets = attention_bias_index(resolution)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, num_offsets))
        self.register_buffer("attention_bias_idxs", index, persistent=False)
        self.register_buffer("frozen_bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        # Per head the qkv features are laid out [q | k | v], as in the authors' code. Slices, not
        # split (XNNPACK does not take split_with_sizes); k comes out already transposed.
        qkv = self.qkv(x).reshape(B, N, self.num_heads, -1)
        kd = self.key_dim
        q = qkv[..., :kd].permute(0, 2, 1, 3)
        k = qkv[..., kd:2 * kd].permute(0, 2, 3, 1)
        v = qkv[..., 2 * kd:].permute(0, 2, 1, 3)
        if self.frozen_bias is None:
            bias = self.attention_biases[:, self.attention_bias_idxs]
        else:
            bias = self.frozen_bias
        # As bmm: XNNPACK does not take the expand of a 4-D matmul.
        attn = (batched_matmul(q, k) * self.scale + bias).softmax(dim=-1)
        x = batched_matmul(attn, v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)

    @torch.no_grad()
    def deploy(self) -> nn.Module:
        self.frozen_bias = self.attention_biases[:, self.attention_bias_idxs].clone()
        del self.attention_biases
        del self.attention_bias_idxs
        return self


class MetaBlock2d(nn.Module):
    """Meta4D: pooling mixer and Conv-BN MLP on feature maps, each with LayerScale."""

    def __init__(
        self, dim: int, pool_size: int = 3, mlp_ratio: float = 4.0, drop: float = 0.0,
        drop_path: float = 0.0, layer_scale_init_value: float = 1e-5,
    ) -> None:
        super().__init__()
        self.token_mixer = Pooling(pool_size)
        self.ls1 = LayerScale2d(dim, layer_scale_init_value)
        self.drop_path1 = drop_path_layer(drop_path)
        self.mlp = ConvMlpWithNorm(dim, int(dim * mlp_ratio), drop)
        self.ls2 = LayerScale2d(dim, layer_scale_init_value)
        self.drop_path2 = drop_path_layer(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(x)))
        return x + self.drop_path2(self.ls2(self.mlp(x)))


class MetaBlock1d(nn.Module):
    """Meta3D: pre-LayerNorm attention and MLP on tokens, each with LayerScale."""

    def __init__(
        self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-5, resolution: int = 7,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = Attention(dim, resolution=resolution)
        self.ls1 = LayerScale(dim, layer_scale_init_value)
        self.drop_path1 = drop_path_layer(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.ls2 = LayerScale(dim, layer_scale_init_value)
        self.drop_path2 = drop_path_layer(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class EfficientFormerStage(nn.Module):
    """Optional downsampling, then Meta4D blocks; the last ``num_vit`` blocks are Meta3D after a Flat."""

    def __init__(
        self, dim: int, dim_out: int, depth: int, downsample: bool, num_vit: int, drop_path: list[float],
        pool_size: int = 3, mlp_ratio: float = 4.0, drop: float = 0.0, layer_scale_init_value: float = 1e-5,
        resolution: int = 7,
    ) -> None:
        super().__init__()
        if downsample:
            self.downsample: nn.Module = Downsample(dim, dim_out)
        elif dim != dim_out:
            raise ValueError(f"a stage without downsampling keeps its width ({dim} != {dim_out})")
        else:
            self.downsample = nn.Identity()
        first_vit = depth - num_vit
        blocks: list[nn.Module] = []
        for i, rate in enumerate(drop_path):
            if i == first_vit:
                blocks.append(Flat())  # its index shifts the block numbering, as in both key formats
            if i >= first_vit:
                blocks.append(MetaBlock1d(dim_out, mlp_ratio, drop, rate, layer_scale_init_value, resolution))
            else:
                blocks.append(MetaBlock2d(dim_out, pool_size, mlp_ratio, drop, rate, layer_scale_init_value))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class EfficientFormer(nn.Module):
    """EfficientFormer v1 with its distillation head.

    In eval (and in training unless :meth:`set_distilled_training` is on) the output is the mean
    of ``head`` and ``head_dist``; in distilled training it is the tuple ``(head, head_dist)``,
    as in timm. ``img_size`` fixes the attention grid (224 → 7×7).
    """

    def __init__(
        self,
        depths: tuple[int, ...] = (3, 2, 6, 4),
        widths: tuple[int, ...] = (48, 96, 224, 448),
        num_vit: int = 1,
        in_chans: int = 3,
        num_classes: int = 1000,
        img_size: tuple[int, int] = (224, 224),
        mlp_ratio: float = 4.0,
        pool_size: int = 3,
        layer_scale_init_value: float = 1e-5,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        height, width = img_size
        if height != width:
            raise EdgevitError(f"EfficientFormer needs a square input (a square attention grid), got {height}×{width}")
        self.img_size = (height, width)
        resolution = height
        for _ in range(_NUM_STRIDE2):
            resolution = (resolution + 1) // 2
        self.attn_resolution = resolution
        self.num_classes = num_classes

        self.stem = Stem4(in_chans, widths[0])
        # Stochastic depth grows linearly over all blocks (plain floats: the model may be built on "meta").
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(depths[:i]) for i in range(len(depths))]
        stages = []
        self.feature_info: list[dict[str, Any]] = []
        prev = widths[0]
        last = len(depths) - 1
        for i, (depth, dim) in enumerate(zip(depths, widths)):
            stages.append(EfficientFormerStage(
                prev, dim, depth, downsample=i > 0, num_vit=num_vit if i == last else 0,
                drop_path=rates[starts[i]:starts[i] + depth], pool_size=pool_size, mlp_ratio=mlp_ratio,
                drop=proj_drop_rate, layer_scale_init_value=layer_scale_init_value, resolution=resolution,
            ))
            self.feature_info.append({"module": f"stages.{i}", "num_chs": dim, "reduction": 2 ** (i + 2)})
            prev = dim
        self.stages = nn.Sequential(*stages)

        self.num_features = widths[-1]
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist: nn.Module | None = (
            nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        )
        self.distilled_training = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``(B, H/32 * W/32, C)`` of the last stage."""
        if tuple(x.shape[-2:]) != self.img_size:
            raise EdgevitError(
                f"EfficientFormer takes {self.img_size[0]}×{self.img_size[1]} inputs (its attention biases "
                f"are learned for a {self.attn_resolution}×{self.attn_resolution} grid), got "
                f"{x.shape[-2]}×{x.shape[-1]}; resize the input or build the model with another input_size"
            )
        x = self.stages(self.stem(x))
        return self.norm(x)

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # The token mean as a 4-D global average pool (the only mean XNNPACK takes).
        x = self.head_drop(mean_tokens(x))
        if pre_logits:
            return x
        if self.head_dist is None:  # deploy form: the two heads merged into one
            return self.head(x)
        logits, logits_dist = self.head(x), self.head_dist(x)
        if self.distilled_training and self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(x))

    def deploy(self) -> nn.Module:
        if isinstance(self.head, nn.Linear):
            self.head = merge_heads([self.head, self.head_dist])
        # Without a classifier both heads are identities, and their mean is the input.
        self.head_dist = None
        return self


# ----------------------------------------------------------------------------- checkpoints

_SNAP_STEM = {"0": "conv1", "1": "norm1", "3": "conv2", "4": "norm2"}
_SNAP_NETWORK = re.compile(r"^network\.(\d+)\.(.*)$")


def detect_format(keys) -> str | None:
    """``"timm"`` or ``"snap"`` for EfficientFormer v1 checkpoints, else None."""
    keys = set(keys)
    has_attention = any(k.endswith("token_mixer.qkv.weight") for k in keys)
    if not has_attention:
        return None
    if "stem.conv1.weight" in keys and "stages.1.downsample.conv.weight" in keys:
        return "timm"
    if "patch_embed.0.weight" in keys and "patch_embed.3.weight" in keys and "network.1.proj.weight" in keys:
        return "snap"
    return None


def _snap_key(key: str) -> str:
    """One snap-research key in timm's naming."""
    if key.startswith("patch_embed."):
        index, _, rest = key[len("patch_embed."):].partition(".")
        return f"stem.{_SNAP_STEM.get(index, index)}.{rest}"
    if key == "dist_head" or key.startswith("dist_head."):
        return "head_dist" + key[len("dist_head"):]
    match = _SNAP_NETWORK.match(key)
    if match is None:
        return key  # norm.*, head.*
    position, rest = int(match.group(1)), match.group(2)
    # snap's ``network`` alternates [stage 0 blocks, downsample 1, stage 1 blocks, downsample 2, …].
    if position % 2:
        stage = (position + 1) // 2
        return f"stages.{stage}.downsample.{rest.replace('proj.', 'conv.', 1)}"
    rest = re.sub(r"layer_scale_(\d)$", r"ls\1.gamma", rest)
    return f"stages.{position // 2}.blocks.{rest}"


def remap_checkpoint(
    state_dict: dict[str, torch.Tensor], fmt: str, model: nn.Module
) -> dict[str, torch.Tensor]:
    """Turn a ``timm`` or ``snap`` checkpoint into edgevit's keys for ``model``.

    Published ``attention_bias_idxs`` tables are checked against the one edgevit computes for the
    model's attention grid and dropped (ours is a non-persistent buffer).
    """
    if fmt == "snap":
        state_dict = {_snap_key(k): v for k, v in state_dict.items()}
    elif fmt != "timm":
        raise CheckpointError(f"unknown EfficientFormer checkpoint format {fmt!r}")
    resolution = model.attn_resolution
    with torch.device("cpu"):  # the filter may be called inside a meta-device context
        expected, _ = attention_bias_index(resolution)
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attention_bias_idxs"):
            if value.shape != expected.shape or not torch.equal(value.long(), expected):
                raise CheckpointError(
                    f"the checkpoint's {key} is not the attention index table of a "
                    f"{resolution}×{resolution} grid that edgevit computes; the checkpoint is corrupt or "
                    "was made for another input size"
                )
            continue
        out[key] = value
    return out


register_family(Family(
    name="efficientformer",
    detect_format=detect_format,
    remap_checkpoint=remap_checkpoint,
    classifier_prefixes=("head.", "head_dist."),
))


# ----------------------------------------------------------------------------- sizes


def _cfg(name: str, source_params: int, paper: PaperFigures, url: str | None, **arch: Any) -> ModelCfg:
    return ModelCfg(
        name=name,
        family="efficientformer",
        source_params=source_params,
        paper=paper,
        input_size=(3, 224, 224),
        fixed_input_size=True,
        crop_pct=0.95,
        interpolation="bicubic",
        num_classes=1000,
        labels="imagenet-1k",
        checkpoint_formats=("timm", "snap"),
        hf_hub_id=f"hf-hub:timm/{name}.snap_dist_in1k",
        url=url,
        arch=arch,
    )


def _build(cfg: ModelCfg, **kwargs: Any) -> EfficientFormer:
    return EfficientFormer(
        **cfg.arch, num_classes=cfg.num_classes, in_chans=cfg.input_size[0], img_size=cfg.input_size[1:], **kwargs
    )


_PAPER = "arXiv 2206.01191, Table 1"
_IPHONE = "iPhone 12 (Core ML, NPU)"
# The authors publish their checkpoints only as Google Drive pages (no direct download URL), so
# url stays None; timm's hub copy (hf_hub_id) is the downloadable one, and a snap .pth a user
# fetched by hand loads as a file.


@register_model(_cfg(
    "efficientformer_l1", 12_289_928,
    PaperFigures(params_m=12.3, gmacs=1.3, top1=79.2, latency_ms=1.6, latency_device=_IPHONE, reference=_PAPER),
    None,
    depths=(3, 2, 6, 4), widths=(48, 96, 224, 448), num_vit=1,
))
def efficientformer_l1(cfg: ModelCfg, **kwargs: Any) -> EfficientFormer:
    return _build(cfg, **kwargs)


@register_model(_cfg(
    "efficientformer_l3", 31_406_000,
    PaperFigures(params_m=31.3, gmacs=3.9, top1=82.4, latency_ms=3.0, latency_device=_IPHONE, reference=_PAPER),
    None,
    depths=(4, 4, 12, 6), widths=(64, 128, 320, 512), num_vit=4,
))
def efficientformer_l3(cfg: ModelCfg, **kwargs: Any) -> EfficientFormer:
    return _build(cfg, **kwargs)


@register_model(_cfg(
    "efficientformer_l7", 82_229_328,
    PaperFigures(params_m=82.1, gmacs=10.2, top1=83.3, latency_ms=7.0, latency_device=_IPHONE, reference=_PAPER),
    None,
    depths=(6, 6, 18, 8), widths=(96, 192, 384, 768), num_vit=8,
))
def efficientformer_l7(cfg: ModelCfg, **kwargs: Any) -> EfficientFormer:
    return _build(cfg, **kwargs)
