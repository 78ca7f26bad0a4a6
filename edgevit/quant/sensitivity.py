"""Which layers int8 hurts most, and how many to keep in float for a given accuracy budget.

``layer_sensitivity`` quantizes one Conv/Linear at a time in PyTorch — per-channel symmetric
int8 weights and a per-tensor uint8 input range from the calibration sample, the arithmetic
every target here uses — and measures the logits' error against float. It is target-neutral
and fast; the decision is then checked on the real artifact: ``keep_float_until`` exports,
measures the real drop, and keeps the most sensitive layers in float until it fits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class LayerSensitivity:
    module: str
    kind: str
    relative_error: float  # ‖logits_q − logits‖ / ‖logits‖ with only this layer quantized
    top1_agreement: float


def _fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.detach().abs().flatten(1).amax(1).clamp(min=1e-12) / 127
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return (weight / scale.view(shape)).round().clamp(-127, 127) * scale.view(shape)


def pair_safe_fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    """The ONNX target's pair-safe int8 weights (``edgevit.targets.onnx.int8.pair_safe_weight_ranges``):
    per output channel, range = the sum of its two largest magnitudes."""
    rows = weight.detach().abs().flatten(1)
    largest = rows.topk(min(2, rows.shape[1]), dim=1).values.sum(1)
    scale = largest.clamp(min=1e-12).view((-1,) + (1,) * (weight.dim() - 1)) / 127
    return (weight / scale).round().clamp(-127, 127) * scale


def _fake_quant_activation(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-12) / 255
    zero_point = round(-low / scale)
    return ((x / scale).round() + zero_point).clamp(0, 255).sub(zero_point).mul(scale)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d))}


def layer_sensitivity(model: nn.Module, inputs: torch.Tensor,
                      progress: Callable[[int, int, str], None] | None = None,
                      quantize_weight: Callable[[torch.Tensor], torch.Tensor] = _fake_quant_weight,
                      quantize_input: bool = True) -> list[LayerSensitivity]:
    """Per-layer error, most sensitive first. ``model`` is the deploy model (left unchanged).
    ``quantize_weight`` rounds a layer's weight; ``quantize_input=False`` leaves its input float
    (to rank layers by what a weight format alone costs)."""
    layers = quantizable_layers(model)
    input_ranges: dict[str, tuple[float, float]] = {}

    def record(name):
        def hook(_module, args):
            x = args[0].detach()
            low, high = input_ranges.get(name, (0.0, 0.0))
            input_ranges[name] = (min(low, x.min().item()), max(high, x.max().item()))
        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in layers.items()] if quantize_input else []
    try:
        with torch.no_grad():
            reference = model(inputs)
    finally:
        for handle in handles:
            handle.remove()

    results = []
    for index, (name, module) in enumerate(layers.items()):
        if progress:
            progress(index, len(layers), name)
        low, high = input_ranges.get(name, (0.0, 0.0))
        original = module.weight.data.clone()
        handle = module.register_forward_pre_hook(
            lambda _m, args, low=low, high=high: (_fake_quant_activation(args[0], low, high), *args[1:])
        ) if quantize_input else None
        module.weight.data = quantize_weight(original)
        try:
            with torch.no_grad():
                output = model(inputs)
        finally:
            module.weight.data = original
            if handle is not None:
                handle.remove()
        error = (torch.linalg.vector_norm(output - reference) / torch.linalg.vector_norm(reference).clamp(min=1e-12)).item()
        agreement = (output.argmax(1) == reference.argmax(1)).float().mean().item()
        results.append(LayerSensitivity(name, type(module).__name__, error, agreement))
    if progress:
        progress(len(layers), len(layers), "")
    return sorted(results, key=lambda r: r.relative_error, reverse=True)


@dataclass
class DropSearchStep:
    float_layers: int
    drop: float
    artifact: object


def keep_float_until(ranking: list[str], export_with_float: Callable[[tuple[str, ...]], object],
                     measure_drop: Callable[[object], float], max_drop: float,
                     report: Callable[[DropSearchStep], None] | None = None) -> tuple[DropSearchStep, list[DropSearchStep]]:
    """Export with the top-k most sensitive layers in float, k = 0, 1, 2, 4, …, until the real
    measured drop ≤ ``max_drop``; then bisect between the last two k for the fewest float layers.
    Returns the chosen step and every step tried (for the report)."""
    tried: dict[int, DropSearchStep] = {}

    def attempt(k: int) -> DropSearchStep:
        if k not in tried:
            artifact = export_with_float(tuple(ranking[:k]))
            tried[k] = DropSearchStep(k, measure_drop(artifact), artifact)
            if report:
                report(tried[k])
        return tried[k]

    k, previous = 0, None
    while True:
        step = attempt(k)
        if step.drop <= max_drop or k >= len(ranking):
            break
        previous, k = k, min(len(ranking), max(1, 2 * k))
    if previous is not None and step.drop <= max_drop:
        low, high = previous, k  # drop(low) > max_drop ≥ drop(high)
        while high - low > 1:
            middle = (low + high) // 2
            if attempt(middle).drop <= max_drop:
                high = middle
            else:
                low = middle
        step = tried[high]
    return step, [tried[k] for k in sorted(tried)]
