"""Per-block outputs of a Core ML bundle where Core ML cannot run (anywhere but macOS), for
``edgevit inspect``: each module's output as the bundle's numerics pre-check computes it
(:func:`edgevit.targets.coreml.precheck`), so the pre-check's error can be followed block by block.

- **fp16**: the deploy model with float16 weights, every op's output rounded to float16;
- **W8**: the same, with the int8 weights read back from the ``.mlpackage`` itself (coremltools
  loads an ML program's weights without Core ML), dequantized;
- **W8A8**: the PT2E int8 program made again from the bundle's quantization spec and calibration
  images (QAT: from its trained state), every float op's output rounded to float16; its activation scales are checked against
  the ``.mlpackage``'s quantize ops, so a program that is not the bundle's is refused;
- **fp32**: the decomposed ``torch.export`` program coremltools converted, in float32.

A module's output is its forward output in eager PyTorch (fp16, W8); in a graph (W8A8, fp32) the
last node run inside the module, or the dequantized value the next block reads where that node is
quantized on its way out (as Core ML converts PT2E's quantize/dequantize pairs).
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgevit.core.errors import EdgevitError, MissingBackend
from edgevit.core.quiet import quiet
from edgevit.models.capture import module_outputs
from edgevit.quant import pt2e
from edgevit.quant.spec import QuantSpec
from edgevit.targets.coreml import (FP16_PRECHECK, FP32_PRECHECK, W8_PRECHECK, W8A8_PRECHECK, _coremltools,
                                    _DivideByStd, _float16_copy, _inverse_std, _parameter_names, _to_float16_values,
                                    _with_weights, dequantized_weights, float16_emulation, one_thread)

_PRECHECK_NAMES = {"fp32": FP32_PRECHECK, "fp16": FP16_PRECHECK, "w8": W8_PRECHECK, "w8a8": W8A8_PRECHECK}
_EAGER_BOUNDARIES = "each module's forward output (eager PyTorch, forward hooks)"
_GRAPH_BOUNDARIES = "the last node run inside each module (the graph's nn_module_stack)"
_BOUNDARIES = {"fp16": _EAGER_BOUNDARIES, "w8": _EAGER_BOUNDARIES, "fp32": _GRAPH_BOUNDARIES,
               "w8a8": _GRAPH_BOUNDARIES + ", dequantized where it is quantized for the next block"}


def precheck_block_outputs(artifact: Path, manifest: dict[str, Any], deploy: nn.Module, images: torch.Tensor,
                           modules: list[str], quant: QuantSpec | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Each of ``modules``' output on ``images`` (module name → float32 array, batch first, in the
    order the modules ran; modules without a tensor output are left out) as the bundle's pre-check
    computes it, and a note saying how: ``method`` (the pre-check's name and why it stands in),
    ``variant``, ``weights``, ``boundaries``; ``first_non_finite`` and ``modules_without_output``
    where there are such.

    ``artifact`` and ``manifest`` are a Core ML bundle's; ``deploy`` the deploy model of the
    checkpoint it was exported from; ``quant`` the int8 spec rebuilt from the manifest
    (``QuantSpec.from_summary``, with the calibration images for static), None for fp16/fp32."""
    artifact = Path(artifact)
    variant = _variant(artifact, manifest, quant)
    _check_request(deploy, images, modules)
    note: dict[str, Any] = {"method": f"{_PRECHECK_NAMES[variant]} (artifact not run: {_why_not_core_ml()})",
                            "variant": variant}
    with one_thread(), torch.no_grad():
        if variant == "fp16":
            outputs, rounding = _float16_module_outputs(deploy, images, modules)
            note["weights"] = "the deploy model's, rounded to float16"
        elif variant == "w8":
            model, replaced = _with_weights(deploy, _package_weights(artifact, deploy, images[:1], manifest))
            outputs, rounding = _float16_module_outputs(model, images, modules)
            note["weights"] = (f"the {replaced} int8 weights of {artifact.name}, read with coremltools (no Core ML "
                               "needed) and dequantized; the others the deploy model's, rounded to float16")
        elif variant == "w8a8":
            graph = pt2e.quantize(deploy, images[:1], quant).graph_module
            made_from = ("its trained state (the bundle's QAT program)" if quant.mode == "qat"
                         else "the manifest's quantization spec and calibration images")
            note["weights"] = (f"the PT2E int8 program made again from {made_from}; "
                               f"{_matching_activation_scales(graph, artifact)}")
            with float16_emulation(graph) as rounding:
                outputs = pt2e.boundary_outputs(graph, _to_float16_values(images), modules)
        else:
            with quiet():
                graph = torch.export.export(deploy.eval(), (images[:1].contiguous(),)).run_decompositions({}).module()
            outputs, rounding = pt2e.boundary_outputs(graph, images, modules), None
            note["weights"] = "the deploy model's, float32, in the decomposed torch.export program ct.convert takes"
    note["boundaries"] = _BOUNDARIES[variant]
    if rounding is not None and rounding.first_non_finite:
        note["first_non_finite"] = f"NaN/Inf first appears in float16 at {rounding.first_non_finite}"
    missing = [name for name in modules if name not in outputs]
    if missing:
        note["modules_without_output"] = missing
    return outputs, note


