"""The profile flow: ``edgevit profile`` — the device profile → a verified bundle per target
(an existing bundle of the target's default recipe is reused, else exported) → the profiler
measures them (or estimates, where the device cannot be reached) → a results document."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevit.core import bundle as bundles
from edgevit.models import get_model_cfg
from edgevit.pipeline.export import ExportRequest, Progress, export_model
from edgevit.profile.profiler import check_plan, profile_model
from edgevit.profile.profiles import DeviceProfile
from edgevit.targets.recipes import resolve_recipe


@dataclass(frozen=True)
class ProfileRequest:
    """One ``edgevit profile MODEL`` run on one device profile (see its ``--help``)."""

    model: str
    profile: DeviceProfile
    targets: tuple[str, ...] | None = None  # None: every target the device runs
    precision: str = "fp32"
    runs: int = 50
    max_warmup: int = 100
    repeats: int = 3
    threads: int | None = None
    batch: int = 1
    isolate: bool = True
    estimate: bool = False
    with_layers: bool = False
    artifacts: Path = Path("artifacts")
    layer_depth: int = 3  # --layers: the blocks are the modules of this many dotted parts


def ensure_bundle(model: str, target: str, precision: str, artifacts: Path,
                  progress: Progress) -> tuple[Path, dict[str, Any]]:
    """The verified artifact of the target's default recipe: the existing bundle, or a new export."""
    recipe = resolve_recipe(None, target, precision)
    existing = artifacts / bundles.bundle_name(model, recipe.name, {})
    if (existing / bundles.MANIFEST_NAME).is_file():
        manifest = bundles.read_manifest(existing)
        progress(f"using {existing}")
        return existing / manifest["artifact"]["file"], manifest
    progress(f"exporting {model} to {target} {precision}")
    outcome = export_model(ExportRequest(model, target, precision, out_dir=artifacts), progress)
    return outcome.artifact, outcome.manifest


def profile(request: ProfileRequest, progress: Progress | None = None) -> dict[str, Any]:
    step = progress or (lambda _message: None)
    get_model_cfg(request.model)  # an unknown name fails before any slow work
    device = request.profile
    targets = list(request.targets or device.runtimes)
    check_plan(device, targets, request.with_layers)  # before any export
    measured = not request.estimate and device.measurable
    found = {target: ensure_bundle(request.model, target, request.precision, request.artifacts, step)
             for target in targets if measured and target != "torch"}
    return profile_model(request.model, device, targets, request.precision, request.runs, request.max_warmup,
                         request.threads, request.batch, request.isolate, request.estimate, request.with_layers,
                         found, step, request.repeats, request.layer_depth)
