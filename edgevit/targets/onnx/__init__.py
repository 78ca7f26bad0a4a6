"""ONNX target: torch.onnx export of the deploy model, onnxslim, optional float16 or int8
(:mod:`edgevit.targets.onnx.int8`), onnxruntime."""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgevit.core.errors import EdgevitError
from edgevit.core.quiet import quiet
from edgevit.quant.onnx_graph import name_nodes_by_module, node_module
from edgevit.targets.base import ExportResult

INPUT_NAME, OUTPUT_NAME = "input", "logits"

# Ops left in float32 in an fp16 graph: their reductions and exponentials overflow or lose the
# small differences that matter in float16 (the same ops the fp16 pre-checks flag).
# InstanceNormalization is what torch.onnx writes for GroupNorm (MobileViT v2's norms).
FP16_KEEP_FLOAT32 = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax", "ReduceMean",
                     "ReduceSum", "Pow", "Sqrt", "Erf")


def export(model: nn.Module, example: torch.Tensor, precision: str, options: dict[str, Any], out_dir: Path,
           quant=None) -> ExportResult:
    import onnx

    if precision == "int8" and quant is None:
        raise EdgevitError(f"ONNX int8 needs quantization settings: run  edgevit quantize {model.cfg.name} --target onnx")
    path = out_dir / f"{model.cfg.name}.onnx"
    quantization = None
    if precision == "int8" and quant.qat_model is not None:
        # QAT: the int8 program itself (batch 1, as converted), through the dynamo exporter (the one
        # that takes a torch.export graph); no onnxslim, whose constant folding could turn the int8
        # weights' DequantizeLinear into float weights; opset 20 keeps GELU one node.
        from edgevit.targets.onnx.int8 import GELU_OPSET, from_pt2e_program

        options = options | {"exporter": "dynamo", "dynamic_batch": False, "simplify": False,
                             "opset": max(options["opset"], GELU_OPSET)}
        _torch_export(quant.qat_model, example, path, options)
        graph = onnx.load(str(path))
        name_nodes_by_module(graph)  # inspect finds each module's output by these names
        int8 = from_pt2e_program(graph)
        graph, quantization = int8.model, int8.details
    else:
        _torch_export(model, example, path, options)
        graph = onnx.load(str(path))
        if precision == "int8" and options["exporter"] == "dynamo":
            # before onnxslim drops the metadata that says which module each node came from
            name_nodes_by_module(graph)
        if options["simplify"]:
            graph = _simplify(graph)
        if precision == "fp16":
            graph, _ = convert_to_float16(graph, keep_io_float32=not options["fp16_io"], keep_ops=FP16_KEEP_FLOAT32)
        elif precision == "int8":
            graph, quantization = _to_int8(graph, model, quant)
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))
    ops = collections.Counter(node.op_type for node in graph.graph.node)
    return ExportResult(path, {
        "exporter": options["exporter"], "opset": max(options["opset"], (quantization or {}).get("opset") or 0),
        "dynamic_batch": options["dynamic_batch"],
        "simplified": options["simplify"], "nodes": sum(ops.values()), "op_counts": dict(sorted(ops.items())),
        "io_dtype": "float16" if precision == "fp16" and options["fp16_io"] else "float32",
        **({"quantization": quantization} if quantization else {}),
    })


def int8_exactness(result: ExportResult) -> dict[str, Any] | None:
    """For an int8 artifact, which CPUs run it exactly, read from the file written
    (:func:`edgevit.targets.onnx.int8.kernel_exactness`); None for float ones."""
    import onnx

    from edgevit.targets.onnx.int8 import kernel_exactness

    return kernel_exactness(onnx.load(str(result.path))) if "quantization" in result.details else None


def _to_int8(graph, model: nn.Module, quant):
    from edgevit.targets.onnx.int8 import quantize_onnx

    modules = quant.float_module_names(model)
    if modules and not any(node_module(n.name) for n in graph.graph.node):
        raise EdgevitError("float_modules need module paths in the ONNX node names and this graph has none; "
                           "export with --exporter torchscript, or use float_ops instead")
    int8 = quantize_onnx(graph, quant, modules, INPUT_NAME, _full_range_modules(graph, model, quant, modules))
    return int8.model, int8.details


