"""The ``edgevit`` command. Each command is a thin call into the Python API.

Errors a user can fix (``EdgevitError``) and usage mistakes are printed as one line on stderr
with a non-zero exit, never as a traceback.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
from rich import box
from rich.table import Table

from edgevit.cli import output
from edgevit.cli.profile import profile_group
import edgevit
from edgevit.core.errors import EXIT_CODES_HELP, EXIT_USAGE, EdgevitError
from edgevit.core.quiet import drop_known_harmless_notes

console = output.console()


@click.group(name="edgevit", context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(edgevit.__version__, "--version", prog_name="edgevit", message="%(prog)s %(version)s")
def app() -> None:
    """Mobile vision transformers from PyTorch to devices, verified and measured."""

WEIGHTS_HELP = ("Checkpoint: file, URL, hf-hub:org/repo, or 'pretrained' (the model's published weights). "
                "Default: random weights.")


def _print_json(data: object) -> None:
    # Plain print: rich would wrap long lines and break the JSON.
    print(json.dumps(data, indent=2))


@app.command("list", epilog=EXIT_CODES_HELP)
@click.argument("pattern", default="*")
@click.option("--family", default=None, help="Only this family.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_command(pattern: str, family: Optional[str], as_json: bool) -> None:
    """List registered models matching PATTERN (shell-style, e.g. 'levit_*'): family,
    parameters, GMACs, input size, checkpoint formats."""
    from edgevit.models import get_model_cfg, list_families, list_models

    if family is not None and family not in {f.name for f in list_families()}:
        known = ", ".join(f.name for f in list_families())
        raise EdgevitError(f"unknown family {family!r}; known families: {known}")
    names = list_models(pattern, family=family)
    if not names:
        raise EdgevitError(f"no model matches {pattern!r}; run `edgevit list` for all names")
    cfgs = [get_model_cfg(n) for n in names]
    if as_json:
        _print_json([cfg.to_dict() for cfg in cfgs])
        return
    table = Table(title=f"edgevit models ({len(cfgs)})", box=box.SIMPLE_HEAD)
    table.add_column("model", no_wrap=True)
    for column in ("params M", "GMACs", "top-1", "input"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("checkpoint formats", no_wrap=True)
    for cfg in cfgs:
        height, width = cfg.input_size[1:]
        table.add_row(
            cfg.name, f"{cfg.source_params / 1e6:.2f}", f"{cfg.paper.gmacs:.2f}",
            f"{cfg.paper.top1:.1f}",
            (str(height) if height == width else f"{height}×{width}") + ("" if cfg.fixed_input_size else "+"),
            ", ".join(cfg.checkpoint_formats),
        )
    console.print(table)
    console.print("params: exact count of the reference implementation; GMACs, top-1: the paper's; "
                  "input: native size, + where other sizes also run.")


@app.command("info", epilog=EXIT_CODES_HELP)
@click.argument("model_name", metavar="MODEL")
@click.option("--weights", "-w", default=None,
              help="Checkpoint to load: file, URL or hf-hub:org/repo (timm's or the authors' keys).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def info_command(model_name: str, weights: Optional[str], as_json: bool) -> None:
    """Show MODEL's config, preprocessing, measured size and per-stage output shapes."""
    from edgevit.models.summary import count_macs, count_params, stage_shapes
    from edgevit.training import load_eval_model

    model, report = load_eval_model(model_name, weights)  # a trained checkpoint's classes and input size
    cfg = model.cfg
    shapes = stage_shapes(model)
    measured = {"params": count_params(model), "macs": count_macs(model)}
    checkpoint = None if report is None else {
        "path": str(report.path), "sha256": report.sha256, "key_format": report.key_format,
        "messages": report.messages,
    }
    if as_json:
        _print_json({"cfg": cfg.to_dict(), "measured": measured, "checkpoint": checkpoint,
                     "stages": [{"module": m, "shape": list(s)} for m, s in shapes]})
        return
    overview = Table(title=cfg.name, show_header=False)
    overview.add_column(style="bold")
    overview.add_column()
    paper = cfg.paper
    latency = f"{paper.latency_ms} ms on {paper.latency_device}" if paper.latency_ms else "not published"
    rows = [
        ("family", cfg.family),
        ("input", f"{'×'.join(map(str, cfg.input_size))}" + (" (fixed)" if cfg.fixed_input_size else "")),
        ("preprocessing", f"resize {cfg.interpolation}, centre crop {cfg.crop_pct}, "
                          f"mean {cfg.mean}, std {cfg.std}"),
        ("classes", f"{cfg.num_classes} ({cfg.labels or 'no labels'})"),
        ("checkpoint formats", ", ".join(cfg.checkpoint_formats)),
        ("weights", "  ".join(x for x in (cfg.hf_hub_id, cfg.url) if x) or "none published"),
        ("params", f"{measured['params']:,} (reference implementation: {cfg.source_params:,})"),
        ("GMACs", f"{measured['macs'] / 1e9:.3f} measured (paper: {paper.gmacs})"),
        ("paper", f"top-1 {paper.top1}, latency {latency} [{paper.reference}]"),
    ]
    if checkpoint:
        rows.append(("loaded", f"{checkpoint['path']} ({checkpoint['key_format']} keys, "
                               f"sha256 {checkpoint['sha256'][:12]}…) " + " ".join(checkpoint["messages"])))
    for key, value in rows:
        overview.add_row(key, value)
    console.print(overview)
    stages = Table(title="stage outputs (batch 1)")
    stages.add_column("module")
    stages.add_column("shape")
    for module, shape in shapes:
        stages.add_row(module, "×".join(map(str, shape)))
    console.print(stages)


