"""int8 against float, measured in one run: accuracy on Fashion-MNIST and latency on this CPU.

For each family's smallest size:

1. **Accuracy.** Train the model (``num_classes=10``, reduced input size) on Fashion-MNIST's
   train split, then measure top-1 on the whole test split (10 000 images) for: the float32
   PyTorch model; static PTQ int8 (ONNX and ExecuTorch artifacts, calibrated on train images);
   QAT int8 (PT2E fake-quant fine-tune, then the same artifacts). Every artifact goes through
   ``edgevit quantize``'s API, so it was verified against float before it was kept.
2. **Latency** at the model's native resolution, batch 1, same threads for all, the artifacts
   timed in interleaved rounds (each one's best round kept): stock ONNX fp32 (plain
   ``torch.onnx.export`` of the eval model), edgevit ONNX fp32, ONNX int8, ExecuTorch fp32 and
   ExecuTorch int8 (random weights: latency does not depend on their values).

Targets (from the quantization issue): static drop ≤ 0.5 pt, QAT drop ≤ 0.2 pt, ONNX int8 ≥ 1.5×
faster than ONNX fp32, best int8 ≥ 3× faster than stock ONNX fp32. The table marks each.

Usage: python benchmarks/quantization.py [--models a,b] [--input-size 64] [--epochs 2]
       [--qat-epochs 0.5] [--runs 50] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from edgevit.core.errors import EdgevitError
from edgevit.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from edgevit.pipeline.evaluate import evaluate
from edgevit.pipeline.export import ExportRequest, export_model
from edgevit.core.host import host_isa
from edgevit.models import create_model
from edgevit.profile.timing import best_of_rounds, thread_settings
from edgevit.pipeline.quantize import QuantizeRequest, quantize_model
from edgevit.quant.calibration import Calibration, preprocessing_of
from edgevit.training import fine_tune, save_trained
from export_latency import artifact_runner, stock_onnx  # shared with the export benchmark (this folder)

SMALLEST = ["mobilevitv2_050", "efficientformer_l1", "levit_128s", "edgevit_xxs"]
THREADS = 2
STATIC_DROP, QAT_DROP, INT8_VS_FP32, BEST_VS_STOCK = 0.5, 0.2, 1.5, 3.0


def calibration_stats(cfg, images: torch.Tensor, path: Path, source: str) -> Path:
    """Calibration images preprocessed exactly as the model was trained (the data set's path)."""
    summary = {"folder": source, "images": len(images), "requested": len(images), "skipped": {"count": 0},
               "seed": 0, "preprocessing": preprocessing_of(cfg)}
    return Calibration(inputs=images.float(), summary=summary).save(path)


def accuracy_rows(name: str, args, work: Path, console: Console) -> dict:
    model = create_model(name, num_classes=10, input_size=(3, args.input_size, args.input_size),
                         crop_pct=1.0, interpolation="bilinear")
    cfg = model.cfg
    train = load_fashion_mnist("train", cfg, limit=args.train_limit)
    test_top1 = {}
    clock = time.perf_counter()
    figures = fine_tune(model, train, epochs=args.epochs, batch_size=64, lr=args.lr, progress=False)
    train_s = time.perf_counter() - clock
    weights = save_trained(model, work / f"{name}-fashion-mnist.safetensors", cfg, class_names=FASHION_MNIST_CLASSES)
    test_top1["fp32"] = evaluate(model, "fashion-mnist")["top1"]
    console.print(f"{name}: trained {args.epochs} epochs in {train_s:.0f} s "
                  f"(loss {figures.get('final_loss', float('nan')):.3f}); fp32 test top-1 {test_top1['fp32']:.2f} %")
    calib_images, _ = train.batch(torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:args.calib_images])
    stats = calibration_stats(cfg, calib_images, work / f"{name}-calibration.safetensors", "fashion-mnist train")
    qat_result = None  # one QAT fine-tune, exported to both targets
    for mode in ("static", "qat"):
        for target in ("executorch", "onnx"):
            clock = time.perf_counter()
            try:
                outcome = quantize_model(QuantizeRequest(name, target, mode, calib_stats=stats, weights=str(weights), out_dir=work / f"{mode}-{target}", train_data="fashion-mnist" if mode == "qat" else None, train_limit=args.train_limit, qat_epochs=args.qat_epochs, qat_lr=args.qat_lr, qat_result=qat_result))
            except EdgevitError as failure:  # a failed verification is a result too: report it, go on
                console.print(f"{name}: {mode} int8 {target}: [red]{failure}[/red]")
                test_top1[f"{mode}_{target}"] = None
                continue
            qat_result = outcome.qat_result or qat_result
            top1 = evaluate(outcome.export.bundle, "fashion-mnist")["top1"]
            test_top1[f"{mode}_{target}"] = top1
            console.print(f"{name}: {mode} int8 {target}: top-1 {top1:.2f} % (drop {test_top1['fp32'] - top1:+.2f} pt), "
                          f"verification cosine {outcome.export.verification['cosine']:.4f}, {time.perf_counter() - clock:.0f} s")
    return {"input_size": args.input_size, "train_seconds": train_s, "train_figures": figures, "top1": test_top1}


