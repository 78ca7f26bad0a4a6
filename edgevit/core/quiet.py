"""Silencing the export libraries' Python-level chatter (warnings, prints, loggers); errors still raise."""
from __future__ import annotations

import contextlib
import io
import logging
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