def _target_option_params() -> list[click.Option]:
    """One flag per target option in the target table; each says which targets take it."""
    from edgevit.targets import TARGETS, all_options

    params = []
    for option in all_options().values():
        targets = ", ".join(t.name for t in TARGETS.values() if t.option(option.name))
        help_text = f"[{targets}] {option.help} Default from the recipe ({option.default!r} in the presets)."
        if isinstance(option.default, bool):
            flag = option.flag
            params.append(click.Option([f"{flag}/--no-{flag[2:]}"], default=None, help=help_text))
        else:
            kind = click.Choice([str(c) for c in option.choices]) if option.choices else type(option.default)
            params.append(click.Option([option.flag], type=kind, default=None, help=help_text))
    return params


def _check_target_options(spec, given: dict) -> None:
    from edgevit.targets import all_options

    for name in given:
        if spec.option(name) is None:
            offered = " ".join(o.flag for o in spec.options) or "none"
            raise EdgevitError(f"{all_options()[name].flag} does not apply to target {spec.name} (its options: {offered})")


def _export_command() -> click.Command:
    from edgevit.targets import TARGETS

    def run(model, target, precision, weights, out, recipe, verify, max_rel_error, min_cosine, as_json, **target_options):
        from edgevit.pipeline.export import ExportRequest, export_model
        from edgevit.targets.recipes import resolve_recipe

        given = {name: value for name, value in target_options.items() if value is not None}
        chosen_target = resolve_recipe(recipe, target, precision, given).target
        spec = TARGETS[chosen_target]
        _check_target_options(spec, given)
        tolerances = {k: v for k, v in (("max_rel_error", max_rel_error), ("min_cosine", min_cosine)) if v is not None}
        with output.stages(f"exporting {model} to {spec.name}") as report:
            request = ExportRequest(model, chosen_target, precision, weights, out, recipe, given, tolerances, verify)
            outcome = export_model(request, progress=report)
        if as_json:
            _print_json(outcome.manifest)
            return
        console.print(_export_summary(outcome), highlight=False, soft_wrap=True)

    params = [
        click.Argument(["model"]),
        click.Option(["--target", "-t"], type=click.Choice(list(TARGETS)), default=None,
                     help="Target format (default onnx, or the recipe's)."),
        click.Option(["--precision", "-p"], default=None,
                     help="; ".join(f"{t.name}: {'|'.join(t.precisions)}" for t in TARGETS.values())
                     + " (first is the default)."),
        click.Option(["--weights", "-w"], default=None, help=WEIGHTS_HELP),
        click.Option(["--out", "-o"], default="artifacts", show_default=True, help="Output directory."),
        click.Option(["--recipe"], default=None, help="Preset name from export/ or a recipe .toml file."),
        click.Option(["--verify/--no-verify"], default=True, show_default=True,
                     help="Run the artifact in its runtime against PyTorch before keeping it."),
        click.Option(["--max-rel-error"], type=float, default=None, help="Override the recipe's bound."),
        click.Option(["--min-cosine"], type=float, default=None, help="Override the recipe's bound."),
        click.Option(["--json", "as_json"], is_flag=True, help="Print the manifest as JSON."),
        *_target_option_params(),
    ]
    targets = "; ".join(f"{t.name}: {t.description}" for t in TARGETS.values())
    return click.Command(
        "export", callback=run, params=params, epilog=EXIT_CODES_HELP,
        help=f"Export MODEL to a verified artifact plus manifest.json. Targets — {targets}.",
    )


