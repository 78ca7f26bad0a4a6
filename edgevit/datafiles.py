"""Reading edgevit's data files (recipes, device profiles, results) with one-line errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from edgevit.errors import EdgevitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def data_dir(kind: str) -> Path:
    """A data folder of the repo (``export``, ``profiles``), also when installed as a wheel."""
    package_root = Path(__file__).resolve().parent
    for candidate in (package_root / "_data" / kind, package_root.parent / kind):
        if candidate.is_dir():
            return candidate
    raise EdgevitError(f"edgevit's {kind}/ folder is missing from this installation; reinstall edgevit")


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """``path`` parsed as TOML; ``what`` names the file in errors ("recipe", "device profile")."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise EdgevitError(f"{what} not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgevitError(f"{what} {path} is not valid TOML: {exc}") from None


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgevitError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgevitError(f"{what} {path} is not JSON: {exc}") from None
