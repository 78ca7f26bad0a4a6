"""Access to the parity references in ../shared/reference (see its README).

The references are the ground truth made with timm and the authors' own code; tests rebuild each
checkpoint from its key/shape list, write it to disk the way that source publishes it, and load it
through edgevit's real loader.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("EDGEVIT_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))

# reference file stem -> the edgevit model it must load into
REFERENCE_MODELS = {
    "timm__mobilevitv2_050": "mobilevitv2_050",
    "timm__mobilevitv2_100": "mobilevitv2_100",
    "timm__efficientformer_l1": "efficientformer_l1",
    "snap__efficientformer_l1": "efficientformer_l1",
    "timm__levit_128s": "levit_128s",
    "timm__levit_conv_128s": "levit_conv_128s",
    "fb__LeViT_128S": "levit_128s",
    "saic__edgevit_xxs": "edgevit_xxs",
}


def require_reference_dir() -> Path:
    """The reference folder; in CI its absence is an error, elsewhere a skip with the reason."""
    if REFERENCE_DIR.is_dir():
        return REFERENCE_DIR
    message = f"parity references not found at {REFERENCE_DIR} (set EDGEVIT_REFERENCE_DIR)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@functools.cache
def det_weights():
    """The shared deterministic-weights module, imported from its file."""
    path = require_reference_dir() / "det_weights.py"
    spec = importlib.util.spec_from_file_location("det_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def load_reference(stem: str) -> dict:
    return json.loads((require_reference_dir() / "parity" / f"{stem}.json").read_text())


def reference_state_dict(stem: str) -> dict[str, torch.Tensor]:
    return det_weights().state_dict_from_reference(load_reference(stem))


def reference_input(stem: str) -> torch.Tensor:
    spec = load_reference(stem)["input"]
    return det_weights().inputs_for(spec["shape"], spec["seed"])


def reference_expected(stem: str) -> torch.Tensor:
    return torch.tensor(load_reference(stem)["expected"], dtype=torch.float32)


def write_as_published(stem: str, directory: Path, state_dict: dict | None = None) -> Path:
    """Write the reference checkpoint as its source publishes it.

    timm publishes safetensors; the authors publish a torch ``.pth`` holding ``{"model": sd}``.
    """
    state_dict = reference_state_dict(stem) if state_dict is None else state_dict
    source = load_reference(stem)["source"]
    if source == "timm":
        from safetensors.torch import save_file

        path = directory / f"{stem}.safetensors"
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        path = directory / f"{stem}.pth"
        torch.save({"model": state_dict}, path)
    return path


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the expected output's largest magnitude."""
    return float((actual - expected).abs().max() / expected.abs().max())
