"""The export pipeline, written once for every target:

load (random init or checkpoint) → deploy form → target export into a private temporary folder
→ run the artifact in the target's real runtime against the PyTorch eval model → manifest →
one atomic rename into place. A failed verification leaves nothing at the destination.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import edgevit
from edgevit.errors import EdgevitError
from edgevit.export import get_target
from edgevit.export.base import RuntimeUnavailable
from edgevit.export.recipes import Recipe, resolve_recipe
from edgevit.host import host_isa
from edgevit.models import create_model, get_model_cfg, load_checkpoint, to_deploy

_PARTIAL_PREFIX = ".edgevit-partial-"
MANIFEST_NAME = "manifest.json"


class VerificationFailed(EdgevitError):
    """The artifact's outputs are outside the recipe's tolerances (nothing was written)."""


@dataclass
class ExportOutcome:
    artifact: Path  # the artifact inside its bundle folder
    bundle: Path  # folder holding the artifact and its manifest
    manifest: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def verification(self) -> dict[str, Any]:
        return self.manifest["verification"]


def verification_batch(cfg, batch: int, seed: int = 0) -> torch.Tensor:
    """A fixed batch with the statistics of real preprocessed images: uniform 8-bit pixels
    normalised with the model's own mean/std (so e.g. MobileViT v2 sees [0, 1] inputs)."""
    generator = torch.Generator().manual_seed(seed)
    # 8-bit pixel levels, as decoded images have, so image-input artifacts see the same values.
    pixels = torch.randint(0, 256, (batch, *cfg.input_size), generator=generator) / 255.0
    mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std).view(1, -1, 1, 1)
    return (pixels - mean) / std


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Agreement figures of a candidate output batch with the float32 reference."""
    reference = reference.astype(np.float64).reshape(len(reference), -1)
    candidate = candidate.astype(np.float64).reshape(len(candidate), -1)
    if reference.shape != candidate.shape:
        raise VerificationFailed(f"artifact output shape {candidate.shape} differs from PyTorch's {reference.shape}")
    finite = bool(np.isfinite(candidate).all())
    difference = np.abs(candidate - reference)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cosine = np.sum(reference * candidate, axis=1) / np.maximum(norms, 1e-30)
    return {
        "max_abs_error": float(difference.max()) if finite else float("inf"),
        "max_rel_error": float(difference.max() / max(np.abs(reference).max(), 1e-30)) if finite else float("inf"),
        "cosine": float(cosine.min()) if finite else 0.0,  # the worst sample, not the mean
        "mean_cosine": float(cosine.mean()) if finite else 0.0,
        "top1_agreement": float(np.mean(reference.argmax(1) == candidate.argmax(1))),
        # A collapsed artifact (e.g. int8 scales larger than the logit range) gives few values.
        "distinct_values": int(len(np.unique(candidate.round(6)))),
        "finite": finite,
    }


def collapse_failure(reference: np.ndarray, figures: dict[str, Any]) -> str | None:
    """A quantized artifact whose outputs took only a handful of values has collapsed (stock
    LeViT on XNNPACK int8 gave two), even when its cosine looks tolerable on a small batch."""
    reference_distinct = len(np.unique(reference.round(6)))
    floor = min(16, max(2, reference_distinct // 10))
    if figures["distinct_values"] < floor:
        return (f"output collapsed: only {figures['distinct_values']} distinct values "
                f"(fp32 gives {reference_distinct}); quantization scales swamp the output range")
    return None


def build_quant_spec(cfg, recipe: Recipe, calibration: Any, extra_float_modules: tuple[str, ...] = ()):
    """The QuantSpec for an int8 recipe: the recipe's table over the family's defaults."""
    from edgevit.quant.recipes import quant_settings
    from edgevit.quant.spec import QuantSpec

    settings = quant_settings(cfg.family, recipe.quantization, recipe.target)
    settings["float_modules"] += tuple(m for m in extra_float_modules if m not in settings["float_modules"])
    if settings["mode"] == "dynamic" and calibration is None:
        return QuantSpec(**settings)  # needs no calibration; verification then uses synthetic images
    if calibration is None:
        raise EdgevitError(f"{settings['mode']} int8 needs calibration images: use  edgevit quantize {cfg.name} --target {recipe.target} --calib-data DIR")
    # Dynamic int8 calibrates nothing: its images are all verification images.
    calibrate_on, held_out = (split_held_out(calibration.inputs, recipe.verify_batch) if settings["mode"] != "dynamic"
                              else (calibration.inputs, None))
    return QuantSpec(**settings, calibration=calibrate_on, held_out=held_out, calibration_summary=calibration.summary)


def split_held_out(images: torch.Tensor, verify_batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images to calibrate on, images to verify on): a quarter of the user's sample, at most the
    recipe's verification batch, is held out, so int8 is judged on images its ranges were not
    fitted to (the sample is already a fixed-seed random draw). A single image cannot be split."""
    held = min(verify_batch, max(1, len(images) // 4)) if len(images) > 1 else 0
    return (images[:len(images) - held], images[len(images) - held:]) if held else (images, None)


def load_eval_model(name: str, weights: str | None):
    """The eval model, built with the classes / input size a trained checkpoint records (see
    ``edgevit train``), then loaded; returns (model, checkpoint report or None); ``model.cfg``
    is the effective config."""
    from edgevit.train import trained_metadata, trained_overrides

    # URLs and hub ids are published checkpoints, not edgevit-trained ones.
    trained = bool(weights) and Path(weights).is_file()
    model = create_model(name, **(trained_overrides(weights) if trained else {}))
    report = load_checkpoint(model, weights) if weights else None
    model.class_names = trained_metadata(weights).get("class_names") if trained else None
    return model, report


def export_model(
    model: str,
    target: str | None = None,
    precision: str | None = None,
    weights: str | None = None,
    out_dir: str | os.PathLike = "artifacts",
    recipe: str | None = None,
    options: dict[str, Any] | None = None,
    tolerances: dict[str, float] | None = None,
    verify: bool = True,
    progress: Callable[[str], None] | None = None,
    *,
    mode: str | None = None,
    calibration: Any = None,
    quant: Any = None,
    extra_float_modules: tuple[str, ...] = (),
    float_model: nn.Module | None = None,
    bundle_suffix: str = "",
) -> ExportOutcome:
    """Export a registered model to a verified artifact with a manifest; see the module doc.

    int8 (``precision="int8"`` or a quantization ``mode``): the QuantSpec is built from the
    recipe's ``[quantization]`` table, the family's defaults, ``extra_float_modules`` and
    ``calibration`` (an ``edgevit.quant.calibration.Calibration``), unless ``quant`` is given.
    ``float_model`` (deploy form) replaces the checkpoint's, e.g. QAT's fine-tuned weights; it is
    then also the verification reference, except for QAT artifacts (``quant.qat_model``), which
    answer to the QAT int8 program.
    """
    step = progress or (lambda _message: None)
    cfg = get_model_cfg(model)  # unknown names fail before any slow work
    chosen = resolve_recipe(recipe, target, precision, options, mode)
    overridden = {k: v for k, v in (options or {}).items() if chosen.options.get(k) != v}
    if options or tolerances:
        chosen = chosen.with_changes(options=options, tolerances=tolerances)
    spec = get_target(chosen.target)
    implementation = spec.implementation()  # missing backend → names the extra to install
    if chosen.precision == "int8" and quant is None:
        quant = build_quant_spec(cfg, chosen, calibration, extra_float_modules)
    out_dir = _writable_dir(Path(out_dir))
    bundle = out_dir / (bundle_name(cfg.name, chosen.name, overridden) + bundle_suffix)
    seconds: dict[str, float] = {}

    clock = time.perf_counter()
    step(f"loading {cfg.name}" + (f" from {weights}" if weights else " (random weights)"))
    eval_model, report = load_eval_model(cfg.name, weights)
    cfg = eval_model.cfg  # a trained checkpoint's classes / input size
    deploy_model = float_model if float_model is not None else to_deploy(eval_model)
    qat_program = quant.qat_model if quant is not None else None
    reference_model = float_model if float_model is not None else eval_model
    seen = None  # the calibration images, when verification runs on held-out ones
    if quant is not None and quant.calibration is not None:
        # int8 is judged on real images, those calibration did not see where the sample allows.
        if quant.held_out is not None and len(quant.held_out):
            example, images = quant.held_out[:chosen.verify_batch].float(), "held out from calibration"
            seen = quant.calibration[:chosen.verify_batch].float()
        else:
            example, images = quant.calibration[:chosen.verify_batch].float(), "calibration images"
    else:
        example, images = verification_batch(cfg, chosen.verify_batch), "synthetic (uniform 8-bit pixels, the model's normalisation)"
    reference = _reference_outputs(qat_program, reference_model, example)
    seconds["load"] = time.perf_counter() - clock

    _remove_stale_partials(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL_PREFIX}{os.getpid()}-", dir=out_dir))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's private 0700 would carry over to the bundle
    try:
        clock = time.perf_counter()
        step(f"exporting to {spec.name} ({chosen.precision}, recipe {chosen.name})")
        extra = {"quant": quant} if quant is not None else {}
        result = implementation.export(deploy_model, example[:1], chosen.precision, chosen.options, staging, **extra)
        seconds["export"] = time.perf_counter() - clock

        clock = time.perf_counter()
        if verify:
            step(f"verifying in {spec.runtime}")
            verification = _verify(implementation, result, chosen, deploy_model, example, reference,
                                   qat=qat_program is not None,
                                   seen=None if seen is None else (seen, _reference_outputs(qat_program, reference_model, seen)))
            verification["images"] = images
            verification["host"] = host_isa()
        else:
            verification = {"check": "skipped (--no-verify)", "passed": None}
        _check_int8_kernels(implementation, result, verification, enforce=verify)
        seconds["verify"] = time.perf_counter() - clock

        if verification.get("passed") is False:
            raise VerificationFailed(
                f"{cfg.name} → {spec.name} {chosen.precision} failed verification "
                f"({verification['check']}): {'; '.join(verification['failures'])}; nothing was written"
            )
        manifest = _manifest(cfg, chosen, spec, result, report, weights, verification, seconds)
        manifest["output"]["class_names"] = getattr(eval_model, "class_names", None)
        if quant is not None:
            manifest["quantization"] = quant.summary() | {"reference": "QAT int8 program (PyTorch)"
                                                          if qat_program is not None else "fp32 eval model"}
        (staging / MANIFEST_NAME).write_text(_to_json(manifest))
        step(f"writing {bundle}")
        _place(staging, bundle)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return ExportOutcome(artifact=bundle / result.path.name, bundle=bundle, manifest=manifest, seconds=seconds)


def _reference_outputs(qat_program, float_model: nn.Module, example: torch.Tensor) -> np.ndarray:
    """What the artifact must reproduce. A QAT artifact answers to the QAT int8 program run in
    PyTorch, not to the fine-tuned float weights: QAT trains the weights *through* fake
    quantization, and they may lean on its clamping (Fashion-MNIST EdgeViT-XXS: after 60 QAT steps
    its float weights lost 27 pt of top-1 while its int8 program gained 0.4), so only the program
    says what was trained."""
    if qat_program is not None:
        from edgevit.quant.pt2e import run_graph
        return run_graph(qat_program, example.float()).numpy()
    with torch.no_grad():
        return float_model(example).numpy()


def _verify(implementation, result, recipe: Recipe, deploy_model: nn.Module, example: torch.Tensor,
            reference: np.ndarray, qat: bool = False,
            seen: tuple[torch.Tensor, np.ndarray] | None = None) -> dict[str, Any]:
    """The artifact (or, where its runtime cannot run here, the target's pre-check) against the
    reference on ``example``; ``seen`` (images calibration saw, their reference) is checked the
    same way for the record, with the artifact loaded once."""
    names: list[str] = []  # a pre-check names itself when it runs
    try:
        runner = implementation.load_runner(result.path, recipe.options)
        check = get_target(recipe.target).runtime

        def outputs(images: torch.Tensor, expected: np.ndarray):
            return runner(images.numpy()), expected, [], []
    except RuntimeUnavailable as unavailable:
        precheck = getattr(implementation, "precheck", None)
        if precheck is None:
            return {"check": f"not run: {unavailable}", "passed": None}
        check, reason = "", str(unavailable)  # the except clause unbinds its name when it ends

        def outputs(images: torch.Tensor, expected: np.ndarray):
            checked = precheck(result, deploy_model, images, recipe.precision)
            names.append(f"{checked.name} (artifact not run: {reason})")
            # a pre-check compares with the deploy model; QAT answers to its int8 program (see _reference_outputs)
            return checked.candidate, expected if qat else checked.reference, checked.notes, checked.failures

    candidate, compared_with, notes, failures = outputs(example, reference)
    figures = compare_outputs(compared_with, candidate)
    failures = recipe.tolerances.failures(figures) + failures
    collapse = collapse_failure(compared_with, figures)
    if collapse:
        failures.append(collapse)
    if not figures["finite"]:
        failures.insert(0, "output has NaN or Inf")
    verification = {"check": check or names[0], "batch": len(example), **figures,
                    "tolerances": recipe.to_dict()["verify"], "passed": not failures, "failures": failures, "notes": notes}
    if seen is not None and not failures:
        # A large gap to the figures above means the ranges fit the sample rather than the data.
        seen_candidate, seen_expected, _, _ = outputs(*seen)
        seen_figures = compare_outputs(seen_expected, seen_candidate)
        verification["calibration_images"] = {"batch": len(seen[0]), **{k: seen_figures[k] for k in (
            "cosine", "mean_cosine", "max_rel_error", "top1_agreement")}}
    return verification


def _check_int8_kernels(implementation, result, verification: dict[str, Any], enforce: bool) -> None:
    """The static half of an int8 check, which needs no runtime: the target's reading of the
    artifact says on which CPUs its numbers hold (those measured above hold on this host's
    kernels only). One not exact on every CPU fails, unless verification was skipped."""
    reader = getattr(implementation, "int8_exactness", None)
    kernels = reader(result) if reader is not None else None
    if kernels is None:
        return
    verification["int8_kernels"] = kernels
    if enforce and kernels["not_exact_on"]:
        verification["failures"] = verification.get("failures", []) + [
            f"not exact on {cpu}: {why}" for cpu, why in kernels["not_exact_on"].items()]
        verification["passed"] = False


def _manifest(cfg, recipe: Recipe, spec, result, report, weights, verification, seconds) -> dict[str, Any]:
    artifact = result.path
    dynamic_batch = bool(recipe.options.get("dynamic_batch", False))
    return {
        "edgevit_version": edgevit.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": cfg.name, "family": cfg.family, "config": cfg.to_dict()},
        "checkpoint": None if report is None else {
            "source": str(weights), "file": report.path.name, "sha256": report.sha256,
            "key_format": report.key_format, "messages": report.messages,
        },
        "input": result.details.pop("input", None) or {
            "name": "input", "layout": "NCHW", "dtype": "float32",
            "shape": ["batch" if dynamic_batch else 1, *cfg.input_size]},
        "preprocessing": {"input_size": list(cfg.input_size), "interpolation": cfg.interpolation,
                          "crop_pct": cfg.crop_pct, "mean": list(cfg.mean), "std": list(cfg.std)},
        "output": {"kind": "logits", "num_classes": cfg.num_classes, "labels": cfg.labels},
        "target": spec.name,
        "runtime": spec.runtime,
        "precision": recipe.precision,
        "recipe": recipe.to_dict() | {"source": recipe.source},
        "quantization": None,
        "artifact": {"file": artifact.name, "bytes": _size(artifact), "sha256": _sha256(artifact)},
        "target_details": result.details,
        "tools": _tool_versions(spec.requires),
        "verification": verification,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def _tool_versions(modules: tuple[str, ...]) -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in modules:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def bundle_name(model: str, recipe: str, overridden: dict[str, Any]) -> str:
    """``model-recipe``, plus the options changed on the command line, so that e.g.
    ``--image-input`` does not overwrite the bundle of the plain recipe."""
    suffix = "".join(f"+{k}" if v is True else f"+{k}={v}" for k, v in sorted(overridden.items()))
    return f"{model}-{recipe}{suffix}".replace("/", "_")


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=_PARTIAL_PREFIX):
            pass
    except OSError as exc:
        raise EdgevitError(f"cannot write to output directory {path}: {exc.strerror or exc}; choose another --out") from None
    return path


def _remove_stale_partials(out_dir: Path) -> None:
    """Staging folders of exports that were killed; a live process's folder is left alone."""
    for partial in out_dir.glob(f"{_PARTIAL_PREFIX}*"):
        pid = partial.name[len(_PARTIAL_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _place(staging: Path, bundle: Path) -> None:
    """Move the verified staging folder to ``bundle`` with renames only (same filesystem)."""
    if bundle.exists():
        retired = bundle.with_name(f"{_PARTIAL_PREFIX}{os.getpid()}-old-{bundle.name}")
        os.replace(bundle, retired)
        os.replace(staging, bundle)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, bundle)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _sha256(path: Path) -> str:
    """SHA-256 of a file, or of a bundle folder's files in path order (Core ML packages)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"
