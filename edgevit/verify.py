"""Judging an artifact's outputs against PyTorch's: the verification batch, the agreement
figures, the tolerances a recipe sets and the collapse guard. Pure numpy and torch: which
runtime produced the outputs is the pipeline's business."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgevit.core.errors import EXIT_VERIFICATION_FAILED, EdgevitError

TOLERANCE_KEYS = ("max_rel_error", "min_cosine", "min_top1_agreement")


class VerificationFailed(EdgevitError):
    """The artifact's outputs are outside the recipe's tolerances (nothing was written)."""

    exit_code = EXIT_VERIFICATION_FAILED


@dataclass(frozen=True)
class Tolerances:
    max_rel_error: float | None = None
    min_cosine: float | None = None
    min_top1_agreement: float | None = None

    def failures(self, figures: dict[str, float]) -> list[str]:
        """The bounds ``figures`` break, as readable phrases."""
        broken = []
        if self.max_rel_error is not None and figures["max_rel_error"] > self.max_rel_error:
            broken.append(f"max relative error {figures['max_rel_error']:.3g} > {self.max_rel_error:g}")
        if self.min_cosine is not None and figures["cosine"] < self.min_cosine:
            broken.append(f"cosine {figures['cosine']:.6f} < {self.min_cosine:g}")
        if self.min_top1_agreement is not None and figures["top1_agreement"] < self.min_top1_agreement:
            broken.append(f"top-1 agreement {figures['top1_agreement']:.3f} < {self.min_top1_agreement:g}")
        return broken


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




def block_figures(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float] | None:
    """How far a block's output in a runtime is from PyTorch's, per image then summarised:
    mean cosine, SQNR in dB (signal over error power, all images), max error relative to the
    reference's largest magnitude. None where the two do not hold the same number of values."""
    reference = reference.astype(np.float64).reshape(len(reference), -1)
    if candidate.size != reference.size:
        return None
    candidate = candidate.astype(np.float64).reshape(reference.shape)
    if not np.isfinite(candidate).all():  # overflowed (float16) or NaN: as far as it gets
        return {"cosine": 0.0, "sqnr_db": float("-inf"), "max_rel_error": float("inf")}
    error = candidate - reference
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cosine = np.sum(reference * candidate, axis=1) / np.maximum(norms, 1e-30)
    noise = float(np.sum(error ** 2))
    return {"cosine": float(cosine.mean()),
            "sqnr_db": float(10 * np.log10(max(float(np.sum(reference ** 2)), 1e-30) / noise)) if noise > 0 else float("inf"),
            "max_rel_error": float(np.abs(error).max() / max(float(np.abs(reference).max()), 1e-30))}


JUMP_DB = 10.0  # error power ×10 from one block to the next: where the error jumps
# SQNR counted as exact: what 8-bit quantization of a real activation reaches (≈53 dB less
# 20·log10(peak/rms): 27 dB at a peak of 20 rms). Int8 blocks of a healthy model sit near it
# (EdgeViT-XXS's first int8 block: 28.8 dB), so the first quantized block is no jump by itself.
EXACT_DB = 30.0


def first_jump(sqnr_db: list[float | None]) -> int | None:
    """Index of the first block whose output SQNR is :data:`JUMP_DB` below the block before it
    (the input is exact; SQNR above :data:`EXACT_DB` counts as exact); None where the error
    grows without a jump. Blocks without figures (None) are passed over."""
    previous = EXACT_DB
    for index, value in enumerate(sqnr_db):
        if value is None:
            continue
        value = min(value, EXACT_DB)
        if previous - value >= JUMP_DB:
            return index
        previous = value
    return None
