"""Latency of edgevit's artifacts against a plain export of the eval model, measured in one run.

For each family's smallest size, at batch 1 and native resolution, with 2 threads:

- baseline: ``torch.onnx.export(eval_model, (x,), path)`` with torch's defaults, in onnxruntime;
- edgevit ONNX (deploy form, both torch exporters, onnxslim), in onnxruntime;
- edgevit ExecuTorch ``.pte`` (deploy form, XNNPACK), in executorch.runtime.

Prints p50 latencies and ratios baseline/edgevit (> 1 means edgevit is faster); --json saves all
timings. Usage: python benchmarks/export_latency.py [--runs 50] [--models a,b] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from edgevit.export.base import RuntimeUnavailable, quiet
from edgevit.export.onnx import session
from edgevit.export.pipeline import export_model, verification_batch
from edgevit.models import create_model
from edgevit.profile.timing import measure, thread_settings

SMALLEST = ["mobilevitv2_050", "efficientformer_l1", "levit_128s", "levit_conv_128s", "edgevit_xxs"]
THREADS = 2


def stock_onnx(name: str, directory: Path) -> Path:
    """What a user gets from torch.onnx.export of the eval model with torch's defaults."""
    model = create_model(name)
    path = directory / f"{name}-stock.onnx"
    with quiet():
        torch.onnx.export(model, (torch.randn(1, *model.cfg.input_size),), str(path))
    return path


def onnx_timer(path: Path, x: np.ndarray, runs: int):
    sess = session(path, threads=THREADS)
    name = sess.get_inputs()[0].name
    return measure(lambda: sess.run(None, {name: x}), runs=runs)


def pte_timer(path: Path, x: np.ndarray, runs: int):
    from edgevit.export import executorch as et_target

    run = et_target.load_runner(path, {})
    return measure(lambda: run(x), runs=runs)


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

    table = Table(title=f"p50 latency, batch 1, {THREADS} threads, {args.runs} runs (ms)")
    for column in ("model", "stock ONNX", "edgevit ONNX (torchscript)", "edgevit ONNX (dynamo)",
                   "edgevit .pte", "stock/ONNX", "stock/.pte"):
        table.add_column(column, justify="right" if column != "model" else "left")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            x = verification_batch(create_model(name).cfg, 1).numpy()
            timings = {}
            with console.status(f"{name}: exporting and timing"):
                timings["stock_onnx"] = onnx_timer(stock_onnx(name, tmp), x, args.runs)
                for exporter in ("torchscript", "dynamo"):
                    outcome = export_model(name, "onnx", out_dir=tmp, recipe="onnx-fp32",
                                           options={"exporter": exporter})
                    timings[f"edgevit_onnx_{exporter}"] = onnx_timer(outcome.artifact, x, args.runs)
                try:
                    outcome = export_model(name, "executorch", out_dir=tmp)
                    timings["edgevit_pte"] = pte_timer(outcome.artifact, x, args.runs)
                except (ImportError, RuntimeUnavailable) as exc:
                    console.print(f"{name}: ExecuTorch skipped: {exc}")
            results["models"][name] = {k: t.to_dict() for k, t in timings.items()}
            p50 = {k: t.p50_ms for k, t in timings.items()}
            best_onnx = min(p50["edgevit_onnx_torchscript"], p50["edgevit_onnx_dynamo"])
            flag = lambda k: "*" if timings[k].noisy else ""  # noqa: E731
            table.add_row(
                name,
                f"{p50['stock_onnx']:.2f}{flag('stock_onnx')}",
                f"{p50['edgevit_onnx_torchscript']:.2f}{flag('edgevit_onnx_torchscript')}",
                f"{p50['edgevit_onnx_dynamo']:.2f}{flag('edgevit_onnx_dynamo')}",
                f"{p50['edgevit_pte']:.2f}{flag('edgevit_pte')}" if "edgevit_pte" in p50 else "-",
                f"{p50['stock_onnx'] / best_onnx:.2f}×",
                f"{p50['stock_onnx'] / p50['edgevit_pte']:.2f}×" if "edgevit_pte" in p50 else "-",
            )
    console.print(table)
    console.print("* noisy: p90 > 1.5 × p50. Ratios > 1 mean edgevit's artifact is faster than the stock export.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        console.print(f"saved {args.json}")


if __name__ == "__main__":
    main()
