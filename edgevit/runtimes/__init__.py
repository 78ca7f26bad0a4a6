"""Runtimes: load one artifact and run it, numpy in and out. One module per runtime
(onnxruntime, executorch, coreml, tensorrt, torch); ``RUNTIMES`` is the table of the ways they
run (a module with its settings, e.g. onnxruntime with the CUDA provider).

Verification, ``edgevit eval``, the profiler's worker and the ssh runner all load artifacts
through :func:`load`. The package needs only the standard library and numpy at import time
(each runtime is imported when it is used), because the profiler copies it onto devices that
have neither torch nor edgevit; inside it, imports are relative for the same reason.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import ArtifactError, LoadRequest, RuntimeUnavailable, Session, captured_stderr, run_in_chunks


@dataclass(frozen=True)
class Runtime:
    name: str
    module: str  # the module of this package that loads it
    target: str  # the export target whose artifact it runs ("torch": the eager model, no artifact)
    clock: str  # how one call is timed: "wall" on CPU, "cuda_events" on GPU (edgevit.profile.timing)
    package: str  # the distribution whose version is recorded
    description: str
    imports: tuple[str, ...] = ()  # imported before the load clock starts: load time is the artifact's
    settings: dict[str, Any] = field(default_factory=dict)  # given to the module's load as options


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("onnxruntime", "onnxruntime", "onnx", "wall", "onnxruntime", "onnxruntime, CPU execution provider",
            ("onnxruntime",), {"providers": ["CPUExecutionProvider"]}),
    Runtime("onnxruntime-cuda", "onnxruntime", "onnx", "wall", "onnxruntime-gpu",
            "onnxruntime, CUDA execution provider (outputs copied back: run() returns when done)", ("onnxruntime",),
            {"providers": ["CUDAExecutionProvider"]}),
    Runtime("onnxruntime-tensorrt", "onnxruntime", "onnx", "wall", "onnxruntime-gpu",
            "onnxruntime, TensorRT execution provider", ("onnxruntime",),
            {"providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}),
    Runtime("executorch", "executorch", "executorch", "wall", "executorch", "executorch.runtime (XNNPACK on CPU)",
            ("executorch.runtime",)),
    Runtime("torch", "torch", "torch", "wall", "torch", "PyTorch eager, deploy form, CPU", ("torch", "edgevit.models"),
            {"device": "cpu"}),
    Runtime("torch-cuda", "torch", "torch", "cuda_events", "torch", "PyTorch eager, deploy form, CUDA",
            ("torch", "edgevit.models"), {"device": "cuda"}),
    Runtime("tensorrt", "tensorrt", "tensorrt", "cuda_events", "tensorrt", "TensorRT engine (CUDA GPU)"),
    Runtime("coreml", "coreml", "coreml", "wall", "coremltools", "Core ML (MLModel.predict), macOS"),
)}


def load(runtime: str, artifact: Path | None, *, threads: int | None = None, batch: int = 1, model: str | None = None,
         trace_prefix: str | None = None, options: dict[str, Any] | None = None) -> Session:
    """``runtime`` (a row of :data:`RUNTIMES`) ready to run ``artifact``. ``options``: the
    export's options where they bear on running it (ExecuTorch's backend), and runtime switches
    (onnxruntime's ``optimize``). ``trace_prefix``: also trace each operator with the runtime's
    profiler (onnxruntime's JSON, ExecuTorch's ETDump), written by ``session.end_trace``."""
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    row = RUNTIMES[runtime]
    request = LoadRequest(None if artifact is None else Path(artifact), threads, batch, model, trace_prefix,
                          {**(options or {}), **row.settings})
    try:
        for name in row.imports:
            with captured_stderr():  # executorch's and torchao's import-time notes
                importlib.import_module(name)
        loader = importlib.import_module(f"{__name__}.{row.module}")
        start = time.perf_counter()
        session = loader.load(request)
    except ImportError as exc:
        raise RuntimeUnavailable(f"{runtime} is not installed here ({exc})") from None
    session.load_ms = (time.perf_counter() - start) * 1e3
    return session


__all__ = ["RUNTIMES", "ArtifactError", "LoadRequest", "Runtime", "RuntimeUnavailable", "Session", "load", "run_in_chunks"]
