"""Fine-tuning: AdamW, warm-up then cosine decay, cross-entropy; one process or DDP under torchrun.

``fine_tune`` trains any ``nn.Module`` and also a PT2E QAT graph (``prepare_qat_pt2e``): such a
graph switches between training and inference with ``move_exported_model_to_train/eval``
(``torchao.quantization.pt2e``; formerly ``torch.ao.quantization``) rather than
``.train()/.eval()``, so both switches are parameters. A graph exported with a static batch
needs ``batch_size`` (and ``eval_batch_size``) equal to it and data sets that divide evenly.

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1) the gloo process group is started,
the model wrapped in ``DistributedDataParallel``, the data sharded with ``DistributedSampler``,
the CPU cores split between the local processes, and only rank 0 prints or saves.

Trained weights are saved as safetensors whose metadata key ``edgevit_cfg`` (JSON) records the
model name and the config overrides they were trained with, so that
``create_model(name, **trained_overrides(path))`` builds the model the weights fit.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from edgevit.core.datafiles import write_safetensors
from edgevit.core.errors import EdgevitError

METADATA_KEY = "edgevit_cfg"
TRAINING_KEY = "edgevit_training"
# Config fields recorded with trained weights: always these, plus the preprocessing fields
# below when they differ from the registered model's.
_RECORDED = ("num_classes", "input_size", "labels")
_RECORDED_IF_CHANGED = ("mean", "std", "crop_pct", "interpolation")
_TUPLE_FIELDS = ("input_size", "mean", "std")

ModeSwitch = Callable[[nn.Module], Any]


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistributedContext:
    world_size: int
    rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context() -> DistributedContext:
    """This process's place in a torchrun job, starting the gloo process group when there are
    several processes (a single process needs none)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise EdgevitError("this torch build has no torch.distributed; run with one process")
        dist.init_process_group("gloo")
    if dist.is_initialized():
        return DistributedContext(dist.get_world_size(), dist.get_rank(),
                                  int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))
    return DistributedContext(1, 0, 1)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- data


