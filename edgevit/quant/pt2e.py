"""PT2E int8: ``torch.export`` → ``prepare_pt2e`` (or ``prepare_qat_pt2e``) → calibrate (or
fine-tune) → ``convert_pt2e``, driven by a :class:`~edgevit.quant.spec.QuantSpec`.

The converted program (quantize/dequantize ops around float ATen ops) is what the ExecuTorch
target lowers to XNNPACK and what the Core ML target converts to a W8A8 ML program, so both
targets, and QAT, share one quantizer: ExecuTorch's ``XNNPACKQuantizer`` with its symmetric int8
configuration (int8 weights, symmetric, per output channel or per tensor; int8 activations, affine,
per tensor), its annotators (conv, linear, add, mul, cat, adaptive average pool, and the
shape ops between them sharing their input's scale), changed here in four ways:

- the spec's float op kinds and float modules become a node filter that the annotators and the
  scale propagation both respect (ExecuTorch's propagation ignores filters, and its
  ``set_module_name(name, None)`` refuses ``None``);
- shape ops on tensors of rank > 5 stay float (see ``MAX_QUANTIZED_RANK``);
- SiLU is written as ``x * sigmoid(x)`` (:func:`silu_as_sigmoid_product`), so the mul pattern makes
  the product int8 and the sigmoid sits between a dequantize and a quantize, which ExecuTorch's
  XNNPACK delegate runs as an int8 lookup table, instead of a float sigmoid and a float product
  with conversions around them (MobileViT v2-050's int8 .pte: 5.14 → 3.97 ms, 2 threads, 224²);
- ``constant_pad_nd`` shares its input's scale. Otherwise a zero pad between a dequantize and a
  float op makes ExecuTorch 1.5's ``InsertPadQDQPass`` give XNNPACK a pad with a float input and
  an int8 output, which fails at load time (``Failed to create StaticConstantPad node``; LeViT's
  query subsampling pads its 7×7 grid to 8×8).

What the quantizer cannot express is stated in :func:`quantizer_details` (e.g. softmax, GELU and
the attention matmuls have no int8 pattern here: they always stay float).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import fnmatch
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from edgevit.core.errors import EdgevitError
from edgevit.core.quiet import quiet
from edgevit.quant.spec import QuantSpec

QUANTIZER_NAME = "executorch XNNPACKQuantizer (symmetric int8), edgevit node filter"
# The 99.99th percentile of each calibration image's values (ONNX Runtime's percentile method
# uses a similar tail; a few outliers then saturate instead of widening every step).
PERCENTILE = 99.99

_Q_KEY = "quantization_annotation"
# Shape ops on tensors of higher rank (MobileViT v2's 6-D patching) stay float: Core ML tensors
# have rank ≤ 5, and coremltools folds such reshape/transpose chains away only when no
# quantize op sits inside them.
MAX_QUANTIZED_RANK = 5
_PAD_OPS = {torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default}
_ADD_OPS = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_MUL_OPS = {torch.ops.aten.mul.Tensor, torch.ops.aten.mul_.Tensor}
_MATMUL_OPS = {torch.ops.aten.bmm.default, torch.ops.aten.matmul.default, torch.ops.aten.mm.default}
_SOFTMAX_OPS = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}
_ACTIVATION_OPS = {torch.ops.aten.gelu.default, torch.ops.aten.hardswish.default, torch.ops.aten.silu.default,
                   torch.ops.aten.relu.default, torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default,
                   torch.ops.aten.relu_.default, torch.ops.aten.sigmoid.default}
_POOLING_OPS = {torch.ops.aten.adaptive_avg_pool2d.default, torch.ops.aten.avg_pool2d.default,
                torch.ops.aten.mean.dim, torch.ops.aten.mean.default}
_VIEW_OPS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.transpose.int,
             torch.ops.aten.permute.default, torch.ops.aten.unsqueeze.default, torch.ops.aten.flatten.using_ints}
_NORM_OPS = {torch.ops.aten.layer_norm.default, torch.ops.aten.group_norm.default,
             torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit_no_training.default}
# Modules that are a normalisation: nn's own, and edgevit's decomposed forms for XNNPACK
# (edgevit.models.layers.decompose_norms), whose statistics are a linear/conv by a 1/C constant.
_NORM_MODULE_TYPES = ("LayerNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "LayerNormAsMatmul", "GroupNorm1AsConv")

# Kinds the quantizer never makes int8, whatever the spec says (no int8 pattern for them).
ALWAYS_FLOAT = {
    "softmax": "no int8 softmax pattern in XNNPACKQuantizer",
    "attention_matmul": "q·kᵀ and attn·v (bmm) have no int8 pattern; the muls of attention (q·kᵀ scaling, "
                        "MobileViT v2's context product) are int8 unless attention_matmul is a float op",
    "activation": "GELU and Hardswish have no int8 pattern; ReLU/hardtanh are int8 (fused or sharing scales), SiLU "
                  "is int8 as x·sigmoid(x) unless activation is a float op",
    "norm": "no int8 layer/group norm; statistics (mean, variance) always stay float",
}


# ------------------------------------------------------------------------------- node kinds

def _module_stack(node: torch.fx.Node) -> list[tuple[str, str]]:
    """(path, type name) of each module the node ran in, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, kind in stack.values():
        if path.startswith("L['self']."):
            path = path[len("L['self']."):]
        type_name = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
        out.append((path, type_name.rsplit(".", 1)[-1]))
    return out


