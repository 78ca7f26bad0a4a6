"""The ``edgevit`` command. Each command is a thin call into the Python API.

Errors a user can fix (``EdgevitError``) and usage mistakes are printed as one line on stderr
with a non-zero exit, never as a traceback.
"""
from __future__ import annotations

import json
import sys
from typing import Optional

import click
from rich import box
from rich.console import Console
from rich.table import Table

from edgevit.errors import EdgevitError
from edgevit.profile.cli import profile_group

console = Console()


@click.group(name="edgevit", context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    """Mobile vision transformers from PyTorch to devices, verified and measured."""

EXIT_USER_ERROR = 2


def _print_json(data: object) -> None:
    # Plain print: rich would wrap long lines and break the JSON.
    print(json.dumps(data, indent=2))


@app.command("list")
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


@app.command("info")
@click.argument("model_name", metavar="MODEL")
@click.option("--weights", "-w", default=None,
              help="Checkpoint to load: file, URL or hf-hub:org/repo (timm's or the authors' keys).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def info_command(model_name: str, weights: Optional[str], as_json: bool) -> None:
    """Show MODEL's config, preprocessing, measured size and per-stage output shapes."""
    from edgevit.models import create_model, load_checkpoint
    from edgevit.models.summary import count_macs, count_params, stage_shapes

    model = create_model(model_name)
    report = load_checkpoint(model, weights) if weights else None
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
    from edgevit.export import TARGETS, all_options

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


def _export_command() -> click.Command:
    from edgevit.export import TARGETS, all_options

    def run(model, target, precision, weights, out, recipe, verify, max_rel_error, min_cosine, as_json, **target_options):
        from edgevit.export.pipeline import export_model
        from edgevit.export.recipes import resolve_recipe

        given = {name: value for name, value in target_options.items() if value is not None}
        chosen_target = resolve_recipe(recipe, target, precision, given).target
        spec = TARGETS[chosen_target]
        for name in given:
            if spec.option(name) is None:
                offered = " ".join(o.flag for o in spec.options) or "none"
                raise EdgevitError(f"{all_options()[name].flag} does not apply to target {spec.name} (its options: {offered})")
        tolerances = {k: v for k, v in (("max_rel_error", max_rel_error), ("min_cosine", min_cosine)) if v is not None}
        err_console = Console(stderr=True)
        with err_console.status(f"exporting {model} to {spec.name}") as status:
            outcome = export_model(
                model, target=chosen_target, precision=precision, weights=weights, out_dir=out,
                recipe=recipe, options=given, tolerances=tolerances, verify=verify,
                progress=lambda message: status.update(message),
            )
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
        click.Option(["--weights", "-w"], default=None, help="Checkpoint: file, URL or hf-hub:org/repo. Default: random init."),
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
        "export", callback=run, params=params,
        help=f"Export MODEL to a verified artifact plus manifest.json. Targets — {targets}.",
    )


def _export_summary(outcome) -> str:
    v = outcome.verification
    manifest = outcome.manifest
    size = manifest["artifact"]["bytes"] / 1e6
    head = f"{manifest['model']['name']} → {manifest['target']} {manifest['precision']}: {outcome.artifact} ({size:.1f} MB)"
    if v.get("passed") is None:
        return f"{head} · not verified: {v['check']}"
    figures = (f"max rel err {v['max_rel_error']:.2e} · cosine {v['cosine']:.6f} · "
               f"top-1 agreement {v['top1_agreement'] * v['batch']:.0f}/{v['batch']}")
    return f"{head} · {figures} · {v['check']} · {sum(outcome.seconds.values()):.1f} s"


app.add_command(_export_command())
app.add_command(profile_group)


def main(argv: list[str] | None = None) -> int:
    command = app
    try:
        result = command.main(args=argv, prog_name="edgevit", standalone_mode=False)
    except EdgevitError as exc:
        print(f"edgevit: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except click.exceptions.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help())
        return 0
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        print(f"edgevit: error: {exc.format_message()}{hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    except click.exceptions.Exit as exc:  # --help
        return exc.exit_code
    except click.Abort:
        print("edgevit: aborted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
