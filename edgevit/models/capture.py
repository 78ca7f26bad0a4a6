"""Module outputs by name, captured with forward hooks: what inspect compares block by block."""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def module_outputs(model: nn.Module, modules: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Yields a dict that the runs inside the block fill with each named module's first tensor
    output (float32, batch first), in the order the modules ran."""
    outputs: dict[str, np.ndarray] = {}
    named = dict(model.named_modules())

    def keep(name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and name not in outputs:
                outputs[name] = output.detach().float().numpy().copy()
        return hook

    handles = [named[name].register_forward_hook(keep(name)) for name in modules]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
