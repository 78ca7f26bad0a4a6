"""EdgeViT (Pan et al., "EdgeViTs: Competing Light-weight CNNs on Mobile Devices with Vision
Transformers", ECCV 2022, arXiv 2205.03436).

A four-stage pyramid whose blocks follow the local-global-local (LGL) bottleneck: a convolutional
local aggregation (``LocalAgg``), then self-attention among a sparse set of delegate tokens
sampled every ``sr`` pixels whose result is propagated back to every pixel by a depthwise
transposed convolution (``SelfAttn`` / ``GlobalSparseAttn``).

timm has no EdgeViT, so edgevit's native keys are those of the authors' code (saic-fi/edgevit,
``src/edgevit.py``), format name ``"saic"``; module names follow them (``patch_embed1``,
``blocks1.0.LocalAgg``, ``blocks1.0.SelfAttn.attn.LocalProp`` …).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from edgevit.core.errors import CheckpointError, EdgevitError
from edgevit.models.layers import (
    batched_matmul,
    drop_path_layer,
    fuse_bn_conv,
    fuse_bn_linear,
    fuse_conv_bn,
)
from edgevit.models.registry import Family, ModelCfg, PaperFigures, register_family, register_model

__all__ = ["EdgeViT", "LGLBlock", "LocalAgg", "SelfAttn", "GlobalSparseAttn", "TokenSpread"]


class Mlp(nn.Module):
    """Token MLP (linear layers) of the global block."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvMlp(nn.Module):
    """Channel MLP as 1×1 convolutions (the authors' ``CMlp``) of the local block."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping strided convolution, then LayerNorm over channels (default eps 1e-5)."""

    def __init__(self, in_chs: int, dim: int, patch_size: int) -> None:
        super().__init__()
        # Declared before ``proj`` so the state dict lists keys in the authors' order.
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Conv2d(in_chs, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LocalAgg(nn.Module):
    """Local aggregation: conditional positional encoding, then BN → 1×1 → depthwise 5×5 → 1×1,
    then BN → convolutional MLP, each as a residual branch."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.drop_path = drop_path_layer(drop_path)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x

    def deploy(self) -> "LocalAgg":
        # Both BatchNorms feed an unpadded 1×1 convolution, so they fold into it exactly.
        if isinstance(self.norm1, nn.BatchNorm2d):
            self.conv1 = fuse_bn_conv(self.norm1, self.conv1)
            self.norm1 = nn.Identity()
        if isinstance(self.norm2, nn.BatchNorm2d):
            self.mlp.fc1 = fuse_bn_conv(self.norm2, self.mlp.fc1)
            self.norm2 = nn.Identity()
        return self


class TokenSpread(nn.Module):
    """Deploy form of ``LocalProp`` (a depthwise transposed convolution with kernel = stride =
    ``r``) on the token layout: each delegate token becomes ``r × r`` tokens, the token times the
    kernel's taps plus the bias. Kernel = stride means one multiply-add per output, so the values
    are the convolution's bit for bit, without the transposes to and from NCHW around it and
    without a deconvolution, which ExecuTorch's XNNPACK runs per channel in float32 (EdgeViT-XXS,
    224², 2 threads: 1.7 ms of the int8 .pte's 6.3; the .pte went 6.7 → 5.0 ms int8, 10.2 → 8.4
    fp32). Ranks are chosen for the runtimes: the product is rank 5 (Core ML takes no more),
    the taps are stored rank 3 and viewed rank 5: ExecuTorch 1.5.1's XNNPACK delegate mislays
    the layout of a product with a rank-4 constant operand ("Expected shape (14, 4, 14, 4, 36),
    but received (14, 4, 14, 36, 4)")."""

    def __init__(self, deconv: nn.ConvTranspose2d) -> None:
        super().__init__()
        dim, ratio = deconv.in_channels, deconv.stride[0]
        self.ratio = ratio
        # weight[a, b, c] is tap (a, b) of channel c (the product's view of it is taken in forward)
        self.weight = nn.Parameter(deconv.weight.detach().reshape(dim, ratio, ratio).permute(1, 2, 0).contiguous())
        bias = deconv.bias.detach().clone() if deconv.bias is not None else torch.zeros(dim)
        self.bias = nn.Parameter(bias)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``tokens`` [B, height·width, C], delegates row by row → [B, height·r·width·r, C]."""
        batch, _, dim = tokens.shape
        taps = self.weight.reshape(1, self.ratio, 1, self.ratio, dim)
        spread = tokens.reshape(batch * height, 1, width, 1, dim) * taps + self.bias
        return spread.reshape(batch, height * self.ratio * width * self.ratio, dim)


class GlobalSparseAttn(nn.Module):
    """Multi-head self-attention among delegate tokens sampled every ``sr`` pixels.

    With ``sr > 1`` the map is subsampled (``sampler``, an average pool of kernel 1 and stride
    ``sr``, i.e. plain strided sampling), attention runs on the delegates, and a depthwise
    transposed convolution (``LocalProp``, kernel = stride = ``sr``) spreads each delegate's
    result back over its ``sr × sr`` neighbourhood, followed by a LayerNorm. With ``sr == 1`` it
    is ordinary dense attention and has none of those layers.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, sr_ratio: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr = sr_ratio
        if sr_ratio > 1:
            self.sampler = nn.AvgPool2d(1, sr_ratio)
            self.LocalProp = nn.ConvTranspose2d(dim, dim, sr_ratio, stride=sr_ratio, groups=dim)
            self.norm = nn.LayerNorm(dim)  # default eps 1e-5, unlike the blocks' 1e-6

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, dim = x.shape
        if self.sr > 1:
            grid = self.sampler(x.transpose(1, 2).reshape(batch, dim, height, width))
            height, width = grid.shape[2:]
            x = grid.flatten(2).transpose(1, 2)
        tokens = x.shape[1]
        heads, head_dim = self.num_heads, dim // self.num_heads
        # Slices instead of unbind and bmm instead of 4-D ``@``: XNNPACK takes neither the
        # squeeze of an unbind nor the expand of a 4-D matmul. Same arithmetic, same result.
        qkv = self.qkv(x)
        q = qkv[..., :dim].reshape(batch, tokens, heads, head_dim).permute(0, 2, 1, 3)
        k = qkv[..., dim : 2 * dim].reshape(batch, tokens, heads, head_dim).permute(0, 2, 3, 1)
        v = qkv[..., 2 * dim :].reshape(batch, tokens, heads, head_dim).permute(0, 2, 1, 3)
        attn = (batched_matmul(q, k) * self.scale).softmax(dim=-1)
        x = batched_matmul(attn, v).transpose(1, 2).reshape(batch, tokens, dim)
        if self.sr > 1:
            if isinstance(self.LocalProp, TokenSpread):
                x = self.LocalProp(x, height, width)
            else:
                x = self.LocalProp(x.transpose(1, 2).reshape(batch, dim, height, width)).flatten(2).transpose(1, 2)
            x = self.norm(x)
        return self.proj(x)

    def deploy(self) -> "GlobalSparseAttn":
        if self.sr > 1 and isinstance(self.LocalProp, nn.ConvTranspose2d):
            self.LocalProp = TokenSpread(self.LocalProp)
        return self


class SelfAttn(nn.Module):
    """Global block: conditional positional encoding, then pre-norm sparse attention and MLP on
    the flattened tokens (LayerNorm eps 1e-6)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        sr_ratio: int,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = GlobalSparseAttn(dim, num_heads, qkv_bias=qkv_bias, sr_ratio=sr_ratio)
        self.drop_path = drop_path_layer(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        batch, dim, height, width = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.transpose(1, 2).reshape(batch, dim, height, width)


class LGLBlock(nn.Module):
    """Local-global-local block; stages without sparse sampling (``sr == 1``) skip ``LocalAgg``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        sr_ratio: int,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.LocalAgg = LocalAgg(dim, mlp_ratio, drop_path) if sr_ratio > 1 else nn.Identity()
        self.SelfAttn = SelfAttn(dim, num_heads, mlp_ratio, qkv_bias, sr_ratio, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SelfAttn(self.LocalAgg(x))


class EdgeViT(nn.Module):
    """EdgeViT classifier: four (patch embedding, LGL blocks) stages, BatchNorm, mean pool, linear head."""

    def __init__(
        self,
        depths: Sequence[int],
        embed_dims: Sequence[int],
        head_dim: int,
        mlp_ratios: Sequence[float] = (4.0, 4.0, 4.0, 4.0),
        sr_ratios: Sequence[int] = (4, 2, 2, 1),
        qkv_bias: bool = True,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # also under meta
        self.feature_info: list[dict] = []
        # All patch embeddings first, then all blocks: the authors' state-dict order.
        for i, (in_chs, dim) in enumerate(zip([in_chans, *embed_dims[:-1]], embed_dims), 1):
            setattr(self, f"patch_embed{i}", PatchEmbed(in_chs, dim, 4 if i == 1 else 2))
        stride, first = 1, 0
        # The input must split evenly into delegates in every stage: a multiple of stride × sr.
        self.input_multiple = 1
        for i, (depth, dim, mlp_ratio, sr) in enumerate(zip(depths, embed_dims, mlp_ratios, sr_ratios), 1):
            stride *= 4 if i == 1 else 2
            self.input_multiple = max(self.input_multiple, stride * sr)
            blocks = [
                LGLBlock(dim, dim // head_dim, mlp_ratio, qkv_bias, sr, rates[first + j])
                for j in range(depth)
            ]
            setattr(self, f"blocks{i}", nn.ModuleList(blocks))
            info = {"module": f"blocks{i}.{depth - 1}", "num_chs": dim, "reduction": stride}
            self.feature_info.append(info)
            first += depth
        self.num_stages = len(depths)
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # As the authors: truncated-normal linear layers, unit LayerNorms; convolutions keep
        # PyTorch's default initialisation.
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % self.input_multiple or width % self.input_multiple:
            raise EdgevitError(
                f"EdgeViT needs an input height and width divisible by {self.input_multiple}, "
                f"got {height}×{width}"
            )
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"blocks{i}"):
                x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # keepdim + flatten: the global average pool is the only mean XNNPACK takes.
        x = x.mean((2, 3), keepdim=True).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def deploy(self) -> "EdgeViT":
        """Fold the final BatchNorm into the head: a per-channel affine commutes with mean pooling.

        After this ``forward_features`` returns the map before that normalisation; the logits
        are unchanged. Without a classifier the BatchNorm becomes a depthwise 1×1 convolution.
        """
        if isinstance(self.norm, nn.BatchNorm2d):
            if isinstance(self.head, nn.Linear):
                self.head = fuse_bn_linear(self.norm, self.head)
                self.norm = nn.Identity()
            else:
                dim = self.num_features
                identity = nn.Conv2d(dim, dim, 1, groups=dim, bias=False).to(self.norm.weight)
                nn.init.ones_(identity.weight)
                self.norm = fuse_conv_bn(identity, self.norm)
        return self


# ----------------------------------------------------------------------------- checkpoints


def detect_format(keys: Iterable[str]) -> str | None:
    """``"saic"`` for the authors' keys (edgevit's own), else None.

    EdgeViT's numbered stage modules (``patch_embed1``, ``blocks1.<i>.SelfAttn``) appear in no
    other family's checkpoints.
    """
    keys = set(keys)
    if "patch_embed1.proj.weight" in keys and any(
        k.startswith("blocks1.") and ".SelfAttn." in k for k in keys
    ):
        return "saic"
    return None


def remap_checkpoint(
    state_dict: dict[str, torch.Tensor], fmt: str, model: nn.Module
) -> dict[str, torch.Tensor]:
    """The authors' keys are edgevit's: nothing to rename, and EdgeViT has no index tables."""
    if fmt != "saic":
        raise CheckpointError(f"EdgeViT checkpoints come in the authors' (saic) format only, not {fmt!r}")
    return state_dict


register_family(
    Family(
        name="edgevit",
        detect_format=detect_format,
        remap_checkpoint=remap_checkpoint,
        classifier_prefixes=("head.",),
    )
)


# ----------------------------------------------------------------------------- sizes


def _cfg(name: str, source_params: int, paper: PaperFigures, **arch: object) -> ModelCfg:
    # The authors evaluate as DeiT does: resize to 256, centre crop 224 (0.875), bicubic,
    # ImageNet mean/std. They published no weights.
    return ModelCfg(
        name=name,
        family="edgevit",
        source_params=source_params,
        paper=paper,
        input_size=(3, 224, 224),
        fixed_input_size=False,
        crop_pct=0.875,
        interpolation="bicubic",
        num_classes=1000,
        labels="imagenet-1k",
        checkpoint_formats=("saic",),
        hf_hub_id=None,
        url=None,
        arch={"mlp_ratios": (4.0, 4.0, 4.0, 4.0), "sr_ratios": (4, 2, 2, 1), **arch},
    )


_DEVICE = "Samsung Galaxy S21 (Snapdragon 888) CPU"
_TABLE = "arXiv 2205.03436, Table 2"


def _build(cfg: ModelCfg, **kwargs: object) -> EdgeViT:
    model = EdgeViT(**cfg.arch, num_classes=cfg.num_classes, **kwargs)
    if any(side % model.input_multiple for side in cfg.input_size[1:]):
        raise EdgevitError(
            f"{cfg.name} needs an input size divisible by {model.input_multiple}, got {cfg.input_size[1:]}"
        )
    return model


@register_model(
    _cfg(
        "edgevit_xxs",
        4067704,
        PaperFigures(4.1, 0.6, 74.4, 32.8, _DEVICE, _TABLE),
        depths=(1, 1, 3, 2),
        embed_dims=(36, 72, 144, 288),
        head_dim=36,
    )
)
def edgevit_xxs(cfg: ModelCfg, **kwargs: object) -> EdgeViT:
    return _build(cfg, **kwargs)


@register_model(
    _cfg(
        "edgevit_xs",
        6770056,
        PaperFigures(6.7, 1.1, 77.5, 54.1, _DEVICE, _TABLE),
        depths=(1, 1, 3, 1),
        embed_dims=(48, 96, 240, 384),
        head_dim=48,
    )
)
def edgevit_xs(cfg: ModelCfg, **kwargs: object) -> EdgeViT:
    return _build(cfg, **kwargs)


@register_model(
    _cfg(
        "edgevit_s",
        13108168,
        # The paper lists 11.1M parameters; the authors' code builds 13.1M (source_params).
        PaperFigures(11.1, 1.9, 81.0, 85.4, _DEVICE, _TABLE),
        depths=(1, 2, 5, 3),
        embed_dims=(48, 96, 240, 384),
        head_dim=48,
    )
)
def edgevit_s(cfg: ModelCfg, **kwargs: object) -> EdgeViT:
    return _build(cfg, **kwargs)
