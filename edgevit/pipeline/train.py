"""The train flow: ``edgevit train`` — data → a registered model with a new classifier → the
fine-tuning loop (:mod:`edgevit.training`) → weights saved with what rebuilds the model."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from edgevit.core.errors import EdgevitError
from edgevit.data.images import Preprocessing
from edgevit.models import create_model, get_model_cfg, load_checkpoint
from edgevit.training import fine_tune, save_trained, training_data


def _validation_data(eval_data: str | None, data: str, cfg, limit: int | None, seed: int, classes: Sequence[str]):
    source = eval_data or ("fashion-mnist" if data == "fashion-mnist" else None)
    if source is None:
        return None
    validation = training_data(source, cfg, limit=limit, seed=seed, split="test")
    if list(validation.classes) != list(classes):
        raise EdgevitError(f"the evaluation classes {list(validation.classes)} differ from the training classes "
                           f"{list(classes)}")
    return validation


@dataclass(frozen=True)
class TrainRequest:
    """One ``edgevit train`` run (see its ``--help``)."""

    model: str
    data: str  # fashion-mnist, or a folder with one subfolder per class
    out: str | os.PathLike  # the .safetensors file to write
    input_size: int | None = None
    weights: str | None = None
    epochs: float | None = None
    steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    label_smoothing: float = 0.0
    limit: int | None = None
    eval_data: str | None = None
    eval_limit: int | None = None
    seed: int = 0
    progress: bool = True


def train_model(request: TrainRequest) -> dict[str, Any]:
    """Fine-tune registered ``request.model`` on ``request.data`` (``fashion-mnist`` or a folder with one
    subfolder per class) with a new classifier, save the weights to ``request.out`` and return figures
    (with ``eval_top1`` on the Fashion-MNIST test split, or on ``eval_data``)."""
    r = request
    model_name, data, out, input_size, seed = r.model, r.data, r.out, r.input_size, r.seed
    if Path(out).suffix != ".safetensors":
        raise EdgevitError(f"--out must be a .safetensors file, got {out}")
    registered = get_model_cfg(model_name)
    size = tuple(registered.input_size) if input_size is None else (registered.input_size[0], input_size, input_size)
    # The data's class count decides the classifier; load the data once the size is known.
    prep_cfg = Preprocessing.from_cfg(registered.replace(input_size=size))
    train_set = training_data(data, prep_cfg, limit=r.limit, seed=seed)
    classes = list(train_set.classes)
    validation = _validation_data(r.eval_data, data, prep_cfg, r.eval_limit, seed, classes)
    torch.manual_seed(seed)  # the same initial weights on every run (and every DDP process)
    model = create_model(model_name, num_classes=len(classes), input_size=size, labels=train_set.name)
    if r.weights:
        load_checkpoint(model, r.weights)  # a classifier for other classes is dropped, as it should be
    figures = fine_tune(model, train_set, epochs=r.epochs, steps=r.steps, batch_size=r.batch_size, lr=r.lr,
                        weight_decay=r.weight_decay, warmup_steps=r.warmup_steps, label_smoothing=r.label_smoothing,
                        seed=seed, progress=r.progress, eval_data=validation)
    figures = {"model": model_name, "data": data, "input_size": list(size), "classes": len(classes), **figures}
    saved = save_trained(model, out, class_names=classes, figures=figures)
    figures["out"] = str(saved) if saved else str(out)
    return figures