class LabelledTensors(torch.utils.data.Dataset):
    """Preprocessed images and labels held in memory (e.g. a loaded ImageFolder)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] = (), name: str = "tensors"):
        if len(images) != len(labels):
            raise EdgevitError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.classes, self.name = images, labels.to(torch.int64), tuple(classes), name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self.images[index], self.labels[index]


def _fetcher(data) -> tuple[int, Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]]:
    """(length, fetch(indices) -> (images, labels)) for a data set with ``batch()``, an
    ``(images, labels)`` pair of tensors, or any map-style data set of (image, label) pairs."""
    if hasattr(data, "batch") and hasattr(data, "__len__"):
        return len(data), data.batch
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        pair = LabelledTensors(*data)
        return len(pair), pair.batch
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        def fetch(indices):
            items = [data[i] for i in indices]
            return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)
        return len(data), fetch
    raise EdgevitError(f"cannot train on {type(data).__name__}: give a data set with batch() or (images, labels) tensors")


# ----------------------------------------------------------------------------- training


def _train(model: nn.Module) -> None:
    model.train()


def _eval(model: nn.Module) -> None:
    model.eval()


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine decay to 0 at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _loss(output, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # Distilled training modes return one output per head: each head learns the labels.
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    return sum(F.cross_entropy(o, labels, label_smoothing=label_smoothing) for o in outputs) / len(outputs)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on norms, biases and other vectors (standard for transformers).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def _adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    # The fused kernel is several times faster on CPU for these small models; it needs floating
    # parameters on a device it supports, else the plain loop is used.
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)


def fine_tune(
    model: nn.Module,
    train_data,
    *,
    epochs: float | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_steps: int | None = None,
    label_smoothing: float = 0.0,
    seed: int = 0,
    progress: bool | Callable[[dict[str, Any]], None] = True,
    log_every: int | None = None,
    eval_data=None,
    eval_batch_size: int | None = None,
    train_mode: ModeSwitch = _train,
    eval_mode: ModeSwitch = _eval,
) -> dict[str, Any]:
    """Train ``model`` in place on ``train_data`` and return the figures; the model is left in
    eval mode (through ``eval_mode``).

    Length: ``steps`` optimizer steps, or ``epochs`` passes (default 1). ``batch_size`` is per
    process. Warm-up defaults to 5 % of the steps. ``progress``: True prints a line every
    ``log_every`` steps (default: ten lines per run; a live bar on a terminal), False is silent, a
    callable receives each step's figures. ``eval_data`` (same kinds as ``train_data``) adds
    ``eval_top1`` (percent), computed in shards across processes under DDP.
    """
    if steps is not None and epochs is not None:
        raise EdgevitError("give steps or epochs, not both")
    if batch_size < 1 or lr <= 0:
        raise EdgevitError(f"batch size must be >= 1 and lr > 0 (got {batch_size}, {lr})")
    context = distributed_context()
    length, fetch = _fetcher(train_data)
    if length == 0:
        raise EdgevitError("the training data is empty")

    threads_before = torch.get_num_threads()
    if context.world_size > 1:  # processes on one machine share its cores
        torch.set_num_threads(max(1, _cpu_cores() // context.local_world_size))
    sampler = torch.utils.data.DistributedSampler(
        range(length), num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=seed, drop_last=False)
    shard = len(sampler)
    drop_last = shard >= batch_size  # keep full batches (BatchNorm); a tiny set keeps its one batch
    batches_per_epoch = shard // batch_size if drop_last else 1
    total = steps if steps is not None else max(1, round((1 if epochs is None else epochs) * batches_per_epoch))
    if total < 1:
        raise EdgevitError(f"steps must be >= 1, got {total}")
    warmup = min(total, warmup_steps if warmup_steps is not None else max(1, round(0.05 * total)))

    trained = nn.parallel.DistributedDataParallel(model) if context.world_size > 1 else model
    optimizer = _adamw(_parameter_groups(model, weight_decay), lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup))
    reporter = _Reporter(progress if context.is_main else False, total, log_every)
    global_batch = batch_size * context.world_size
    losses: list[float] = []
    torch.manual_seed(seed)  # dropout / drop-path draws
    train_mode(model)
    start = time.perf_counter()
    step = epoch = 0
    try:
        while step < total:
            sampler.set_epoch(epoch)
            batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=drop_last)
            for indices in batch_sampler:
                images, labels = fetch(indices)
                loss = _loss(trained(images), labels, label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                step_lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                schedule.step()
                step += 1
                losses.append(float(loss.detach()))
                reporter.step({"step": step, "steps": total, "epoch": epoch + 1, "loss": losses[-1],
                               "lr": step_lr,
                               "images_per_second": step * global_batch / (time.perf_counter() - start)})
                if step == total:
                    break
            epoch += 1
        seconds = time.perf_counter() - start
    finally:
        reporter.close()
    norm_images = reestimate_batchnorm(model, train_data, seed=seed)
    eval_mode(model)
    tail = max(1, min(20, total // 10))  # the final loss is the mean over the last steps
    final_loss = _mean_across_processes(sum(losses[-tail:]) / len(losses[-tail:]), context)
    figures: dict[str, Any] = {
        "steps": total, "epochs": round(total * global_batch / length, 3), "batch_size": batch_size,
        "world_size": context.world_size, "train_images": length, "lr": lr, "weight_decay": weight_decay,
        "warmup_steps": warmup, "label_smoothing": label_smoothing, "seed": seed,
        "first_loss": _mean_across_processes(losses[0], context), "final_loss": final_loss,
        "seconds": round(seconds, 2), "images_per_second": round(total * global_batch / seconds, 1),
        "threads": torch.get_num_threads(), "batchnorm_statistics_images": norm_images,
    }
    if eval_data is not None:
        figures.update(accuracy(model, eval_data, batch_size=eval_batch_size or batch_size))
    torch.set_num_threads(threads_before)
    return figures


BATCHNORM_IMAGES = 4096  # images whose statistics replace the running averages after training


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, data, *, seed: int = 0, limit: int = BATCHNORM_IMAGES,
                         batch_size: int = 64) -> int:
    """Recompute every BatchNorm's running mean and variance for the final weights, over up to
    ``limit`` fixed-seed training images (the same ones in every DDP process); returns how many.

    Training keeps an exponential average (momentum 0.1) of batch statistics taken while the
    weights were still changing; after a short fine-tune that average fits no version of them,
    and eval mode computes with it. Measured: MobileViT v2 0.5, 30 steps on 12 Fashion-MNIST
    images of 3 classes, train loss 0.25, top-1 on those very images 33 % in eval mode and 100 %
    once the statistics are recomputed (batch statistics, i.e. train mode, also gave 100 %).
    QAT graphs have none to recompute: the deploy form they start from has its BatchNorms fused."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    length, fetch = _fetcher(data)
    chosen = torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:limit].sort().values.tolist()
    momenta = [m.momentum for m in norms]
    was_training = model.training
    model.eval()  # dropout and drop-path off: the statistics of the eval-mode activations
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
        norm.train()
    used = 0
    try:
        for start in range(0, len(chosen), batch_size):
            indices = chosen[start:start + batch_size]
            if len(indices) < 2 and start > 0:
                break  # BatchNorm1d cannot take a batch of one; the images before it suffice
            model(fetch(indices)[0])
            used += len(indices)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)
    return used