def _export_summary(outcome) -> str:
    v = outcome.verification
    manifest = outcome.manifest
    size = manifest["artifact"]["bytes"] / 1e6
    head = f"{manifest['model']['name']} → {manifest['target']} {manifest['precision']}: {outcome.artifact} ({size:.1f} MB)"
    if manifest.get("random_weights"):
        head += " · random weights (no --weights)"
    if v.get("passed") is None:
        return f"{head} · not verified: {v['check']}"
    figures = (f"max rel err {v['max_rel_error']:.2e} · cosine {v['cosine']:.6f} · "
               f"top-1 agreement {v['top1_agreement'] * v['batch']:.0f}/{v['batch']}")
    if v.get("fidelity") and v["unenforced_failures"]:
        figures += f" · not enforced (random weights): {'; '.join(v['unenforced_failures'])}"
    return f"{head} · {figures} · {v['check']} · {sum(outcome.seconds.values()):.1f} s"


@app.command("data", epilog=EXIT_CODES_HELP)
@click.argument("dataset", type=click.Choice(["fashion-mnist"]))
@click.argument("dest")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--per-class", type=click.IntRange(min=1), default=100, show_default=True, help="Images per class.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which images (a fixed-seed draw).")
def data_command(dataset: str, dest: str, split: str, per_class: int, seed: int) -> None:
    """Write a sample of DATASET as an image folder in DEST (one subfolder per class), to try
    train, calibrate, quantize --max-drop and eval on. Fashion-MNIST comes from Debian's
    dataset-fashion-mnist package (see the README's set-up)."""
    from edgevit.data.fashion_mnist import write_image_folder

    folder = Path(dest)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise EdgevitError(f"{dest} exists and is not an empty folder; give a new one")
    written = write_image_folder(split, folder, per_class, seed)
    classes = len({path.parent for path in written})
    console.print(f"{dataset} {split}: {len(written)} images of {classes} classes in {folder}/", highlight=False)


@app.command("calibrate", epilog=EXIT_CODES_HELP)
@click.argument("model")
@click.option("--calib-data", required=True, help="Image folder (flat, or one subfolder per class).")
@click.option("--images", "count", type=click.IntRange(min=1), default=64, show_default=True,
              help="Fixed-seed sample size.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--weights", "-w", default=None, help="Checkpoint (a trained one sets classes and input size).")
