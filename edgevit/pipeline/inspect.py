"""The inspect flow: ``edgevit inspect BUNDLE …`` — where an artifact's error (and, with
``latency``, its time) comes from, block by block. Each bundle's artifact runs in its runtime on
the same images as the PyTorch model it was exported from (its checkpoint, recorded in the
manifest), and the output of every module at the chosen depth is compared, in graph order, under
the module's own name in every runtime — so bundles of one model (ONNX int8 beside ExecuTorch
int8, fp16 beside fp32) line up row by row. Where the error jumps in an int8 bundle, the bundle is
exported again with that block float and the change is measured (the advice).

The PyTorch side is the float deploy model, except for QAT bundles: a QAT artifact answers to its
QAT int8 program (what its export verified it against), made again from the trained state the
bundle keeps (:func:`edgevit.quant.qat.program_from_state`), its module boundaries read as
ExecuTorch's are (:func:`edgevit.quant.pt2e.boundary_outputs`).

Inner tensors, by target:
- ``onnx``, ``tensorrt`` (TensorRT-ready ONNX): each module's output tensor, found by the
  exporter's scope names (:func:`edgevit.quant.onnx_graph.module_boundaries`), added as a graph
  output in onnxruntime (``Session.intermediates``);
- ``executorch``: the program the .pte was lowered from, made again from the recipe (int8: the
  manifest's spec on its calibration images) and lowered with the boundaries as extra outputs
  (:mod:`edgevit.targets.executorch.probe`), checked to give the artifact's logits;
- ``coreml``: the bundle's numerics pre-check, block by block
  (:mod:`edgevit.targets.coreml.inspection`); the artifact itself gives the logits where Core ML runs.

Per-block time (:mod:`edgevit.profile.layers`): each runtime times the prefix of the graph that
ends at each block; a block's time is what its prefix adds.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgevit import runtimes
from edgevit.core import bundle as bundles
from edgevit.core.errors import EdgevitError, MissingBackend
from edgevit.models import to_deploy
from edgevit.models.capture import module_outputs
from edgevit.models.checkpoints import file_sha256
from edgevit.pipeline.evaluate import artifact_session
from edgevit.pipeline.export import Progress
from edgevit.profile import layers
from edgevit.quant.onnx_graph import OnnxGraph, floors_at_zero, module_boundaries
from edgevit.training import load_eval_model
from edgevit.verify import block_figures, compare_outputs, first_jump, verification_batch


@dataclass(frozen=True)
class InspectRequest:
    bundles: tuple[str, ...]
    data: str | None = None  # image folder; default: the verification batch's synthetic images
    images: int = 8
    depth: int = 1  # module names of this many dotted parts ("stages.1": 2)
    seed: int = 0
    advice: bool = True  # int8 bundles with a jump: re-export with that block float and measure
    latency: bool = False  # also the time each block takes in each bundle's runtime
    threads: int | None = None  # for --latency; None: every core
    runs: int = 50  # timed runs per program, for --latency


def inspect(request: InspectRequest, progress: Progress | None = None) -> dict[str, Any]:
    step = progress or (lambda _message: None)
    if not request.bundles:
        raise EdgevitError("give at least one bundle folder written by `edgevit export` or `edgevit quantize`")
    if request.depth < 1 or request.images < 1:
        raise EdgevitError("--depth and --images must be at least 1")
    opened = [_open(Path(path)) for path in request.bundles]
    manifest = opened[0][1]
    for path, other, _artifact in opened[1:]:
        if other["model"] != manifest["model"] or (other.get("checkpoint") or {}).get("sha256") != \
                (manifest.get("checkpoint") or {}).get("sha256"):
            raise EdgevitError(f"{path.name} is another model or checkpoint than {opened[0][0].name}: inspect lines up "
                               "bundles of one model exported from one checkpoint")
    step(f"loading {manifest['model']['name']} from {manifest['checkpoint']['source']}")
    model, _report = load_eval_model(manifest["model"]["name"], manifest["checkpoint"]["source"])
    deploy = to_deploy(model)
    names = [name for name, _ in deploy.named_modules()]
    deepest = max(name.count(".") + 1 for name in names if name)
    if request.depth > deepest:
        raise EdgevitError(f"--depth {request.depth} is beyond {model.cfg.name}, whose module names have at most "
                           f"{deepest} parts")
    # The rows profile --layers has: every layer in one block (a childless shallower module, such
    # as LeViT's merged head at depth 2, is its own block).
    modules = layers.blocks_at_depth(names, request.depth)
    images = _images(request, model.cfg)
    step(f"running PyTorch on {len(images)} images")
    float_blocks, order = _module_outputs(deploy, modules, images)
    with torch.no_grad():
        float_reference = Reference("float", FLOAT_REFERENCE, float_blocks, deploy(images).numpy())
    qat_programs: dict[str, tuple[Any, Reference]] = {}  # by the state's digest: bundles of one QAT run share it
    rows = []
    for bundle, bundle_manifest, artifact in opened:
        quant, reference = None, float_reference
        if (bundle_manifest.get("quantization") or {}).get("mode") == "qat":
            digest = bundle_manifest["quantization"]["qat_program"]["sha256"]
            if digest not in qat_programs:
                qat_programs[digest] = _qat_program(bundle, bundle_manifest, deploy, modules, images, step)
            quant, reference = qat_programs[digest]
        step(f"running {bundle.name} in its runtime")
        rows.append(_inspect_bundle(bundle, bundle_manifest, artifact, deploy, order, reference, images, step, request,
                                    quant))
    return {"model": manifest["model"]["name"], "checkpoint": manifest["checkpoint"]["source"], "depth": request.depth,
            "images": len(images), "image_source": request.data or "synthetic (uniform 8-bit pixels, the model's normalisation)",
            "modules": order, "bundles": rows}


def _open(path: Path) -> tuple[Path, dict[str, Any], Path]:
    found = bundles.find_manifest(path)
    if found is None:
        raise EdgevitError(f"{path} is not a bundle: it has no {bundles.MANIFEST_NAME} (in it or beside it)")
    manifest = bundles.read_manifest(found.parent)
    if manifest.get("random_weights") or not manifest.get("checkpoint"):
        raise EdgevitError(f"{found.parent.name} was exported with random weights: there is no PyTorch model to "
                           "compare it with; export it with --weights")
    if (manifest.get("quantization") or {}).get("mode") == "qat":
        _qat_program_file(found.parent, manifest)
    source = Path(manifest["checkpoint"]["source"])
    if not source.is_file() or file_sha256(source) != manifest["checkpoint"]["sha256"]:
        raise EdgevitError(f"{found.parent.name} was exported from {source}, which is not here (or changed since); "
                           "inspect needs that checkpoint for the PyTorch side")
    return found.parent, manifest, found.parent / manifest["artifact"]["file"]


@dataclass(frozen=True)
class Reference:
    """What a bundle's blocks are compared with: its PyTorch program's module outputs and logits."""

    kind: str  # "float" or "qat"
    name: str
    blocks: dict[str, np.ndarray]
    logits: np.ndarray


FLOAT_REFERENCE = "the fp32 deploy model (PyTorch)"
QAT_REFERENCE = "the QAT int8 program (PyTorch), made again from the bundle's {file}"


def _qat_program_file(bundle: Path, manifest: dict[str, Any]) -> Path:
    """The QAT bundle's trained-state file, checked against its manifest's digest."""
    record = manifest["quantization"].get("qat_program")
    if not record:
        raise EdgevitError(f"{bundle.name} is QAT and keeps no qat_program (it was written before bundles kept one): "
                           "its artifact answers to the QAT int8 program, which inspect makes from that file; export "
                           "it again with  edgevit quantize … --mode qat")
    path = bundle / record["file"]
    if not path.is_file() or file_sha256(path) != record["sha256"]:
        state = "missing" if not path.is_file() else "not the file its manifest records (changed since export)"
        raise EdgevitError(f"{bundle.name}'s {record['file']} is {state}; inspect makes the QAT program from it: "
                           "export the bundle again")
    return path


def _qat_program(bundle: Path, manifest: dict[str, Any], deploy: torch.nn.Module, modules: list[str],
                 images: torch.Tensor, step: Progress):
    """The bundle's QAT int8 program made again from the state it keeps, as (its spec, its outputs
    on ``images`` at every module boundary)."""
    from edgevit.quant import pt2e
    from edgevit.quant.qat import program_from_state, read_program_state
    from edgevit.quant.spec import QuantSpec

    path = bundle / manifest["quantization"]["qat_program"]["file"]  # its digest was checked when the bundle was opened
    step(f"making the QAT int8 program again from {bundle.name}/{path.name}")
    spec = QuantSpec.from_summary(manifest["quantization"], qat_state=read_program_state(path))
    spec = spec.with_changes(qat_model=program_from_state(deploy, tuple(deploy.cfg.input_size), spec))
    step(f"running the QAT program on {len(images)} images")
    blocks = pt2e.boundary_outputs(spec.qat_model, images, modules)
    logits = pt2e.run_graph(spec.qat_model, images).numpy()
    return spec, Reference("qat", QAT_REFERENCE.format(file=path.name), blocks, logits)


def _images(request: InspectRequest, cfg) -> torch.Tensor:
    if request.data is None:
        return verification_batch(cfg, request.images, seed=request.seed)
    from edgevit.data.images import calibration_batch

    return calibration_batch(request.data, cfg, request.images, seed=request.seed).tensor.float()


def _module_outputs(deploy: torch.nn.Module, modules: list[str], images: torch.Tensor):
    """Each module's output on ``images`` (tensor outputs only), and the modules in the order
    they ran (graph order)."""
    with module_outputs(deploy, modules) as outputs, torch.no_grad():
        deploy(images)
    return outputs, list(outputs)


def _inspect_bundle(bundle: Path, manifest: dict[str, Any], artifact: Path, deploy: torch.nn.Module,
                    order: list[str], reference: Reference, images: torch.Tensor, step: Progress,
                    request: InspectRequest, quant=None) -> dict[str, Any]:
    """One bundle's row; ``quant``: its int8 spec where the caller made it already (QAT)."""
    target, int8 = manifest["target"], manifest["precision"] == "int8"
    qat = quant is not None and quant.mode == "qat"
    # Advice measures a re-export in its runtime: Core ML's runs on macOS only, so not there; a QAT
    # program with a block float is another QAT run, not a re-export.
    advice = request.advice and target in ADVISED_TARGETS and not qat
    # ExecuTorch and Core ML read inner tensors from the int8 program made again; ONNX needs it only for advice.
    if quant is None and int8 and target in ("executorch", "coreml"):
        quant = _rebuilt_spec(manifest, deploy.cfg, step)
    row: dict[str, Any] = {"bundle": str(bundle), "target": target, "precision": manifest["precision"],
                           "reference_kind": reference.kind, "reference": reference.name}
    if target == "coreml":
        values, row["precheck"], artifact_logits, runs_in = _coreml_values(artifact, manifest, deploy, order, images, quant)
    else:
        session, runs_in = _artifact_session(artifact, manifest)
        artifact_logits = session.run(images.numpy())
        if artifact.suffix == ".onnx":
            values, row["onnx"] = _onnx_values(artifact, session, order, reference.blocks, images)
            if request.latency:
                step(f"timing {bundle.name} block by block ({len(order)} prefixes of its graph)")
                row["latency"] = layers.onnxruntime_block_ms(artifact, order, _threads(request), request.runs)
        elif target == "executorch":
            values, row["probe"], graph = _executorch_values(manifest, deploy, order, images, artifact_logits, quant, step)
            if request.latency:
                row["latency"] = layers.executorch_block_ms(graph, images[:1], _backend(manifest), order,
                                                            _threads(request), request.runs, step, whole=artifact)
        else:
            raise MissingBackend(f"{bundle.name}: inspect reads inner tensors of ONNX graphs (onnx and TensorRT-ready), "
                                 f"ExecuTorch programs and Core ML pre-checks; not {artifact.suffix} artifacts")
    output = compare_outputs(reference.logits, artifact_logits)
    blocks = {name: (block_figures(reference.blocks[name], values[name]) if name in values and name in reference.blocks
                     else None) for name in order}
    if any(figures is None for figures in blocks.values()):
        row["no_figure"] = {name: NO_FIGURE for name, figures in blocks.items() if figures is None}
    jump = first_jump([figures["sqnr_db"] if figures else None for figures in blocks.values()])
    row |= {"runtime": runs_in, "blocks": blocks, "first_jump": order[jump] if jump is not None else None,
            "output": output}
    if request.latency and "latency" not in row:
        row["latency_missing"] = f"no per-block time: {runs_in}"
    if advice and int8 and jump is not None:
        quant = quant or _rebuilt_spec(manifest, deploy.cfg, step)
        row["advice"] = _float_module_advice(manifest, quant, order[jump], images, reference.logits, output, step)
    elif qat and jump is not None and request.advice:
        row["advice_missing"] = (f"no measured advice: {order[jump]} float in a QAT program is another QAT run "
                                 f"(edgevit quantize {manifest['model']['name']} --mode qat --float-modules "
                                 f"{order[jump]} …), not a re-export")
    return row


