"""The quantize flow: calibration → QAT, or the ``--max-drop`` search, or neither → the export
flow, so every target's int8 is verified against float32 before it is kept."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from edgevit.core import bundle as bundles
from edgevit.core.errors import EdgevitError
from edgevit.models import get_model_cfg, to_deploy
from edgevit.pipeline.export import ExportOutcome, ExportRequest, Progress, build_quant_spec, export_model
from edgevit.quant.calibration import Calibration, activation_ranges, calibration_from_folder, load_calibration
from edgevit.quant.qat import QatResult, run_qat
from edgevit.quant.sensitivity import keep_float_until, layer_sensitivity
from edgevit.quant.spec import check_choices
from edgevit.targets.recipes import resolve_recipe
from edgevit.training import load_eval_model, training_data


@dataclass(frozen=True)
class QuantizeRequest:
    """One quantization: ``edgevit quantize``'s options (see its ``--help``)."""

    model: str
    target: str = "onnx"
    mode: str = "static"
    calib_data: str | Path | None = None
    calib_stats: str | Path | None = None
    calib_images: int | None = None
    seed: int = 0
    weights: str | None = None
    out_dir: str | Path = "artifacts"
    recipe: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    method: str | None = None
    float_ops: tuple[str, ...] | None = None
    float_modules: tuple[str, ...] = ()
    max_drop: float | None = None
    eval_data: str | None = None
    eval_limit: int | None = None
    train_data: str | None = None
    train_limit: int | None = None
    qat_epochs: float = 1.0
    qat_lr: float = 1e-5
    qat_result: QatResult | None = None  # a finished QAT run, to export the same QAT to another target
    random_weights: bool = False  # latency-only work: no weights, fidelity reported but not enforced


@dataclass
class QuantizeOutcome:
    export: ExportOutcome | None  # the kept artifact
    calibration: Calibration | None = None
    sensitivity: list = field(default_factory=list)  # LayerSensitivity, most sensitive first
    search: list = field(default_factory=list)  # DropSearchStep per float-layer count tried
    qat: dict[str, Any] | None = None  # QAT training figures
    qat_result: QatResult | None = None  # pass it back (QuantizeRequest.qat_result) to export the same QAT to another target


def calibrate(model_name: str, calib_data: str | Path, count: int = 64, seed: int = 0, weights: str | None = None,
              progress: Callable[..., None] | None = None, warn: Callable[[str], None] | None = None) -> Calibration:
    """``edgevit calibrate``: sample and preprocess images as ``model_name``'s config says, and
    record its deploy model's activation ranges (``quantize --calib-stats`` reuses the run)."""
    model, _report = load_eval_model(model_name, weights)
    calibration = calibration_from_folder(calib_data, model.cfg, count, seed, progress, warn)
    calibration.summary["model"] = model.cfg.name
    calibration.ranges = activation_ranges(to_deploy(model), calibration.inputs)
    return calibration