def _full_range_modules(graph, model: nn.Module, quant, float_modules: list[str]) -> list[str]:
    """The ``quant.full_range_weights`` layers (static int8) whose output moves most when only
    their weights are rounded to pair-safe int8, measured on 8 calibration images, among the
    graph's weighted nodes that will be quantized."""
    if quant.mode != "static" or not quant.full_range_weights or quant.calibration is None:
        return []
    from edgevit.targets.onnx.int8 import LINEAR_OPS
    from edgevit.quant.sensitivity import layer_sensitivity, pair_safe_fake_quant_weight

    weights = {t.name for t in graph.graph.initializer}
    kept_float = lambda name: any(name == m or name.startswith(m + ".") for m in float_modules)  # noqa: E731
    candidates = {node_module(n.name) for n in graph.graph.node
                  if n.op_type in LINEAR_OPS and len(n.input) > 1 and n.input[1] in weights} - {""}
    ranked = layer_sensitivity(model, quant.calibration[:8].float(), quantize_weight=pair_safe_fake_quant_weight,
                               quantize_input=False)
    return [r.module for r in ranked if r.module in candidates and not kept_float(r.module)][:quant.full_range_weights]


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path, options: dict[str, Any]) -> None:
    dynamic = options["dynamic_batch"]
    common = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=options["opset"])
    # The exporters narrate every step and warn about optional ops (torchvision's); what matters
    # to the user is reported by the pipeline instead.
    with quiet():
        if options["exporter"] == "dynamo":
            shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
            program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=shapes,
                                        external_data=False, verbose=False, **common)
            program.save(str(path), external_data=False)
        else:
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
            torch.onnx.export(model, (example,), str(path), dynamo=False, dynamic_axes=axes,
                              do_constant_folding=True, **common)


def _simplify(graph):
    import onnxslim

    with quiet():
        return onnxslim.slim(graph)


def convert_to_float16(graph, keep_io_float32: bool, keep_ops: tuple[str, ...], keep_nodes: list[str] = ()):
    """``graph`` in float16 except the ``keep_ops`` op types and ``keep_nodes`` node names, with the
    converter's output repaired (see below). Returns the graph and how many float16 round trips
    between kept float32 ops were removed (shared by the ONNX and TensorRT targets)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with quiet():
        converted = convert_float_to_float16(graph, keep_io_types=keep_io_float32, op_block_list=list(keep_ops),
                                             node_block_list=list(keep_nodes))
    round_trips = _drop_float16_round_trips(converted)
    _repair_node_order(converted.graph)
    return converted, round_trips


def _drop_float16_round_trips(model) -> int:
    """Bypass Cast(float16) → Cast(float32) pairs on float32 tensors: the converter puts one
    between two ops it keeps in float32, which would overflow exactly the values they were kept
    for. Returns how many float32 consumers now read the float32 tensor directly."""
    import onnx

    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in
             (*onnx.shape_inference.infer_shapes(model).graph.value_info, *graph.input)}
    types |= {t.name: t.data_type for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    bypassed: dict[str, str] = {}
    for node in graph.node:
        first = producer.get(node.input[0]) if cast_to(node) == onnx.TensorProto.FLOAT else None
        if first is not None and cast_to(first) == onnx.TensorProto.FLOAT16 and types.get(first.input[0]) == onnx.TensorProto.FLOAT:
            bypassed[node.output[0]] = first.input[0]
    if not bypassed:
        return 0
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        node.input[:] = [bypassed.get(name, name) for name in node.input]
    # Casts nothing reads any more (graph outputs excepted) go.
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in read]
        if not dead:
            return len(bypassed)
        for node in dead:
            graph.node.remove(node)


def _repair_node_order(graph) -> None:
    """Put producers before consumers and drop exact duplicate nodes.

    The converter appends its input casts at the end of the node list, and emits one identical
    Cast per use of an initializer shared by kept-float32 ops; ONNX needs a sorted SSA graph.
    """
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    seen: set[bytes] = set()
    pending, ordered = [], []
    for node in graph.node:
        key = node.SerializeToString()
        if key not in seen:
            seen.add(key)
            pending.append(node)
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise EdgevitError("the float16 ONNX graph has a dangling input; export fp32 instead")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)
