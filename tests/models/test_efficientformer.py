"""EfficientFormer specifics: the authors' (snap) key format, the published attention index
tables, the fixed 7×7 attention grid, and the distillation head in its two forms."""
import pytest
import torch

from edgevit.core.errors import CheckpointError, EdgevitError
from edgevit.models import create_model, get_model_cfg, load_checkpoint, to_deploy
from edgevit.models.efficientformer import detect_format, remap_checkpoint
from edgevit.models.registry import build_model
from tests.reference_data import (
    load_reference,
    max_relative_error,
    reference_expected,
    reference_input,
    reference_state_dict,
    write_as_published,
)

SNAP, TIMM = "snap__efficientformer_l1", "timm__efficientformer_l1"
IDXS = "attention_bias_idxs"


@pytest.fixture(scope="module")
def snap_file(tmp_path_factory):
    return write_as_published(SNAP, tmp_path_factory.mktemp("snap"))


def snap_key_shapes(depths, widths, vit_num, num_classes=1000):
    """Keys and shapes of a snap-research EfficientFormer, from its module structure.

    ``patch_embed`` is Sequential(conv, BN, ReLU, conv, BN, ReLU); ``network`` alternates the block
    Sequential of each stage with an ``Embedding`` (proj conv + norm BN) before the next stage;
    the last stage holds a parameter-free ``Flat`` just before its ``vit_num`` Meta3D blocks;
    Meta4D/Meta3D keep their layer scales as bare ``layer_scale_1/2`` parameters.
    """
    def bn(prefix, ch):
        return {f"{prefix}.{n}": [ch] for n in ("weight", "bias", "running_mean", "running_var")} | {
            f"{prefix}.num_batches_tracked": []
        }

    def conv(prefix, cin, cout, k):
        return {f"{prefix}.weight": [cout, cin, k, k], f"{prefix}.bias": [cout]}

    def linear(prefix, cin, cout):
        return {f"{prefix}.weight": [cout, cin], f"{prefix}.bias": [cout]}

    keys = conv("patch_embed.0", 3, widths[0] // 2, 3) | bn("patch_embed.1", widths[0] // 2)
    keys |= conv("patch_embed.3", widths[0] // 2, widths[0], 3) | bn("patch_embed.4", widths[0])
    last = len(depths) - 1
    for stage, (depth, dim) in enumerate(zip(depths, widths)):
        if stage:
            keys |= conv(f"network.{2 * stage - 1}.proj", widths[stage - 1], dim, 3)
            keys |= bn(f"network.{2 * stage - 1}.norm", dim)
        num_vit = vit_num if stage == last else 0
        position = 0
        for block in range(depth):
            if block == depth - num_vit:
                position += 1  # Flat
            p = f"network.{2 * stage}.{position}"
            keys |= {f"{p}.layer_scale_1": [dim], f"{p}.layer_scale_2": [dim]}
            if block >= depth - num_vit:
                keys |= {f"{p}.norm1.weight": [dim], f"{p}.norm1.bias": [dim]}
                keys |= {f"{p}.norm2.weight": [dim], f"{p}.norm2.bias": [dim]}
                keys |= {f"{p}.token_mixer.attention_biases": [8, 49], f"{p}.token_mixer.{IDXS}": [49, 49]}
                keys |= linear(f"{p}.token_mixer.qkv", dim, 8 * (32 + 32 + 128))
                keys |= linear(f"{p}.token_mixer.proj", 8 * 128, dim)
                keys |= linear(f"{p}.mlp.fc1", dim, 4 * dim) | linear(f"{p}.mlp.fc2", 4 * dim, dim)
            else:
                keys |= conv(f"{p}.mlp.fc1", dim, 4 * dim, 1) | conv(f"{p}.mlp.fc2", 4 * dim, dim, 1)
                keys |= bn(f"{p}.mlp.norm1", 4 * dim) | bn(f"{p}.mlp.norm2", dim)
            position += 1
    keys |= {"norm.weight": [widths[-1]], "norm.bias": [widths[-1]]}
    keys |= linear("head", widths[-1], num_classes) | linear("dist_head", widths[-1], num_classes)
    return keys


def published_index_table():
    spec = load_reference(SNAP)["state_dict"]["network.6.4.token_mixer.attention_bias_idxs"]
    return torch.tensor(spec["values"], dtype=torch.int64).reshape(spec["shape"])


def test_key_structure_of_snap_code_reproduces_the_reference_file():
    # Anchors snap_key_shapes (used below for L3 and L7) to the real snap-format reference.
    cfg = get_model_cfg("efficientformer_l1")
    published = {k: spec["shape"] for k, spec in load_reference(SNAP)["state_dict"].items()}
    assert snap_key_shapes(cfg.arch["depths"], cfg.arch["widths"], cfg.arch["num_vit"]) == published


@pytest.mark.parametrize("name", ["efficientformer_l3", "efficientformer_l7"])
def test_snap_keys_of_larger_sizes_remap_onto_the_model(name):
    cfg = get_model_cfg(name)
    shapes = snap_key_shapes(cfg.arch["depths"], cfg.arch["widths"], cfg.arch["num_vit"])
    table = published_index_table()
    snap = {
        k: table.clone() if k.endswith(IDXS) else torch.empty(shape, device="meta")
        for k, shape in shapes.items()
    }
    assert detect_format(snap) == "snap"
    with torch.device("meta"):
        model = build_model(cfg)
        remapped = remap_checkpoint(dict(snap), "snap", model)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in remapped.items()} == own
    # Every tensor but the dropped index tables is carried over, none duplicated.
    assert len(remapped) == len(snap) - sum(k.endswith(IDXS) for k in snap)
    assert remapped["stages.3.downsample.conv.weight"] is snap["network.5.proj.weight"]
    assert remapped["head_dist.weight"] is snap["dist_head.weight"]


@pytest.mark.parametrize("stem", [SNAP, TIMM])
def test_published_index_table_is_checked_then_dropped(stem, tmp_path):
    sd = reference_state_dict(stem)
    key = next(k for k in sd if k.endswith(IDXS))
    model = create_model("efficientformer_l1")
    assert torch.equal(sd[key], model.stages[3].blocks[4].token_mixer.attention_bias_idxs)
    assert not any(k.endswith(IDXS) for k in model.state_dict())

    sd[key] = sd[key].clone()
    sd[key][0, [1, 2]] = sd[key][0, [2, 1]]
    path = write_as_published(stem, tmp_path, sd)
    with pytest.raises(CheckpointError, match=f"{IDXS}.*7×7 grid"):
        create_model("efficientformer_l1", pretrained=str(path))


@pytest.mark.parametrize(
    "stem",
    ["timm__levit_128s", "timm__levit_conv_128s", "fb__LeViT_128S", "saic__edgevit_xxs", "timm__mobilevitv2_050"],
)
def test_other_families_keys_are_not_taken_for_efficientformer(stem):
    assert detect_format(load_reference(stem)["state_dict"]) is None


def test_own_formats_are_detected():
    assert detect_format(load_reference(TIMM)["state_dict"]) == "timm"
    assert detect_format(load_reference(SNAP)["state_dict"]) == "snap"


def test_input_size_is_fixed_by_the_attention_grid(snap_file):
    model = create_model("efficientformer_l1")
    with pytest.raises(EdgevitError, match=r"takes 224×224 inputs.*7×7 grid.*got 256×256"):
        model(torch.randn(1, 3, 256, 256))

    larger = create_model("efficientformer_l1", input_size=(3, 256, 256))
    assert larger.stages[3].blocks[4].token_mixer.attention_biases.shape == (8, 64)
    with torch.no_grad():
        assert larger(torch.randn(1, 3, 256, 256)).shape == (1, 1000)
    # A 224 checkpoint's 7×7 tables do not fit an 8×8 grid.
    with pytest.raises(CheckpointError, match="8×8 grid"):
        create_model("efficientformer_l1", pretrained=str(snap_file), input_size=(3, 256, 256))


def test_snap_checkpoint_in_eval_deploy_and_distilled_training_forms(snap_file):
    model = create_model("efficientformer_l1")
    report = load_checkpoint(model, snap_file)
    assert report.key_format == "snap"
    assert not report.missing and not report.unexpected and not report.dropped_classifier
    x, expected = reference_input(SNAP), reference_expected(SNAP)
    with torch.no_grad():
        tokens = model.forward_features(x)
        features = model.forward_head(tokens, pre_logits=True)
        heads = model.head(features), model.head_dist(features)
        logits = model.forward_head(tokens)
        assert max_relative_error(logits, expected) < 1e-4
        torch.testing.assert_close(logits, (heads[0] + heads[1]) / 2)

        deployed = to_deploy(model)
        assert deployed.head_dist is None
        attention = deployed.stages[3].blocks[4].token_mixer
        assert not hasattr(attention, "attention_biases") and attention.frozen_bias.shape == (8, 49, 49)
        assert max_relative_error(deployed(x), expected) < 1e-4

        model.train()  # the heads only: no BatchNorm runs, so nothing else changes
        torch.testing.assert_close(model.forward_head(tokens), logits)
        model.set_distilled_training(True)
        train_out = model.forward_head(tokens)
    assert isinstance(train_out, tuple) and len(train_out) == 2
    torch.testing.assert_close(train_out[0], heads[0])
    torch.testing.assert_close(train_out[1], heads[1])


def test_attention_and_head_are_in_forms_every_backend_delegates():
    """Slices instead of split, bmm on 3-D views instead of 4-D matmuls (whose expand XNNPACK does
    not take), and the token mean as a 4-D global average pool: the same numbers as the plain forms."""
    from edgevit.models.efficientformer import Attention

    torch.manual_seed(0)
    attention = Attention(64, key_dim=16, num_heads=4, resolution=3).eval()
    with torch.no_grad():
        attention.attention_biases.normal_()
        x = torch.randn(2, 9, 64)
        qkv = attention.qkv(x).reshape(2, 9, 4, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([16, 16, attention.val_dim], dim=3)
        bias = attention.attention_biases[:, attention.attention_bias_idxs]
        attn = (q @ k.transpose(-2, -1) * attention.scale + bias).softmax(dim=-1)
        plain = attention.proj((attn @ v).transpose(1, 2).reshape(2, 9, -1))
        torch.testing.assert_close(attention(x), plain, rtol=1e-6, atol=1e-6)

    deployed = to_deploy(create_model("efficientformer_l1"))
    # Core ATen, as ExecuTorch lowers it (a 4-D matmul decomposes to expand + bmm there).
    graph = torch.export.export(deployed, (torch.randn(1, 3, 224, 224),)).run_decompositions().graph
    ops = [n for n in graph.nodes if n.op == "call_function"]
    names = {str(n.target) for n in ops}
    assert "aten.bmm.default" in names
    assert not {"aten.split_with_sizes.default", "aten.expand.default", "aten.unbind.int"} & names
    means = [n for n in ops if str(n.target) == "aten.mean.dim"]
    assert means and all(list(n.args[1]) == [2, 3] and n.args[2] for n in means)
    with torch.no_grad():
        tokens = torch.randn(2, 49, 448)
        torch.testing.assert_close(deployed.forward_head(tokens, pre_logits=True), tokens.mean(1))
