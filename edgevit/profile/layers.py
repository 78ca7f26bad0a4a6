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
"""
from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

from edgevit import runtimes
from edgevit.runtimes.base import captured_stderr

_XNNPACK_INSTANCE = re.compile(r"\s*#\d+$")


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
        for _ in range(runs + 1):
            session.bench()
        events = json.loads(Path(session.end_trace()).read_text())
    by_module: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    node_events = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    first_run = len(node_events) // (runs + 1)  # the first run allocates: left out like a warm-up
    for event in node_events[first_run:]:
        ms = event["dur"] / 1e3 / runs
        by_module[module_of_node(event["name"], module_names)] += ms
        by_op[event["args"]["op_name"]] += ms
    return {"modules": dict(by_module), "ops": dict(by_op)}


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


def at_depth(by_module: dict[str, float], depth: int) -> dict[str, float]:
    """Sum per-module times up to module names of at most ``depth`` dotted parts."""
    summed: dict[str, float] = defaultdict(float)
    for name, ms in by_module.items():
        summed[".".join(name.split(".")[:depth]) if name else "(graph)"] += ms
    return dict(summed)


def comparison_tables(document: dict, depth: int) -> list:
    """Per-module milliseconds (each runtime that maps to modules, beside the roofline estimate)
    and per-operator-kind milliseconds (every runtime), for one profile run."""
    from rich import box
    from rich.table import Table

    profiled = [m for m in document["measurements"] if m.get("layers")]
    module_columns = {f"{m['runtime']} ms": at_depth(m["layers"]["modules"], depth) for m in profiled if m["layers"]["modules"]}
    if document.get("layer_estimate_ms"):
        module_columns["roofline estimate ms"] = at_depth(document["layer_estimate_ms"], depth)
    tables = []
    for title, columns in ((f"per module (names cut to {depth} parts)", module_columns),
                           ("per operator kind", {f"{m['runtime']} ms": m["layers"]["ops"] for m in profiled})):
        if not columns:
            continue
        table = Table(title=f"{document['model']}: mean time per run, {title}", box=box.SIMPLE_HEAD)
        table.add_column("module" if "module" in title else "operator")
        for column in columns:
            table.add_column(column, justify="right")
        keys = sorted({k for values in columns.values() for k in values},
                      key=lambda k: -max(values.get(k, 0.0) for values in columns.values()))
        for key in keys:
            table.add_row(key, *(f"{values[key]:.3f}" if key in values else "–" for values in columns.values()))
        tables.append(table)
    return tables