ADVISED_TARGETS = ("onnx", "tensorrt", "executorch")
NO_FIGURE = ("the artifact never holds this output: int8 keeps it only after the activation fused into it "
             "(conv+ReLU), or the module runs no op of its own")


def _coreml_values(artifact: Path, manifest: dict[str, Any], deploy: torch.nn.Module, order: list[str],
                   images: torch.Tensor, quant):
    """Each block as the bundle's numerics pre-check computes it (Core ML exposes no inner tensors,
    and runs only on macOS), and the logits: the artifact's where Core ML runs, else the pre-check's."""
    from edgevit.targets.coreml.inspection import precheck_block_outputs

    heads = [name for name, _ in deploy.named_children()]
    values, note = precheck_block_outputs(artifact, manifest, deploy, images, list(dict.fromkeys(order + heads)), quant)
    try:
        session, runs_in = _artifact_session(artifact, manifest)
        return values, note, session.run(images.numpy()), runs_in
    except MissingBackend:
        # The pre-check's logits: the last top-level module whose output is the logits' shape.
        outputs = [values[name] for name in values if name in heads and values[name].shape[1:] == (deploy.cfg.num_classes,)]
        if not outputs:
            raise
        return values, note, outputs[-1], note["method"]


def _float_module_advice(manifest: dict[str, Any], quant, block: str, images: torch.Tensor, logits: np.ndarray,
                         before: dict[str, Any], step: Progress) -> dict[str, Any]:
    """What keeping ``block`` float does, measured: the bundle exported again with the same
    recipe, calibration and checkpoint plus ``--float-modules block``, its logits against PyTorch
    on the same images (tolerances reported, not enforced; nothing is kept)."""
    from edgevit.pipeline.export import ExportRequest, export_model
    from edgevit.targets.recipes import parse_recipe

    step(f"exporting {manifest['target']} int8 again with --float-modules {block}, to measure what it changes")
    spec = quant.with_changes(float_modules=tuple(quant.float_modules) + (block,))
    # The recipe as the manifest records it: a recipe file's or a changed preset's name resolves to nothing.
    recipe = parse_recipe({k: v for k, v in manifest["recipe"].items() if k != "source"}, source="the bundle's manifest")
    request = ExportRequest(manifest["model"]["name"], target=manifest["target"], weights=manifest["checkpoint"]["source"],
                            recipe=recipe, quant=spec, enforce_fidelity=False)
    with tempfile.TemporaryDirectory() as scratch:
        outcome = export_model(dataclasses.replace(request, out_dir=scratch))
        session, _runs_in = _artifact_session(outcome.artifact, outcome.manifest)
        after = compare_outputs(logits, session.run(images.numpy()))
    return {"float_modules": [block], "option": f"--float-modules {block}", "output_before": before,
            "output_after": after, "artifact_bytes": outcome.manifest["artifact"]["bytes"],
            "artifact_bytes_before": manifest["artifact"]["bytes"]}


