"""Reading checkpoints safely and loading them into edgevit models.

Where a checkpoint may come from: a local safetensors file, a torch ``.pth/.pt`` (read with
``weights_only=True``, never a full unpickle), an http(s)/file URL (downloaded once into a cache),
or an ``hf-hub:org/repo[@revision]`` id (through huggingface_hub's own cache). Which key format
it is in (timm's or the authors') is decided by the model's family, and remapped by that
family's one filter function.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgevit.core.errors import CheckpointError
from edgevit.models.registry import Family, get_family, get_model_cfg, list_families, list_models

# Wrappers the authors and training libraries put around the state dict, in the order tried.
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")
_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")
_SHOWN = 5  # how many key names an error message lists before summarising


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did, for messages and for the export manifest."""

    path: Path
    sha256: str
    key_format: str
    dropped_classifier: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- locating


def cache_dir() -> Path:
    """Where URL downloads are kept (``$EDGEVIT_CACHE``, else ~/.cache/edgevit/checkpoints)."""
    root = os.environ.get("EDGEVIT_CACHE") or Path.home() / ".cache" / "edgevit" / "checkpoints"
    return Path(root)


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A local path for ``source`` (file, URL or ``hf-hub:`` id), downloading if needed."""
    text = str(source)
    if text.startswith("hf-hub:"):
        return _from_hub(text[len("hf-hub:"):])
    if re.match(r"^(https?|file)://", text):
        return _from_url(text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (give a file, a URL or an hf-hub: id)")
    return path


def _from_hub(spec: str) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1:
        raise CheckpointError(f"hf-hub id must look like hf-hub:org/repo[@revision], got hf-hub:{spec}")
    # Without a network, huggingface_hub retries each file for ~25 s, printing a line per retry:
    # one short connection attempt decides instead, and the local cache answers alone.
    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _unreachable(constants.ENDPOINT)
    last_error: Exception | None = None
    for filename in _HUB_FILENAMES:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision or None, local_files_only=bool(offline)))
        except EntryNotFoundError as exc:
            last_error = exc
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
            last_error = exc
            if not offline and (not isinstance(exc, HfHubHTTPError) or getattr(exc.response, "status_code", 0) != 404):
                break
    if offline:
        raise CheckpointError(f"hf-hub:{spec} is not in the local Hugging Face cache and the Hub is out of reach "
                              f"({offline}); download its weights where there is a network and pass the file")
    reason = str(last_error).splitlines()[0] if last_error else "no weights file"
    raise CheckpointError(
        f"could not get {' or '.join(_HUB_FILENAMES)} of hf-hub:{spec} ({reason}); "
        "check the id, or download the file and pass its path"
    )


def _unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why ``endpoint`` cannot be reached (None: a TCP connection opened within ``timeout`` s,
    or a proxy is configured, which then decides)."""
    if urllib.request.getproxies().get(urllib.parse.urlparse(endpoint).scheme):
        return None
    parsed = urllib.parse.urlparse(endpoint)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"
    return None


PRETRAINED = "pretrained"  # a checkpoint source naming the model's published weights


def checkpoint_source(source: str | os.PathLike, cfg) -> str | os.PathLike:
    """``source``, or for "pretrained" (when no such file exists) the model's published weights:
    its timm Hub id, else the authors' URL."""
    if str(source) != PRETRAINED or Path(source).exists():
        return source
    published = cfg.hf_hub_id or cfg.url
    if not published:
        raise CheckpointError(f"{cfg.name} has no published weights (its authors released none); "
                              "pass a checkpoint file with --weights")
    return published


def _from_url(url: str) -> Path:
    name = Path(urllib.parse.urlparse(url).path).name or "checkpoint"
    url_tag = hashlib.sha256(url.encode()).hexdigest()[:12]
    target = cache_dir() / f"{url_tag}-{name}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            digest = hashlib.sha256()
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        # torch.hub's convention: a file named name-<sha256 prefix>.ext carries its own check.
        expected = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$", name)
        if expected and not digest.hexdigest().startswith(expected.group(1)):
            raise CheckpointError(f"download of {url} does not match the hash in its name; not kept")
        if _file_kind(Path(tmp_name)) is None:  # e.g. a sharing site's HTML page
            raise CheckpointError(f"{url} did not return a checkpoint (safetensors or torch file); not kept")
        os.replace(tmp_name, target)
    except (urllib.error.URLError, OSError) as exc:
        raise CheckpointError(f"could not download {url}: {getattr(exc, 'reason', exc)}") from None
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


# ----------------------------------------------------------------------------- reading


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped and with any DDP ``module.`` prefix removed."""
    path = Path(path)
    kind = _file_kind(path)
    if kind == "safetensors":
        raw = _read_safetensors(path)
    elif kind == "torch":
        raw = _read_torch(path)
    else:
        raise CheckpointError(f"{path} is neither a safetensors file nor a torch checkpoint")
    state_dict = _unwrap(raw, path)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _file_kind(path: Path) -> str | None:
    """"safetensors" or "torch" from the file's first bytes, None for anything else."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch's zip format, or a legacy pickle
        return "torch"
    return None


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({exc}); download it again") from None


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects besides tensors, and unpickling "
            "those could run code; re-save it as safetensors or as a plain state dict"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({reason}); download it again") from None


