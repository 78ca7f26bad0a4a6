"""What every runtime module shares: the loaded ``Session``, the unavailable signal, chunked
runs and the C-level stderr guard. Standard library and numpy only: this package is copied onto
devices that have neither torch nor edgevit (see ``edgevit.profile.remote``)."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np


if __package__ == "edgevit.runtimes":
    from edgevit.core.errors import EdgevitError as _UserError  # one line from the CLI, no traceback
else:  # copied onto a device (package "runtimes"): the worker reports these errors as JSON
    _UserError = Exception


class RuntimeUnavailable(Exception):
    """The runtime cannot run on this machine (the reason is the message)."""


class ArtifactError(_UserError):
    """The runtime is here but cannot load or run this artifact (the message says why and what to do)."""


@dataclass
class Session:
    """One artifact loaded in its runtime.

    ``run`` is the verification and evaluation call: a float32 NCHW batch of any size in, float32
    outputs out (fed in slices of the artifact's own batch). ``bench`` is one inference on a fixed
    input of ``input_shape`` already in the runtime's own types: the call the profiler times."""

    run: Callable[[np.ndarray], np.ndarray]
    bench: Callable[[], object]
    input_shape: list[int]
    threads: int | None  # as the runtime reports it, or as set where it cannot report it
    options: dict[str, Any] = field(default_factory=dict)  # the runtime's settings that bear on timing
    end_trace: Callable[[], str] | None = None  # with a trace requested: write it, return its path
    load_ms: float = 0.0  # the artifact's load (and compile) alone: the runtime was imported before
    # Where the runtime can expose inner tensors: (batch, tensor names) → {name: values per image}.
    intermediates: Callable[[np.ndarray, list[str]], dict[str, np.ndarray]] | None = None


@dataclass(frozen=True)
class LoadRequest:
    """What a runtime module's ``load`` is given."""

    artifact: Path | None
    threads: int | None = None  # None: the runtime's default (every core)
    batch: int = 1  # the batch ``bench`` runs where the artifact's batch is free
    model: str | None = None  # the torch runtime builds this registered model (no artifact)
    trace_prefix: str | None = None  # also trace each operator into files with this prefix
    options: dict[str, Any] = field(default_factory=dict)  # the runtime row's settings and the export's options


def run_in_chunks(run_chunk: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, size: int | None) -> np.ndarray:
    """Feed an artifact with a static batch ``size`` (None: any) one slice at a time; the outputs
    come back as one float32 array. Every slice is C-contiguous: ExecuTorch's Python ``execute``
    reads a strided tensor's storage in memory order and silently computes on the wrong pixels."""
    size = size or len(batch)
    outputs = [np.asarray(run_chunk(np.ascontiguousarray(batch[i:i + size]))) for i in range(0, len(batch), size)]
    return np.concatenate(outputs).astype(np.float32)


def example_input(shape: list[int]) -> np.ndarray:
    """The fixed random input every runtime times."""
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


@contextlib.contextmanager
def captured_stderr():
    """What C++ runtimes write straight to file descriptor 2 (ExecuTorch's thread-pool, cpuinfo
    and file-probing notes), caught in a temporary file that is yielded for error messages."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as file:
        os.dup2(file.fileno(), 2)
        try:
            yield file
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def captured_text(file) -> str:
    file.seek(0)
    return file.read().decode(errors="replace").strip()
