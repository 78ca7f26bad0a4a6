"""Silencing the export libraries' Python-level chatter (warnings, prints, loggers); errors still raise."""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from typing import Iterator

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


# Notes third-party packages log on import that are known to be harmless here, by logger and
# message: torchao's CUDA kernel libraries (mxfp8, CUTLASS sm90a), which a CPU-only torch cannot
# load and no CPU path uses; torch's deprecation note about torchao registering an Enum.
_HARMLESS = {
    "torchao": re.compile(r"Failed to load .*torchao/_C_(mxfp8|cutlass)"),
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
}


class _DropHarmless(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def drop_known_harmless_notes() -> None:
    """Filter the notes of :data:`_HARMLESS` from their loggers (the CLI calls this once;
    other messages of the same loggers still print)."""
    for name, pattern in _HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless(pattern))