def _mean_across_processes(value: float, context: DistributedContext) -> float:
    if context.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor[0]) / context.world_size


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int = 256) -> dict[str, Any]:
    """Top-1 (percent) of ``model`` as it is (call after switching it to eval) on ``data``; under
    DDP each process scores every world_size-th image and the counts are summed."""
    context = distributed_context()
    length, fetch = _fetcher(data)
    mine = list(range(context.rank, length, context.world_size))
    counts = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(mine), batch_size):
        images, labels = fetch(mine[start:start + batch_size])
        output = model(images)
        output = torch.stack(output).mean(0) if isinstance(output, (tuple, list)) else output
        counts[0] += (output.argmax(1) == labels).sum()
        counts[1] += len(labels)
    if context.world_size > 1:
        dist.all_reduce(counts)
    return {"eval_top1": round(100.0 * float(counts[0]) / max(1.0, float(counts[1])), 2), "eval_images": int(counts[1])}


class _Reporter:
    """Training progress on stderr: a live bar on a terminal, else a line every few steps."""

    def __init__(self, progress, total: int, log_every: int | None):
        self.callback = progress if callable(progress) else None
        self.enabled = progress is True
        self.total = total
        self.every = log_every or max(1, total // 10)
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[figures]}"), console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task("train", total=total, figures="")
            self.bar.start()

    def step(self, figures: dict[str, Any]) -> None:
        if self.callback:
            self.callback(figures)
        if not self.enabled:
            return
        line = (f"step {figures['step']}/{self.total} · epoch {figures['epoch']} · loss {figures['loss']:.4f} · "
                f"lr {figures['lr']:.2e} · {figures['images_per_second']:.0f} img/s")
        if self.bar is not None:
            self.bar.update(self.task, completed=figures["step"], figures=line.split(" · ", 1)[1])
        elif figures["step"] % self.every == 0 or figures["step"] in (1, self.total):
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------- saving


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_trained(model: nn.Module, path: str | os.PathLike, cfg=None, *, class_names: Sequence[str] | None = None,
                 figures: dict[str, Any] | None = None) -> Path | None:
    """Write ``model``'s weights as safetensors with the config it was trained with.

    ``cfg`` defaults to ``model.cfg``. The metadata key ``edgevit_cfg`` holds JSON:
    ``{"model": name, "overrides": {num_classes, input_size, labels, and any changed
    preprocessing field}, "class_names": [...] or null}``; ``edgevit_training`` holds ``figures``.
    Written atomically; under DDP only rank 0 writes (the others return None). For plain edgevit
    models: a PT2E graph's weights have other names.
    """
    from edgevit.models import get_model_cfg

    if not is_main_process():
        return None
    model = _unwrapped(model)
    cfg = cfg if cfg is not None else getattr(model, "cfg", None)
    if cfg is None:
        raise EdgevitError("save_trained needs the model's config: pass cfg= (the model has no .cfg)")
    registered = get_model_cfg(cfg.name)
    overrides = {name: getattr(cfg, name) for name in _RECORDED}
    overrides.update({name: getattr(cfg, name) for name in _RECORDED_IF_CHANGED
                      if getattr(cfg, name) != getattr(registered, name)})
    if class_names is not None and len(class_names) != cfg.num_classes:
        raise EdgevitError(f"{len(class_names)} class names for a model with {cfg.num_classes} classes")
    record = {"model": cfg.name, "overrides": overrides, "class_names": list(class_names) if class_names else None}
    metadata = {METADATA_KEY: json.dumps(record)}
    if figures:
        metadata[TRAINING_KEY] = json.dumps(figures, default=str)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(model.state_dict(), path, metadata)


