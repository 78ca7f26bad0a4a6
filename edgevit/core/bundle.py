"""Bundles: an artifact and its ``manifest.json`` in one folder, written whole or not at all.

One implementation for every writer (export, quantize's ``--max-drop`` search, the profiler's
exports) and every reader (``eval``, the profiler, the quantize search): the manifest's name,
the bundle's name, a private staging folder beside the destination, clean-up of the staging
folders of killed processes, and the atomic rename that places a verified bundle.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from edgevit.core.datafiles import current_umask, read_json
from edgevit.core.errors import EdgevitError

MANIFEST_NAME = "manifest.json"
PARTIAL_PREFIX = ".edgevit-partial-"  # staging folders; a killed process's are removed by the next writer


def bundle_name(model: str, recipe: str, overridden: dict[str, Any]) -> str:
    """``model-recipe``, plus the options changed on the command line, so that e.g.
    ``--image-input`` does not overwrite the bundle of the plain recipe."""
    suffix = "".join(f"+{k}" if v is True else f"+{k}={v}" for k, v in sorted(overridden.items()))
    return f"{model}-{recipe}{suffix}".replace("/", "_")


def writable_dir(path: Path) -> Path:
    """``path``, made if needed, checked writable (one line naming --out otherwise)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=PARTIAL_PREFIX):
            pass
    except OSError as exc:
        raise EdgevitError(f"cannot write to output directory {path}: {exc.strerror or exc}; choose another --out") from None
    return path


@contextlib.contextmanager
def staging(out_dir: Path, tag: str = "") -> Iterator[Path]:
    """A private folder in ``out_dir`` (same filesystem: placing it is a rename), removed on exit
    unless :func:`place` moved it; first clears what killed processes left."""
    remove_stale_partials(out_dir)
    folder = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{os.getpid()}-{tag}", dir=out_dir))
    folder.chmod(0o777 & ~current_umask())  # mkdtemp's private 0700 would carry over to the bundle
    try:
        yield folder
    finally:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


def place(staging_folder: Path, bundle: Path) -> None:
    """Move a verified staging folder to ``bundle`` with renames only (an existing bundle is
    replaced whole: a reader never sees half of each)."""
    if bundle.exists():
        retired = bundle.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-old-{bundle.name}")
        os.replace(bundle, retired)
        os.replace(staging_folder, bundle)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging_folder, bundle)


def remove_stale_partials(out_dir: Path) -> None:
    """Staging folders of exports that were killed; a live process's folder is left alone."""
    for partial in out_dir.glob(f"{PARTIAL_PREFIX}*"):
        pid = partial.name[len(PARTIAL_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def find_manifest(path: Path) -> Path | None:
    """The manifest of a bundle folder, or of the artifact ``path`` inside one (None: neither)."""
    for folder in (path, path.parent):
        if (folder / MANIFEST_NAME).is_file():
            return folder / MANIFEST_NAME
    return None


def read_manifest(path: Path) -> dict[str, Any]:
    """A bundle's manifest (``path``: the bundle folder or its artifact)."""
    found = find_manifest(Path(path))
    if found is None:
        raise EdgevitError(f"{path} has no {MANIFEST_NAME} (in it or beside it); give a bundle written by `edgevit export`")
    return read_json(found, "artifact manifest")


def artifact_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def artifact_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a bundle folder's files in path order (Core ML packages)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
