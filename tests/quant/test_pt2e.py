"""PT2E int8 for ExecuTorch (XNNPACK) and Core ML: the spec's float ops and modules reach the
graph, every family's smallest size lowers fully delegated and agrees with float32 in
executorch.runtime, dynamic int8 runs, Core ML W8 and W8A8 hold int8 weights and pass their
pre-check, and a collapsed int8 output is caught."""
from __future__ import annotations

import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("executorch", reason="the executorch extra is not installed (pip install -e '.[executorch]')")

from edgevit.core.errors import EdgevitError  # noqa: E402
from edgevit.targets import coreml, executorch  # noqa: E402
from edgevit.verify import collapse_failure, compare_outputs  # noqa: E402
from edgevit.models import create_model, get_model_cfg, load_checkpoint, to_deploy  # noqa: E402
from edgevit.models.layers import mean_tokens  # noqa: E402
from edgevit.profile.layers import executorch_layers  # noqa: E402
from edgevit.quant import pt2e  # noqa: E402
from edgevit.quant.recipes import quant_settings  # noqa: E402
from edgevit.quant.spec import QuantSpec  # noqa: E402
from edgevit import runtimes  # noqa: E402
from tests.reference_data import write_as_published  # noqa: E402

XNNPACK = {"backend": "xnnpack"}
COREML = {"deployment_target": "iOS17", "image_input": False, "labels_file": ""}


# ---------------------------------------------------------------------------------- fixtures

