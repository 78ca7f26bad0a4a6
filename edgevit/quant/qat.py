"""Quantization-aware training with PT2E: the deploy model (norms decomposed, as XNNPACK takes
them) is exported with the training batch, ``prepare_qat_pt2e`` inserts fake quantization with
the same quantizer as static int8 (:mod:`edgevit.quant.pt2e`), the calibration images set its
ranges (then frozen), :func:`edgevit.training.fine_tune` trains the weights, and ``convert_pt2e`` gives the int8 program.

The training graph has a static batch (the training batch size) and the targets need batch 1, so
the trained state (weights, fake-quant scales and ranges) is loaded into the same graph exported
at batch 1 before it is converted (:func:`program_from_state`). That state is all the int8
program is made of besides the architecture, so a bundle keeps it (:func:`write_program_state`,
safetensors) and ``edgevit inspect`` makes the program again from it. Targets use the result as
follows:

- ExecuTorch lowers ``converted_model`` and Core ML (W8A8) converts it, as they are
  (``QuantSpec.qat_model``);
- ONNX exports ``converted_model`` with the scales it trained with
  (:func:`edgevit.targets.onnx.int8.from_pt2e_program`);
- TensorRT quantizes ``fine_tuned_float_model`` — the deploy model with the fine-tuned float
  weights — statically with the same calibration images: TensorRT takes symmetric activations
  only, and the XNNPACK quantizer's are asymmetric, so its scales are recalibrated, not learned.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from edgevit.core.datafiles import write_safetensors
from edgevit.core.errors import EdgevitError
from edgevit.models.layers import decompose_norms
from edgevit.quant import pt2e
from edgevit.quant.spec import QuantSpec


# The file in a QAT bundle that holds its program's trained state.
PROGRAM_STATE_FILE = "qat_program.safetensors"


@dataclass
class QatResult:
    converted_model: torch.fx.GraphModule  # PT2E int8 program, batch 1 (QuantSpec.qat_model)
    fine_tuned_float_model: nn.Module  # deploy form with the fine-tuned float weights
    # The batch-1 QAT graph's trained state (QuantSpec.qat_state): program_from_state makes
    # converted_model again from it.
    program_state: dict[str, torch.Tensor] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)


def run_qat(
    deploy_model: nn.Module,
    train_data,
    calibration: torch.Tensor,
    spec: QuantSpec,
    *,
    epochs: float | None = None,
    steps: int | None = None,
    lr: float = 1e-5,
    batch_size: int = 32,
    seed: int = 0,
    eval_data=None,
    progress: bool | Callable[[dict[str, Any]], None] = False,
) -> QatResult:
    """Fine-tune ``deploy_model`` with fake quantization and convert it; see the module doc.

    ``train_data``: what :func:`edgevit.training.fine_tune` takes (a data set with ``batch()``, or
    ``(images, labels)`` tensors) with the model's preprocessing. ``calibration`` warms up the
    fake-quant ranges. ``spec`` gives per-channel, float_ops and float_modules (its mode is not
    read). ``eval_data`` (same kinds) adds top-1 figures of the float model before and after and
    of the int8 program, and of static int8 without QAT (same calibration) for comparison.
    """
    from torchao.quantization.pt2e import disable_observer, move_exported_model_to_eval, move_exported_model_to_train

    from edgevit.training import fine_tune

    if calibration is None or len(calibration) == 0:
        raise EdgevitError("QAT needs calibration images to start its int8 ranges from: give --calib-data DIR")
    if batch_size < 1:
        raise EdgevitError(f"QAT batch size must be >= 1, got {batch_size}")
    length = len(train_data[1]) if isinstance(train_data, (tuple, list)) else len(train_data)
    batch_size = min(batch_size, length)  # the training graph's static batch: one full batch at least
    model = decompose_norms(copy.deepcopy(deploy_model)).eval()
    shape = tuple(calibration.shape[1:])
    qat_spec = spec.with_changes(mode="qat", calibration=calibration, qat_model=None)
    figures: dict[str, Any] = {}

    clock = time.perf_counter()
    prepared, plan = pt2e.prepare(model, torch.zeros(batch_size, *shape), qat_spec, qat=True)
    # Ranges from the calibration images (in training mode, the fake-quant observers update).
    move_exported_model_to_train(prepared)
    with torch.no_grad():
        for chunk in _static_batches(calibration, batch_size):
            prepared(chunk)
    # Ranges stay where calibration put them while the weights train. With moving-average ranges
    # the weights learn to lean on the fake quantization's clamping: Fashion-MNIST EdgeViT-XXS after
    # 56 steps, float top-1 85.4 -> 61.2 and int8 84.6 with them moving, 85.65 and 85.25 frozen.
    prepared.apply(disable_observer)
    for parameter in prepared.parameters():
        parameter.requires_grad_(True)
    figures["training"] = fine_tune(
        prepared, train_data, epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        progress=progress, train_mode=move_exported_model_to_train, eval_mode=move_exported_model_to_eval)

    # The same graph at batch 1, with the trained state, converted.
    state = {name: tensor.detach().clone() for name, tensor in prepared.state_dict().items()}
    converted = program_from_state(deploy_model, shape, qat_spec.with_changes(qat_state=state), made_from="the training graph",
                                   mismatch="the model's graph depends on its batch size")
    float_model = _with_trained_weights(deploy_model, prepared)
    figures["seconds"] = round(time.perf_counter() - clock, 1)
    figures["quantization"] = converted.edgevit_quantization

    if eval_data is not None:
        figures["eval"] = _evaluate(deploy_model, float_model, converted, calibration, spec, eval_data)
    return QatResult(converted, float_model, state, figures)


def program_from_state(deploy_model: nn.Module, input_shape: tuple[int, ...], spec: QuantSpec,
                       made_from: str = "the bundle's qat_program",
                       mismatch: str = "it was trained with another model, quantizer or torch version") -> torch.fx.GraphModule:
    """The QAT int8 program at batch 1: ``deploy_model``'s QAT graph (norms decomposed, the
    quantizer of ``spec``: its per-channel, float_ops and float_modules) holding
    ``spec.qat_state`` (the trained graph's weights, fake-quant scales and ranges), converted.
    Deterministic: the same state gives the same program, op for op and bit for bit. ``made_from``
    and ``mismatch`` word the one-line error for a state that does not fit."""
    from torchao.quantization.pt2e import move_exported_model_to_eval

    if spec.mode != "qat" or not spec.qat_state:
        raise EdgevitError("a QAT program is made from a qat spec holding its trained state (QuantSpec.qat_state)")
    model = decompose_norms(copy.deepcopy(deploy_model)).eval()
    single, plan = pt2e.prepare(model, torch.zeros(1, *input_shape), spec, qat=True)
    try:
        single.load_state_dict(spec.qat_state)
    except RuntimeError as exc:
        raise EdgevitError(f"the batch-1 QAT graph of {type(deploy_model).__name__} does not take the state of "
                           f"{made_from} ({str(exc).splitlines()[0]}); {mismatch}") from None
    move_exported_model_to_eval(single)
    converted = pt2e.convert(single)
    converted.edgevit_quantization = pt2e.quantizer_details(spec, plan, qat=True)  # read by pt2e.quantize for mode "qat"
    return converted


def write_program_state(state: dict[str, torch.Tensor], path) -> None:
    """``state`` (:attr:`QatResult.program_state`) as safetensors: tensors only, nothing unpickled
    when it is read back."""
    write_safetensors(state, path)


def read_program_state(path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise EdgevitError(f"{path} is not a readable QAT program state ({exc}); export the QAT bundle again") from None


def _static_batches(images: torch.Tensor, size: int):
    """``images`` in batches of exactly ``size`` (the last one filled up from the start)."""
    for start in range(0, len(images), size):
        chunk = images[start:start + size]
        if len(chunk) < size:
            chunk = torch.cat([chunk, images[: size - len(chunk)].repeat(-(-(size - len(chunk)) // len(images)), 1, 1, 1)])[:size]
        yield chunk.contiguous()


def _with_trained_weights(deploy_model: nn.Module, prepared: torch.fx.GraphModule) -> nn.Module:
    """A copy of the deploy model holding the prepared graph's fine-tuned parameters.

    ``torch.export(...).module()`` keeps the module's parameter names; the decomposed norms keep
    theirs too, GroupNorm's affine vectors shaped (C, 1, 1) instead of (C,).
    """
    trained = prepared.state_dict()
    float_model = copy.deepcopy(deploy_model)
    state = float_model.state_dict()
    missing = [name for name in state if name not in trained and state[name].is_floating_point()]
    if missing:
        raise EdgevitError(f"QAT graph lacks parameters {', '.join(missing[:5])}; cannot rebuild the float model")
    with torch.no_grad():
        for name, tensor in state.items():
            if name in trained:
                tensor.copy_(trained[name].reshape(tensor.shape))
    return float_model.eval()


def _evaluate(deploy_model, float_model, converted, calibration, spec, eval_data) -> dict[str, Any]:
    """Top-1 (percent) on ``eval_data``: float before and after QAT; static int8 (PT2E, the same
    calibration) of the model before QAT; the QAT int8 program; and static int8 of the fine-tuned
    float weights, what a target that recalibrates them (TensorRT) gets, with PT2E as its proxy."""
    from edgevit.training import accuracy

    static = spec.with_changes(mode="static", calibration=calibration, qat_model=None)

    def static_int8(model: nn.Module) -> nn.Module:
        return _OneByOne(pt2e.quantize(decompose_norms(copy.deepcopy(model)), calibration[:1], static).graph_module)

    return {
        "float_before": accuracy(deploy_model.eval(), eval_data)["eval_top1"],
        "float_after": accuracy(float_model, eval_data)["eval_top1"],
        "ptq_int8": accuracy(static_int8(deploy_model), eval_data)["eval_top1"],
        "qat_int8": accuracy(_OneByOne(converted), eval_data)["eval_top1"],
        "fine_tuned_recalibrated_int8": accuracy(static_int8(float_model), eval_data)["eval_top1"],
    }


class _OneByOne(nn.Module):
    """A batch-1 int8 program run over a batch one sample at a time."""

    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pt2e.run_graph(self.graph, x)