def native_calibration(name: str, count: int, work: Path) -> Path:
    """Fashion-MNIST images at the model's own resolution and normalisation (latency only needs
    realistic activation ranges, not a trained model)."""
    cfg = create_model(name).cfg
    images, _ = load_fashion_mnist("train", cfg, limit=count).tensors()
    return calibration_stats(cfg, images, work / f"{name}-native-calibration.safetensors", "fashion-mnist train (native size)")


def latency_rows(name: str, args, work: Path) -> dict:

    stats = native_calibration(name, 32, work)

    def same_weights(make):  # every artifact from the same random init (values can change speed: denormals)
        torch.manual_seed(0)
        return make()

    artifacts = {
        "stock_onnx_fp32": same_weights(lambda: stock_onnx(name, work)),
        "onnx_fp32": same_weights(lambda: export_model(ExportRequest(name, "onnx", out_dir=work / "lat")).artifact),
        "pte_fp32": same_weights(lambda: export_model(ExportRequest(name, "executorch", out_dir=work / "lat")).artifact),
    }
    for key, target in (("onnx_int8", "onnx"), ("pte_int8", "executorch")):
        # Random weights: near-uniform logits make cosine a poor judge of int8 here (accuracy is
        # judged on the trained model above), so latency artifacts report fidelity, not enforce it.
        artifacts[key] = same_weights(lambda: quantize_model(QuantizeRequest(
            name, target, "static", calib_stats=stats, out_dir=work / "lat", random_weights=True)).export.artifact)
    best = best_of_rounds({key: artifact_runner(path) for key, path in artifacts.items()}, args.rounds, runs=args.runs)
    return {key: timing.to_dict() for key, timing in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SMALLEST))
    parser.add_argument("--input-size", type=int, default=64, help="training/accuracy input size")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-limit", type=int, default=None, help="train on this many images (default all 60 000)")
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--qat-epochs", type=float, default=0.5)
    parser.add_argument("--qat-lr", type=float, default=2e-5)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; each artifact keeps its best (this VM's speed drifts between minutes)")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    console = Console(width=None if os.isatty(1) else 160)  # saved logs keep whole table rows
    # int8 speed depends on the CPU's instructions (VNNI or not): every result names them.
    results: dict = {"threads": THREADS, "settings": thread_settings(), "host": host_isa(),
                     "args": vars(args) | {"json": str(args.json)}, "models": {}}
    console.print(f"host: {results['host']['machine']}, int8 features {' '.join(results['host']['features']) or 'unknown'} "
                  f"({results['host']['int8_kernels']})")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            entry = results["models"][name] = {}
            if not args.skip_accuracy:
                entry["accuracy"] = accuracy_rows(name, args, work, console)
            if not args.skip_latency:
                with console.status(f"{name}: exporting and timing at native resolution"):
                    entry["latency"] = latency_rows(name, args, work)
            if args.json:  # partial results survive an interrupted run
                args.json.write_text(json.dumps(results, indent=2, default=str))
    if not args.skip_accuracy:
        console.print(_accuracy_table(results, args))
    if not args.skip_latency:
        console.print(_latency_table(results, args))
        for line in _slower_int8(results):
            console.print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        console.print(f"saved {args.json}")


def _mark(ok: bool) -> str:
    return "[green]✓[/green]" if ok else "[red]✗[/red]"


def _accuracy_table(results, args) -> Table:
    table = Table(title=f"Fashion-MNIST test top-1 (%, 10 000 images), input {args.input_size}², trained {args.epochs} epochs")
    for column in ("model", "fp32", "static ONNX", "static .pte", f"drop ≤ {STATIC_DROP}", "QAT ONNX", "QAT .pte", f"drop ≤ {QAT_DROP}"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, entry in results["models"].items():
        if "accuracy" not in entry:
            continue
        top1 = entry["accuracy"]["top1"]
        fp32 = top1["fp32"]

        def cell(key):
            return "failed" if top1[key] is None else f"{top1[key]:.2f}"

        def worst_drop(mode, bound):
            values = [top1[f"{mode}_{t}"] for t in ("onnx", "executorch")]
            if None in values:
                return f"— {_mark(False)}"
            drop = fp32 - min(values)
            return f"{drop:+.2f} {_mark(drop <= bound)}"

        table.add_row(name, f"{fp32:.2f}", cell("static_onnx"), cell("static_executorch"), worst_drop("static", STATIC_DROP),
                      cell("qat_onnx"), cell("qat_executorch"), worst_drop("qat", QAT_DROP))
    return table


def _latency_table(results, args) -> Table:
    table = Table(title=f"p50 latency (ms), native resolution, batch 1, {THREADS} threads, "
                        f"{args.runs} runs, best of {args.rounds} interleaved rounds")
    columns = ("stock_onnx_fp32", "onnx_fp32", "onnx_int8", "pte_fp32", "pte_int8")
    for column in ("model", "stock ONNX fp32", "ONNX fp32", "ONNX int8", ".pte fp32", ".pte int8",
                   f"ONNX int8 vs fp32 (≥ {INT8_VS_FP32}×)", f"best int8 vs stock (≥ {BEST_VS_STOCK}×)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, entry in results["models"].items():
        if "latency" not in entry:
            continue
        p50 = {k: entry["latency"][k]["p50_ms"] for k in columns}
        noisy = {k for k in columns if entry["latency"][k].get("noisy")}
        speedup = p50["onnx_fp32"] / p50["onnx_int8"]
        best = p50["stock_onnx_fp32"] / min(p50["onnx_int8"], p50["pte_int8"])
        table.add_row(name, *(f"{p50[k]:.2f}" + (" (noisy)" if k in noisy else "") for k in columns),
                      f"{speedup:.2f}× {_mark(speedup >= INT8_VS_FP32)}", f"{best:.2f}× {_mark(best >= BEST_VS_STOCK)}")
    return table


def _slower_int8(results) -> list[str]:
    """One line per int8 artifact slower than edgevit's own fp32 of the same runtime on this host:
    there, the fp32 artifact is the one to ship."""
    host = results["host"]
    lines = []
    for name, entry in results["models"].items():
        for int8, fp32 in (("onnx_int8", "onnx_fp32"), ("pte_int8", "pte_fp32")):
            p50 = {k: entry.get("latency", {}).get(k, {}).get("p50_ms") for k in (int8, fp32)}
            if None not in p50.values() and p50[int8] > p50[fp32]:
                lines.append(f"{name}: {int8} ({p50[int8]:.2f} ms) is slower than {fp32} ({p50[fp32]:.2f} ms) on this host "
                             f"({host['int8_kernels']}): ship fp32 here")
    return lines or [f"every int8 artifact is faster than its fp32 on this host ({host['int8_kernels']})"]


if __name__ == "__main__":
    main()
