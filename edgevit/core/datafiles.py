"""Reading edgevit's data files (recipes, device profiles, results) with one-line errors, and
writing its tensor files (checkpoints, calibration stats, QAT state) whole or not at all."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from edgevit.core.errors import EdgevitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def data_dir(kind: str) -> Path:
    """A data folder of the repo (``export``, ``profiles``), also when installed as a wheel."""
    package_root = Path(__file__).resolve().parents[1]  # the edgevit package
    for candidate in (package_root / "_data" / kind, package_root.parent / kind):
        if candidate.is_dir():
            return candidate
    raise EdgevitError(f"edgevit's {kind}/ folder is missing from this installation; reinstall edgevit")


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """``path`` parsed as TOML; ``what`` names the file in errors ("recipe file", "device profile")."""
    return _read(path, what, tomllib.loads, tomllib.TOMLDecodeError, "valid TOML")


def read_json(path: str | Path, what: str) -> Any:
    return _read(path, what, json.loads, json.JSONDecodeError, "JSON")


def _read(path: str | Path, what: str, parse, parse_error: type[Exception], kind: str) -> Any:
    path = Path(path)
    try:
        return parse(path.read_text())
    except FileNotFoundError:
        raise EdgevitError(f"{what} not found: {path}") from None
    except (parse_error, UnicodeDecodeError) as exc:
        raise EdgevitError(f"{what} {path} is not {kind}: {exc}") from None


def write_safetensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``tensors`` (name → torch tensor) as a safetensors file at ``path``: written beside it under
    another name and renamed, so a killed process never leaves half a file under the real name;
    readable as the umask allows (safetensors itself writes 0600). Tensors are copied contiguous
    and unshared: safetensors refuses tensors that share storage (tied or viewed weights)."""
    from safetensors.torch import save_file

    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file({name: tensor.detach().cpu().contiguous().clone() for name, tensor in tensors.items()},
                  str(partial), metadata=metadata)
        partial.chmod(0o666 & ~current_umask())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
