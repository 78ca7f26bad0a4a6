"""Calibration runs: a fixed sample of the user's images, preprocessed exactly as the model's
config says, plus the activation ranges the deploy model produces on it.

``edgevit calibrate`` saves a run as one safetensors file (never a pickle): the preprocessed
sample and a per-layer range table, with the model, preprocessing and image summary in its
metadata. ``quantize --calib-stats FILE`` reuses it for every target. Each target computes its
own scales from the *same* saved sample (its observers sit on its own graph's tensors, whose
names no other runtime shares); the range table is the run's readable record and what the
sensitivity analysis reads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from edgevit.core.datafiles import write_safetensors
from edgevit.core.errors import EdgevitError

_METADATA_KEY = "edgevit_calibration"
RANGE_COLUMNS = ("min", "max", "p0.01", "p99.99")


@dataclass
class Calibration:
    inputs: torch.Tensor  # NCHW float32, preprocessed
    summary: dict[str, Any]  # folder, images used/requested/skipped, seed, preprocessing, digest
    ranges: dict[str, tuple[float, ...]] = field(default_factory=dict)  # module → RANGE_COLUMNS

    def save(self, path: str | Path) -> Path:
        names = list(self.ranges)
        tensors = {"inputs": self.inputs,
                   "ranges": torch.tensor([self.ranges[n] for n in names], dtype=torch.float64).reshape(-1, len(RANGE_COLUMNS))}
        metadata = {_METADATA_KEY: json.dumps({"summary": self.summary, "modules": names, "columns": RANGE_COLUMNS})}
        return write_safetensors(tensors, path, metadata)


def preprocessing_of(cfg) -> dict[str, Any]:
    return {"input_size": list(cfg.input_size), "interpolation": cfg.interpolation, "crop_pct": cfg.crop_pct,
            "mean": list(cfg.mean), "std": list(cfg.std)}


def calibration_from_folder(folder: str | Path, cfg, count: int, seed: int = 0,
                            progress: Callable[..., None] | None = None,
                            warn: Callable[[str], None] | None = None) -> Calibration:
    """A fixed-seed sample of ``count`` images from ``folder`` (flat or class subfolders)."""
    from edgevit.data import calibration_batch

    sample = calibration_batch(folder, cfg, count, seed=seed, progress=progress)
    for message in getattr(sample, "warnings", []) or []:
        (warn or (lambda _m: None))(message)
    # One preprocessing record format, whatever the sampler reports, so reloads compare exactly.
    summary = dict(sample.summary()) | {"preprocessing": preprocessing_of(cfg)}
    return Calibration(inputs=sample.tensor.float(), summary=summary)


def activation_ranges(model: nn.Module, inputs: torch.Tensor, batch: int = 16) -> dict[str, tuple[float, ...]]:
    """min / max / 0.01 % / 99.99 % of every leaf module's output over the sample."""
    leaves = {name: module for name, module in model.named_modules() if name and not list(module.children())}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in leaves}

    def record(name):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                flat = output.detach().flatten()
                # A strided subsample keeps the percentiles cheap on large feature maps.
                seen[name].append(flat[:: max(1, flat.numel() // 65536)])
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in leaves.items()]
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), batch):
                model(inputs[start:start + batch])
    finally:
        for handle in handles:
            handle.remove()
    ranges = {}
    for name, chunks in seen.items():
        if chunks:
            values = torch.cat(chunks).double()
            low, high = torch.quantile(values[: 1 << 24], torch.tensor([1e-4, 1 - 1e-4], dtype=torch.float64)).tolist()
            ranges[name] = (values.min().item(), values.max().item(), low, high)
    return ranges


def load_calibration(path: str | Path, cfg) -> Calibration:
    """A saved calibration run, checked to match ``cfg``'s model input and preprocessing."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EdgevitError(f"calibration stats file {path} does not exist; make one with  edgevit calibrate MODEL --calib-data DIR --out {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {})[_METADATA_KEY])
            inputs = handle.get_tensor("inputs")
            table = handle.get_tensor("ranges")
    except Exception as exc:  # safetensors, json and missing keys each raise their own types
        raise EdgevitError(f"{path} is not an edgevit calibration stats file ({type(exc).__name__}); "
                           f"make one with  edgevit calibrate MODEL --calib-data DIR") from None
    summary = metadata["summary"]
    expected = preprocessing_of(cfg)
    if summary.get("preprocessing") != expected:
        raise EdgevitError(f"{path} was calibrated with preprocessing {summary.get('preprocessing')}, but {cfg.name} "
                           f"uses {expected}; re-run  edgevit calibrate {cfg.name} --calib-data DIR")
    if tuple(inputs.shape[1:]) != tuple(cfg.input_size):
        raise EdgevitError(f"{path} holds {tuple(inputs.shape[1:])} inputs, {cfg.name} takes {tuple(cfg.input_size)}")
    ranges = {name: tuple(row) for name, row in zip(metadata["modules"], table.tolist())}
    return Calibration(inputs=inputs.float(), summary=summary | {"stats_file": str(Path(path).resolve())}, ranges=ranges)


def split_held_out(images: torch.Tensor, verify_batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images to calibrate on, images to verify on): a quarter of the user's sample, at most the
    recipe's verification batch, is held out, so int8 is judged on images its ranges were not
    fitted to (the sample is already a fixed-seed random draw). A single image cannot be split."""
    held = min(verify_batch, max(1, len(images) // 4)) if len(images) > 1 else 0
    return (images[:len(images) - held], images[len(images) - held:]) if held else (images, None)
