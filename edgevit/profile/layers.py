"""Per-layer profiles from the runtimes' own profilers, keyed by the model's module names.

- onnxruntime: its profiling JSON times every graph node; the torch.onnx exporter names nodes
  after the module scope that made them (``/stages/stages.0/stages.0.1/attn/MatMul``), which
  maps each node back to a module name, so ORT and the roofline estimate
  (:mod:`edgevit.profile.estimate`) line up module by module.
- ExecuTorch: its ETDump (``executorch.devtools.Inspector``) times every XNNPACK operator and
  every portable kernel, but names them by operator ("Fully Connected (NC, F32) GEMM #25"), not
  by module. An ETRecord does not help with XNNPACK: it maps ETDump events to graph nodes (and
  so to ``nn_module_stack``) through debug handles, and XNNPACK's preprocess in executorch 1.5.1
  returns an empty ``debug_handle_map`` (backends/xnnpack/xnnpack_preprocess.py), so its events
  carry none (checked: levit_128s re-lowered with ``generate_etrecord``, all 351 Execute events
  have ``debug_handles`` None). Only ops left outside the delegate would map, and these families
  are delegated whole; matching XNNPACK operators to nodes by order would be a guess (XNNPACK
  adds layout transposes and reshapes that are no graph node). ExecuTorch's layers are
  therefore keyed by operator kind.

Per-block times (one row per listed module, the same rows in every runtime) come from each
runtime's own evidence: onnxruntime's node times summed to the blocks (:func:`onnxruntime_block_ms`),
and for ExecuTorch the graph the .pte was lowered from, cut at each block's boundary and lowered
again (:func:`executorch_block_ms`): a block's time is what its prefix adds.
"""
from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgevit import runtimes
from edgevit.profile import timing
from edgevit.runtimes.base import captured_stderr

if TYPE_CHECKING:
    import torch

_XNNPACK_INSTANCE = re.compile(r"\s*#\d+$")
# Rows of a per-block table that are no module: time spent outside every listed block.
BETWEEN_BLOCKS = "(between blocks)"
AFTER_LAST_BLOCK = "(after the last block)"
_WHOLE_PROGRAM = "(whole program)"


def module_of_node(node_name: str, module_names: set[str]) -> str:
    """The innermost module a torch.onnx node name belongs to ("" for graph-level nodes).

    Scope parts are either a child's own name ("attn") or its full name ("stages.0.1"); the
    walk stops at the first part that is not a module (the op's own name)."""
    current = ""
    for part in node_name.strip("/").split("/"):
        candidate = part if part in module_names and part.startswith(current) else f"{current}.{part}".strip(".")
        if candidate not in module_names:
            break
        current = candidate
    return current


def onnxruntime_layers(artifact: Path, threads: int, runs: int, module_names: set[str]) -> dict[str, dict[str, float]]:
    """Mean milliseconds per run, by module and by ONNX op type, from onnxruntime's profiler."""
    with tempfile.TemporaryDirectory() as tmp:
        session = runtimes.load("onnxruntime", artifact, threads=threads, trace_prefix=str(Path(tmp) / "ort"))
        for _ in range(runs + 1):  # the first run allocates: left out like a warm-up
            session.bench()
        node_runs = _node_events_per_run(Path(session.end_trace()), runs + 1)[1:]
    by_module: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for run in node_runs:
        for event in run:
            ms = event["dur"] / 1e3 / runs
            by_module[module_of_node(event["name"], module_names)] += ms
            by_op[event["args"]["op_name"]] += ms
    return {"modules": dict(by_module), "ops": dict(by_op)}


def _node_events_per_run(trace: Path, runs: int) -> list[list[dict[str, Any]]]:
    """onnxruntime's profiler events of every node in ``trace``, one list per run of the ``runs``
    it holds (they ran one after another, each node once)."""
    events = json.loads(trace.read_text())
    node_events = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(node_events) // runs
    return [node_events[k * per_run:(k + 1) * per_run] for k in range(runs)]


