"""Quantization: calibration runs, per-family ViT-aware recipes, sensitivity analysis, QAT, and
``quantize_model`` — the one entry point that turns them into verified int8 artifacts through
the export pipeline (every target's int8 is checked against float32 before it is kept)."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgevit.errors import EdgevitError
from edgevit.quant.spec import METHODS, MODES, OP_KINDS, QuantSpec


@dataclass
class QuantizeOutcome:
    export: Any  # edgevit.export.pipeline.ExportOutcome of the kept artifact
    calibration: Any = None
    sensitivity: list = field(default_factory=list)  # LayerSensitivity, most sensitive first
    search: list = field(default_factory=list)  # DropSearchStep per float-layer count tried
    qat: dict[str, Any] | None = None  # QAT training figures
    qat_result: Any = None  # edgevit.quant.qat.QatResult: pass it back to export the same QAT to another target


def quantize_model(
    model: str,
    target: str = "onnx",
    mode: str = "static",
    *,
    calib_data: str | os.PathLike | None = None,
    calib_stats: str | os.PathLike | None = None,
    calib_images: int | None = None,
    seed: int = 0,
    weights: str | None = None,
    out_dir: str | os.PathLike = "artifacts",
    recipe: str | None = None,
    options: dict[str, Any] | None = None,
    tolerances: dict[str, float] | None = None,
    method: str | None = None,
    float_ops: tuple[str, ...] | None = None,
    float_modules: tuple[str, ...] = (),
    max_drop: float | None = None,
    eval_data: str | None = None,
    eval_limit: int | None = None,
    train_data: str | None = None,
    train_limit: int | None = None,
    qat_epochs: float = 1.0,
    qat_lr: float = 1e-5,
    qat_result: Any = None,
    progress: Callable[[str], None] | None = None,
) -> QuantizeOutcome:
    """Quantize ``model`` for ``target`` in ``mode``; see ``edgevit quantize --help``."""
    from edgevit.export.pipeline import export_model, load_eval_model
    from edgevit.export.recipes import resolve_recipe
    from edgevit.models import get_model_cfg, to_deploy

    step = progress or (lambda _message: None)
    get_model_cfg(model)  # unknown names fail before any slow work
    float_modules = tuple(float_modules or ())
    if mode not in MODES:
        raise EdgevitError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if method is not None and method not in METHODS:
        raise EdgevitError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if float_ops and set(float_ops) - set(OP_KINDS):
        raise EdgevitError(f"unknown float op kinds {', '.join(sorted(set(float_ops) - set(OP_KINDS)))}; known: {', '.join(OP_KINDS)}")
    chosen = resolve_recipe(recipe, target, "int8", options, mode)
    overrides = {k: v for k, v in {"method": method, "float_ops": list(float_ops) if float_ops else None}.items() if v is not None}
    if overrides:
        chosen = chosen.with_changes(quantization=overrides)
    if calib_data is None and calib_stats is None and mode != "dynamic":
        raise EdgevitError(f"{mode} quantization needs calibration images: give --calib-data DIR "
                           f"(or --calib-stats FILE from  edgevit calibrate {model} --calib-data DIR)")
    if mode == "qat" and not train_data and qat_result is None:
        raise EdgevitError("qat needs labelled training data: give --train-data fashion-mnist or a folder with one subfolder per class")
    if max_drop is not None and max_drop < 0:
        raise EdgevitError(f"--max-drop must be >= 0 top-1 points, got {max_drop}")
    eval_model, _report = load_eval_model(model, weights)
    cfg = eval_model.cfg

    calibration = None
    if calib_stats is not None:
        from edgevit.quant.calibration import load_calibration
        calibration = load_calibration(calib_stats, cfg)
        step(f"calibration: {calib_stats} ({len(calibration.inputs)} images)")
    elif calib_data is not None:
        from edgevit.quant.calibration import calibration_from_folder
        count = calib_images or chosen.quantization.get("calibration_images", 64)
        step(f"calibration: sampling {count} images from {calib_data}")
        calibration = calibration_from_folder(calib_data, cfg, count, seed=seed, warn=lambda m: step(f"warning: {m}"))

    outcome = QuantizeOutcome(export=None, calibration=calibration)
    export_kwargs = dict(target=chosen.target, weights=weights, recipe=chosen, options=options, tolerances=tolerances, mode=mode,
                         calibration=calibration, progress=progress)

    if mode == "qat":
        from edgevit.export.pipeline import build_quant_spec
        from edgevit.quant.qat import run_qat
        from edgevit.train import training_data

        spec = build_quant_spec(cfg, chosen, calibration, float_modules)
        result = qat_result
        if result is None:
            data = training_data(train_data, cfg, limit=train_limit)
            step(f"QAT: fine-tuning {cfg.name} with fake quantization on {train_data}")
            result = run_qat(to_deploy(eval_model), data, spec.calibration, spec, epochs=qat_epochs, lr=qat_lr)
        outcome.qat, outcome.qat_result = result.figures, result
        outcome.export = export_model(model, **export_kwargs, quant=spec.with_changes(qat_model=result.converted_model),
                                      float_model=result.fine_tuned_float_model, out_dir=out_dir)
        return outcome

    if max_drop is None:
        outcome.export = export_model(model, **export_kwargs, out_dir=out_dir, extra_float_modules=float_modules)
        return outcome

    from edgevit.quant.sensitivity import keep_float_until, layer_sensitivity

    if calibration is None:
        raise EdgevitError("--max-drop needs calibration images for the sensitivity analysis: give --calib-data DIR")
    deploy_model = to_deploy(eval_model)
    step("sensitivity: quantizing one layer at a time")
    outcome.sensitivity = layer_sensitivity(deploy_model, calibration.inputs[:8])
    ranking = [s.module for s in outcome.sensitivity]
    measure_drop = _drop_meter(eval_model, cfg, eval_data, eval_limit, calibration)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".edgevit-partial-{os.getpid()}-search-", dir=out_dir))
    try:
        def export_with_float(layers: tuple[str, ...]):
            return export_model(model, **export_kwargs, out_dir=scratch, extra_float_modules=float_modules + layers,
                                bundle_suffix=f"+float{len(layers)}")

        chosen_step, outcome.search = keep_float_until(
            ranking, export_with_float, measure_drop, max_drop,
            report=lambda s: step(f"  {s.float_layers} layers float → drop {s.drop:.2f} pt"))
        if chosen_step.drop > max_drop:
            raise EdgevitError(f"even with all {len(ranking)} conv/linear layers in float the drop is "
                               f"{chosen_step.drop:.2f} pt > --max-drop {max_drop}; nothing was written")
        kept = chosen_step.artifact
        final = out_dir / kept.bundle.name.rsplit("+float", 1)[0]
        from edgevit.export.pipeline import _place
        _place(kept.bundle, final)
        kept.bundle, kept.artifact = final, final / kept.artifact.name
        outcome.export = kept
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return outcome


def _drop_meter(eval_model, cfg, eval_data, eval_limit, calibration):
    """Top-1 points lost by an artifact: on labelled ``eval_data`` when given, else the share of
    calibration images whose top-1 class changed from float's (no labels needed)."""
    from edgevit.evaluate import evaluate

    if eval_data:
        baseline = evaluate(eval_model, eval_data, limit=eval_limit)["top1"]
        return lambda artifact: baseline - evaluate(artifact.bundle, eval_data, limit=eval_limit)["top1"]

    import numpy as np
    import torch

    from edgevit.export import get_target

    with torch.no_grad():
        reference = eval_model(calibration.inputs).argmax(1).numpy()

    def disagreement(artifact) -> float:
        manifest = artifact.manifest
        runner = get_target(manifest["target"]).implementation().load_runner(artifact.artifact, manifest["recipe"]["options"])
        predicted = runner(calibration.inputs.numpy()).argmax(1)
        return 100.0 * float(np.mean(predicted != reference))

    return disagreement


__all__ = ["METHODS", "MODES", "OP_KINDS", "QuantSpec", "QuantizeOutcome", "quantize_model"]