def photo_crops(cfg, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` random square crops of the photos shipped with matplotlib and scikit-learn,
    preprocessed exactly as the model's config says (natural image statistics)."""
    from PIL import Image

    from edgevit.data.images import preprocess

    photos = []
    for module, relative in (("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
                             ("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg")):
        try:
            package = __import__(module)
        except ImportError:
            continue
        path = Path(os.path.dirname(package.__file__)) / relative
        if path.is_file():
            photos.append(Image.open(path).convert("RGB"))
    if not photos:
        pytest.skip("no sample photos (matplotlib / scikit-learn) to calibrate with")
    generator = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = generator.uniform(0.35, 1.0) * min(photo.size)
        left, top = generator.uniform(0, photo.size[0] - side), generator.uniform(0, photo.size[1] - side)
        crops.append(preprocess(photo.crop((left, top, left + side, top + side)), cfg))
    return torch.stack(crops).contiguous()


class _TinyViT(nn.Module):
    """conv stem → LayerNorm → attention with a position bias → GELU MLP → head, with residuals:
    every op kind of a ViT block in a model that lowers in seconds."""

    def __init__(self, dim: int = 32, tokens: int = 16, head_scale: float = 1.0) -> None:
        super().__init__()
        self.cfg = get_model_cfg("efficientformer_l1").replace(name="tinyvit", input_size=(3, 16, 16), num_classes=10)
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("position_bias", torch.randn(1, tokens, tokens) * 0.5)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.head = nn.Linear(dim, 10)
        with torch.no_grad():
            self.head.weight.mul_(head_scale)
            self.head.bias.mul_(head_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        qkv = self.qkv(self.norm(x))
        q, k, v = qkv[..., :32], qkv[..., 32:64], qkv[..., 64:]
        attention = (torch.bmm(q, k.transpose(1, 2)) * 0.17 + self.position_bias).softmax(-1)
        x = x + self.proj(torch.bmm(attention, v))
        x = x + self.gamma * self.fc2(F.gelu(self.fc1(x)))
        return self.head(mean_tokens(x))


def _tiny(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return _TinyViT(**kwargs).eval()


def _spec(mode="static", calibration=None, **changes) -> QuantSpec:
    return QuantSpec(mode=mode, calibration=calibration, **changes)


def _linears(graph: torch.fx.GraphModule) -> dict[str, bool]:
    """Each linear of a converted graph: True when it reads a dequantized (int8) input."""
    found = {}
    for node in graph.graph.nodes:
        if node.target == torch.ops.aten.linear.default:
            path = pt2e._module_stack(node)[-1][0]
            found[path] = "dequantize" in str(node.args[0].target)
    return found


# -------------------------------------------------------------------- the spec reaches the graph

def test_op_kinds_are_found_in_the_graph():
    graph = pt2e.export_graph(_tiny(), torch.randn(1, 3, 16, 16))
    constness = pt2e._Constness()
    kinds = {}
    for node in graph.graph.nodes:
        kind = pt2e.op_kind(node, constness)
        if kind:
            kinds.setdefault(kind, []).append(str(node.target))
    assert kinds["norm"] == ["aten.layer_norm.default"]
    assert kinds["softmax"] == ["aten.softmax.int"]
    assert kinds["activation"] == ["aten.gelu.default"]
    assert kinds["residual_add"] == ["aten.add.Tensor"] * 2
    assert kinds["attention_bias_add"] == ["aten.add.Tensor"]
    # q·kᵀ, its scaling by a constant, and attn·v; the layer scale (× gamma) is no attention product.
    assert kinds["attention_matmul"] == ["aten.bmm.default", "aten.mul.Tensor", "aten.bmm.default"]
    assert kinds["pooling"] == ["aten.mean.dim"]


def test_float_ops_and_float_modules_stay_float():
    model, calibration = _tiny(), torch.randn(4, 3, 16, 16)
    everything = pt2e.quantize(model, calibration[:1], _spec(calibration=calibration))
    assert _linears(everything.graph_module) == {"qkv": True, "proj": True, "fc1": True, "fc2": True, "head": True}

    spec = _spec(calibration=calibration, float_ops=("residual_add", "attention_bias_add"), float_modules=("head", "fc*"))
    kept = pt2e.quantize(model, calibration[:1], spec)
    # fc2 reads a float GELU output, so it is float anyway; head is float by name.
    assert _linears(kept.graph_module) == {"qkv": True, "proj": True, "fc1": False, "fc2": False, "head": False}
    # A float add's result flows on unquantized (the residual stream stays float); only the inputs of
    # int8 ops after it are quantized.
    for program, float_adds in ((everything, False), (kept, True)):
        adds = [n for n in program.graph_module.graph.nodes if n.target == torch.ops.aten.add.Tensor]
        assert len(adds) == 3
        assert all(any("quantize" not in str(user.target) for user in add.users) for add in adds) == float_adds
    details = kept.details
    assert details["float_modules"] == ["fc1", "fc2", "head"] and details["float_modules_unmatched"] == []
    kept = details["kept_float_nodes"]
    assert kept["float_ops:residual_add"] == 2 and kept["float_ops:attention_bias_add"] == 1 and kept["float_modules"] == 3
    assert details["pt2e_ops"]["quantize_per_tensor"] < everything.details["pt2e_ops"]["quantize_per_tensor"]
    assert "softmax" in details["always_float"]


def test_calibration_methods_give_working_programs():
    model, calibration = _tiny(), torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        reference = model(calibration).numpy()
    for method, described in (("minmax", "min/max"), ("percentile", "percentile"), ("entropy", "HistogramObserver")):
        program = pt2e.quantize(model, calibration[:1], _spec(calibration=calibration, method=method, float_modules=("head",)))
        figures = compare_outputs(reference, pt2e.run_graph(program.graph_module, calibration).numpy())
        assert figures["cosine"] > 0.98, method
        assert described in program.details["activations"]
    # The percentile range ignores a lone outlier that min/max would stretch every step for.
    observer = pt2e._percentile_observer()(dtype=torch.int8, quant_min=-128, quant_max=127)
    values = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    values[0] = 100.0
    observer(values)
    assert 3.5 < float(observer.max_val) < 4.5 and -4.5 < float(observer.min_val) < -3.5


def test_bad_quantization_inputs_are_one_clear_error(tmp_path):
    model = _tiny()
    with pytest.raises(EdgevitError, match="needs a quantization spec"):
        executorch.export(model, torch.randn(1, 3, 16, 16), "int8", XNNPACK, tmp_path)
    with pytest.raises(EdgevitError, match="lowered to XNNPACK, not coreml"):
        executorch.export(model, torch.randn(1, 3, 16, 16), "int8", {"backend": "coreml"}, tmp_path,
                          quant=_spec("dynamic"))
    with pytest.raises(EdgevitError, match="calibration images have shape"):
        pt2e.quantize(model, torch.randn(1, 3, 16, 16), _spec(calibration=torch.randn(2, 3, 32, 32)))
    convolutions_only = nn.Sequential(nn.Conv2d(3, 8, 3)).eval()
    with pytest.raises(EdgevitError, match="dynamic int8 quantizes linear layers, and Sequential has none"):
        pt2e.quantize(convolutions_only, torch.randn(1, 3, 16, 16), _spec("dynamic"))
    with pytest.raises(EdgevitError, match="needs the fine-tuned model"):
        pt2e.quantize(model, torch.randn(1, 3, 16, 16), _spec("qat", calibration=torch.randn(2, 3, 16, 16)))
    with pytest.raises(EdgevitError, match="from iOS17/macOS14 on, not iOS16"):
        coreml.export(model, torch.randn(1, 3, 16, 16), "int8", {**COREML, "deployment_target": "iOS16"}, tmp_path,
                      quant=_spec(calibration=torch.randn(2, 3, 16, 16)))
    with pytest.raises(EdgevitError, match="pass the ExportResult of an int8 export"):
        coreml.precheck(None, _tiny(), torch.randn(1, 3, 16, 16), "int8")


# ----------------------------------------------------------------------- ExecuTorch, small models

def test_static_int8_lowers_whole_and_runs_like_the_pt2e_program(tmp_path):
    model, calibration = _tiny(), torch.randn(8, 3, 16, 16)
    spec = _spec(calibration=calibration, float_ops=("norm", "softmax"), float_modules=("head",))
    result = executorch.export(model, calibration[:1], "int8", XNNPACK, tmp_path, quant=spec)
    details = result.details
    assert details["dtype"] == "int8" and details["delegated_share"] == 1.0 and details["delegated_subgraphs"] == 1
    assert details["non_delegated_int8_ops"] == {}
    assert details["quantization"]["pt2e_ops"]["dequantize_per_channel"] == 5  # stem, qkv, proj, fc1, fc2 weights
    batch = torch.randn(5, 3, 16, 16)
    simulated = pt2e.run_graph(pt2e.quantize(model, calibration[:1], spec).graph_module, batch).numpy()
    got = runtimes.load("executorch", result.path, options=XNNPACK).run(batch.numpy())
    assert compare_outputs(simulated, got)["cosine"] > 0.999  # XNNPACK's int8 kernels = PT2E's numerics
    with torch.no_grad():
        assert compare_outputs(model(batch).numpy(), got)["cosine"] > 0.99
    # Weights stop at -127, so XNNPACK's int16 pair sums (Arm "mlal" kernels) cannot wrap.
    kernels = executorch.int8_exactness(result)
    assert kernels["not_exact_on"] == {} and kernels["checked_weights"] == 5


def test_a_minus_128_weight_is_named_as_not_exact_on_arm_without_dot_product():
    from edgevit.core.host import ARM_NO_DOT

    model, calibration = _tiny(), torch.randn(8, 3, 16, 16)
    program = pt2e.quantize(model, calibration[:1], _spec(calibration=calibration)).graph_module
    assert pt2e.kernel_exactness(program)["not_exact_on"] == {}
    stored = next(n for n in program.graph.nodes if n.op == "call_function" and "dequantize_per_channel" in str(n.target)).args[0]
    getattr(program, stored.target).view(-1)[0] = -128
    found = pt2e.kernel_exactness(program)
    assert list(found["not_exact_on"]) == [ARM_NO_DOT] and stored.target in found["not_exact_on"][ARM_NO_DOT]


class _PadBetweenLinears(nn.Module):
    """LeViT's query subsampling: linear → pad the token grid → strided pick → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = types.SimpleNamespace(name="pad")
        self.fc1, self.fc2 = nn.Linear(3, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.fc1(x.permute(0, 2, 3, 1))  # (1, 7, 7, 16)
        grid = F.pad(grid, (0, 0, 0, 1, 0, 1))  # 8×8
        rows = grid.reshape(1, 4, 2 * 8 * 16)[:, :, : 8 * 16]
        cells = rows.reshape(1, 4, 4, 2 * 16)[..., :16]
        return self.fc2(cells.reshape(1, 16, 16)).flatten(1)


def test_a_pad_between_quantized_ops_loads_in_xnnpack(tmp_path):
    # Without the pad sharing its input's scale, ExecuTorch 1.5 builds an XNNPACK pad with a
    # float input and an int8 output, and the program fails to load.
    torch.manual_seed(0)
    model, calibration = _PadBetweenLinears().eval(), torch.randn(4, 3, 7, 7)
    result = executorch.export(model, calibration[:1], "int8", XNNPACK, tmp_path, quant=_spec(calibration=calibration))
    assert result.details["delegated_share"] == 1.0
    with torch.no_grad():
        expected = model(calibration[:1]).numpy()
    got = runtimes.load("executorch", result.path, options=XNNPACK).run(calibration[:1].numpy())
    assert compare_outputs(expected, got)["cosine"] > 0.99


class _ConvSiLU(nn.Module):
    """MobileViT v2's conv → SiLU → 1×1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = types.SimpleNamespace(name="convsilu")
        self.conv1, self.act, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


def _silu_nodes(graph: torch.fx.GraphModule) -> tuple[torch.fx.Node, torch.fx.Node]:
    sigmoid = next(n for n in graph.graph.nodes if n.target == torch.ops.aten.sigmoid.default)
    product = next(n for n in graph.graph.nodes if n.target == torch.ops.aten.mul.Tensor)
    return sigmoid, product


def test_silu_runs_as_an_int8_sigmoid_and_product_in_xnnpack(tmp_path):
    torch.manual_seed(0)
    model, calibration = _ConvSiLU().eval(), torch.randn(8, 3, 16, 16)
    exported = pt2e.export_graph(model, calibration[:1])
    sigmoid, product = _silu_nodes(exported)
    constness = pt2e._Constness()
    assert (pt2e.op_kind(sigmoid, constness), pt2e.op_kind(product, constness)) == ("activation", "activation")
    with torch.no_grad():  # the rewrite is SiLU's definition
        torch.testing.assert_close(exported(calibration[:1]), model(calibration[:1]), rtol=0, atol=1e-6)

    def is_int8(node: torch.fx.Node) -> bool:  # dequantized inputs, quantized output
        return (all("dequantize" in str(value.target) for value in node.all_input_nodes)
                and all("quantize_per_tensor" in str(user.target) for user in node.users))

    ops_by_float_ops = {}
    for float_ops in ((), ("activation",)):
        spec = _spec(calibration=calibration, float_ops=float_ops)
        sigmoid, product = _silu_nodes(pt2e.quantize(model, calibration[:1], spec).graph_module)
        assert is_int8(sigmoid) == is_int8(product) == (not float_ops)
        out_dir = tmp_path / "-".join(float_ops or ["int8"])
        out_dir.mkdir()
        result = executorch.export(model, calibration[:1], "int8", XNNPACK, out_dir, quant=spec)
        assert result.details["delegated_share"] == 1.0
        with torch.no_grad():
            expected = model(calibration).numpy()
        assert compare_outputs(expected, runtimes.load("executorch", result.path, options=XNNPACK).run(calibration.numpy()))["cosine"] > 0.999
        ops_by_float_ops[float_ops] = set(executorch_layers(result.path, threads=1, runs=1)["ops"])
    # XNNPACK's own op names (ETDump): its float sigmoid only where SiLU was kept float.
    assert "Sigmoid (NC)" in ops_by_float_ops[("activation",)]
    assert "Sigmoid (NC)" not in ops_by_float_ops[()], ops_by_float_ops[()]


def test_an_int8_head_collapses_small_logits_and_a_float_head_does_not(tmp_path):
    # Logits spanning less than int8's smallest scale (2⁻¹² here) come out as a few levels, as
    # stock LeViT's did on XNNPACK; the pipeline's collapse rule fails such an artifact.
    model, calibration = _tiny(head_scale=1e-4), torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        reference = model(calibration).numpy()
    spec = _spec(calibration=calibration, float_ops=("norm", "softmax"))
    result = executorch.export(model, calibration[:1], "int8", XNNPACK, tmp_path, quant=spec)
    figures = compare_outputs(reference, runtimes.load("executorch", result.path, options=XNNPACK).run(calibration.numpy()))
    assert figures["distinct_values"] <= 8 and collapse_failure(reference, figures) is not None, figures
    # With the head in float the logits keep their values (the PT2E program has XNNPACK's numerics,
    # see the test above).
    program = pt2e.quantize(model, calibration[:1], spec.with_changes(float_modules=("head",)))
    figures = compare_outputs(reference, pt2e.run_graph(program.graph_module, calibration).numpy())
    assert collapse_failure(reference, figures) is None and figures["cosine"] > 0.99, figures


def test_dynamic_int8_quantizes_linear_weights_and_runs(tmp_path):
    model = _tiny()
    result = executorch.export(model, torch.randn(1, 3, 16, 16), "int8", XNNPACK, tmp_path,
                               quant=_spec("dynamic", float_modules=("head",)))
    details = result.details
    assert details["quantization"]["mode"] == "dynamic" and details["delegated_share"] == 1.0
    ops = details["quantization"]["pt2e_ops"]
    # qkv, proj, fc1, fc2: linears only (not the stem conv, not the float head); input scales at run time.
    assert ops["dequantize_per_channel"] == 4 and ops["choose_qparams"] == 4
    batch = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(batch).numpy()
    assert compare_outputs(expected, runtimes.load("executorch", result.path, options=XNNPACK).run(batch.numpy()))["cosine"] > 0.99


# --------------------------------------------------------------------------- Core ML, small model

def test_coreml_w8_and_w8a8_hold_int8_and_pass_their_precheck(tmp_path):
    model, calibration = _tiny(), torch.randn(6, 3, 16, 16)
    w8 = coreml.export(model, calibration[:1], "int8", COREML, tmp_path / "w8",
                       quant=_spec("dynamic", float_modules=("head",)))
    facts = w8.details["int8"]
    large = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
             and m.weight.numel() > coreml.W8_WEIGHT_THRESHOLD and name != "head"]
    assert large == ["qkv"] and facts["int8_weight_tensors"] == 1 and facts["quantize_ops"] == 0
    assert w8.details["quantization"]["float_weights"] == ["head.weight"] and w8.details["compute_precision"] == "fp16"
    check = coreml.precheck(w8, model, calibration, "int8")
    assert check.name.startswith("W8 pre-check") and not check.failures
    assert compare_outputs(check.reference, check.candidate)["cosine"] > 0.999

    w8a8 = coreml.export(model, calibration[:1], "int8", COREML, tmp_path / "w8a8",
                         quant=_spec(calibration=calibration, float_ops=("norm", "softmax"), float_modules=("head",)))
    facts = w8a8.details["int8"]
    # stem, qkv, proj, fc1, fc2 weights, and the constant operands of the int8 bias add and layer scale.
    assert facts["int8_weight_tensors"] == 7 and facts["quantize_ops"] > 0 and facts["dequantize_ops"] > 0
    assert w8a8.details["op_counts"]["constexpr_affine_dequantize"] == 7
    check = coreml.precheck(w8a8, model, calibration, "int8")
    assert check.name.startswith("W8A8 pre-check") and not check.failures
    assert compare_outputs(check.reference, check.candidate)["cosine"] > 0.99


# ------------------------------------------------------------------------------- every family

SMALLEST = [
    ("mobilevitv2_050", "timm__mobilevitv2_050"),
    ("efficientformer_l1", "timm__efficientformer_l1"),
    ("levit_128s", "timm__levit_128s"),
    ("edgevit_xxs", "saic__edgevit_xxs"),
]
# Worst-sample cosine and top-1 agreement with float32 on 8 photo crops, calibrated on 16 others
# with the family's recipe defaults (minmax), reference weights. Measured, ExecuTorch static /
# Core ML W8A8 cosine, top-1: MobileViT v2 0.986 / 0.986, 5-6 of 8 (near-tied logits);
# EfficientFormer 0.9997 / 0.9997, 7 of 8; LeViT 0.972 / 0.973, 6 of 8; EdgeViT 0.997 / 0.998, 8 of 8.
# Bounds leave a margin (other CPUs' int8 kernels round differently).
STATIC_BOUNDS = {"mobilevitv2_050": (0.96, 0.375), "efficientformer_l1": (0.995, 0.625),
                 "levit_128s": (0.94, 0.5), "edgevit_xxs": (0.99, 0.75)}
# Core ML W8 cosine, measured: MobileViT v2 0.992, EfficientFormer 0.9999, LeViT 0.9985, EdgeViT 0.9997.
W8_MIN_COSINE = {"mobilevitv2_050": 0.98, "efficientformer_l1": 0.995, "levit_128s": 0.995, "edgevit_xxs": 0.995}


def _family(name: str, stem: str, tmp_path: Path):
    eval_model = create_model(name)
    load_checkpoint(eval_model, str(write_as_published(stem, tmp_path)))
    cfg = eval_model.cfg
    return eval_model, to_deploy(eval_model), photo_crops(cfg, 16, seed=0), photo_crops(cfg, 8, seed=1)


def _family_spec(cfg, mode: str, calibration: torch.Tensor | None) -> QuantSpec:
    return QuantSpec(**quant_settings(cfg.family, {"mode": mode}), calibration=calibration)


@pytest.mark.slow
@pytest.mark.parametrize("name,stem", SMALLEST)
def test_static_int8_of_every_family_is_fully_delegated_and_agrees_with_float(name, stem, tmp_path):
    eval_model, deploy, calibration, verification = _family(name, stem, tmp_path)
    result = executorch.export(deploy, verification[:1], "int8", XNNPACK, tmp_path,
                               quant=_family_spec(eval_model.cfg, "static", calibration))
    details = result.details
    assert details["delegated_subgraphs"] == 1 and details["delegated_share"] == 1.0
    assert details["non_delegated_ops"] == {} and details["non_delegated_int8_ops"] == {}
    with torch.no_grad():
        reference = eval_model(verification).numpy()
    figures = compare_outputs(reference, runtimes.load("executorch", result.path, options=XNNPACK).run(verification.numpy()))
    min_cosine, min_top1 = STATIC_BOUNDS[name]
    assert figures["cosine"] >= min_cosine and figures["top1_agreement"] >= min_top1, figures
    assert collapse_failure(reference, figures) is None


@pytest.mark.slow
@pytest.mark.parametrize("name,stem", SMALLEST)
def test_coreml_w8_and_w8a8_of_every_family_convert_and_pass_the_precheck(name, stem, tmp_path):
    eval_model, deploy, calibration, verification = _family(name, stem, tmp_path)
    for mode, scheme, min_cosine in (("dynamic", "W8", W8_MIN_COSINE[name]), ("static", "W8A8", STATIC_BOUNDS[name][0])):
        result = coreml.export(deploy, verification[:1], "int8", COREML, tmp_path / mode,
                               quant=_family_spec(eval_model.cfg, mode, calibration))
        facts = result.details["int8"]
        assert facts["scheme"].startswith(scheme) and facts["int8_weight_tensors"] >= 10
        assert (facts["quantize_ops"] > 0) == (mode == "static")
        check = coreml.precheck(result, deploy, verification, "int8")
        assert not check.failures
        figures = compare_outputs(check.reference, check.candidate)
        assert figures["finite"] and figures["cosine"] >= min_cosine, (mode, figures)


@pytest.mark.slow
def test_dynamic_int8_of_levit_is_fully_delegated_and_agrees_with_float(tmp_path):
    # LeViT is linear layers throughout: the family dynamic int8 is for (measured cosine 0.9987).
    eval_model, deploy, _calibration, verification = _family("levit_128s", "timm__levit_128s", tmp_path)
    result = executorch.export(deploy, verification[:1], "int8", XNNPACK, tmp_path,
                               quant=_family_spec(eval_model.cfg, "dynamic", None))
    assert result.details["delegated_share"] == 1.0 and result.details["delegated_subgraphs"] == 1
    assert result.details["quantization"]["pt2e_ops"]["choose_qparams"] == 46  # every linear but the float head
    with torch.no_grad():
        reference = eval_model(verification).numpy()
    figures = compare_outputs(reference, runtimes.load("executorch", result.path, options=XNNPACK).run(verification.numpy()))
    assert figures["cosine"] >= 0.99, figures