def _unwrap(raw: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(raw, dict):
        for key in _WRAPPER_KEYS:
            inner = raw.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(raw):
            return tensors
    raise CheckpointError(
        f"{path} holds no state dict (expected tensors, or a dict with one of "
        f"{', '.join(map(repr, _WRAPPER_KEYS))})"
    )


# ----------------------------------------------------------------------------- loading


def load_checkpoint(model: nn.Module, source: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Load ``source`` into ``model`` (an edgevit model), remapping the authors' key formats;
    "pretrained" names the model's published weights.

    Strict by default: any missing or unexpected key, or any shape mismatch, raises a
    :class:`CheckpointError` naming them. A classifier for another number of classes is not a
    mismatch: it is dropped (the model keeps its own, freshly initialised) and reported.
    """
    cfg = model.cfg
    path = resolve_checkpoint(checkpoint_source(source, cfg))
    source_dict = read_state_dict(path)
    family = get_family(cfg.family)
    key_format = family.detect_format(source_dict.keys())
    if key_format is None:
        raise CheckpointError(_wrong_family_message(path, source_dict, cfg.name, family))
    state_dict = family.remap_checkpoint(dict(source_dict), key_format, model)
    report = LoadReport(path=path, sha256=file_sha256(path), key_format=key_format)

    own = model.state_dict()
    classifier = [k for k in own if k.startswith(family.classifier_prefixes)]
    # Another class count shows in the classifier's output dimension; any other shape difference
    # there (its input width) is a different size and reported below as a mismatch.
    if any(k in state_dict and state_dict[k].shape[:1] != own[k].shape[:1] for k in classifier) or (
        cfg.num_classes == 0 and any(k.startswith(family.classifier_prefixes) for k in state_dict)
    ):
        report.dropped_classifier = sorted(k for k in state_dict if k.startswith(family.classifier_prefixes))
        for k in report.dropped_classifier:
            del state_dict[k]
        report.messages.append(
            f"checkpoint classifier does not fit num_classes={cfg.num_classes}: "
            "kept the model's freshly initialised classifier"
        )
    ignorable = set(classifier) if report.dropped_classifier else set()
    report.missing = [k for k in own if k not in state_dict and k not in ignorable]
    report.unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if mismatched:
        guess = _matching_size(family, source_dict, key_format, exclude=cfg.name)
        hint = f"; it fits {guess}" if guess else f"; it is another size of {cfg.family}"
        raise CheckpointError(
            f"{path.name} does not fit {cfg.name}: {len(mismatched)} tensors differ in shape "
            f"({_first(mismatched)}){hint}"
        )
    if strict and (report.missing or report.unexpected):
        parts = []
        if report.missing:
            parts.append(f"{len(report.missing)} missing ({_first(report.missing)})")
        if report.unexpected:
            parts.append(f"{len(report.unexpected)} unexpected ({_first(report.unexpected)})")
        raise CheckpointError(
            f"{path.name} ({key_format} format) does not match {cfg.name}: keys "
            + "; ".join(parts) + "; pass strict=False to load what matches"
        )
    model.load_state_dict(state_dict, strict=False)
    return report


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", … {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _wrong_family_message(path: Path, state_dict: dict, model_name: str, family: Family) -> str:
    for other in list_families():
        key_format = None if other is family else other.detect_format(state_dict.keys())
        if key_format is not None:
            what = _matching_size(other, state_dict, key_format) or f"a {other.name} model"
            return f"{path.name} is a checkpoint of {what} ({key_format} format), not of {model_name}"
    sample = ", ".join(list(state_dict)[:3])
    return (
        f"{path.name} is not a {family.name} checkpoint in any format edgevit knows "
        f"({', '.join(get_model_cfg(model_name).checkpoint_formats)}); its first keys: {sample}"
    )


def _matching_size(family: Family, source_dict: dict, key_format: str, exclude: str | None = None) -> str | None:
    """The registered size of ``family`` whose every tensor shape equals the checkpoint's.

    Candidates are built on the meta device, so trying every size costs no memory or time.
    """
    from edgevit.models.registry import build_model

    for name in list_models(family=family.name):
        if name == exclude:
            continue
        with torch.device("meta"):
            candidate = build_model(get_model_cfg(name))
            try:
                remapped = family.remap_checkpoint(dict(source_dict), key_format, candidate)
            except Exception:  # a filter may reject a checkpoint that cannot be this size
                continue
        own = {k: tuple(v.shape) for k, v in candidate.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in remapped.items()}
        if own == theirs:
            return name
    return None