def _in_norm_module(node: torch.fx.Node) -> bool:
    return any(kind in _NORM_MODULE_TYPES for _, kind in _module_stack(node))


class _Constness:
    """Whether a node's value is fixed at export time (parameters, buffers and what is computed
    from them alone: a layer scale's ``gamma.view(...)``), memoised over the graph."""

    def __init__(self) -> None:
        self.memo: dict[torch.fx.Node, bool] = {}

    def __call__(self, value: Any) -> bool:
        if not isinstance(value, torch.fx.Node):
            return True
        if value not in self.memo:
            if value.op == "get_attr":
                self.memo[value] = True
            elif value.op == "call_function":
                self.memo[value] = all(self(arg) for arg in value.all_input_nodes)
            else:
                self.memo[value] = False
        return self.memo[value]


def _tensor_rank(value: Any) -> int:
    meta = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
    return meta.dim() if isinstance(meta, torch.Tensor) else 0


def op_kind(node: torch.fx.Node, is_constant: _Constness) -> str | None:
    """The OP_KINDS kind of an ATen node (``None`` for ops no kind names, e.g. conv, linear)."""
    if node.op != "call_function":
        return None
    target = node.target
    if target in _NORM_OPS or _in_norm_module(node):
        return "norm"
    if target in _SOFTMAX_OPS:
        return "softmax"
    if target in _ACTIVATION_OPS:
        return "activation"
    if target in _POOLING_OPS:
        return "pooling"
    if target in _MATMUL_OPS:
        return "attention_matmul"
    operands = list(node.args[:2])
    if target in _ADD_OPS and len(operands) == 2:
        constants = [is_constant(a) for a in operands]
        if not any(constants):
            return "residual_add"
        # A learned table over query/key positions (rank ≥ 2) added to attention logits.
        if any(c and _tensor_rank(a) >= 2 for c, a in zip(constants, operands)):
            return "attention_bias_add"
    if target in _MUL_OPS and len(operands) == 2:
        if _is_silu_product(operands):
            return "activation"
        variable = [a for a in operands if not is_constant(a)]
        # Two activations multiplied (MobileViT v2's context scores × keys), or q·kᵀ scaled by a
        # constant: both are part of the attention product.
        if len(variable) == 2 or (variable and _produced_by(variable[0], _MATMUL_OPS)):
            return "attention_matmul"
    return None


def _is_silu_product(operands: list) -> bool:
    """``x * sigmoid(x)`` (either order)."""
    for value, gate in (operands, operands[::-1]):
        if (isinstance(gate, torch.fx.Node) and gate.op == "call_function"
                and gate.target == torch.ops.aten.sigmoid.default and gate.args[0] is value):
            return True
    return False