@click.option("--out", "-o", default=None, help="Stats file (.safetensors). Default: MODEL-calibration.safetensors")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def calibrate_command(model, calib_data, count, seed, weights, out, as_json):
    """Run a calibration: sample images, preprocess them as MODEL's config says, record the deploy
    model's activation ranges; `quantize --calib-stats FILE` reuses it for every target."""
    from edgevit.pipeline.quantize import calibrate

    out = out or f"{model}-calibration.safetensors"
    with output.counter(f"calibrating {model}: images read") as report:
        calibration = calibrate(model, calib_data, count, seed=seed, weights=weights,
                                progress=lambda done, total, *_: report(done, total),
                                warn=lambda message: print(f"warning: {message}", file=sys.stderr))
        path = calibration.save(out)
    summary = calibration.summary | {"stats_file": str(path), "layers_recorded": len(calibration.ranges)}
    if as_json:
        _print_json(summary)
        return
    table = Table(box=box.SIMPLE_HEAD, title=f"calibration of {model} → {path}")
    for column in ("layer", "min", "max", "p0.01 %", "p99.99 %"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    widest = sorted(calibration.ranges.items(), key=lambda item: item[1][1] - item[1][0], reverse=True)
    for name, (low, high, p_low, p_high) in widest[:10]:
        table.add_row(name, f"{low:.3g}", f"{high:.3g}", f"{p_low:.3g}", f"{p_high:.3g}")
    console.print(table)
    skipped = summary.get("skipped")
    skipped_count = skipped.get("count", 0) if isinstance(skipped, dict) else skipped
    console.print(f"{summary.get('images', len(calibration.inputs))} images used, {skipped_count or 0} skipped; "
                  f"widest 10 of {len(calibration.ranges)} layers shown")


def _quantize_command() -> click.Command:
    from edgevit.targets import TARGETS
    from edgevit.quant.spec import METHODS, MODES, OP_KINDS

    def run(model, mode, target, calib_data, calib_stats, calib_images, method, float_ops, float_modules, max_drop,
            eval_data, eval_limit, train_data, train_limit, qat_epochs, qat_lr, weights, random_weights, out, recipe, seed,
            as_json, **target_options):
        from edgevit.pipeline.quantize import QuantizeRequest, quantize_model

        given = {name: value for name, value in target_options.items() if value is not None}
        _check_target_options(TARGETS[target], given)
        with output.stages(f"quantizing {model} for {target} ({mode})") as progress:
            request = QuantizeRequest(
                model, target, mode, calib_data=calib_data, calib_stats=calib_stats, calib_images=calib_images,
                seed=seed, weights=weights, out_dir=out, recipe=recipe, options=given, method=method,
                float_ops=tuple(float_ops.split(",")) if float_ops else None,
                float_modules=tuple(m for m in (float_modules or "").split(",") if m),
                max_drop=max_drop, eval_data=eval_data, eval_limit=eval_limit, train_data=train_data,
                train_limit=train_limit, qat_epochs=qat_epochs, qat_lr=qat_lr, random_weights=random_weights)
            outcome = quantize_model(request, progress)
        if as_json:
            _print_json(outcome.export.manifest)
            return
        if outcome.sensitivity:
            table = Table(box=box.SIMPLE_HEAD, title="most sensitive layers (only that layer int8)")
            for column in ("layer", "kind", "rel. logit error", "top-1 agreement"):
                table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
            for item in outcome.sensitivity[:10]:
                table.add_row(item.module, item.kind, f"{item.relative_error:.4f}", f"{item.top1_agreement:.3f}")
            console.print(table)
        console.print(_export_summary(outcome.export), highlight=False, soft_wrap=True)

    params = [
        click.Argument(["model"]),
        click.Option(["--mode", "-m"], type=click.Choice(MODES), default="static", show_default=True,
                     help="dynamic: weights int8, activations at run time (Core ML: 8-bit weights); static: "
                          "calibrated int8 activations (Core ML: W8A8); qat: fine-tune with fake quantization first."),
        click.Option(["--target", "-t"], type=click.Choice(list(TARGETS)), default="onnx", show_default=True,
                     help="; ".join(f"{t.name}: {'|'.join(t.quant_modes) or 'no int8'}" for t in TARGETS.values())),
        click.Option(["--calib-data"], default=None, help="Calibration image folder (flat or class subfolders)."),
        click.Option(["--calib-stats"], default=None, help="A saved calibration run (edgevit calibrate)."),
        click.Option(["--calib-images"], type=click.IntRange(min=1), default=None, help="Sample size (default: the recipe's)."),
        click.Option(["--method"], type=click.Choice(METHODS), default=None, help="Activation range method (default: the recipe's)."),
        click.Option(["--float-ops"], default=None, help=f"Comma-separated op kinds kept float, replacing the family's: {', '.join(OP_KINDS)}."),
        click.Option(["--float-modules"], default=None, help="Comma-separated module-name patterns kept float (added)."),
        click.Option(["--max-drop"], type=float, default=None,
                     help="Top-1 points int8 may lose; the most sensitive layers stay float until the measured drop fits."),
        click.Option(["--eval-data"], default=None, help="Labelled folder or fashion-mnist, to measure --max-drop "
                     "(default: top-1 changes vs float on the calibration images)."),
        click.Option(["--eval-limit"], type=click.IntRange(min=1), default=None, help="Evaluate on at most this many images."),
        click.Option(["--train-data"], default=None, help="qat: labelled folder or fashion-mnist."),
        click.Option(["--train-limit"], type=click.IntRange(min=1), default=None, help="qat: at most this many training images."),
        click.Option(["--qat-epochs"], type=float, default=1.0, show_default=True),
        click.Option(["--qat-lr"], type=float, default=1e-5, show_default=True),
        click.Option(["--weights", "-w"], default=None, help="Checkpoint: file, URL, hf-hub:org/repo, or 'pretrained' "
                     "(the model's published weights). Required, unless --random-weights."),
        click.Option(["--random-weights"], is_flag=True, help="No weights, for latency-only work: verification "
                     "reports its figures and does not fail on them."),
        click.Option(["--out", "-o"], default="artifacts", show_default=True, help="Output directory."),
        click.Option(["--recipe"], default=None, help="int8 preset from export/ or a recipe .toml file."),
        click.Option(["--seed"], type=int, default=0, show_default=True, help="Calibration sample seed."),
        click.Option(["--json", "as_json"], is_flag=True, help="Print the manifest as JSON."),
        *_target_option_params(),
    ]
    return click.Command(
        "quantize", callback=run, params=params, epilog=EXIT_CODES_HELP,
        help="Quantize MODEL to a verified int8 artifact (checked against float32, collapse guarded) plus manifest.json.",
    )



def _write_json_file(path: str, data: object) -> None:
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
    except OSError as exc:
        raise EdgevitError(f"cannot write {path}: {exc.strerror or exc}; choose another --json path") from None


def _figures_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, box=box.SIMPLE_HEAD)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