def blocks_at_depth(names: list[str], depth: int) -> list[str]:
    """The modules a per-block table at ``depth`` has rows for, in ``names``' order: those of
    ``depth`` dotted parts, and shallower ones without children (LeViT's stem convolutions at
    depth 3), so that none holds another and every leaf module is inside one."""
    parents = {name.rsplit(".", 1)[0] for name in names if "." in name}
    return [name for name in names if name and (name.count(".") + 1 == depth
                                                or (name.count(".") + 1 < depth and name not in parents))]


def sum_to_blocks(ms_by_module: dict[str, float], modules: list[str]) -> dict[str, float]:
    """``ms_by_module`` (any module names; "" for the graph itself) summed to the listed
    ``modules``: each to the listed module that is it or holds it, the rest to
    :data:`BETWEEN_BLOCKS`, so the rows sum to the input's total."""
    listed = set(modules)
    rows: dict[str, float] = defaultdict(float)
    for name, ms in ms_by_module.items():
        parts = name.split(".") if name else []
        holder = next((".".join(parts[:end]) for end in range(len(parts), 0, -1) if ".".join(parts[:end]) in listed),
                      BETWEEN_BLOCKS)
        rows[holder] += ms
    return dict(rows)


def onnxruntime_block_ms(artifact: Path, modules: list[str], threads: int, runs: int, rounds: int = 2) -> dict[str, Any]:
    """Milliseconds per run in each of ``modules`` (module names, none inside another) under
    onnxruntime, measured as ExecuTorch's are (:func:`executorch_block_ms`): the graph cut at each
    module's output tensor (:func:`edgevit.quant.onnx_graph.module_boundaries`, the tensors inspect
    compares), each prefix timed, a block's time its prefix's p50 less that of the latest listed
    block it reads from. Not onnxruntime's profiler: it slows the nodes it times (levit_128s, 2
    threads, 2-core x86: their sum 1.35 × the run without it; 1.1 × at 1 thread).

    Returns ``{"blocks": {module: ms}, "other_ms": {row: ms}, "total_ms": sum of both, "p50_ms":
    the whole graph's, "noise": [why the p50 may not repeat]}``; a module with no tensor of its
    own is absent."""
    import onnx

    from edgevit.quant.onnx_graph import OnnxGraph, module_boundaries, prefix_model

    model = onnx.load(str(artifact))
    graph = OnnxGraph(model)
    found = module_boundaries(model, modules)
    position = {tensor: index for index, node in enumerate(graph.nodes) for tensor in node.output}
    order = sorted(found, key=lambda name: position[found[name]])
    program_of = {name: _WHOLE_PROGRAM if found[name] in graph.outputs else found[name] for name in order}
    with tempfile.TemporaryDirectory() as tmp:
        paths: dict[str, Path] = {_WHOLE_PROGRAM: Path(artifact)}
        for index, name in enumerate(order, 1):
            if program_of[name] not in paths:
                paths[program_of[name]] = Path(tmp) / f"prefix-{index}.onnx"
                onnx.save(prefix_model(model, found[name], graph), str(paths[program_of[name]]))
        benches = {key: runtimes.load("onnxruntime", path, threads=threads).bench for key, path in paths.items()}
        upstream = {name: graph.ancestors(found[name]) for name in order}
        return _prefix_differences(order, program_of, lambda name, earlier: found[earlier] in upstream[name],
                                   benches, rounds, runs, threads)


