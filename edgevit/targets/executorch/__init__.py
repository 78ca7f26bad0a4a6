"""ExecuTorch target: ``torch.export`` → ``to_edge_transform_and_lower`` with the XNNPACK (or
Core ML) partitioner → ``.pte``, verified in ``executorch.runtime``.

The program has a static batch of 1 (the example's shape); the runner feeds a batch one sample
at a time. What the partitioner left outside the delegate is reported in the manifest: every op
it leaves out runs in ExecuTorch's portable kernels and splits the graph into more delegate
calls, so ``delegated_share`` and ``delegated_subgraphs`` say how well a deploy form suits the
backend.

``int8`` (XNNPACK only) comes from :mod:`edgevit.quant.pt2e`: the deploy model, norms decomposed
as for fp32, is quantized with PT2E (static: calibrated on ``quant.calibration``; dynamic: linear
weights int8, their inputs quantized at run time; qat: ``quant.qat_model`` as it is) and
the converted program is lowered the same way as fp32. The manifest adds the quantizer settings,
what stayed float, the PT2E graph's quantize/dequantize counts and the int8 ops (if any) that
the delegate left to ExecuTorch's portable kernels.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgevit.core.errors import EdgevitError
from edgevit.core.quiet import quiet
from edgevit.runtimes.executorch import BACKEND_NAMES
from edgevit.targets.base import ExportResult
from edgevit.targets.executorch.probe import lowering_input
from edgevit.quant import pt2e
from edgevit.quant.spec import QuantSpec

# Node names that are bookkeeping, not compute: a delegate call's outputs are unpacked by getitem.
_NOT_COMPUTE = frozenset({"getitem"})
# Core ML delegate settings: float32 compute (the only precision this target offers), all compute
# units, and the same minimum OS as the coreml target's default recipe.
COREML_DEPLOYMENT_TARGET = "iOS17"


def export(model: nn.Module, example: torch.Tensor, precision: str, options: dict[str, Any], out_dir: Path,
           quant: QuantSpec | None = None) -> ExportResult:
    backend = options["backend"]
    if precision not in ("fp32", "int8"):
        raise EdgevitError(f"the executorch target exports fp32 or int8, not {precision}")
    if precision == "int8" and backend != "xnnpack":
        raise EdgevitError(f"int8 for the executorch target is lowered to XNNPACK, not {backend}: use --backend "
                           "xnnpack, or the coreml target for 8-bit Core ML models")
    if precision == "int8" and quant is None:
        raise EdgevitError("int8 export needs a quantization spec (edgevit.quant.spec.QuantSpec)")
    name = model.cfg.name
    model, quantization = lowering_input(model, example, precision, backend, quant)
    with quiet():
        edge = lower(model, example, backend)
        stats = delegation_stats(edge.exported_program().graph_module)
        executorch_program = edge.to_executorch()
    path = out_dir / f"{name}.pte"
    path.write_bytes(executorch_program.buffer)
    details: dict[str, Any] = {"backend": backend, "static_batch": int(example.shape[0]),
                               "dtype": "int8" if quantization else "float32", **stats}
    if quantization:
        # Quantized ops the delegate did not take run in portable kernels, outside XNNPACK.
        details["non_delegated_int8_ops"] = {op: n for op, n in stats["non_delegated_ops"].items() if "quantize" in op}
        details["quantization"] = quantization
    if backend == "coreml":
        details |= {"coreml_compute_precision": "float32", "coreml_compute_units": "all",
                    "coreml_minimum_deployment_target": COREML_DEPLOYMENT_TARGET}
    # The converted program the .pte was lowered from: what int8_exactness reads.
    return ExportResult(path, details, evidence={"int8_program": model} if quantization else {})


def int8_exactness(result: ExportResult) -> dict[str, Any] | None:
    """For an int8 .pte, which CPUs XNNPACK runs it exactly on, read from the converted program
    it was lowered from (:func:`edgevit.quant.pt2e.kernel_exactness`); None for float ones."""
    program = result.evidence.get("int8_program")
    return pt2e.kernel_exactness(program) if program is not None else None


def program(model: nn.Module, example: torch.Tensor, backend: str) -> bytes:
    """``model`` lowered onto ``backend``: the .pte's bytes (how :mod:`.probe`'s graphs are run)."""
    with quiet():
        return lower(model, example, backend).to_executorch().buffer


def lower(model: nn.Module, example: torch.Tensor, backend: str):
    """``torch.export`` and ``to_edge_transform_and_lower`` onto ``backend``: the edge program
    manager, delegates in place (``.to_executorch()`` gives the program)."""
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(model, (example.contiguous(),))
    if backend != "xnnpack":
        return to_edge_transform_and_lower(program, partitioner=[_partitioner(backend)])
    with _without_pattern_tracing():
        return to_edge_transform_and_lower(
            program, transform_passes=[_softmax_on_rank3_pass()], partitioner=[_partitioner(backend)]
        )


@contextlib.contextmanager
def _without_pattern_tracing():
    """Skip two XNNPACK passes' pattern tracing, a quarter of the lowering time of a small model.

    ``ConvertToUpsampleBilinear2d`` and ``ConvertToSDPAPass`` first export and lower reference
    graphs of a decomposed bilinear resize and a decomposed attention (seconds, once per
    process), to fold such decompositions back into one XNNPACK op. Through
    ``to_edge_transform_and_lower`` the partitioner keeps ``upsample_bilinear2d`` whole, and
    edgevit's families write attention as bmm/softmax with biases rather than SDPA, so the
    patterns never match here; without them the passes leave the graph as it is.
    """
    try:
        from executorch.backends.xnnpack.partition.graphs import bilinear_2d, sdpa
    except ImportError:  # another layout of ExecuTorch: lower as it comes
        yield
        return
    saved = [(module, name, getattr(module, name, None)) for module, name in ((bilinear_2d, "get_graphs_dict"), (sdpa, "get_graphs"))]
    if any(original is None for _, _, original in saved):
        yield
        return
    bilinear_2d.get_graphs_dict, sdpa.get_graphs = dict, list
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def _softmax_on_rank3_pass():
    """A pass that runs every 4-D last-dim softmax on a 3-D view of its input.

    ExecuTorch 1.5's XNNPACK delegate keeps the output of a convolution in NHWC and lets the
    following ops work on it in that layout; its softmax does not account for that and
    normalises over the channels instead of the last logical dim (MobileViT v2's context
    scores, a softmax over the patches of a 1×1 conv's output, were off by more than the logits' own scale). A view
    is layout-sensitive, so the delegate converts back to NCHW before it: correct, and still
    fully delegated.
    """
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import ExportPass

    softmax, view = exir_ops.edge.aten._softmax.default, exir_ops.edge.aten.view_copy.default

    class SoftmaxOnRank3(ExportPass):
        def call_operator(self, op, args, kwargs, meta):
            if op is not softmax:
                return super().call_operator(op, args, kwargs, meta)
            x, dim, half_to_float = args
            shape = list(x.to_tensor().shape)
            if len(shape) != 4 or dim not in (-1, 3):
                return super().call_operator(op, args, kwargs, meta)
            flat = super().call_operator(view, (x, [shape[0] * shape[1], shape[2], shape[3]]), {}, meta)
            out = super().call_operator(op, (flat, 2, half_to_float), kwargs, meta)
            return super().call_operator(view, (out, shape), {}, meta)

    return SoftmaxOnRank3()


def _partitioner(backend: str):
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return XnnpackPartitioner()
    if backend == "coreml":
        # Lowering converts each partition with coremltools (works on Linux too); only running
        # the result needs macOS.
        try:
            import coremltools as ct
            from executorch.backends.apple.coreml.compiler import CoreMLBackend
            from executorch.backends.apple.coreml.partition import CoreMLPartitioner
        except ImportError as exc:
            raise EdgevitError(
                f"--backend coreml needs coremltools and ExecuTorch's Core ML backend ({exc}): "
                "install them with  pip install -c constraints.txt -e \".[executorch,coreml]\""
            ) from None

        specs = CoreMLBackend.generate_compile_specs(
            compute_unit=ct.ComputeUnit.ALL,
            compute_precision=ct.precision.FLOAT32,
            minimum_deployment_target=getattr(ct.target, COREML_DEPLOYMENT_TARGET),
        )
        return CoreMLPartitioner(compile_specs=specs)
    raise EdgevitError(f"unknown executorch backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")


def delegation_stats(graph_module: torch.fx.GraphModule) -> dict[str, Any]:
    """How much of the lowered edge graph the delegate took, from ExecuTorch's own tooling.

    Counts are over the edge graph as the partitioner saw it (delegated ops are counted in each
    delegate's original subgraph); ``getitem`` nodes (unpacking a delegate's outputs) are left
    out of the totals, they compute nothing.
    """
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    outside = {op: b.non_delegated for op, b in sorted(info.delegation_by_operator.items())
               if b.non_delegated and op not in _NOT_COMPUTE}
    delegated = sum(b.delegated for op, b in info.delegation_by_operator.items() if op not in _NOT_COMPUTE)
    total = delegated + sum(outside.values())
    return {
        "delegated_subgraphs": info.num_delegated_subgraphs,
        "delegated_ops": delegated,
        "total_ops": total,
        "delegated_share": round(delegated / total, 4) if total else 0.0,
        "non_delegated_ops": outside,
    }
