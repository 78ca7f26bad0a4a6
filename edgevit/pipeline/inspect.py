"""The inspect flow: ``edgevit inspect BUNDLE …`` — where an artifact's error comes from, block by
block. Each bundle's artifact runs in its runtime on the same images as the PyTorch model it was
exported from (its checkpoint, recorded in the manifest), and the output of every module at the
chosen depth is compared, in graph order, under the module's own name in every runtime — so
bundles of one model (int8 beside fp16, ONNX beside TensorRT-ready ONNX) line up row by row.

Inner tensors come from runtimes that expose them (``Session.intermediates``): onnxruntime, for
the ``onnx`` and ``tensorrt`` (TensorRT-ready ONNX) targets, where each module's output tensor is
found by the exporter's scope names (``edgevit.quant.onnx_graph.module_boundaries``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgevit import runtimes
from edgevit.core import bundle as bundles
from edgevit.core.errors import EdgevitError, MissingBackend
from edgevit.models import to_deploy
from edgevit.models.checkpoints import file_sha256
from edgevit.pipeline.evaluate import artifact_session
from edgevit.pipeline.export import Progress
from edgevit.quant.onnx_graph import module_boundaries
from edgevit.training import load_eval_model
from edgevit.verify import block_figures, compare_outputs, first_jump, verification_batch


@dataclass(frozen=True)
class InspectRequest:
    bundles: tuple[str, ...]
    data: str | None = None  # image folder; default: the verification batch's synthetic images
    images: int = 8
    depth: int = 1  # module names of this many dotted parts ("stages.1": 2)
    seed: int = 0


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
    modules = [name for name, _ in deploy.named_modules() if name and name.count(".") + 1 == request.depth]
    if not modules:
        deepest = max(name.count(".") + 1 for name, _ in deploy.named_modules() if name)
        raise EdgevitError(f"--depth {request.depth} is beyond {model.cfg.name}, whose module names have at most "
                           f"{deepest} parts")
    images = _images(request, model.cfg)
    step(f"running PyTorch on {len(images)} images")
    reference, order = _module_outputs(deploy, modules, images)
    with torch.no_grad():
        logits = deploy(images).numpy()
    rows = []
    for bundle, bundle_manifest, artifact in opened:
        step(f"running {bundle.name} in its runtime")
        rows.append(_inspect_bundle(bundle, bundle_manifest, artifact, order, reference, images, logits))
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
        raise EdgevitError(f"{found.parent.name} is QAT: it answers to the QAT int8 program, which the bundle does "
                           "not keep; inspect compares with the float model and cannot judge it")
    source = Path(manifest["checkpoint"]["source"])
    if not source.is_file() or file_sha256(source) != manifest["checkpoint"]["sha256"]:
        raise EdgevitError(f"{found.parent.name} was exported from {source}, which is not here (or changed since); "
                           "inspect needs that checkpoint for the PyTorch side")
    return found.parent, manifest, found.parent / manifest["artifact"]["file"]


def _images(request: InspectRequest, cfg) -> torch.Tensor:
    if request.data is None:
        return verification_batch(cfg, request.images, seed=request.seed)
    from edgevit.data.images import calibration_batch

    return calibration_batch(request.data, cfg, request.images, seed=request.seed).tensor.float()


def _module_outputs(deploy: torch.nn.Module, modules: list[str], images: torch.Tensor):
    """Each module's output on ``images`` (tensor outputs only), and the modules in the order
    they ran (graph order)."""
    outputs: dict[str, np.ndarray] = {}
    order: list[str] = []
    named = dict(deploy.named_modules())

    def keep(name):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and name not in outputs:
                outputs[name] = output.detach().float().numpy().copy()
                order.append(name)
        return hook

    handles = [named[name].register_forward_hook(keep(name)) for name in modules]
    try:
        with torch.no_grad():
            deploy(images)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, order


def _inspect_bundle(bundle: Path, manifest: dict[str, Any], artifact: Path, order: list[str],
                    reference: dict[str, np.ndarray], images: torch.Tensor, logits: np.ndarray) -> dict[str, Any]:
    runs_in = manifest["runtime"]
    try:
        session = artifact_session(artifact, manifest)
    except MissingBackend:
        if manifest["target"] != "tensorrt" or artifact.suffix != ".onnx":
            raise
        # The ONNX TensorRT consumes, as its pre-check runs it: every node as ONNX defines it.
        session = runtimes.load("onnxruntime", artifact, options={"optimize": False})
        runs_in = "TensorRT-ready ONNX in onnxruntime, optimisations off (no TensorRT here)"
    if session.intermediates is None or artifact.suffix != ".onnx":
        raise MissingBackend(f"{bundle.name}: inspect reads inner tensors of ONNX graphs (onnx and TensorRT-ready "
                             f"bundles) so far; {manifest['target']} artifacts are not supported yet")
    import onnx

    boundaries = module_boundaries(onnx.load(str(artifact), load_external_data=False), order)
    values = session.intermediates(images.numpy(), sorted(set(boundaries.values())))
    blocks = {name: (block_figures(reference[name], values[boundaries[name]]) if name in boundaries else None)
              for name in order}
    jump = first_jump([figures["sqnr_db"] if figures else None for figures in blocks.values()])
    return {"bundle": str(bundle), "target": manifest["target"], "precision": manifest["precision"],
            "runtime": runs_in, "blocks": blocks, "tensors": boundaries,
            "first_jump": order[jump] if jump is not None else None,
            "output": compare_outputs(logits, session.run(images.numpy()))}