def executorch_block_ms(graph: "torch.fx.GraphModule", example: "torch.Tensor", backend: str, modules: list[str],
                        threads: int, runs: int, progress: Callable[[str], None] | None = None,
                        whole: Path | None = None, rounds: int = 2) -> dict[str, Any]:
    """Milliseconds per run in each of ``modules`` (module names, none inside another) under
    ExecuTorch, whose XNNPACK events name no module: the prefix of ``graph`` that ends at each
    module's boundary (:func:`edgevit.targets.executorch.probe.prefix`) is lowered onto
    ``backend``, and a block's time is its prefix's p50 less that of the latest listed block it
    reads from (in a chain, the block before; none: the whole prefix, so the first block holds
    whatever runs before it). The whole program (``whole``: the .pte lowered from ``graph``, when
    at hand; else ``graph`` is lowered too) is timed beside the prefixes, all taking turns, each
    keeping its best of ``rounds`` (:func:`edgevit.profile.timing.best_of_rounds`); what it spends
    beyond the blocks is :data:`AFTER_LAST_BLOCK`. ``graph``: ``probe.as_graph`` of
    ``probe.lowering_input``, what the .pte is lowered from. ``progress``: told of each lowering
    (seconds each). Returns :func:`onnxruntime_block_ms`'s shape."""
    from edgevit.quant.pt2e import boundary_nodes
    from edgevit.targets.executorch import program
    from edgevit.targets.executorch.probe import prefix

    step = progress or (lambda _message: None)
    found = boundary_nodes(graph, modules)
    position = {node: index for index, node in enumerate(graph.graph.nodes)}
    order = sorted(found, key=lambda name: position[found[name]])
    outputs = next(node for node in graph.graph.nodes if node.op == "output").all_input_nodes
    # A block that ends at the program's output is timed as the whole program; two that end at one
    # node share a prefix.
    program_of = {name: _WHOLE_PROGRAM if outputs == [found[name]] else found[name].name for name in order}
    with tempfile.TemporaryDirectory() as tmp:
        paths: dict[str, Path] = {}
        for index, name in enumerate(order, 1):
            if program_of[name] in paths or program_of[name] == _WHOLE_PROGRAM:
                continue
            step(f"lowering the prefix that ends at {name} ({index} of {len(order)})")
            paths[program_of[name]] = Path(tmp) / f"prefix-{index}.pte"
            paths[program_of[name]].write_bytes(program(prefix(graph, name), example, backend))
        if whole is None:
            step("lowering the whole program")
            whole = Path(tmp) / "whole.pte"
            whole.write_bytes(program(graph, example, backend))
        paths[_WHOLE_PROGRAM] = whole
        benches = {key: runtimes.load("executorch", path, threads=threads, options={"backend": backend}).bench
                   for key, path in paths.items()}
        step(f"timing {len(benches)} programs, taking turns, best of {rounds} rounds")
        upstream = {name: _ancestors(found[name]) for name in order}
        return _prefix_differences(order, program_of, lambda name, earlier: found[earlier] in upstream[name],
                                   benches, rounds, runs, threads)


def _prefix_differences(order: list[str], program_of: dict[str, str], reads: Callable[[str, str], bool],
                        benches: dict[str, Callable[[], object]], rounds: int, runs: int, threads: int) -> dict[str, Any]:
    """Every prefix and the whole program timed taking turns; each block's time is its prefix's
    p50 less that of the latest earlier block it ``reads`` from."""
    timed = timing.best_of_rounds(benches, rounds, runs=runs, threads=threads)
    p50 = {key: result.p50_ms for key, result in timed.items()}
    blocks: dict[str, float] = {}
    for index, name in enumerate(order):
        source = next((earlier for earlier in reversed(order[:index]) if reads(name, earlier)), None)
        blocks[name] = p50[program_of[name]] - (p50[program_of[source]] if source else 0.0)
    return _block_result(blocks, {AFTER_LAST_BLOCK: p50[_WHOLE_PROGRAM] - sum(blocks.values())}, timed[_WHOLE_PROGRAM])


def _ancestors(node: "torch.fx.Node") -> set["torch.fx.Node"]:
    seen: set = set()
    stack = list(node.all_input_nodes)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def _block_result(blocks: dict[str, float], other_ms: dict[str, float], timed: timing.Timing) -> dict[str, Any]:
    return {"blocks": blocks, "other_ms": other_ms, "total_ms": sum(blocks.values()) + sum(other_ms.values()),
            "p50_ms": timed.p50_ms, "noise": timed.noise}


