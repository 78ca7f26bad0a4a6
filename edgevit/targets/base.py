"""What every export target shares: its row in the target table and the artifact it produces.

A target package (``edgevit/targets/<name>/``) provides:

- ``export(model, example, precision, options, out_dir, quant=None) -> ExportResult``: write the
  artifact into ``out_dir`` (a private temporary folder) and say what it wrote
  (``details["input"]``, if given, replaces the manifest's default float32 NCHW tensor input
  spec); precision ``int8`` comes with ``quant``, an ``edgevit.quant.spec.QuantSpec``;
- optionally ``precheck(result, model, example, precision) -> PrecheckResult``: the next best
  check where the runtime (``TargetSpec.runs_in``, a module of ``edgevit.runtimes``) cannot run
  here, handed the ``ExportResult`` export() returned (its ``evidence``: what it made, in memory);
- optionally ``int8_exactness(result)``: on which CPU classes the int8 artifact's numbers hold.

Running the artifact, verification, the manifest and atomic placement are not a target's: the
runtimes and the pipeline do them once, for every target.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgevit.core.errors import MissingBackend


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
    """A row of the target table (``edgevit.targets.TARGETS``)."""

    name: str
    description: str
    suffix: str  # file (or bundle directory) suffix of the artifact
    precisions: tuple[str, ...]
    runtime: str  # what verifies and runs the artifact, in words (the manifest's "runtime")
    extra: str  # pip extra that installs what it needs
    requires: tuple[str, ...]  # importable modules it needs
    options: tuple[OptionSpec, ...] = ()
    quant_modes: tuple[str, ...] = ()  # quantization modes (edgevit.quant.spec.MODES) its int8 supports
    runs_in: str = ""  # the edgevit.runtimes row that loads its artifacts

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
            raise MissingBackend(
                f"target {self.name} needs {', '.join(missing)}: "
                f"install it with  pip install -c constraints.txt -e \".[{self.extra}]\""
            )
        return importlib.import_module(f"edgevit.targets.{self.name}")


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