def _artifact_session(artifact: Path, manifest: dict[str, Any]):
    try:
        return artifact_session(artifact, manifest), manifest["runtime"]
    except MissingBackend:
        if manifest["target"] != "tensorrt" or artifact.suffix != ".onnx":
            raise
        # The ONNX TensorRT consumes, as its pre-check runs it: every node as ONNX defines it.
        return (runtimes.load("onnxruntime", artifact, options={"optimize": False}),
                "TensorRT-ready ONNX in onnxruntime, optimisations off (no TensorRT here)")


def _onnx_values(artifact: Path, session, order: list[str], reference: dict[str, np.ndarray], images: torch.Tensor):
    """Each module's output tensor, found by the exporter's scope names, added as a graph output."""
    import onnx

    model = onnx.load(str(artifact), load_external_data=False)
    tensors = module_boundaries(model, order)
    values = session.intermediates(images.numpy(), sorted(set(tensors.values())))
    found = {name: values[tensor] for name, tensor in tensors.items()}
    # A conv output whose ReLU was folded into its int8 range is never held unclipped: no figure.
    graph = OnnxGraph(model)
    folded = [name for name, tensor in tensors.items()
              if name in reference and reference[name].min() < 0 and floors_at_zero(model, tensor, graph)]
    return {name: value for name, value in found.items() if name not in folded}, {"tensors": tensors}


