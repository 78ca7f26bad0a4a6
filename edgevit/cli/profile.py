"""``edgevit profile``: measure artifacts on a device, and report across devices.

    edgevit profile MODEL --device NAME [--targets onnx,executorch] [--precision fp32] …
    edgevit profile report RUN.json … [--markdown F] [--json F] [--plot F.png] [--accuracy F]

The group runs ``measure`` when its first argument is not a subcommand, so the first form needs
no subcommand name. Registered in ``edgevit.cli`` with ``app.add_command(profile_group)``.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Optional

import click

from edgevit.cli import output
from edgevit.core.errors import EXIT_CODES_HELP, EdgevitError

console = output.console()


class _DefaultToMeasure(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["measure", *args]
        return super().parse_args(ctx, args)


@click.group(name="profile", cls=_DefaultToMeasure, context_settings={"help_option_names": ["-h", "--help"]})
def profile_group() -> None:
    """Measure MODEL's latency on a device (`edgevit profile MODEL --device NAME`), or compare
    results files (`edgevit profile report RUN.json …`)."""


@profile_group.command("measure", epilog=EXIT_CODES_HELP)
@click.argument("model")
@click.option("--device", "-d", default=None, help="A device profile from profiles/ (e.g. host-cpu).")
@click.option("--profile", "profile_file", default=None, help="Your own device profile (.toml) instead.")
@click.option("--targets", "-t", default=None, help="Comma-separated targets (default: every target the device runs).")
@click.option("--precision", "-p", default=None, help="fp32, fp16 or int8 (default: the device's own, e.g. fp16 on "
              "Core ML phones, fp32 on CPUs).")
@click.option("--runs", default=50, show_default=True, help="Timed runs after the warm-up (at least 50 for reported figures).")
@click.option("--max-warmup", default=100, show_default=True, help="Most warm-up runs before timing starts anyway.")
@click.option("--repeats", default=3, show_default=True,
              help="Repeats per target, each in a fresh process, targets taking turns; --runs is split among them.")
@click.option("--threads", type=int, default=None, help="Threads (default: the profile's).")
@click.option("--batch", default=1, show_default=True, help="Batch size (static-batch artifacts use their own).")
@click.option("--isolate/--in-process", default=True, show_default=True,
              help="Each measurement in a fresh process (clean load time and peak memory).")
@click.option("--estimate", is_flag=True, help="Roofline estimate from the profile's peak figures instead of measuring.")
@click.option("--layers", "with_layers", is_flag=True, help="Also a per-layer profile (onnxruntime, ExecuTorch): per "
              "block and per operator kind (ExecuTorch fp32 blocks: one lowering per block, seconds each).")
@click.option("--layer-depth", default=3, show_default=True, help="Module-name depth of the per-block table.")
@click.option("--artifacts", default="artifacts", show_default=True, help="Where exported artifacts are found or written.")
@click.option("--save", default=None, help="Results file (default: profile-results/MODEL-DEVICE-PRECISION-TIME.json).")
def measure_command(model: str, device: Optional[str], profile_file: Optional[str], targets: Optional[str], precision: str,
                    runs: int, max_warmup: int, repeats: int, threads: Optional[int], batch: int, isolate: bool, estimate: bool,
                    with_layers: bool, layer_depth: int, artifacts: str, save: Optional[str]) -> None:
    """Measure MODEL on a device: every target the device runs, under edgevit's timing protocol."""
    from edgevit.pipeline.profile import ProfileRequest, profile
    from edgevit.profile import layers, results
    from edgevit.profile.profiles import resolve_profile
    from edgevit.profile.report import measurement_table

    if runs < 1 or repeats < 1 or max_warmup < 0 or batch < 1 or layer_depth < 1 or (threads is not None and threads < 1):
        raise EdgevitError("--runs, --repeats, --batch, --layer-depth and --threads must be positive and --max-warmup >= 0")
    device_profile = resolve_profile(device, profile_file)
    precision = precision or device_profile.precision
    chosen = tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else None
    request = ProfileRequest(model, device_profile, chosen, precision, runs, max_warmup, repeats, threads, batch, isolate,
                             estimate, with_layers, Path(artifacts), layer_depth)
    with output.stages(f"profiling {model} on {device_profile.name}") as report:
        document = profile(request, progress=report)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = results.save(document, Path(save or f"profile-results/{model}-{device_profile.name}-{precision}-{stamp}.json"))
    console.print(measurement_table(document))
    if with_layers:
        for table in layers.comparison_tables(document):
            console.print(table)
    console.print(f"results: {path}", highlight=False)


@profile_group.command("report", epilog=EXIT_CODES_HELP)
@click.argument("results_files", nargs=-1, required=True, metavar="RUN.json…")
@click.option("--markdown", default=None, help="Also write the table as Markdown to this file.")
@click.option("--json", "json_file", default=None, help="Also write the rows as JSON to this file.")
@click.option("--plot", default=None, help="Also draw a PNG (needs the [report] extra).")
@click.option("--accuracy", default=None, help="Accuracy JSON (schema edgevit-accuracy/1) for accuracy vs latency.")
def report_command(results_files: tuple[str, ...], markdown: Optional[str], json_file: Optional[str],
                   plot: Optional[str], accuracy: Optional[str]) -> None:
    """Compare results files: p50 per model × device/runtime against the desktop GPU."""
    from edgevit.profile import report, results

    documents = [results.load(path) for path in results_files]
    rows, note = report.build_rows(documents, report.load_accuracy(accuracy) if accuracy else None)
    if not rows:
        raise EdgevitError("these results hold no measurement or estimate (every target was skipped)")
    console.print(report.table(rows, note))
    try:
        for path, text in ((markdown, report.markdown), (json_file, report.to_json)):
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(text(rows, note))
                console.print(f"wrote {path}", highlight=False)
        if plot:
            console.print(f"wrote {report.plot(rows, note, Path(plot))}", highlight=False)
    except OSError as exc:
        raise EdgevitError(f"cannot write {exc.filename}: {exc.strerror}") from None