def executorch_layers(artifact: Path, threads: int, runs: int) -> dict[str, dict[str, float]]:
    """Mean milliseconds per run by operator kind, from ExecuTorch's ETDump."""
    from executorch.devtools import Inspector

    with tempfile.TemporaryDirectory() as tmp:
        session = runtimes.load("executorch", artifact, threads=threads, trace_prefix=str(Path(tmp) / "et"))
        for _ in range(runs + 1):
            session.bench()
        etdump = session.end_trace()
        with captured_stderr():
            inspector = Inspector(etdump_path=etdump)
    by_op: dict[str, float] = defaultdict(float)
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for event in block.events:
            # Delegate calls and OPERATOR_CALL wrap the operators they run; count the operators.
            if not event.perf_data or event.name in ("Method::execute", "DELEGATE_CALL", "OPERATOR_CALL"):
                continue
            kind = _XNNPACK_INSTANCE.sub("", event.name).removeprefix("native_call_")
            by_op[kind] += sum(event.perf_data.raw[1:]) / runs  # first run left out, as for ORT
    return {"modules": {}, "ops": dict(by_op)}


def comparison_tables(document: dict) -> list:
    """For one profile run: milliseconds per block (``document["layer_blocks"]``, a column per
    runtime that has them, beside the roofline estimate summed to the same blocks; a line per
    runtime without them, saying why) and per operator kind (every runtime)."""
    from rich import box
    from rich.table import Table

    profiled = [m for m in document["measurements"] if m.get("layers")]
    blocks = document.get("layer_blocks") or []
    tables = []
    measured = {f"{m['runtime']} ms": m["layers"]["per_block"] for m in profiled if m["layers"].get("per_block")}
    estimates = ({"roofline estimate ms": sum_to_blocks(document["layer_estimate_ms"], blocks)}
                 if document.get("layer_estimate_ms") else {})
    columns = {**measured, **estimates}
    missing = [f"{m['runtime']}: {m['layers']['per_block_missing']}" for m in profiled if m["layers"].get("per_block_missing")]
    if columns:
        tables.append(block_time_table(f"{document['model']}: time per run in each block (depth "
                                       f"{document.get('layer_depth')}, module names)", blocks, measured, estimates))
    tables += missing
    ops = {f"{m['runtime']} ms": m["layers"]["ops"] for m in profiled}
    if ops:
        table = Table(title=f"{document['model']}: mean time per run, per operator kind", box=box.SIMPLE_HEAD)
        table.add_column("operator")
        for column in ops:
            table.add_column(column, justify="right")
        keys = sorted({k for values in ops.values() for k in values},
                      key=lambda k: -max(values.get(k, 0.0) for values in ops.values()))
        for key in keys:
            table.add_row(key, *(f"{values[key]:.3f}" if key in values else "–" for values in ops.values()))
        tables.append(table)
    return tables


def block_time_table(title: str, blocks: list[str], measured: dict[str, dict[str, Any] | None],
                     estimates: dict[str, dict[str, float]] | None = None):
    """Milliseconds per block, one column per runtime (``measured``: header → a ``*_block_ms``
    result, None where that runtime has none) and per estimate, rows aligned by module name in
    ``blocks``' order, then each column's sum and its whole artifact's p50, timed in the same call."""
    from rich import box
    from rich.table import Table

    columns = {header: ({**result["blocks"], **result["other_ms"]} if result else {}) for header, result in measured.items()}
    columns |= estimates or {}
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("module")
    for header in columns:
        table.add_column(header, justify="right")
    rows = [name for name in blocks if any(name in values for values in columns.values())]
    rows += sorted({key for values in columns.values() for key in values} - set(blocks))
    for key in rows:
        table.add_row(key, *(f"{values[key]:.3f}" if key in values else "–" for values in columns.values()))
    table.add_row("sum", *(f"{sum(values.values()):.3f}" if values else "–" for values in columns.values()))
    table.add_row("p50, whole artifact",
                  *(f"{measured[header]['p50_ms']:.3f}" if measured.get(header) else "–" for header in columns))
    return table
