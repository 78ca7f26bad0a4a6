"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, read with numpy.

60 000 training and 10 000 test images, 28×28 grey, 10 classes (MIT licence); here for short
training runs that need real accuracy (fp32 vs int8, QAT). This is the data set's own
preprocessing, not the photo-folder path of :mod:`edgevit.data.images`: the whole grey batch is
resized at once with ``torch.nn.functional.interpolate`` (bilinear) to the model's input size,
repeated to 3 channels, scaled to [0, 1] and normalised with the model config's mean and std.
Images stay 28×28 uint8 in memory and are resized one batch at a time, so any input size fits.
"""
from __future__ import annotations

import gzip
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edgevit.core.errors import EdgevitError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SPLITS = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def data_dir() -> Path:
    """Where the idx files are: ``$EDGEVIT_FASHION_MNIST``, else Debian's location."""
    return Path(os.environ.get("EDGEVIT_FASHION_MNIST") or DEFAULT_DIR)


def folder_name(class_name: str) -> str:
    """A class name usable as a folder name ("T-shirt/top" → "T-shirt_top")."""
    return class_name.replace("/", "_")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (gzip-compressed or not) as a numpy array of its declared type and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise EdgevitError(f"Fashion-MNIST file {path} is missing; install it with "
                           "`apt-get install dataset-fashion-mnist` (or set EDGEVIT_FASHION_MNIST to its folder)") from None
    except (OSError, EOFError) as exc:
        raise EdgevitError(f"{path} is truncated or corrupt ({exc}); reinstall dataset-fashion-mnist") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise EdgevitError(f"{path} is not an idx file; reinstall dataset-fashion-mnist")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    if len(data) != header + int(np.prod(shape)) * dtype.itemsize:
        raise EdgevitError(f"{path} holds {len(data) - header} data bytes, not what its header says ({shape}); "
                           "reinstall dataset-fashion-mnist")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


@lru_cache(maxsize=2)
def load_raw(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of ``split`` ('train' or 'test')."""
    if split not in SPLITS:
        raise EdgevitError(f"unknown Fashion-MNIST split {split!r}; choose train or test")
    root = data_dir()
    images = read_idx(root / f"{SPLITS[split]}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{SPLITS[split]}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise EdgevitError(f"Fashion-MNIST {split} files in {root} do not match ({images.shape} images, "
                           f"{labels.shape} labels); reinstall dataset-fashion-mnist")
    return images, labels


@dataclass(repr=False, eq=False)
class FashionMnist(torch.utils.data.Dataset):
    """A Fashion-MNIST split ready for a model: ``batch(indices)`` (or ``dataset[i]``) gives
    (NCHW float32 at the model's input size, int64 labels)."""

    split: str
    pixels: torch.Tensor  # uint8 [N, 28, 28], kept small; resized per batch
    labels: torch.Tensor  # int64 [N]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = FASHION_MNIST_CLASSES
    name: str = "fashion-mnist"

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"FashionMnist({self.split!r}, {len(self)} images at {'x'.join(map(str, self.input_size))})"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.batch([index])
        return images[0], labels[0]

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self._prepare(self.pixels[index]), self.labels[index]

    def _prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        channels, height, width = self.input_size
        grey = pixels.unsqueeze(1).to(torch.float32) / 255.0
        if grey.shape[-2:] != (height, width):
            # antialias matters only when shrinking below 28×28; clamp undoes bilinear overshoot.
            grey = F.interpolate(grey, size=(height, width), mode="bilinear", align_corners=False,
                                 antialias=height < grey.shape[-2] or width < grey.shape[-1]).clamp_(0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (grey.expand(-1, channels, -1, -1) - mean) / std

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split at once (mind the memory at large input sizes)."""
        return self.batch(range(len(self)))


def load_fashion_mnist(split: str, cfg: Any, *, limit: int | None = None, seed: int = 0) -> FashionMnist:
    """Fashion-MNIST ``split`` ('train' or 'test') prepared for ``cfg`` (a ModelCfg, or anything
    with ``input_size`` (C, H, W), ``mean`` and ``std``).

    ``limit`` keeps a fixed-seed random subset of that many images (in their original order).
    """
    images, labels = load_raw(split)
    index = np.arange(len(labels))
    if limit is not None:
        if limit < 1:
            raise EdgevitError(f"limit must be at least 1, got {limit}")
        if limit < len(index):
            index = np.sort(np.random.default_rng(seed).permutation(len(index))[:limit])
    return FashionMnist(
        split=split,
        pixels=torch.from_numpy(images[index].copy()),
        labels=torch.from_numpy(labels[index].astype(np.int64)),
        input_size=tuple(int(v) for v in cfg.input_size),
        mean=tuple(float(v) for v in cfg.mean),
        std=tuple(float(v) for v in cfg.std),
    )


def write_image_folder(split: str, dest: str | os.PathLike, per_class: int, seed: int = 0) -> list[Path]:
    """Write ``per_class`` fixed-seed images of each class as 28×28 grey PNGs into
    ``dest/<class>/`` (class names made folder-safe by :func:`folder_name`); returns the files."""
    from PIL import Image

    if per_class < 1:
        raise EdgevitError(f"per_class must be at least 1, got {per_class}")
    images, labels = load_raw(split)
    rng = random.Random(seed)
    dest = Path(dest)
    written = []
    for label, name in enumerate(FASHION_MNIST_CLASSES):
        members = np.flatnonzero(labels == label).tolist()
        chosen = sorted(rng.sample(members, min(per_class, len(members))))
        folder = dest / folder_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        for index in chosen:
            path = folder / f"{split}-{index:05d}.png"
            Image.fromarray(np.ascontiguousarray(images[index])).save(path)
            written.append(path)
    return written