def silu_as_sigmoid_product(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite every SiLU as ``x * sigmoid(x)``, in place (same values: it is SiLU's definition).

    The XNNPACK quantizer has no SiLU pattern, so a SiLU stays float between a dequantize and a
    quantize, and ExecuTorch's XNNPACK lowering splits it into a float sigmoid and a float multiply
    anyway. Written as a product, the mul pattern makes it int8 (both operands and the output),
    leaving the sigmoid with int8 on both sides.
    """
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.silu.default:  # export graphs are functional
            continue
        with graph.inserting_after(node):
            gate = graph.call_function(torch.ops.aten.sigmoid.default, (node.args[0],))
        with graph.inserting_after(gate):
            product = graph.call_function(torch.ops.aten.mul.Tensor, (node.args[0], gate))
        for created in (gate, product):
            created.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "val")}
        node.replace_all_uses_with(product)
        graph.erase_node(node)
    graph.lint()
    graph_module.recompile()
    return graph_module


def _produced_by(node: torch.fx.Node, targets: set, hops: int = 3) -> bool:
    """Whether ``node`` is the output of one of ``targets``, looking through a few views."""
    for _ in range(hops + 1):
        if node.op != "call_function":
            return False
        if node.target in targets:
            return True
        if node.target not in _VIEW_OPS or not isinstance(node.args[0], torch.fx.Node):
            return False
        node = node.args[0]
    return False


def _is_norm_statistic(node: torch.fx.Node) -> bool:
    """A decomposed norm's mean/variance (a linear/conv by the 1/C constant, or the mean feeding it)."""
    if not _in_norm_module(node) or node.op != "call_function":
        return False
    return node.target in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default,
                           torch.ops.aten.mean.dim, torch.ops.aten.rsqrt.default)


@dataclasses.dataclass
class FloatPlan:
    """Which nodes of a graph stay float and why (for the filter and the manifest)."""

    float_ops: tuple[str, ...]
    module_patterns: tuple[str, ...]
    module_names: tuple[str, ...]
    kept: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self._constness = _Constness()
        self._decisions: dict[torch.fx.Node, bool] = {}

    def quantizable(self, node: torch.fx.Node) -> bool:
        """False when the node must stay float: a float op kind, a float module, a norm statistic."""
        if node not in self._decisions:
            reason = self._float_reason(node)
            if reason:
                self.kept[reason] += 1
            self._decisions[node] = reason is None
        return self._decisions[node]

    def _float_reason(self, node: torch.fx.Node) -> str | None:
        if node.op != "call_function":
            return None
        if self.module_names:
            paths = {path for path, _ in _module_stack(node)}
            if any(name in paths for name in self.module_names):
                return "float_modules"
        kind = op_kind(node, self._constness)
        if kind in self.float_ops:
            return f"float_ops:{kind}"
        if _is_norm_statistic(node):
            return "norm statistics"
        return None


# ---------------------------------------------------------------------------------- observers

def _observer(method: str, qat: bool, dynamic: bool):
    """The activation observer constructor for a calibration method (None: the config's own)."""
    from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver

    if qat or dynamic:
        return None  # QAT: moving-average fake-quant; dynamic: ranges taken at run time
    if method == "minmax":
        return MinMaxObserver
    if method == "percentile":
        return _percentile_observer()
    return HistogramObserver  # "entropy"


_PERCENTILE_OBSERVER = None


def _percentile_observer():
    """A MinMaxObserver whose range is the per-image ``PERCENTILE`` tails, widest over images."""
    global _PERCENTILE_OBSERVER
    if _PERCENTILE_OBSERVER is not None:
        return _PERCENTILE_OBSERVER
    from torchao.quantization.pt2e import MinMaxObserver

    class PercentileObserver(MinMaxObserver):
        def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
            if x_orig.numel() == 0:
                return x_orig
            x = x_orig.detach().to(self.min_val.dtype).flatten()
            tail = (100.0 - PERCENTILE) / 100.0
            k_low = max(1, int(tail * x.numel()))
            k_high = max(1, x.numel() - k_low + 1)
            low, high = x.kthvalue(k_low).values, x.kthvalue(k_high).values
            self.min_val.copy_(torch.minimum(low, self.min_val))
            self.max_val.copy_(torch.maximum(high, self.max_val))
            return x_orig

    _PERCENTILE_OBSERVER = PercentileObserver
    return PercentileObserver


def quantization_config(spec: QuantSpec, *, qat: bool = False):
    """ExecuTorch's symmetric int8 config for the spec's mode, per-channel choice and method."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    dynamic = spec.mode == "dynamic"
    config = get_symmetric_quantization_config(is_per_channel=spec.per_channel, is_qat=qat, is_dynamic=dynamic)
    observer = _observer(spec.method, qat, dynamic)
    if observer is None:
        return config
    activation = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=observer.with_args(eps=2 ** -12))
    return dataclasses.replace(config, input_activation=activation, output_activation=activation)


def make_quantizer(spec: QuantSpec, model: nn.Module, *, qat: bool = False):
    """The quantizer for ``spec`` over ``model`` (the module that is exported): returns
    ``(quantizer, plan)``; ``plan.kept`` counts the nodes kept float, once annotation ran."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import _is_share_obs_or_fq_op
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    names = spec.float_module_names(model)
    plan = FloatPlan(tuple(spec.float_ops), tuple(spec.float_modules), tuple(names))

    class EdgevitQuantizer(XNNPACKQuantizer):
        # Deploy forms hold no BatchNorm (to_deploy fuses it, or refuses): skip the conv+BN
        # patterns, whose matching traces a dozen pattern graphs on every prepare (seconds each).
        SUPPORTED_PATTERNS = [p for p in XNNPACKQuantizer.SUPPORTED_PATTERNS if "_bn" not in p.name]

        def annotate(self, graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
            self._annotate_for_quantization_config(graph_module)
            _propagate_shared_scales(graph_module, plan.quantizable)
            return graph_module

    def _propagate_shared_scales(graph_module: torch.fx.GraphModule, quantizable: Callable) -> None:
        # ExecuTorch's propagate_annotation, plus constant pads, minus filtered nodes.
        for node in graph_module.graph.nodes:
            if node.op != "call_function" or not (_is_share_obs_or_fq_op(node.target) or node.target in _PAD_OPS):
                continue
            source = node.args[0]
            if not isinstance(source, torch.fx.Node) or not quantizable(node):
                continue
            if _tensor_rank(node) > MAX_QUANTIZED_RANK:
                continue
            annotation = source.meta.get(_Q_KEY)
            if annotation is None or annotation.output_qspec is None:
                continue
            if _Q_KEY in node.meta and node.meta[_Q_KEY]._annotated:
                continue
            shared = SharedQuantizationSpec(source)
            node.meta[_Q_KEY] = QuantizationAnnotation(input_qspec_map={source: shared}, output_qspec=shared,
                                                       _annotated=True)

    quantizer = EdgevitQuantizer()
    if spec.mode == "dynamic":
        # Linear layers only: ExecuTorch 1.5's XNNPACK runs dynamically quantized convolutions alone,
        # but fails at run time ("Propagating input shapes failed") on a second one after a reshape
        # round trip, as MobileViT v2's patching and EdgeViT's token reshapes make.
        quantizer.set_operator_type(torch.ops.aten.linear.default, quantization_config(spec))
    else:
        quantizer.set_global(quantization_config(spec, qat=qat))
    quantizer.set_filter_function(plan.quantizable)
    return quantizer, plan


def quantizer_details(spec: QuantSpec, plan: FloatPlan, *, qat: bool = False) -> dict[str, Any]:
    """The quantizer configuration and what stayed float, for the manifest."""
    dynamic = spec.mode == "dynamic"
    if qat:
        activations = "int8 affine per tensor, fake-quantized with moving-average min/max during fine-tuning"
    elif dynamic:
        activations = "int8 affine per tensor, range computed at run time (linear inputs only)"
    else:
        observer = {"minmax": "min/max over the calibration images",
                    "percentile": f"{PERCENTILE}th percentile tails per image, widest over the images",
                    "entropy": "torchao HistogramObserver (range minimising the L2 quantization error over a "
                               "histogram; PT2E's stand-in for entropy calibration, not KL divergence)"}[spec.method]
        activations = f"int8 affine per tensor, {observer}"
    always = {k: v for k, v in ALWAYS_FLOAT.items() if k not in spec.float_ops}
    return {
        "quantizer": QUANTIZER_NAME,
        "mode": spec.mode,
        "weights": f"int8 symmetric [-127, 127], {'per output channel' if spec.per_channel else 'per tensor'}",
        "activations": activations,
        "patterns": "linear (dynamic)" if dynamic else
                    "conv(+relu), linear(+relu), add(+relu), mul(+relu) (SiLU as x·sigmoid(x)), cat, adaptive_avg_pool2d; shape ops, "
                    "ReLU, mean and constant pads share their input's scale",
        "float_ops": list(spec.float_ops),
        "float_modules": list(plan.module_names),
        # Patterns that named no module of this model (a recipe shared by several sizes may have them).
        "float_modules_unmatched": [p for p in plan.module_patterns
                                    if not any(fnmatch.fnmatchcase(n, p) for n in plan.module_names)],
        # Nodes an int8 pattern matched that the spec kept float, by reason.
        "kept_float_nodes": dict(sorted(plan.kept.items())),
        "always_float": always,
    }


# ---------------------------------------------------------------------------- the PT2E steps

def export_graph(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``torch.export`` of ``model`` at the example's (static) shape, as a GraphModule for PT2E."""
    with quiet():
        graph_module = torch.export.export(model.eval(), (example.contiguous(),)).module()
    return silu_as_sigmoid_product(graph_module)


def prepare(model: nn.Module, example: torch.Tensor, spec: QuantSpec, *, qat: bool = False):
    """Export ``model`` and insert observers (or fake-quant modules for QAT): ``(prepared, plan)``."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    graph = export_graph(model, example)
    quantizer, plan = make_quantizer(spec, model, qat=qat)
    with quiet():
        prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(graph, quantizer)
    return prepared, plan


def calibrate(prepared: torch.fx.GraphModule, calibration: torch.Tensor, batch: int = 1) -> None:
    """Run the calibration images through the observers (``batch`` at a time: the export's batch)."""
    with torch.no_grad():
        for start in range(0, len(calibration), batch):
            prepared(calibration[start:start + batch].contiguous())


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    with quiet():
        return convert_pt2e(prepared)


@dataclasses.dataclass
class QuantizedProgram:
    """A converted PT2E graph (float ops between quantize/dequantize ops) and what it holds."""

    graph_module: torch.fx.GraphModule
    details: dict[str, Any]


def quantize(model: nn.Module, example: torch.Tensor, spec: QuantSpec) -> QuantizedProgram:
    """The converted program for ``spec``: static (calibrated on ``spec.calibration``), dynamic
    (no calibration), or qat (``spec.qat_model``, already converted by :mod:`edgevit.quant.qat`)."""
    example = example[:1]
    if spec.mode == "qat":
        if spec.qat_model is None:
            raise EdgevitError("qat quantization needs the fine-tuned model (QuantSpec.qat_model from "
                               "edgevit.quant.qat.run_qat); run QAT first")
        graph = spec.qat_model
        details = dict(getattr(graph, "edgevit_quantization", None) or {"quantizer": QUANTIZER_NAME, "mode": "qat"})
    else:
        prepared, plan = prepare(model, example, spec)
        # Weight observers see the weights only in a forward pass: dynamic needs one too, or every
        # weight gets the observers' empty default scale.
        calibrate(prepared, _checked_calibration(spec.calibration, example) if spec.mode == "static" else example)
        graph = convert(prepared)
        details = quantizer_details(spec, plan)
    details["pt2e_ops"] = qdq_counts(graph)
    if not any(details["pt2e_ops"].values()):
        if spec.mode == "dynamic":
            raise EdgevitError(f"dynamic int8 quantizes linear layers, and {type(model).__name__} has none outside "
                               "float_modules; use static int8 (calibrated) for its convolutions")
        raise EdgevitError("the quantizer found nothing to quantize (every op is kept float or has no int8 "
                           "pattern); keep fewer float_ops/float_modules")
    return QuantizedProgram(graph, details)


def kernel_exactness(graph_module: torch.fx.GraphModule) -> dict[str, Any]:
    """Which classes of CPU (``edgevit.core.host.INT8_KERNEL_CLASSES``) run a converted program's int8
    exactly in XNNPACK. Its x86 kernels widen to 16 bits before multiplying (SSE/AVX2/AVX-512) or
    use VNNI; on Arm without dot product its "mlal" GEMMs and "mla8" depthwise convolutions add
    two s8·s8 products in an int16, which wraps only for (-128)·(-128), and the quantizer's
    weights stop at -127. So the program is exact everywhere unless a stored weight is -128."""
    from edgevit.core.host import ARM_NO_DOT, INT8_KERNEL_CLASSES

    checked, minus_128 = 0, []
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or "dequantize_per" not in str(node.target) or not node.args:
            continue
        stored = node.args[0]
        # Only weights pair up in a dot product; a constant quantized as an activation (a
        # position bias into an add) may use -128 freely.
        is_weight = any(user.op == "call_function" and any(k in str(user.target) for k in ("conv", "linear"))
                        and len(user.args) > 1 and user.args[1] is node for user in node.users)
        if getattr(stored, "op", None) != "get_attr" or not is_weight:
            continue
        weight = functools.reduce(getattr, stored.target.split("."), graph_module)
        if isinstance(weight, torch.Tensor) and weight.dtype == torch.int8:
            checked += 1
            if int(weight.min()) == -128:
                minus_128.append(stored.target)
    not_exact = {ARM_NO_DOT: f"{INT8_KERNEL_CLASSES[ARM_NO_DOT]}; {len(minus_128)} weights hold -128 "
                             f"(first {minus_128[0]})"} if minus_128 else {}
    return {"checked_weights": checked, "exact_on": [c for c in INT8_KERNEL_CLASSES if c not in not_exact],
            "not_exact_on": not_exact}


def _checked_calibration(calibration: torch.Tensor | None, example: torch.Tensor) -> torch.Tensor:
    if calibration is None or len(calibration) == 0:
        raise EdgevitError("static quantization needs calibration images: give --calib-data DIR")
    if tuple(calibration.shape[1:]) != tuple(example.shape[1:]):
        raise EdgevitError(f"calibration images have shape {tuple(calibration.shape[1:])}, the model takes "
                           f"{tuple(example.shape[1:])}; preprocess them with the model's own input size")
    return calibration.to(torch.float32)


def qdq_counts(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    """Quantize/dequantize ops in a converted graph, by kind."""
    counts: collections.Counter[str] = collections.Counter()
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and "quantized_decomposed" in str(node.target):
            name = str(node.target).split(".")[1]
            counts[name] += 1
    return dict(sorted(counts.items()))


def run_graph(graph_module: torch.fx.GraphModule, batch: torch.Tensor) -> torch.Tensor:
    """A static-batch-1 graph over a batch, one sample at a time."""
    with torch.no_grad():
        return torch.cat([graph_module(batch[i:i + 1].contiguous()) for i in range(len(batch))])


def boundary_outputs(graph_module: torch.fx.GraphModule, images: torch.Tensor, modules: list[str]) -> dict[str, np.ndarray]:
    """Each of ``modules``' boundary value (:func:`boundary_nodes`) in a static-batch-1 graph over
    ``images``, in graph order (module name → float32 array, batch first)."""
    names_of: dict[torch.fx.Node, list[str]] = {}  # a module and its last child can end on one node
    for name, node in boundary_nodes(graph_module, modules).items():
        names_of.setdefault(node, []).append(name)
    order = [name for node in graph_module.graph.nodes for name in names_of.get(node, [])]
    found: dict[str, list[np.ndarray]] = {name: [] for name in order}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            value = super().run_node(node)
            if node in names_of and isinstance(value, torch.Tensor):
                for name in names_of[node]:
                    found[name].append(value.detach().float().numpy().copy())
            return value

    for i in range(len(images)):
        Recorder(graph_module).run(images[i:i + 1].contiguous())
    return {name: np.concatenate(found[name]) for name in order if len(found[name]) == len(images)}


def boundary_nodes(graph_module: torch.fx.GraphModule, modules: list[str]) -> dict[str, torch.fx.Node]:
    """module name → the node that is its output, for the ``modules`` the graph runs: the last node
    run inside the module (``nn_module_stack``); where that value is quantized on its way to the
    next block, the dequantized value the next block reads."""
    last: dict[str, torch.fx.Node] = {}
    wanted = set(modules)
    is_constant = _Constness()
    for node in graph_module.graph.nodes:
        # A weight's dequantize can come last in its module: only values computed from the input count.
        if node.op != "call_function" or is_constant(node):
            continue
        for path, _kind in _module_stack(node):
            if path in wanted:
                last[path] = node
    return {name: _as_next_block_reads(node) for name, node in last.items() if not _fused_with_its_activation(node)}


def _fused_with_its_activation(node: torch.fx.Node) -> bool:
    """An int8 op whose only reader is a ReLU-like activation quantized after it: the int8 program
    holds the value only after the activation (conv+ReLU is one int8 op), so it has no boundary."""
    users = list(node.users)
    return (len(users) == 1 and users[0].target in _FUSED_ACTIVATIONS
            and any("quantize_per_tensor" in str(u.target) for u in users[0].users)
            and any("dequantize" in str(i.target) for i in node.all_input_nodes))


_FUSED_ACTIVATIONS = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default, torch.ops.aten.hardtanh.default,
                      torch.ops.aten.hardtanh_.default}


def _as_next_block_reads(node: torch.fx.Node) -> torch.fx.Node:
    users = list(node.users)
    if len(users) == 1 and "quantize_per_tensor" in str(users[0].target):
        dequantized = [u for u in users[0].users if "dequantize_per_tensor" in str(u.target)]
        if dequantized:
            return dequantized[0]
    return node