def _executorch_values(manifest: dict[str, Any], deploy: torch.nn.Module, order: list[str], images: torch.Tensor,
                       artifact_logits: np.ndarray, quant, step: Progress):
    """The program the .pte was lowered from, made again from the bundle's recipe (int8: its
    quantization spec on its calibration images) and lowered with every module boundary as an
    extra output (:mod:`edgevit.targets.executorch.probe`); its logits must match the artifact's."""
    from edgevit.targets.executorch import program
    from edgevit.targets.executorch.probe import as_graph, lowering_input, with_boundary_outputs

    backend = _backend(manifest)
    example = images[:1]
    step(f"lowering the {manifest['precision']} program again with {len(order)} module outputs")
    lowered, _details = lowering_input(deploy, example, manifest["precision"], backend, quant)
    source = as_graph(lowered, example)
    graph, found = with_boundary_outputs(source, order)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.pte"
        path.write_bytes(program(graph, example, backend))
        session = runtimes.load("executorch", path, options={"backend": backend})
        values = session.intermediates(images.numpy(), [str(i) for i in range(len(found) + 1)])
    agreement = compare_outputs(artifact_logits, values.pop("0"))
    probe = {"method": f"the recipe's program lowered again with {len(found)} module boundaries as outputs",
             "max_abs_error_to_artifact": agreement["max_abs_error"],
             "reproduces_artifact": agreement["max_rel_error"] <= PROBE_AGREEMENT}
    return {name: values[str(i + 1)] for i, name in enumerate(found)}, probe, source