def trained_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``edgevit_cfg`` record of a safetensors file ({} for other files, or none recorded)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return {}
    if len(head) < 9 or head[8:9] != b"{":  # not safetensors (a torch checkpoint, a URL, …)
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError):
        return {}
    if raw is None:
        return {}
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        raise EdgevitError(f"{path.name}: metadata {METADATA_KEY} is not JSON; re-save the weights") from None
    return record if isinstance(record, dict) else {}


def trained_overrides(path: str | os.PathLike) -> dict[str, Any]:
    """The ``create_model`` overrides the weights in ``path`` were trained with ({} if none recorded)."""
    overrides = dict(trained_metadata(path).get("overrides") or {})
    for name in _TUPLE_FIELDS:  # JSON lists back to the tuples ModelCfg holds
        if isinstance(overrides.get(name), list):
            overrides[name] = tuple(overrides[name])
    return overrides


def load_eval_model(name: str, weights: str | None):
    """The eval model, built with the classes / input size a trained checkpoint records (see
    ``edgevit train``), then loaded; returns (model, checkpoint report or None); ``model.cfg``
    is the effective config and ``model.class_names`` the recorded class names (or None).
    ``weights`` "pretrained": the model's published weights (its Hub id, else the authors' URL)."""
    from edgevit.models import create_model, get_model_cfg, load_checkpoint
    from edgevit.models.checkpoints import checkpoint_source, resolve_checkpoint

    local = resolve_checkpoint(checkpoint_source(weights, get_model_cfg(name))) if weights else None
    model = create_model(name, **(trained_overrides(local) if local else {}))
    report = load_checkpoint(model, local) if local else None
    model.class_names = trained_metadata(local).get("class_names") if local else None
    return model, report


def training_data(data: str | os.PathLike, cfg, *, limit: int | None = None, seed: int = 0, split: str = "train"):
    """A labelled data set for :func:`fine_tune` from ``fashion-mnist`` (its ``split``) or a folder
    with one subfolder per class, preprocessed for ``cfg``; it has ``classes`` and ``name``.
    ``limit`` keeps a fixed-seed random subset of that many images."""
    from edgevit.data.fashion_mnist import load_fashion_mnist
    from edgevit.data.images import labelled_folder

    if str(data) == "fashion-mnist":
        return load_fashion_mnist(split, cfg, limit=limit, seed=seed)
    folder = labelled_folder(data, cfg, "training", limit, seed)
    loaded = folder.load()
    if len(loaded.files) == 0:
        raise EdgevitError(f"no readable images in {folder.root} ({len(loaded.skipped)} skipped); "
                           "give a folder of JPEG/PNG images in class subfolders")
    return LabelledTensors(loaded.tensor, loaded.labels, folder.classes, folder.root.name)
