"""Roofline estimates for devices that cannot be reached: never a measurement, always labelled.

Every aten op of one forward pass of the deploy form is counted: FLOPs by PyTorch's own formulas
(the ones ``FlopCounterMode`` uses, so matmuls and convolutions; elementwise work counts as
memory traffic only), and bytes as the op's inputs plus outputs at the artifact's precision.
Each op takes ``max(FLOPs / peak FLOP/s, bytes / bandwidth)``; ops are charged to the innermost
module that ran them, so the per-layer figures line up with measured per-layer profiles.

This is a lower bound: it assumes every op reaches the device's peak and ignores fusion (which
saves traffic) and launch overheads (which cost time, a lot on GPUs at batch 1).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from edgevit.core.errors import EdgevitError

BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1}


@dataclass
class LayerCost:
    flops: int = 0
    bytes: int = 0
    seconds: float = 0.0


class _OpCounter(TorchDispatchMode):
    def __init__(self, module_stack: list[str], bytes_per_element: int, flops_per_s: float, bytes_per_s: float):
        super().__init__()
        self.stack = module_stack
        self.bytes_per_element = bytes_per_element
        self.flops_per_s, self.bytes_per_s = flops_per_s, bytes_per_s
        self.layers: dict[str, LayerCost] = defaultdict(LayerCost)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        flops = int(formula(*args, **kwargs, out_val=out)) if formula else 0
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        # Views move nothing; everything else reads its inputs and writes its outputs once.
        moved = 0 if func.is_view else sum(t.numel() for t in tensors) * self.bytes_per_element
        cost = self.layers[self.stack[-1]]
        cost.flops += flops
        cost.bytes += moved
        cost.seconds += max(flops / self.flops_per_s, moved / self.bytes_per_s)
        return out


@torch.no_grad()
def layer_costs(model: torch.nn.Module, x: torch.Tensor, precision: str, flops_per_s: float,
                bytes_per_s: float) -> dict[str, LayerCost]:
    """Roofline cost of each module's own ops (not its children's) in one forward pass of ``x``."""
    if precision not in BYTES_PER_ELEMENT:
        raise EdgevitError(f"no estimate for precision {precision!r} (known: {', '.join(BYTES_PER_ELEMENT)})")
    stack = [""]  # "": ops outside any named module (none in these models, but counted if any)
    handles = []

    def enter(name: str):
        def hook(_module, _inputs) -> None:  # returning anything would replace the inputs
            stack.append(name)
        return hook

    def leave(_module, _inputs, _output) -> None:
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    counter = _OpCounter(stack, BYTES_PER_ELEMENT[precision], flops_per_s, bytes_per_s)
    try:
        with counter:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return dict(counter.layers)


def estimate(model_name: str, profile, precision: str, batch: int = 1) -> dict:
    """The roofline estimate of ``model_name``'s deploy form on ``profile``'s peak figures."""
    from edgevit.models import create_model, to_deploy

    peak = profile.peak_flops.get(precision)
    if peak is None or profile.memory_bandwidth is None:
        have = ", ".join(profile.peak_flops) or "none"
        raise EdgevitError(f"device {profile.name} has no peak figures for an {precision} estimate "
                           f"(peak.flops: {have}; memory bandwidth: {'yes' if profile.memory_bandwidth else 'no'})")
    model = to_deploy(create_model(model_name)).eval()
    x = torch.zeros(batch, *model.cfg.input_size)
    layers = layer_costs(model, x, precision, peak.value, profile.memory_bandwidth.value)
    total = sum(cost.seconds for cost in layers.values())
    return {
        "kind": "estimate",
        "method": "roofline per aten op: max(FLOPs / peak FLOP/s, bytes / memory bandwidth), summed",
        "p50_ms": total * 1e3,
        "flops": sum(c.flops for c in layers.values()),
        "bytes": sum(c.bytes for c in layers.values()),
        "peak_flops": {"value": peak.value, "source": peak.source},
        "memory_bandwidth": {"value": profile.memory_bandwidth.value, "source": profile.memory_bandwidth.source},
        "layers_ms": {name: cost.seconds * 1e3 for name, cost in layers.items()},
    }
