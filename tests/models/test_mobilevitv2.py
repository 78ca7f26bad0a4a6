"""MobileViT v2 specifics: the authors' (ml-cvnets) key format, odd input sizes, export hygiene."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgevit.core.errors import CheckpointError
from edgevit.models import create_model, load_checkpoint, to_deploy
from edgevit.models.mobilevitv2 import LinearSelfAttention, detect_format
from tests.reference_data import (
    REFERENCE_MODELS,
    load_reference,
    max_relative_error,
    reference_expected,
    reference_input,
    reference_state_dict,
)

STEM = "timm__mobilevitv2_050"
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_layer(timm_prefix: str, cvnets_prefix: str) -> list[tuple[str, str]]:
    """timm ``ConvNormAct`` (conv, bn) vs cvnets ``ConvLayer2d`` (block.conv, block.norm)."""
    pairs = [(f"{timm_prefix}.conv.weight", f"{cvnets_prefix}.block.conv.weight")]
    return pairs + [(f"{timm_prefix}.bn.{k}", f"{cvnets_prefix}.block.norm.{k}") for k in BN_KEYS]


def cvnets_key_table_050() -> dict[str, str]:
    """timm key -> ml-cvnets key for mobilevitv2_050, written from ml-cvnets' module tree.

    ml-cvnets (cvnets/models/classification/mobilevit_v2.py): ``conv_1``, ``layer_1..5`` of
    ``InvertedResidual`` (``block.exp_1x1/conv_3x3/red_1x1``) with a ``MobileViTBlockv2`` second
    in layers 3-5 (``local_rep = (dw conv, 1x1 conv)``, ``global_rep = (LinearAttnFFN…, norm)``,
    ``conv_proj``), and ``classifier = (GlobalPool, LinearLayer)``.
    """
    pairs = _conv_layer("stem", "conv_1")
    for stage, block in ((0, 0), (1, 0), (1, 1), (2, 0), (3, 0), (4, 0)):
        for ours, theirs in (("conv1_1x1", "exp_1x1"), ("conv2_kxk", "conv_3x3"), ("conv3_1x1", "red_1x1")):
            pairs += _conv_layer(f"stages.{stage}.{block}.{ours}", f"layer_{stage + 1}.{block}.block.{theirs}")
    for stage, depth in ((2, 2), (3, 4), (4, 3)):
        ours, theirs = f"stages.{stage}.1", f"layer_{stage + 1}.1"
        pairs += _conv_layer(f"{ours}.conv_kxk", f"{theirs}.local_rep.0")
        pairs.append((f"{ours}.conv_1x1.weight", f"{theirs}.local_rep.1.block.conv.weight"))
        for i in range(depth):
            block, rep = f"{ours}.transformer.{i}", f"{theirs}.global_rep.{i}"
            for p in ("weight", "bias"):
                pairs += [
                    (f"{block}.norm1.{p}", f"{rep}.pre_norm_attn.0.{p}"),
                    (f"{block}.attn.qkv_proj.{p}", f"{rep}.pre_norm_attn.1.qkv_proj.block.conv.{p}"),
                    (f"{block}.attn.out_proj.{p}", f"{rep}.pre_norm_attn.1.out_proj.block.conv.{p}"),
                    (f"{block}.norm2.{p}", f"{rep}.pre_norm_ffn.0.{p}"),
                    (f"{block}.mlp.fc1.{p}", f"{rep}.pre_norm_ffn.1.block.conv.{p}"),
                    (f"{block}.mlp.fc2.{p}", f"{rep}.pre_norm_ffn.3.block.conv.{p}"),
                ]
        pairs += [(f"{ours}.norm.{p}", f"{theirs}.global_rep.{depth}.{p}") for p in ("weight", "bias")]
        pairs += _conv_layer(f"{ours}.conv_proj", f"{theirs}.conv_proj")
    pairs += [("head.fc.weight", "classifier.1.weight"), ("head.fc.bias", "classifier.1.bias")]
    return dict(pairs)


@pytest.fixture(scope="module")
def cvnets_checkpoint(tmp_path_factory) -> str:
    """The reference weights under ml-cvnets' names, saved as Apple publishes them (a plain state dict)."""
    table = cvnets_key_table_050()
    timm_sd = reference_state_dict(STEM)
    assert set(table) == set(timm_sd), "the cvnets key table must cover exactly the timm keys"
    path = tmp_path_factory.mktemp("cvnets") / "mobilevitv2-0.5.pt"
    torch.save({table[k]: v for k, v in timm_sd.items()}, path)
    return str(path)