@app.command("eval", epilog=EXIT_CODES_HELP)
@click.argument("subject", metavar="MODEL|ARTIFACT")
@click.option("--data", "-d", required=True,
              help="A folder with one subfolder per class, or fashion-mnist (its test split).")
@click.option("--weights", "-w", default=None, help="Checkpoint for a model name (trained weights set classes and input size).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate a fixed-seed random subset of N images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --limit subset.")
@click.option("--json", "json_path", default=None, help="Also write the figures to this JSON file.")
def eval_command(subject, data, weights, limit, batch_size, seed, json_path):
    """Top-1/top-5 of MODEL (PyTorch) or of an ARTIFACT bundle from `edgevit export` (run in its
    own runtime with its manifest's preprocessing). Class folders are matched to the model's
    class names when both are known, else by sorted index."""
    from edgevit.pipeline.evaluate import evaluate

    with output.counter("evaluating: images") as progress:
        result = evaluate(subject, data, weights=weights, limit=limit, batch_size=batch_size, seed=seed,
                          progress=progress)
    if json_path:
        _write_json_file(json_path, result)
    runner = result.get("runtime", "")
    if result["kind"] == "artifact":
        runner = f"{result['target']} {result.get('precision') or ''} in {runner}"
    rows = [("subject", str(result["subject"])), ("runs in", runner), ("data", result["data"]),
            ("images", f"{result['images']} ({result['skipped']['count']} skipped)"),
            ("classes", f"{result['classes']} (matched {result['labels_matched']})"),
            ("top-1", f"{result['top1']:.2f} %"),
            ("top-5", "n/a (fewer than 5 classes)" if result["top5"] is None else f"{result['top5']:.2f} %"),
            ("seconds", f"{result['seconds']:.1f} ({result['images_per_second'] or 0:.0f} images/s)")]
    console.print(_figures_table(f"accuracy of {result['model']}", rows))
    for name in result["skipped"]["files"]:
        console.print(f"skipped: {name}", highlight=False)
    for warning in result["warnings"]:
        print(f"edgevit: warning: {warning}", file=sys.stderr)


