"""Image files → model-ready tensors, with the model's own preprocessing.

One code path serves calibration (``calibration_batch``) and evaluation (``ImageFolder``), so an
int8 artifact is calibrated on exactly the pixels it will be judged on. The transform is timm's
eval transform, written here from its definition:

1. convert to RGB (see :func:`to_rgb` for every image mode);
2. resize with the config's interpolation (Pillow): a square input resizes the shorter side to
   ``floor(size / crop_pct)`` keeping the aspect ratio (the longer side truncated to an integer);
   a non-square input (H, W) resizes to ``(floor(H / crop_pct), floor(W / crop_pct))``;
3. centre crop to H×W (offsets rounded as Python's ``round``; an image smaller than the crop,
   possible with ``crop_pct > 1``, is padded with black);
4. scale 8-bit pixels to [0, 1] and normalise with the config's mean and std.

Files that cannot be decoded (not an image, truncated, unsupported mode) are skipped and
counted, never fatal; a folder where nothing is readable is an :class:`EdgevitError`.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from edgevit.core.errors import EdgevitError

# Suffixes Pillow decodes that image folders commonly hold; anything else in a folder is ignored.
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jfif",
})

# What :func:`to_rgb` does to pixels that are not plain 8-bit RGB, recorded in summaries.
RGB_CONVERSION = ("transparent pixels composited on white; 16-bit scaled to 8-bit (v*255/65535, rounded); "
                  "mode F taken as 0-255 (Pillow's convention); bilevel as 0/255")

_WHITE = (255, 255, 255)
_SHOWN_SKIPPED = 20  # skipped files named in a summary; the count is always complete

Progress = Callable[[int, int], None]  # progress(done, total)


@dataclass(frozen=True)
class Preprocessing:
    """The part of a ``ModelCfg`` that preprocessing reads (also built from an export manifest)."""

    input_size: tuple[int, int, int]
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_cfg(cls, cfg: Any) -> "Preprocessing":
        return cls(tuple(cfg.input_size), float(cfg.crop_pct), str(cfg.interpolation),
                   tuple(cfg.mean), tuple(cfg.std))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        """From a manifest's ``preprocessing`` table."""
        try:
            return cls(tuple(int(v) for v in data["input_size"]), float(data["crop_pct"]),
                       str(data["interpolation"]), tuple(map(float, data["mean"])), tuple(map(float, data["std"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise EdgevitError(f"preprocessing table is incomplete or malformed ({exc!r}); re-export the artifact") from None

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": list(self.input_size), "interpolation": self.interpolation,
                "crop_pct": self.crop_pct, "mean": list(self.mean), "std": list(self.std),
                "rgb_conversion": RGB_CONVERSION}


class UnreadableImage(Exception):
    """A file that cannot be turned into an RGB image (the reason is the message)."""


# ----------------------------------------------------------------------------- one image


def _resample(name: str) -> int:
    from PIL import Image

    methods = {
        "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
        "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS,
    }
    try:
        return methods[name]
    except KeyError:
        raise EdgevitError(f"unknown interpolation {name!r} in the model config; use one of {', '.join(methods)}") from None


def _on_white(image):
    """An image with alpha composited over white (premultiplied modes are un-premultiplied first)."""
    from PIL import Image

    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image):
    """A Pillow image as 8-bit RGB, the way the model's training data looked.

    - RGB: unchanged. L, 1 (bilevel, 0/255), CMYK, YCbCr, RGBX, LAB, HSV: Pillow's conversion.
    - Alpha (RGBA, LA, PA, RGBa, La) and palette images with a transparent colour: composited
      on white, as a page or viewer shows them (Pillow's plain ``convert`` would keep the hidden
      colour under each transparent pixel, often black).
    - 16-bit (I;16*, and I, which Pillow uses for 16-bit PNG/TIFF): scaled, not clipped, to
      8 bits, ``round(v * 255 / 65535)`` (mid-grey 32768 becomes 128); I values outside 0-65535
      are clipped.
    - F (float): taken in 0-255 units, Pillow's own convention for L → F, and clipped.
    """
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    try:
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
            return _on_white(image)
    except (ValueError, OSError) as exc:
        raise UnreadableImage(f"image mode {mode} cannot be converted to RGB ({exc})") from None
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        values = np.clip(values, 0, 65535)
        # Integer rounding of v*255/65535: exact, and 32768 → 128 rather than 127.
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnreadableImage(f"image mode {mode} cannot be converted to RGB ({exc})") from None


def open_rgb(path: str | os.PathLike):
    """Decode ``path`` fully (first frame) and convert it to RGB, or raise :class:`UnreadableImage`."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # A huge image is decoded anyway below the hard limit (an error above it): no noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decode now: a truncated file fails here, not later
                return to_rgb(image).copy()
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage("not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"too large to decode safely ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableImage(text) from None


def _resize_and_crop(image, prep: Preprocessing):
    from PIL import Image

    _, height, width = prep.input_size
    resample = _resample(prep.interpolation)
    in_width, in_height = image.size
    if height == width:
        scale = math.floor(height / prep.crop_pct)
        # Shorter side to `scale`; the longer side truncated, as torchvision's Resize does.
        if in_width <= in_height:
            size = (scale, int(scale * in_height / in_width))
        else:
            size = (int(scale * in_width / in_height), scale)
    else:
        size = (math.floor(width / prep.crop_pct), math.floor(height / prep.crop_pct))
    if size != image.size:
        image = image.resize(size, resample)
    resized_width, resized_height = image.size
    if resized_width < width or resized_height < height:  # crop_pct > 1: pad with black first
        padded = Image.new("RGB", (max(width, resized_width), max(height, resized_height)))
        padded.paste(image, ((padded.width - resized_width) // 2, (padded.height - resized_height) // 2))
        image, resized_width, resized_height = padded, padded.width, padded.height
    top = int(round((resized_height - height) / 2.0))
    left = int(round((resized_width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def preprocess(image, cfg: Any) -> torch.Tensor:
    """One Pillow image → CHW float32 tensor, exactly as ``cfg`` (a ModelCfg or Preprocessing) says."""
    prep = cfg if isinstance(cfg, Preprocessing) else Preprocessing.from_cfg(cfg)
    pixels = np.asarray(_resize_and_crop(to_rgb(image), prep), dtype=np.uint8)
    return normalise_uint8(torch.from_numpy(pixels.copy()).permute(2, 0, 1), prep)


def normalise_uint8(pixels: torch.Tensor, cfg: Any) -> torch.Tensor:
    """8-bit CHW or NCHW pixels → float32 in [0, 1], normalised with ``cfg``'s mean and std."""
    shape = (-1, 1, 1) if pixels.dim() == 3 else (1, -1, 1, 1)
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(shape)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(shape)
    return (pixels.to(torch.float32) / 255.0 - mean) / std


def preprocess_files(paths: Sequence[str | os.PathLike], cfg: Any, progress: Progress | None = None
                     ) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Files → (NCHW batch of the readable ones, their indices in ``paths``, skipped (path, reason))."""
    prep = cfg if isinstance(cfg, Preprocessing) else Preprocessing.from_cfg(cfg)
    tensors, used, skipped = [], [], []
    for index, path in enumerate(paths):
        try:
            tensors.append(preprocess(open_rgb(path), prep))
            used.append(index)
        except UnreadableImage as reason:
            skipped.append((str(path), str(reason)))
        if progress:
            progress(index + 1, len(paths))
    batch = torch.stack(tensors) if tensors else torch.empty((0, *prep.input_size))
    return batch, used, skipped


# ----------------------------------------------------------------------------- folders


@dataclass
class LoadedImages:
    """Images of a folder, preprocessed: ``tensor`` NCHW, ``labels`` (None for a flat folder),
    the relative paths used and those skipped with the reason."""

    tensor: torch.Tensor
    labels: torch.Tensor | None
    files: list[str]
    skipped: list[tuple[str, str]]


class ImageFolder:
    """A folder of images: flat (no labels) or one subfolder per class.

    Layout: if any non-hidden subfolder holds image files, the folder is a class folder: the
    classes are the sorted subfolder names (label = index), and each class folder is searched
    recursively; image files directly in ``root`` are then ignored (listed in ``notes``).
    Otherwise the images directly in ``root`` are used, unlabelled. Hidden files and folders
    (names starting with ".") are ignored; so are files without an image suffix.
    """

    def __init__(self, root: str | os.PathLike, cfg: Any, *, _files: list[str] | None = None,
                 _labels: list[int] | None = None, _classes: list[str] | None = None):
        self.root = Path(root).expanduser()
        self.preprocessing = cfg if isinstance(cfg, Preprocessing) else Preprocessing.from_cfg(cfg)
        self.notes: list[str] = []
        if _files is not None:  # a view made by sample()/subset()
            self.files, self.labels, self.classes = _files, _labels, _classes or []
            return
        if not self.root.exists():
            raise EdgevitError(f"image folder not found: {self.root}; give a folder of images "
                               "(flat, or one subfolder per class)")
        if not self.root.is_dir():
            raise EdgevitError(f"{self.root} is not a folder; give a folder of images (flat, or one subfolder per class)")
        self.files, self.labels, self.classes = self._discover()
        if not self.files:
            raise EdgevitError(f"no image files in {self.root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
                               "put images there, flat or in one subfolder per class")

    def _discover(self) -> tuple[list[str], list[int] | None, list[str]]:
        try:
            entries = sorted((e for e in os.scandir(self.root) if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as exc:
            raise EdgevitError(f"cannot read folder {self.root}: {exc.strerror or exc}") from None
        loose = [e.name for e in entries if e.is_file() and _is_image_name(e.name)]
        class_files = {}
        for entry in entries:
            if entry.is_dir():
                found = _images_under(Path(entry.path), self.root)
                if found:
                    class_files[entry.name] = found
        if not class_files:
            return loose, None, []
        if loose:
            self.notes.append(f"{len(loose)} image(s) directly in {self.root} are in no class folder; ignored")
        classes = sorted(class_files)
        files, labels = [], []
        for label, name in enumerate(classes):
            files.extend(class_files[name])
            labels.extend([label] * len(class_files[name]))
        return files, labels, classes

    def __len__(self) -> int:
        return len(self.files)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def path(self, relative: str) -> Path:
        return self.root / relative

    def order(self, seed: int = 0) -> list[int]:
        """A seeded permutation of the file indices; files are listed in sorted path order, so the
        permutation does not depend on the order the filesystem lists them."""
        indices = list(range(len(self.files)))
        random.Random(seed).shuffle(indices)
        return indices

    def subset(self, indices: Sequence[int]) -> "ImageFolder":
        view = ImageFolder(self.root, self.preprocessing, _files=[self.files[i] for i in indices],
                           _labels=None if self.labels is None else [self.labels[i] for i in indices],
                           _classes=self.classes)
        view.notes = list(self.notes)
        return view

    def sample(self, n: int, seed: int = 0) -> "ImageFolder":
        """A fixed-seed random sample of ``n`` files (all of them, shuffled, if there are fewer)."""
        if n < 1:
            raise EdgevitError(f"the number of images must be at least 1, got {n}")
        return self.subset(self.order(seed)[:n])

    def load(self, progress: Progress | None = None) -> LoadedImages:
        """Every file preprocessed into one NCHW batch; unreadable files are skipped and listed."""
        tensor, used, skipped = preprocess_files([self.path(f) for f in self.files], self.preprocessing, progress)
        labels = None if self.labels is None else torch.tensor([self.labels[i] for i in used], dtype=torch.int64)
        return LoadedImages(tensor, labels, [self.files[i] for i in used], self._relative(skipped))

    def batches(self, batch_size: int, progress: Progress | None = None) -> Iterator[LoadedImages]:
        """The folder in batches of up to ``batch_size`` readable images (for evaluation)."""
        total = len(self.files)
        for start in range(0, total, batch_size):
            chunk = self.subset(range(start, min(start + batch_size, total)))
            loaded = chunk.load()
            if progress:
                progress(min(start + batch_size, total), total)
            yield loaded

    def _relative(self, skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(Path(p).relative_to(self.root).as_posix(), reason) for p, reason in skipped]


def labelled_folder(root: str | os.PathLike, cfg: Any, purpose: str, limit: int | None = None,
                    seed: int = 0) -> "ImageFolder":
    """An ImageFolder that must have class subfolders (for ``purpose``: training, evaluation),
    optionally a fixed-seed sample of ``limit`` images."""
    folder = ImageFolder(root, cfg)
    if not folder.has_labels:
        raise EdgevitError(f"{folder.root} has no class subfolders; {purpose} needs one subfolder per class "
                           "(or fashion-mnist)")
    return folder.sample(limit, seed) if limit is not None else folder


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _images_under(folder: Path, root: Path) -> list[str]:
    """Image files under ``folder`` (recursively, hidden entries skipped), relative to ``root``, sorted."""
    found = []
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found.extend((Path(directory) / n).relative_to(root).as_posix() for n in names if _is_image_name(n))
    return sorted(found)


# ----------------------------------------------------------------------------- calibration


@dataclass
class CalibrationSample:
    """The preprocessed calibration images and what the manifest should say about them."""

    tensor: torch.Tensor  # NCHW float32
    files: list[str]  # relative paths, in the order of ``tensor``
    requested: int
    skipped: list[tuple[str, str]]  # (relative path, reason)
    folder: str
    seed: int
    preprocessing: Preprocessing
    sha256: str
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        shown = [f"{name} ({reason})" for name, reason in self.skipped[:_SHOWN_SKIPPED]]
        return {
            "folder": self.folder,
            "images": len(self.files),
            "requested": self.requested,
            "skipped": {"count": len(self.skipped), "files": shown},
            "seed": self.seed,
            "preprocessing": self.preprocessing.to_dict(),
            # Identifies the exact images: sorted relative paths and their bytes.
            "sha256": self.sha256,
            "warnings": list(self.warnings),
        }


def calibration_batch(root: str | os.PathLike, cfg: Any, count: int, seed: int = 0,
                      progress: Progress | None = None) -> CalibrationSample:
    """``count`` images of ``root`` chosen with a fixed seed, preprocessed for ``cfg``.

    Files are visited in a seeded permutation of their sorted paths; unreadable ones are skipped
    (counted and named) and the next file takes their place, so ``count`` readable images are
    used whenever the folder has them. With fewer, all are used and ``warnings`` says so.
    """
    if count < 1:
        raise EdgevitError(f"the number of calibration images must be at least 1, got {count}")
    folder = ImageFolder(root, cfg)
    prep = folder.preprocessing
    tensors, used, skipped = [], [], []
    order = folder.order(seed)
    for index in order:
        if len(used) == count:
            break
        relative = folder.files[index]
        try:
            tensors.append(preprocess(open_rgb(folder.path(relative)), prep))
            used.append(relative)
        except UnreadableImage as reason:
            skipped.append((relative, str(reason)))
        if progress:
            progress(len(used), min(count, len(order) - len(skipped)))
    if not used:
        names = ", ".join(f"{n} ({r})" for n, r in skipped[:3]) + (" …" if len(skipped) > 3 else "")
        raise EdgevitError(f"no readable images in {folder.root}: all {len(skipped)} image files were skipped "
                           f"({names}); give a folder of JPEG/PNG photos")
    warnings = list(folder.notes)
    if len(used) < count:
        readable = f"{len(used)} readable ({len(skipped)} skipped)" if skipped else str(len(used))
        warnings.append(f"asked for {count} images, {folder.root} has only {readable}; using {len(used)}")
    return CalibrationSample(
        tensor=torch.stack(tensors), files=used, requested=count, skipped=skipped, folder=str(Path(folder.root).resolve()),
        seed=seed, preprocessing=prep, sha256=files_sha256(folder.root, used), warnings=warnings,
    )


def files_sha256(root: Path, relative_paths: Sequence[str]) -> str:
    """SHA-256 over the sorted relative paths and each file's bytes."""
    digest = hashlib.sha256()
    for relative in sorted(relative_paths):
        digest.update(relative.encode() + b"\0")
        with open(root / relative, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
