"""What every export target shares: its row in the target table, the artifact it produces, the
verification figures, and the runtime-unavailable signal.

A target module (``edgevit/export/<name>.py``) provides two functions:

- ``export(model, example, precision, options, out_dir, quant=None) -> ExportResult``: write the
  artifact into ``out_dir`` (a private temporary folder) and say what it wrote
  (``details["input"]``, if given, replaces the manifest's default float32 NCHW tensor input
  spec); precision ``int8`` comes with ``quant``, an ``edgevit.quant.spec.QuantSpec``;
- ``load_runner(artifact_path, options) -> Runner``: the target's real runtime, as a callable
  from a float32 NCHW numpy batch to float32 logits; raises :class:`RuntimeUnavailable` where
  that runtime cannot run here (Core ML off macOS), and may then offer
  ``precheck(result, model, example, precision) -> PrecheckResult`` as the next best check,
  handed the ``ExportResult`` export() returned (its ``evidence``: what it made, in memory).

Verification, the manifest and atomic placement are done once, by the pipeline.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import numpy as np

from edgevit.errors import EdgevitError

Runner = Callable[[np.ndarray], np.ndarray]


def run_in_chunks(run_chunk: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, size: int | None) -> np.ndarray:
    """Feed an artifact with a static batch ``size`` (None: any) one slice at a time; the outputs
    come back as one float32 array. Shared by every target's runner."""
    size = size or len(batch)
    outputs = [np.asarray(run_chunk(batch[i:i + size])) for i in range(0, len(batch), size)]
    return np.concatenate(outputs).astype(np.float32)


class RuntimeUnavailable(Exception):
    """The target's runtime cannot run on this machine (the reason is the message)."""


@dataclass(frozen=True)
class OptionSpec:
    """One target-specific export option; the CLI flag is ``--`` + name with ``_`` as ``-``."""

    name: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: int | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class TargetSpec:
    """A row of the target table (``edgevit.export.TARGETS``)."""

    name: str
    description: str
    suffix: str  # file (or bundle directory) suffix of the artifact
    precisions: tuple[str, ...]
    runtime: str  # what verifies and runs the artifact
    extra: str  # pip extra that installs what it needs
    requires: tuple[str, ...]  # importable modules it needs
    options: tuple[OptionSpec, ...] = ()
    quant_modes: tuple[str, ...] = ()  # quantization modes (edgevit.quant.spec.MODES) its int8 supports

    @property
    def default_precision(self) -> str:
        return self.precisions[0]

    def option(self, name: str) -> OptionSpec | None:
        return next((o for o in self.options if o.name == name), None)

    def missing_packages(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def implementation(self) -> ModuleType:
        missing = self.missing_packages()
        if missing:
            raise EdgevitError(
                f"target {self.name} needs {', '.join(missing)}: "
                f"install it with  pip install -c constraints.txt -e \".[{self.extra}]\""
            )
        return importlib.import_module(f"edgevit.export.{self.name}")


@dataclass
class ExportResult:
    """What a target wrote: the artifact path and target-specific facts for the manifest."""

    path: Path
    details: dict[str, Any] = field(default_factory=dict)
    # What export() made that precheck() reads back (an exported program, the int8 program, the
    # ONNX file TensorRT consumes): kept in memory, never written to the manifest.
    evidence: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class PrecheckResult:
    """A check that stands in for running the artifact where its runtime cannot run."""

    name: str
    reference: np.ndarray  # fp32 output
    candidate: np.ndarray  # output computed the way the runtime would (e.g. float16)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # risks that must fail verification


# Libraries that narrate exports on stdout/stderr and through their loggers (step banners,
# progress bars, notes about optional kernels); the pipeline reports what matters instead.
# "" is the root logger: onnxruntime.quantization warns through it (its handler, set up by an
# earlier basicConfig, holds the real stderr, which redirect_stderr cannot catch).
_CHATTY_LOGGERS = ("", "torch", "torch.onnx", "torch.export", "torch.utils._pytree", "onnxscript", "onnx_ir",
                   "executorch", "coremltools", "torchao")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Python-level warnings, prints and the export libraries' loggers (errors still raise)."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