def _variant(artifact: Path, manifest: dict[str, Any], quant: QuantSpec | None) -> str:
    """"fp32", "fp16", "w8" or "w8a8", after checking the bundle and ``quant`` fit together."""
    if manifest.get("target") != "coreml":
        raise EdgevitError(f"{artifact.name} is a {manifest.get('target')!r} bundle, not a Core ML one; Core ML "
                           "pre-check outputs are for bundles written with --target coreml")
    if artifact.suffix != ".mlpackage" or not artifact.is_dir():
        raise EdgevitError(f"{artifact} is not a Core ML package (an .mlpackage folder); give the artifact that the "
                           "bundle's manifest.json names")
    precision = manifest.get("precision")
    if precision in ("fp16", "fp32"):
        if quant is not None:
            raise EdgevitError(f"{artifact.name} is a {precision} bundle: pass quant=None (an int8 spec is for int8 "
                               "bundles)")
        return precision
    if precision != "int8":
        raise EdgevitError(f"{artifact.name}'s manifest names precision {precision!r}; Core ML bundles are fp32, "
                           "fp16 or int8 — is manifest.json the bundle's own?")
    mode = (manifest.get("quantization") or {}).get("mode")
    if quant is None or quant.mode != mode:
        raise EdgevitError(f"{artifact.name} is int8 {mode}: pass its spec, QuantSpec.from_summary(manifest"
                           f"['quantization'], …), not {'None' if quant is None else 'a ' + quant.mode + ' one'}")
    if mode == "qat" and quant.qat_model is None:
        raise EdgevitError(f"{artifact.name} is QAT: pass its spec with the program made again from the bundle's "
                           "qat_program (edgevit.quant.qat.program_from_state)")
    return "w8" if mode == "dynamic" else "w8a8"