@pytest.fixture(scope="module")
def model_050() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mobilevitv2_050")


def test_cvnets_checkpoint_matches_reference(cvnets_checkpoint):
    model = create_model("mobilevitv2_050")
    report = load_checkpoint(model, cvnets_checkpoint)
    assert report.key_format == "cvnets"
    with torch.no_grad():
        out = model(reference_input(STEM))
    assert max_relative_error(out, reference_expected(STEM)) < 1e-4


def test_cvnets_checkpoint_of_another_size_is_named(cvnets_checkpoint):
    # The size guess runs the filter on meta-device candidates of every size.
    with pytest.raises(CheckpointError, match="mobilevitv2_050"):
        create_model("mobilevitv2_075", pretrained=cvnets_checkpoint)


def test_detect_format():
    assert detect_format(load_reference(STEM)["state_dict"]) == "timm"
    assert detect_format(cvnets_key_table_050().values()) == "cvnets"
    others = [stem for stem, name in REFERENCE_MODELS.items() if not name.startswith("mobilevitv2")]
    assert {"timm__efficientformer_l1", "timm__levit_128s", "saic__edgevit_xxs"} <= set(others)
    for stem in others:
        assert detect_format(load_reference(stem)["state_dict"]) is None, stem


def test_attention_block_resizes_odd_maps_like_ml_cvnets(model_050):
    # ml-cvnets (and timm) resize a map whose sides are not multiples of the patch size up to
    # the next multiple (bilinear, align_corners=True) and keep that size at the block output.
    block = model_050.stages[2][1]
    x = torch.randn(1, 128, 25, 33)
    with torch.no_grad():
        out = block(x)
        resized = block(F.interpolate(x, size=(26, 34), mode="bilinear", align_corners=True))
    assert out.shape == (1, 128, 26, 34)
    assert torch.equal(out, resized)


def test_odd_input_size_exports_without_unfold(model_050):
    x = torch.randn(1, 3, 200, 264)  # stage 3-5 maps are 25x33, 13x17, 7x9: every block resizes
    with torch.no_grad():
        expected = model_050(x)
        assert model_050.forward_features(x).shape == (1, model_050.num_features, 8, 10)
    program = torch.export.export(to_deploy(model_050), (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "aten.upsample_bilinear2d.vec" in targets
    assert not [t for t in targets if any(op in t for op in ("im2col", "col2im", "unfold", "fold"))]
    with torch.no_grad():
        assert max_relative_error(program.module()(x), expected) < 1e-5



def test_linear_attention_context_is_the_weighted_sum_without_a_sum_op():
    # The context is computed as a bmm with the softmax on a 3-D view (the forms XNNPACK takes);
    # it must equal the paper's softmax over patches and score-weighted sum of the keys.
    torch.manual_seed(0)
    attn = LinearSelfAttention(32).eval()
    x = torch.randn(2, 32, 4, 48) * 3
    with torch.no_grad():
        qkv = attn.qkv_proj(x)
        query, key, value = qkv[:, :1], qkv[:, 1:33], qkv[:, 33:]
        context = (key * query.softmax(dim=-1)).sum(dim=-1, keepdim=True)
        expected = attn.out_proj(F.relu(value) * context)
        assert max_relative_error(attn(x), expected) < 1e-5
    program = torch.export.export(attn, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "aten.bmm.default" in targets
    assert not [t for t in targets if "sum" in t or "expand" in t]