@app.command("inspect", epilog=EXIT_CODES_HELP)
@click.argument("bundles", nargs=-1, required=True, metavar="BUNDLE…")
@click.option("--data", default=None, help="Image folder to run (default: the verification batch's synthetic images).")
@click.option("--images", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--depth", type=click.IntRange(min=1), default=1, show_default=True,
              help="Module-name depth of the blocks compared (stages.1: 2).")
@click.option("--latency", is_flag=True, help="Also the time each block takes in each bundle's runtime (a prefix "
              "of the graph timed per block: ExecuTorch lowers each one, seconds apiece).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for --latency (default: every core).")
@click.option("--runs", type=click.IntRange(min=3), default=50, show_default=True, help="Timed runs per program, --latency.")
@click.option("--advice/--no-advice", default=True, show_default=True,
              help="For an int8 bundle with a jump, export it again with that block float and measure the change.")
@click.option("--json", "json_path", default=None, help="Also write the figures to this JSON file.")
def inspect_command(bundles, data, images, depth, latency, threads, runs, advice, json_path):
    """Where an artifact's error comes from: each module's output at --depth in each BUNDLE's
    runtime against PyTorch (the checkpoint the bundle was exported from), in graph order, with
    the first block where the error jumps. Bundles of one model line up row by row."""
    from edgevit.pipeline.inspect import InspectRequest, inspect

    with output.stages(f"inspecting {len(bundles)} bundle(s)") as report:
        result = inspect(InspectRequest(tuple(bundles), data, images, depth, advice=advice, latency=latency,
                                        threads=threads, runs=runs), report)
    if json_path:
        _write_json_file(json_path, result)
    table = Table(title=f"{result['model']}: each block's output against PyTorch ({result['images']} images, "
                        f"depth {depth}); cos · SQNR dB · max rel err", box=box.SIMPLE_HEAD)
    table.add_column("block")
    for row in result["bundles"]:
        against = "\nvs its QAT program" if row["reference_kind"] == "qat" else ""
        table.add_column(f"{Path(row['bundle']).name}\n{row['target']} {row['precision']}{against}", justify="right")
    for module in result["modules"]:
        cells = []
        for row in result["bundles"]:
            figures = row["blocks"][module]
            cell = "–" if figures is None else (f"{figures['cosine']:.4f} · {figures['sqnr_db']:.1f} · "
                                                f"{figures['max_rel_error']:.2e}")
            cells.append(cell + (" ◀ jump" if row["first_jump"] == module else ""))
        table.add_row(module, *cells)
    table.add_row("(logits)", *(f"{r['output']['mean_cosine']:.4f} · – · {r['output']['max_rel_error']:.2e}"
                                for r in result["bundles"]))
    console.print(table)
    if latency:
        from edgevit.profile.layers import block_time_table

        console.print(block_time_table(
            f"{result['model']}: time per block, ms (p50 of each prefix less the block it reads from)", result["modules"],
            {f"{Path(row['bundle']).name}\n{row['runtime']}": row.get("latency") for row in result["bundles"]}))
    for row in result["bundles"]:
        console.print(_inspect_summary(row), highlight=False)


def _inspect_summary(row: dict) -> str:
    """How one bundle's figures were obtained, where its error jumps, and what the advice measured."""
    name = Path(row["bundle"]).name
    lines = [f"{name}: " + (f"first jump at {row['first_jump']}" if row["first_jump"] else "no block where the error jumps")
             + f" ({row['runtime']})"]
    if row["reference_kind"] != "float":
        lines.append(f"  compared with {row['reference']}")
    probe = row.get("probe")
    if probe:
        lines.append(f"  inner tensors: {probe['method']}; its logits differ from the artifact's by at most "
                     f"{probe['max_abs_error_to_artifact']:.3g}" + ("" if probe["reproduces_artifact"] else
                                                                   " — NOT the artifact's: figures describe the re-lowered program"))
    for missing in ("latency_missing", "advice_missing"):
        if row.get(missing):
            lines.append(f"  {row[missing]}")
    if row.get("no_figure"):
        lines.append(f"  no figure (–) for {', '.join(row['no_figure'])}: {next(iter(row['no_figure'].values()))}")
    advice = row.get("advice")
    if advice:
        before, after = advice["output_before"], advice["output_after"]
        lines.append(f"  {advice['option']} (measured by exporting again): logits cosine {before['mean_cosine']:.4f} → "
                     f"{after['mean_cosine']:.4f}, top-1 agreement {before['top1_agreement']:.2f} → {after['top1_agreement']:.2f}, "
                     f"{advice['artifact_bytes_before'] / 1e6:.1f} → {advice['artifact_bytes'] / 1e6:.1f} MB")
    return "\n".join(lines)