def _check_request(deploy: nn.Module, images: torch.Tensor, modules: list[str]) -> None:
    expected = tuple(deploy.cfg.input_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.dtype != torch.float32 or not len(images):
        raise EdgevitError(f"images must be a float32 batch of shape (N, {', '.join(map(str, expected))}), the "
                           f"model's preprocessed input; got {tuple(images.shape)} {images.dtype}")
    if not modules:
        raise EdgevitError("name at least one module whose output to compute (names from deploy.named_modules())")
    known = {name for name, _ in deploy.named_modules() if name}
    unknown = [name for name in modules if name not in known]
    if unknown:
        raise EdgevitError(f"{type(deploy).__name__} has no module {unknown[0]!r}"
                           f"{f' (and {len(unknown) - 1} more unknown)' if len(unknown) > 1 else ''}; use names from "
                           "deploy.named_modules()")


def _why_not_core_ml() -> str:
    system = platform.system()
    if system == "Darwin":
        return "Core ML runs here but does not hand out its inner tensors; these are the pre-check's"
    return f"Core ML runs models only on macOS, not on {system}"


def _float16_module_outputs(model: nn.Module, images: torch.Tensor, modules: list[str]):
    """(module outputs, the rounding mode) of ``model`` with float16 weights and every op's output
    rounded to float16, as the fp16 and W8 pre-checks run it."""
    emulated = _float16_copy(model)
    with float16_emulation(emulated) as rounding, module_outputs(emulated, modules) as outputs:
        emulated(_to_float16_values(images))
    return outputs, rounding


def _package_weights(artifact: Path, deploy: nn.Module, example: torch.Tensor,
                     manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """W8: the ML program's int8 weights, dequantized, by the deploy model's parameter names. The
    program's consts are named after torch.export's placeholders, so the deploy model is exported
    again (as export() wrapped it) for that naming."""
    program = _mil_program(artifact)
    image_input = bool(manifest.get("recipe", {}).get("options", {}).get("image_input"))
    inv_std = _inverse_std(deploy.cfg.std) if image_input else None
    module = _DivideByStd(deploy, inv_std) if inv_std is not None else deploy
    with quiet():
        exported = torch.export.export(module.eval(), (example.contiguous(),))
    weights = dequantized_weights(program, _parameter_names(exported))
    if not weights:
        raise EdgevitError(f"{artifact.name} holds no int8 weights that match {type(deploy).__name__}'s parameters: "
                           "it is not the W8 program of this model; inspect it with the checkpoint it was quantized from")
    return weights


def _mil_program(artifact: Path):
    """The ML program of a saved package, weights included, loaded without Core ML."""
    try:
        ct = _coremltools()
    except ImportError:
        raise MissingBackend(f"reading {artifact.name} needs coremltools: install it with  "
                             "pip install -c constraints.txt -e \".[coreml]\"") from None
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    try:
        with quiet():
            package = ct.models.MLModel(str(artifact), skip_model_load=True)
            spec = package.get_spec()
            return load_mil(spec, spec.specificationVersion, package.weights_dir)
    except Exception as exc:  # coremltools raises bare Exceptions for unreadable packages
        raise EdgevitError(f"coremltools cannot read {artifact.name} ({type(exc).__name__}: {exc}); "
                           "export the bundle again") from None


def _matching_activation_scales(graph: torch.fx.GraphModule, artifact: Path) -> str:
    """Checks that the rebuilt program quantizes activations as the ML program does: the (scale,
    zero point) of the package's quantize ops, which Core ML stores in float16, are among the
    rebuilt program's; calibration on other images or weights gives other scales. coremltools
    divides the output scale of a quantized add or sub by one input's scale
    (``distributive_quantized_binary_op_scale_normalization``), so those are not compared."""
    ours = set()
    for node in graph.graph.nodes:
        if node.op == "call_function" and "quantize_per_tensor" in str(node.target) \
                and "dequantize" not in str(node.target):
            ours.add((float(np.float16(node.args[1])), int(node.args[2])))
    quantize_ops = [op for op in _mil_program(artifact).functions["main"].operations if op.op_type == "quantize"]
    compared = [(float(np.float16(op.scale.val)), int(op.zero_point.val) if op.zero_point is not None else 0)
                for op in quantize_ops if op.input.op is None or op.input.op.op_type not in ("add", "sub")]
    differ = sum(pair not in ours for pair in compared)
    if not compared or differ:
        raise EdgevitError(f"the int8 program made again from the manifest is not {artifact.name}'s: "
                           + (f"{differ} of its {len(compared)} activation scales differ" if compared
                              else "the package has no activation quantize ops to compare")
                           + "; inspect it where it was quantized, with its checkpoint and calibration images")
    return (f"the activation scales of {len(compared)} of {artifact.name}'s {len(quantize_ops)} quantize ops found "
            "in it (those after an add or sub, which coremltools rescales, not compared)")
