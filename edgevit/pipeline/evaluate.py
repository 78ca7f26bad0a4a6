"""Accuracy of a model or an exported artifact on labelled images.

The subject is a registered model name (the PyTorch eval model, random or ``weights``; trained
weights from ``edgevit train`` set the classes and input size), an edgevit model object, or an
artifact written by ``edgevit export``: its bundle folder, or the artifact inside it. An
artifact is run in its target's own runtime, fed with the preprocessing its manifest records.

The data is a folder with one subfolder per class, or ``fashion-mnist`` (its test split).
Labels: when the model's class names are known (names saved with trained weights, or a known
label set such as ``fashion-mnist``) and every class folder matches one of them (case, spaces
and punctuation ignored: "T-shirt_top" matches "T-shirt/top"), folders are matched by name;
otherwise a folder's label is its index in sorted order, and the result says "by index".
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from edgevit.data.fashion_mnist import FASHION_MNIST_CLASSES
from edgevit.data.images import Preprocessing, labelled_folder
from edgevit.core.errors import EdgevitError, MissingBackend, UnknownModelError

FASHION_MNIST = "fashion-mnist"
KNOWN_LABEL_SETS: dict[str, Sequence[str]] = {FASHION_MNIST: FASHION_MNIST_CLASSES}
ARTIFACT_SUFFIXES = (".onnx", ".pte", ".mlpackage")
_SHOWN_SKIPPED = 20

Progress = Callable[[int, int], None]


@dataclass
class Subject:
    """What is evaluated: how to run it and how to feed it."""

    name: str
    kind: str  # "pytorch" or "artifact"
    run: Callable[[np.ndarray], np.ndarray]  # NCHW float32 → logits
    preprocessing: Preprocessing
    num_classes: int
    class_names: Sequence[str] | None
    details: dict[str, Any]


def load_subject(subject: "str | os.PathLike | torch.nn.Module", weights: str | None = None) -> Subject:
    """A model name, an edgevit model object, or an artifact (bundle folder or artifact file), ready to run."""
    if isinstance(subject, torch.nn.Module):
        if weights:
            raise EdgevitError("weights apply to a model name; load them into the model object yourself")
        return _module_subject(subject, getattr(subject, "cfg", None), None, None)
    path = Path(subject).expanduser()
    if path.exists():
        if weights:
            raise EdgevitError("--weights applies to a model name, not to an artifact (its weights are inside it)")
        return _artifact_subject(path)
    if any(sep in str(subject) for sep in ("/", os.sep)) or path.suffix in ARTIFACT_SUFFIXES:
        raise EdgevitError(f"{subject} not found; give a registered model name or an artifact bundle from `edgevit export`")
    return _model_subject(str(subject), weights)


def _model_subject(name: str, weights: str | None) -> Subject:
    from edgevit.training import load_eval_model

    try:
        model, report = load_eval_model(name, weights)
    except UnknownModelError as exc:
        raise UnknownModelError(f"{exc} (and there is no file or folder {name!r})") from None
    weights_record = None if report is None else {"source": str(weights), "sha256": report.sha256,
                                                  "messages": report.messages}
    subject = _module_subject(model, model.cfg, model.class_names, weights_record)
    subject.details["random_weights"] = report is None
    return subject


def _module_subject(model: torch.nn.Module, cfg, class_names, weights_record) -> Subject:
    if cfg is None:
        raise EdgevitError(f"{type(model).__name__} has no .cfg; evaluate an edgevit model (create_model)")
    model.eval()

    @torch.no_grad()
    def run(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch)).numpy()

    return Subject(
        name=cfg.name, kind="pytorch", run=run, preprocessing=Preprocessing.from_cfg(cfg),
        num_classes=cfg.num_classes, class_names=class_names or KNOWN_LABEL_SETS.get(cfg.labels or ""),
        details={"model": cfg.name, "runtime": f"PyTorch {torch.__version__} (eval model)", "weights": weights_record},
    )


def _artifact_subject(path: Path) -> Subject:
    from edgevit.core.bundle import MANIFEST_NAME, find_manifest, read_manifest
    from edgevit.targets import get_target

    found = find_manifest(path)
    if found is None:
        raise EdgevitError(f"{path} has no {MANIFEST_NAME} (in it or beside it); evaluate a model name, or a "
                           "bundle written by `edgevit export`")
    bundle, manifest = found.parent, read_manifest(found.parent)
    try:
        artifact = bundle / manifest["artifact"]["file"]
        target = manifest["target"]
        preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
        output = manifest.get("output") or {}
        num_classes = int(output.get("num_classes", manifest["model"]["config"]["num_classes"]))
        model_name = manifest["model"]["name"]
    except (KeyError, TypeError, ValueError) as exc:
        raise EdgevitError(f"{bundle / MANIFEST_NAME} lacks {exc}; re-export the artifact with `edgevit export`") from None
    if path != bundle and path.resolve() != artifact.resolve():
        raise EdgevitError(f"{path.name} is not the artifact its manifest names ({artifact.name}); "
                           "give the bundle folder")
    if not artifact.exists():
        raise EdgevitError(f"the manifest names {artifact.name}, which is missing from {bundle}; re-export it")
    spec = get_target(target)
    runner = artifact_session(artifact, manifest).run
    labels = output.get("labels")
    class_names = output.get("class_names") or KNOWN_LABEL_SETS.get(labels or "")
    return Subject(
        name=str(bundle), kind="artifact", run=runner, preprocessing=preprocessing, num_classes=num_classes,
        class_names=class_names,
        details={"model": model_name, "target": target, "precision": manifest.get("precision"),
                 "runtime": spec.runtime, "artifact": str(artifact), "random_weights": bool(manifest.get("random_weights")),
                 "artifact_sha256": (manifest.get("artifact") or {}).get("sha256")},
    )


def artifact_session(artifact: Path, manifest: dict[str, Any]):
    """A bundle's artifact loaded in its target's runtime with the export's options; a runtime
    this machine lacks is one line (exit code 4)."""
    from edgevit import runtimes
    from edgevit.targets import get_target

    spec = get_target(manifest["target"])
    try:
        return runtimes.load(spec.runs_in, artifact, options=(manifest.get("recipe") or {}).get("options") or {})
    except runtimes.RuntimeUnavailable as reason:
        raise MissingBackend(f"cannot run {artifact.name} here: {reason}; run it where {spec.runtime} runs") from None


def normalise_class_name(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def map_labels(data_classes: Sequence[str], num_classes: int, model_classes: Sequence[str] | None
               ) -> tuple[list[int], str]:
    """For each data class, the model output it means, and how that was decided ("by name"/"by index")."""
    if model_classes:
        by_name = {normalise_class_name(c): i for i, c in enumerate(model_classes)}
        wanted = [normalise_class_name(c) for c in data_classes]
        if all(w in by_name for w in wanted):
            return [by_name[w] for w in wanted], "by name"
    if len(data_classes) > num_classes:
        raise EdgevitError(f"the data has {len(data_classes)} classes but the model only {num_classes} outputs, "
                           "and the class names do not match the model's")
    return list(range(len(data_classes))), "by index"


def class_warnings(data_classes: Sequence[str], num_classes: int, model_classes: Sequence[str] | None,
                   matched: str) -> list[str]:
    """Why the figures may mean little: classes matched by position between a model and data
    that do not share them (e.g. a 1000-class ImageNet head scored on 3 folders)."""
    if matched == "by name":
        return []
    if model_classes:
        missing = [c for c in data_classes if normalise_class_name(c) not in {normalise_class_name(m) for m in model_classes}]
        return [f"{len(missing)} of the data's {len(data_classes)} classes ({', '.join(missing[:3])}"
                f"{', …' if len(missing) > 3 else ''}) are not among the model's class names: classes were matched "
                f"by sorted index, which is only right if the model was trained on these folders in this order"]
    if num_classes != len(data_classes):
        return [f"the model has {num_classes} outputs and the data {len(data_classes)} classes, with no class names to "
                f"match: the data's classes were mapped to the first {len(data_classes)} outputs, so top-1 measures "
                f"little (train on this data with `edgevit train`, or evaluate data with the model's own classes)"]
    return []


def _batches(data: str, prep: Preprocessing, batch_size: int, limit: int | None, seed: int,
             progress: Progress | None) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], list[str], str, int, list]:
    """(batches of (images, data labels), data class names, description, total images, skipped list)."""
    skipped: list[tuple[str, str]] = []
    if data == FASHION_MNIST:
        from edgevit.data.fashion_mnist import load_fashion_mnist

        test = load_fashion_mnist("test", prep, limit=limit, seed=seed)

        def fashion() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for start in range(0, len(test), batch_size):
                yield test.batch(range(start, min(start + batch_size, len(test))))
                if progress:
                    progress(min(start + batch_size, len(test)), len(test))

        return fashion(), list(test.classes), "fashion-mnist (test split)", len(test), skipped
    folder = labelled_folder(data, prep, "evaluation", limit, seed)

    def images() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for loaded in folder.batches(batch_size, progress):
            skipped.extend(loaded.skipped)
            if len(loaded.files):
                yield loaded.tensor, loaded.labels

    return images(), folder.classes, str(folder.root), len(folder), skipped


def evaluate(
    subject: "str | os.PathLike | torch.nn.Module",
    data: str | os.PathLike,
    *,
    weights: str | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Top-1 (and top-5 where the model has ≥ 5 classes), in percent, of ``subject`` on ``data``.

    ``limit`` evaluates a fixed-seed random subset of that many images. Unreadable images are
    skipped and counted. See the module doc for subjects, data and how labels are matched.
    """
    if batch_size < 1:
        raise EdgevitError(f"batch size must be at least 1, got {batch_size}")
    loaded = load_subject(subject, weights)
    batches, data_classes, description, total, skipped = _batches(
        str(data), loaded.preprocessing, batch_size, limit, seed, progress)
    mapping, matched = map_labels(data_classes, loaded.num_classes, loaded.class_names)
    warnings = class_warnings(data_classes, loaded.num_classes, loaded.class_names, matched)
    if loaded.details.get("random_weights"):
        warnings.insert(0, "random weights (no --weights when it was built): the figures are chance level")
    to_output = torch.tensor(mapping, dtype=torch.int64)
    k = 5 if loaded.num_classes >= 5 else None
    top1 = top5 = seen = 0
    start = time.perf_counter()
    for images, labels in batches:
        logits = torch.from_numpy(np.asarray(loaded.run(images.numpy().astype(np.float32, copy=False))))
        if logits.shape != (len(labels), loaded.num_classes):
            raise EdgevitError(f"{loaded.name} returned shape {tuple(logits.shape)} for a batch of {len(labels)}; "
                               f"expected ({len(labels)}, {loaded.num_classes}) logits")
        targets = to_output[labels]
        top1 += int((logits.argmax(1) == targets).sum())
        if k:
            top5 += int((logits.topk(k, dim=1).indices == targets[:, None]).any(1).sum())
        seen += len(labels)
    seconds = time.perf_counter() - start
    if seen == 0:
        raise EdgevitError(f"no readable images in {description} ({len(skipped)} skipped)")
    return {
        "subject": loaded.name if isinstance(subject, torch.nn.Module) else str(subject), "kind": loaded.kind, **loaded.details,
        "data": description, "images": seen, "requested": total,
        "skipped": {"count": len(skipped), "files": [f"{n} ({r})" for n, r in skipped[:_SHOWN_SKIPPED]]},
        "classes": len(data_classes), "labels_matched": matched, "warnings": warnings,
        "top1": round(100.0 * top1 / seen, 2), "top5": round(100.0 * top5 / seen, 2) if k else None,
        "seconds": round(seconds, 2), "images_per_second": round(seen / seconds, 1) if seconds > 0 else None,
        "preprocessing": loaded.preprocessing.to_dict() if data != FASHION_MNIST else
        {"fashion-mnist": "bilinear batch resize to input size, grey to 3 channels",
         "input_size": list(loaded.preprocessing.input_size), "mean": list(loaded.preprocessing.mean),
         "std": list(loaded.preprocessing.std)},
    }
