"""Facts about a built model: parameter count, measured MACs, per-stage output shapes."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A random batch at the model's native input size."""
    return torch.randn(batch, *model.cfg.input_size)


@torch.no_grad()
def count_macs(model: nn.Module, x: torch.Tensor | None = None) -> int:
    """Multiply-accumulates of one forward pass at batch 1, as counted by PyTorch's FLOP counter.

    The counter sees matmuls and convolutions (2 FLOPs per MAC); elementwise work is not counted,
    which is also how the papers count.
    """
    x = example_input(model) if x is None else x[:1]
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


@torch.no_grad()
def stage_shapes(model: nn.Module, x: torch.Tensor | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """Output shape of every stage named in ``model.feature_info``, in order, plus the logits."""
    x = example_input(model) if x is None else x
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for info in model.feature_info:
        name = info["module"]

        def record(_module, _inputs, output, name=name):
            shapes[name] = tuple(output.shape)

        handles.append(modules[name].register_forward_hook(record))
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [(info["module"], shapes[info["module"]]) for info in model.feature_info] + [
        ("logits", tuple(logits.shape))
    ]
