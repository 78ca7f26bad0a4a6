"""Latency of edgevit's artifacts against a plain export of the eval model, measured in one run.

For each family's smallest size, at batch 1 and native resolution, with 2 threads:

- baseline: ``torch.onnx.export(eval_model, (x,), path)`` with torch's defaults, in onnxruntime;
- edgevit ONNX (deploy form, both torch exporters, onnxslim), in onnxruntime;
- stock ExecuTorch: ``torch.export`` of the eval model → ``to_edge_transform_and_lower`` with the
  XNNPACK partitioner, as ExecuTorch's docs show it;
- edgevit ExecuTorch ``.pte`` (deploy form, XNNPACK), in executorch.runtime.

Prints p50 latencies and ratios baseline/edgevit (> 1 means edgevit is faster); --json saves all
timings. (The stock .pte is timed only; its outputs are not checked.) Usage: python benchmarks/export_latency.py [--runs 50] [--models a,b] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from edgevit import runtimes
from edgevit.core.quiet import quiet
from edgevit.pipeline.export import ExportRequest, export_model
from edgevit.runtimes import RuntimeUnavailable
from edgevit.models import create_model
from edgevit.profile.timing import best_of_rounds, thread_settings

SMALLEST = ["mobilevitv2_050", "efficientformer_l1", "levit_128s", "levit_conv_128s", "edgevit_xxs"]
THREADS = 2


def stock_onnx(name: str, directory: Path) -> Path:
    """What a user gets from torch.onnx.export of the eval model with torch's defaults."""
    model = create_model(name)
    path = directory / f"{name}-stock.onnx"
    with quiet():
        torch.onnx.export(model, (torch.randn(1, *model.cfg.input_size),), str(path))
    return path


def stock_pte(name: str, directory: Path) -> Path:
    """What a user gets from ExecuTorch's documented XNNPACK flow on the eval model."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = create_model(name)
    with quiet():
        program = torch.export.export(model, (torch.randn(1, *model.cfg.input_size),))
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    path = directory / f"{name}-stock.pte"
    path.write_bytes(lowered.buffer)
    return path


def artifact_runner(path: Path):
    """One timed inference of the artifact in its runtime, as the profiler times it."""
    return runtimes.load("onnxruntime" if path.suffix == ".onnx" else "executorch", path, threads=THREADS).bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--models", default=",".join(SMALLEST))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    console = Console()
    results = {"threads": THREADS, "settings": thread_settings(), "models": {}}

    table = Table(title=f"p50 latency (ms), batch 1, {THREADS} threads, {args.runs} runs, best of 2 interleaved rounds")
    for column in ("model", "stock ONNX", "edgevit ONNX (torchscript)", "edgevit ONNX (dynamo)",
                   "stock .pte", "edgevit .pte", "ONNX: stock/edgevit", ".pte: stock ONNX/edgevit",
                   ".pte: stock/edgevit"):
        table.add_column(column, justify="right" if column != "model" else "left")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            timings = {}
            paths = {"stock_onnx": stock_onnx(name, tmp)}
            with console.status(f"{name}: exporting"):
                for exporter in ("torchscript", "dynamo"):
                    outcome = export_model(ExportRequest(name, "onnx", out_dir=tmp / exporter, recipe="onnx-fp32", options={"exporter": exporter}))
                    paths[f"edgevit_onnx_{exporter}"] = outcome.artifact
                try:
                    paths["stock_pte"] = stock_pte(name, tmp)
                    paths["edgevit_pte"] = export_model(ExportRequest(name, "executorch", out_dir=tmp)).artifact
                except (ImportError, RuntimeUnavailable) as exc:
                    console.print(f"{name}: ExecuTorch skipped: {exc}")
            with console.status(f"{name}: timing {len(paths)} artifacts, 2 interleaved rounds"):
                timings = best_of_rounds({k: artifact_runner(path) for k, path in paths.items()}, runs=args.runs)
            results["models"][name] = {k: t.to_dict() for k, t in timings.items()}
            p50 = {k: t.p50_ms for k, t in timings.items()}
            best_onnx = min(p50["edgevit_onnx_torchscript"], p50["edgevit_onnx_dynamo"])
            flag = lambda k: "*" if timings[k].noisy else ""  # noqa: E731
            table.add_row(
                name,
                f"{p50['stock_onnx']:.2f}{flag('stock_onnx')}",
                f"{p50['edgevit_onnx_torchscript']:.2f}{flag('edgevit_onnx_torchscript')}",
                f"{p50['edgevit_onnx_dynamo']:.2f}{flag('edgevit_onnx_dynamo')}",
                f"{p50['stock_pte']:.2f}{flag('stock_pte')}" if "stock_pte" in p50 else "-",
                f"{p50['edgevit_pte']:.2f}{flag('edgevit_pte')}" if "edgevit_pte" in p50 else "-",
                f"{p50['stock_onnx'] / best_onnx:.2f}×",
                f"{p50['stock_onnx'] / p50['edgevit_pte']:.2f}×" if "edgevit_pte" in p50 else "-",
                f"{p50['stock_pte'] / p50['edgevit_pte']:.2f}×" if "edgevit_pte" in p50 else "-",
            )
    console.print(table)
    console.print("* noisy: p90 > 1.5 × p50. Ratios > 1 mean edgevit's artifact is faster than the stock export.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        console.print(f"saved {args.json}")


if __name__ == "__main__":
    main()