def quantize_model(request: QuantizeRequest, progress: Progress | None = None) -> QuantizeOutcome:
    """Quantize ``request.model`` for its target in its mode; see ``edgevit quantize --help``."""
    model, mode, max_drop = request.model, request.mode, request.max_drop
    step = progress or (lambda _message: None)
    get_model_cfg(model)  # unknown names fail before any slow work
    float_modules = tuple(request.float_modules or ())
    check_choices(mode, request.method, request.float_ops)
    chosen = resolve_recipe(request.recipe, request.target, "int8", request.options, mode)
    overrides = {k: v for k, v in {"method": request.method,
                                   "float_ops": list(request.float_ops) if request.float_ops else None}.items() if v is not None}
    if overrides:
        chosen = chosen.with_changes(quantization=overrides)
    if request.calib_data is None and request.calib_stats is None and mode != "dynamic":
        raise EdgevitError(f"{mode} quantization needs calibration images: give --calib-data DIR "
                           f"(or --calib-stats FILE from  edgevit calibrate {model} --calib-data DIR)")
    if mode == "qat" and not request.train_data and request.qat_result is None:
        raise EdgevitError("qat needs labelled training data: give --train-data fashion-mnist or a folder with one subfolder per class")
    if max_drop is not None and max_drop < 0:
        raise EdgevitError(f"--max-drop must be >= 0 top-1 points, got {max_drop}")
    if request.weights and request.random_weights:
        raise EdgevitError("give --weights or --random-weights, not both")
    if not request.weights and not request.random_weights and request.qat_result is None:
        raise EdgevitError("int8 of random weights is not meaningful (its ranges and its check against float would "
                           "describe noise): give --weights FILE (or --weights pretrained), or --random-weights for "
                           "latency-only work, where the figures are reported and not enforced")
    eval_model, _report = load_eval_model(model, request.weights)
    cfg = eval_model.cfg

    calibration = None
    if request.calib_stats is not None:
        calibration = load_calibration(request.calib_stats, cfg)
        step(f"calibration: {request.calib_stats} ({len(calibration.inputs)} images)")
    elif request.calib_data is not None:
        count = request.calib_images or chosen.quantization.get("calibration_images", 64)
        step(f"calibration: sampling {count} images from {request.calib_data}")
        calibration = calibration_from_folder(request.calib_data, cfg, count, seed=request.seed,
                                              warn=lambda m: step(f"warning: {m}"))

    outcome = QuantizeOutcome(export=None, calibration=calibration)
    base = ExportRequest(model, target=chosen.target, weights=request.weights, out_dir=request.out_dir, recipe=chosen,
                         options=request.options, tolerances=request.tolerances, mode=mode, calibration=calibration,
                         extra_float_modules=float_modules, enforce_fidelity=not request.random_weights)

    if mode == "qat":
        spec = build_quant_spec(cfg, chosen, calibration, float_modules)
        result = request.qat_result
        if result is None:
            data = training_data(request.train_data, cfg, limit=request.train_limit)
            step(f"QAT: fine-tuning {cfg.name} with fake quantization on {request.train_data}")
            result = run_qat(to_deploy(eval_model), data, spec.calibration, spec, epochs=request.qat_epochs, lr=request.qat_lr)
        outcome.qat, outcome.qat_result = result.figures, result
        outcome.export = export_model(dataclasses.replace(
            base, quant=spec.with_changes(qat_model=result.converted_model, qat_state=result.program_state),
            float_model=result.fine_tuned_float_model,
            extra_float_modules=()), progress)
        return outcome

    if max_drop is None:
        outcome.export = export_model(base, progress)
        return outcome

    if calibration is None:
        raise EdgevitError("--max-drop needs calibration images for the sensitivity analysis: give --calib-data DIR")
    deploy_model = to_deploy(eval_model)
    step("sensitivity: quantizing one layer at a time")
    outcome.sensitivity = layer_sensitivity(deploy_model, calibration.inputs[:8])
    ranking = [s.module for s in outcome.sensitivity]
    measure_drop = _drop_meter(eval_model, request.eval_data, request.eval_limit, calibration)
    out_dir = bundles.writable_dir(Path(request.out_dir))
    with bundles.staging(out_dir, "search-") as scratch:
        def export_with_float(layers: tuple[str, ...]) -> ExportOutcome:
            return export_model(dataclasses.replace(base, out_dir=scratch, extra_float_modules=float_modules + layers,
                                                    bundle_suffix=f"+float{len(layers)}"), progress)

        chosen_step, outcome.search = keep_float_until(
            ranking, export_with_float, measure_drop, max_drop,
            report=lambda s: step(f"  {s.float_layers} layers float → drop {s.drop:.2f} pt"))
        if chosen_step.drop > max_drop:
            raise EdgevitError(f"even with all {len(ranking)} conv/linear layers in float the drop is "
                               f"{chosen_step.drop:.2f} pt > --max-drop {max_drop}; nothing was written")
        kept = chosen_step.artifact
        final = out_dir / kept.bundle.name.rsplit("+float", 1)[0]
        bundles.place(kept.bundle, final)
        kept.bundle, kept.artifact = final, final / kept.artifact.name
        outcome.export = kept
    return outcome


def _drop_meter(eval_model, eval_data, eval_limit, calibration):
    """Top-1 points lost by an artifact: on labelled ``eval_data`` when given, else the share of
    calibration images whose top-1 class changed from float's (no labels needed)."""
    from edgevit.pipeline.evaluate import artifact_session, evaluate

    if eval_data:
        baseline = evaluate(eval_model, eval_data, limit=eval_limit)["top1"]
        return lambda artifact: baseline - evaluate(artifact.bundle, eval_data, limit=eval_limit)["top1"]

    with torch.no_grad():
        reference = eval_model(calibration.inputs).argmax(1).numpy()

    def disagreement(artifact: ExportOutcome) -> float:
        predicted = artifact_session(artifact.artifact, artifact.manifest).run(calibration.inputs.numpy()).argmax(1)
        return 100.0 * float(np.mean(predicted != reference))

    return disagreement


__all__ = ["QuantizeOutcome", "QuantizeRequest", "quantize_model"]
