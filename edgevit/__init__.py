"""edgevit: mobile vision transformers from PyTorch to devices, verified and measured.

Everything loads on first use, so `import edgevit` (the CLI's `--help`, the profiler's worker
process) imports neither torch nor a runtime."""

__version__ = "0.1.0"

_LAZY = {"create_model": "edgevit.models", "list_models": "edgevit.models", "load_checkpoint": "edgevit.models",
         "to_deploy": "edgevit.models", "export_model": "edgevit.pipeline.export",
         "quantize_model": "edgevit.pipeline.quantize", "evaluate": "edgevit.pipeline.evaluate",
         "fine_tune": "edgevit.training"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgevit' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
