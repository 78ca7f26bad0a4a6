"""The export flow, written once for every target:

load (random init or checkpoint) → deploy form → target export into a private staging folder →
run the artifact in its runtime (or the target's pre-check) against the PyTorch reference →
manifest → one atomic rename into place. A failed verification leaves nothing at the destination.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import edgevit
from edgevit import runtimes
from edgevit.core import bundle as bundles
from edgevit.core.errors import EdgevitError
from edgevit.core.host import host_isa
from edgevit.models import get_model_cfg, to_deploy
from edgevit.models.checkpoints import file_sha256
from edgevit.quant.calibration import Calibration, split_held_out
from edgevit.quant.spec import QuantSpec
from edgevit.targets import get_target
from edgevit.targets.recipes import Recipe, resolve_recipe
from edgevit.training import load_eval_model
from edgevit.verify import VerificationFailed, collapse_failure, compare_outputs, verification_batch

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportRequest:
    """One export: what ``edgevit export`` asks for, and what quantize's flows add.

    int8 (``precision="int8"`` or a quantization ``mode``): the QuantSpec is built from the
    recipe's ``[quantization]`` table, the family's defaults, ``extra_float_modules`` and
    ``calibration``, unless ``quant`` is given. ``float_model`` (deploy form) replaces the
    checkpoint's, e.g. QAT's fine-tuned weights; it is then also the verification reference,
    except for QAT artifacts (``quant.qat_model``), which answer to the QAT int8 program."""

    model: str
    target: str | None = None
    precision: str | None = None
    weights: str | None = None
    out_dir: Path | str = "artifacts"
    recipe: str | Recipe | None = None
    options: dict[str, Any] = field(default_factory=dict)  # target options given on the command line
    tolerances: dict[str, float] = field(default_factory=dict)
    verify: bool = True
    mode: str | None = None
    calibration: Calibration | None = None
    quant: QuantSpec | None = None
    extra_float_modules: tuple[str, ...] = ()
    float_model: nn.Module | None = None
    bundle_suffix: str = ""
    enforce_fidelity: bool = True  # False: tolerances and the collapse guard are reported, not enforced


@dataclass
class ExportOutcome:
    artifact: Path  # the artifact inside its bundle folder
    bundle: Path  # folder holding the artifact and its manifest
    manifest: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def verification(self) -> dict[str, Any]:
        return self.manifest["verification"]


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


def export_model(request: ExportRequest, progress: Progress | None = None) -> ExportOutcome:
    """A registered model to a verified artifact with a manifest; see the module doc."""
    step = progress or (lambda _message: None)
    cfg = get_model_cfg(request.model)  # unknown names fail before any slow work
    options, tolerances = dict(request.options or {}), dict(request.tolerances or {})
    chosen = resolve_recipe(request.recipe, request.target, request.precision, options, request.mode)
    overridden = {k: v for k, v in options.items() if chosen.options.get(k) != v}
    if options or tolerances:
        chosen = chosen.with_changes(options=options, tolerances=tolerances)
    spec = get_target(chosen.target)
    implementation = spec.implementation()  # missing backend → names the extra to install
    quant = request.quant
    if chosen.precision == "int8" and quant is None:
        quant = build_quant_spec(cfg, chosen, request.calibration, request.extra_float_modules)
    out_dir = bundles.writable_dir(Path(request.out_dir))
    bundle = out_dir / (bundles.bundle_name(cfg.name, chosen.name, overridden) + request.bundle_suffix)
    seconds: dict[str, float] = {}

    clock = time.perf_counter()
    step(f"loading {cfg.name}" + (f" from {request.weights}" if request.weights else " (random weights)"))
    eval_model, report = load_eval_model(cfg.name, request.weights)
    cfg = eval_model.cfg  # a trained checkpoint's classes / input size
    float_model = request.float_model
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

    with bundles.staging(out_dir) as staging:
        clock = time.perf_counter()
        step(f"exporting to {spec.name} ({chosen.precision}, recipe {chosen.name})")
        extra = {"quant": quant} if quant is not None else {}
        result = implementation.export(deploy_model, example[:1], chosen.precision, chosen.options, staging, **extra)
        seconds["export"] = time.perf_counter() - clock

        clock = time.perf_counter()
        if request.verify:
            step(f"verifying in {spec.runtime}")
            verification = _verify(spec, implementation, result, chosen, deploy_model, example, reference,
                                   qat=qat_program is not None, enforce_fidelity=request.enforce_fidelity,
                                   seen=None if seen is None else (seen, _reference_outputs(qat_program, reference_model, seen)))
            verification["images"] = images
            verification["host"] = host_isa()
        else:
            verification = {"check": "skipped (--no-verify)", "passed": None}
        _check_int8_kernels(implementation, result, verification, enforce=request.verify)
        seconds["verify"] = time.perf_counter() - clock

        if verification.get("passed") is False:
            raise VerificationFailed(
                f"{cfg.name} → {spec.name} {chosen.precision} failed verification "
                f"({verification['check']}): {'; '.join(verification['failures'])}; nothing was written"
            )
        manifest = _manifest(cfg, chosen, spec, result, report, request.weights, verification, seconds)
        manifest["output"]["class_names"] = getattr(eval_model, "class_names", None)
        manifest["random_weights"] = not request.weights and request.float_model is None
        if quant is not None:
            manifest["quantization"] = quant.summary() | {"reference": "QAT int8 program (PyTorch)"
                                                          if qat_program is not None else "fp32 eval model"}
            if quant.qat_state:
                manifest["quantization"]["qat_program"] = _keep_qat_program(quant.qat_state, staging)
        bundles.write_manifest(staging, manifest)
        step(f"writing {bundle}")
        bundles.place(staging, bundle)
    return ExportOutcome(artifact=bundle / result.path.name, bundle=bundle, manifest=manifest, seconds=seconds)


def _keep_qat_program(state: dict[str, torch.Tensor], folder: Path) -> dict[str, Any]:
    """The QAT program's trained state, written beside the artifact: the program the artifact
    answers to exists nowhere else, and ``edgevit inspect`` makes it again from this file."""
    from edgevit.quant.qat import PROGRAM_STATE_FILE, write_program_state

    path = folder / PROGRAM_STATE_FILE
    write_program_state(state, path)
    return {"file": PROGRAM_STATE_FILE, "sha256": file_sha256(path), "bytes": path.stat().st_size,
            "holds": "the batch-1 QAT graph's trained weights, fake-quant scales and ranges (safetensors)"}


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


def _verify(spec, implementation, result, recipe: Recipe, deploy_model: nn.Module, example: torch.Tensor,
            reference: np.ndarray, qat: bool = False, enforce_fidelity: bool = True,
            seen: tuple[torch.Tensor, np.ndarray] | None = None) -> dict[str, Any]:
    """The artifact (or, where its runtime cannot run here, the target's pre-check) against the
    reference on ``example``; ``seen`` (images calibration saw, their reference) is checked the
    same way for the record, with the artifact loaded once. Without ``enforce_fidelity`` (random
    weights: agreement then says nothing about real data) the tolerances and the collapse guard
    are reported under ``unenforced_failures``; NaN/Inf and the pre-check's own findings still fail."""
    names: list[str] = []  # a pre-check names itself when it runs
    try:
        session = runtimes.load(spec.runs_in, result.path, options=recipe.options)
        check = spec.runtime

        def outputs(images: torch.Tensor, expected: np.ndarray):
            return session.run(images.numpy()), expected, [], []
    except runtimes.RuntimeUnavailable as unavailable:
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
    fidelity = recipe.tolerances.failures(figures) + [f for f in [collapse_failure(compared_with, figures)] if f]
    failures = (["output has NaN or Inf"] if not figures["finite"] else []) + (fidelity if enforce_fidelity else []) + failures
    verification = {"check": check or names[0], "batch": len(example), **figures,
                    "tolerances": recipe.to_dict()["verify"], "passed": not failures, "failures": failures, "notes": notes}
    if not enforce_fidelity:
        verification |= {"fidelity": "reported, not enforced (random weights)", "unenforced_failures": fidelity}
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
        "artifact": {"file": artifact.name, "bytes": bundles.artifact_bytes(artifact), "sha256": bundles.artifact_sha256(artifact)},
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