def _backend(manifest: dict[str, Any]) -> str:
    return manifest["recipe"]["options"].get("backend", "xnnpack")


def _threads(request: InspectRequest) -> int:
    return request.threads or os.cpu_count() or 1


# The re-lowered program counts as the artifact's when its logits agree to this (relative to the
# largest logit): XNNPACK may pick other kernels for a graph with more outputs, never other math.
PROBE_AGREEMENT = 1e-3


def _rebuilt_spec(manifest: dict[str, Any], cfg, step: Progress):
    """The int8 spec the bundle was quantized with, on the same calibration images (checked by
    their digest)."""
    from edgevit.quant.calibration import calibration_from_folder, load_calibration, split_held_out
    from edgevit.quant.spec import QuantSpec

    summary = manifest["quantization"]
    recorded = summary.get("calibration") or {}
    if summary["mode"] == "dynamic":
        return QuantSpec.from_summary(summary)
    if recorded.get("stats_file"):
        source, calibration = recorded["stats_file"], None
        if Path(source).is_file():
            calibration = load_calibration(source, cfg)
    else:
        source, calibration = recorded.get("folder"), None
        if source and Path(source).is_dir():
            step(f"calibration images again: {recorded['requested']} from {source}")
            calibration = calibration_from_folder(source, cfg, recorded["requested"], recorded.get("seed", 0))
    if calibration is None or calibration.summary.get("sha256") != recorded.get("sha256"):
        purpose = ("to read its inner tensors" if manifest["target"] == "executorch"
                   else "to measure --float-modules advice (--no-advice skips it)")
        raise EdgevitError(f"{Path(manifest['artifact']['file']).name}'s int8 program is made again from its "
                           f"calibration images {purpose}, and {source} is "
                           f"{'not here' if calibration is None else 'no longer the same images'}; run inspect where the "
                           "bundle was quantized")
    calibrate_on, held_out = split_held_out(calibration.inputs, manifest["recipe"]["verify"]["batch"])
    return QuantSpec.from_summary(summary, calibrate_on, held_out)