@app.command("train", epilog=EXIT_CODES_HELP)
@click.argument("model_name", metavar="MODEL")
@click.option("--data", "-d", required=True, help="fashion-mnist, or a folder with one subfolder per class.")
@click.option("--out", "-o", required=True, help="Where to write the trained weights (.safetensors).")
@click.option("--input-size", type=click.IntRange(min=1), default=None,
              help="Square input size to train at (default: the model's).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=None, help="Passes over the data (default 1).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps instead of --epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Per process.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.05, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None, help="Default: 5 % of the steps.")
@click.option("--label-smoothing", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Train on a fixed-seed subset of N images.")
@click.option("--eval-data", default=None, help="Folder with the same class subfolders to report top-1 on "
              "(fashion-mnist: its test split by default).")
@click.option("--eval-limit", type=click.IntRange(min=1), default=None, help="Evaluate on a subset of N images.")
@click.option("--weights", "-w", default=None, help="Initial checkpoint (its classifier is replaced).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", default=None, help="Also write the figures to this JSON file.")
def train_command(model_name, data, out, input_size, epochs, steps, batch_size, lr, weight_decay, warmup_steps,
                  label_smoothing, limit, eval_data, eval_limit, weights, seed, json_path):
    """Fine-tune MODEL with a new classifier (AdamW, warm-up + cosine) and save safetensors that
    record the classes and input size. Under `torchrun --nproc_per_node N -m edgevit train …`
    it trains data-parallel (gloo); rank 0 prints and saves."""
    from edgevit.pipeline.train import TrainRequest, train_model
    from edgevit.training import is_main_process, shutdown_distributed

    if steps is not None and epochs is not None:
        raise EdgevitError("give --steps or --epochs, not both")
    try:
        figures = train_model(TrainRequest(model_name, data, out, input_size=input_size, weights=weights, epochs=epochs,
                                           steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                           warmup_steps=warmup_steps, label_smoothing=label_smoothing, limit=limit,
                                           eval_data=eval_data, eval_limit=eval_limit, seed=seed))
        main_process = is_main_process()
    finally:
        shutdown_distributed()
    if not main_process:
        return
    if json_path:
        _write_json_file(json_path, figures)
    top1 = figures.get("eval_top1")
    rows = [("data", f"{data}: {figures['train_images']} images, {figures['classes']} classes, "
                     f"input {'×'.join(map(str, figures['input_size']))}"),
            ("steps", f"{figures['steps']} × batch {figures['batch_size']} × {figures['world_size']} process(es) "
                      f"= {figures['epochs']} epochs"),
            ("train loss", f"{figures['first_loss']:.4f} → {figures['final_loss']:.4f}"),
            ("test top-1", "not measured (give --eval-data)" if top1 is None
             else f"{top1:.2f} % on {figures['eval_images']} images"),
            ("seconds", f"{figures['seconds']:.1f} ({figures['images_per_second']:.0f} images/s)"),
            ("weights", figures["out"])]
    console.print(_figures_table(f"fine-tuned {model_name}", rows))


app.add_command(_export_command())
app.add_command(_quantize_command())
app.add_command(profile_group)


def main(argv: list[str] | None = None) -> int:
    drop_known_harmless_notes()
    command = app
    try:
        result = command.main(args=argv, prog_name="edgevit", standalone_mode=False)
    except EdgevitError as exc:
        print(f"edgevit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help())
        return 0
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        print(f"edgevit: error: {exc.format_message()}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except click.exceptions.Exit as exc:  # --help
        return exc.exit_code
    except click.Abort:
        print("edgevit: aborted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
