"""TensorRT target: the ONNX TensorRT should consume for a precision, verified in onnxruntime
wherever edgevit runs, and — where ``import tensorrt`` works and torch sees a CUDA GPU — the
serialized engine built from it, verified on that GPU.

The precision lives in the ONNX, so one file serves TensorRT 10 (Jetsons; strongly typed
network) and 11 (no FP16/INT8 builder flags, strongly typed only):

- fp32: the ONNX target's graph (TorchScript exporter, onnxslim);
- fp16: float16 weights and compute with float32 inputs/outputs and explicit Casts; norms,
  softmax, reductions and pow/sqrt stay float32, and so does every op whose float32 values on
  the export sample come within a factor 2 of float16's range (the range pre-check);
- int8: explicit Q/DQ placed the way TensorRT fuses them (:mod:`edgevit.targets.tensorrt.int8`),
  activation scales from onnxruntime's calibrators on the spec's calibration images, float32
  between them. TensorRT has no dynamic quantization: modes static and qat only.

The bundle holds ``MODEL.onnx`` (what TensorRT consumes) and ``build-engine.sh`` (the trtexec
line that builds the same engine). With TensorRT and a GPU, also ``MODEL.engine`` (the
artifact), ``MODEL.engine.json`` (the GPU, compute capability and TensorRT version it was built
for) and ``MODEL.timing.cache``. Without them the artifact is the ONNX: the runtime
(:mod:`edgevit.runtimes.tensorrt`) is unavailable and :func:`precheck` runs the ONNX in onnxruntime on the CPU,
which the verification's check name says.
"""
from __future__ import annotations

import collections
import json
import platform
import re
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgevit.core.errors import EdgevitError
from edgevit.targets import onnx as onnx_target
from edgevit.runtimes import onnxruntime as ort_runtime
from edgevit import runtimes
from edgevit.runtimes.tensorrt import BUILD_SCRIPT, gpu_facts, tensorrt_module, unavailable_reason
from edgevit.targets.base import ExportResult, PrecheckResult

INPUT_NAME, OUTPUT_NAME = onnx_target.INPUT_NAME, onnx_target.OUTPUT_NAME
# Kept float32 in the fp16 graph whatever the pre-check finds: the ONNX target's list, except
# GELU's Erf, which computes in float16 here: it saturates instead of overflowing, and a float32
# island there would put Casts inside every conv+GELU TensorRT fuses.
FP16_KEEP_FLOAT32 = tuple(op for op in onnx_target.FP16_KEEP_FLOAT32 if op != "Erf")
FP16_MAX = float(np.finfo(np.float16).max)
FP16_HEADROOM = 2.0  # values within this factor of float16's range on the sample keep their ops float32


# ---------------------------------------------------------------------------------------- export

def export(model: nn.Module, example: torch.Tensor, precision: str, options: dict[str, Any], out_dir: Path,
           quant=None) -> ExportResult:
    import onnx

    _check_batch_options(options)
    if precision == "int8":
        _check_quant(quant)
    name = model.cfg.name
    fp32 = onnx_target.export(model, example, "fp32", _onnx_options(options), out_dir)
    path = fp32.path
    details: dict[str, Any] = {"exporter": "torchscript", "opset": options["opset"],
                               "dynamic_batch": options["dynamic_batch"], "io_dtype": "float32"}
    if precision == "fp16":
        graph, kept = to_float16(onnx.load(str(path)), example.numpy())
        details["float16"] = kept
    elif precision == "int8":
        graph, details["int8"] = _quantize(model, path, quant, options)
    else:
        graph = onnx.load(str(path))
    if precision != "fp32":
        onnx.checker.check_model(graph, full_check=True)
        onnx.save(graph, str(path))
    ops = collections.Counter(node.op_type for node in graph.graph.node)
    details |= {"nodes": sum(ops.values()), "op_counts": dict(sorted(ops.items()))}

    files = engine_files(name)
    command = trtexec_command(path.name, files["engine"], files["timing_cache"], tuple(example.shape[1:]), precision,
                              options)
    script = out_dir / BUILD_SCRIPT
    script.write_text("#!/bin/sh\n# Builds the TensorRT engine edgevit would build from this ONNX (TensorRT >= 10).\n"
                      f'cd "$(dirname "$0")" && exec {shlex.join(command)}\n')
    script.chmod(0o755)
    tensorrt: dict[str, Any] = {"consumes": path.name, "trtexec": shlex.join(command), "trtexec_script": BUILD_SCRIPT}
    artifact = path
    unavailable = unavailable_reason()
    if unavailable:
        tensorrt["engine"] = {"built": False, "reason": unavailable}
        tensorrt["exercised"] = ("the ONNX TensorRT consumes, run in onnxruntime (CPU) against PyTorch; no engine "
                                 f"was built or run ({unavailable}); {BUILD_SCRIPT} builds it where TensorRT is")
    else:
        tensorrt["engine"] = build_engine(path, out_dir, precision, options)
        tensorrt["exercised"] = "engine built here and run on this GPU against PyTorch"
        artifact = out_dir / files["engine"]
    details["tensorrt"] = tensorrt
    return ExportResult(artifact, details, evidence={"onnx": path})


def _onnx_options(options: dict[str, Any]) -> dict[str, Any]:
    # TorchScript exporter: its node names carry module paths, which float_modules resolves against.
    return {"opset": options["opset"], "dynamic_batch": options["dynamic_batch"], "exporter": "torchscript",
            "simplify": True, "fp16_io": False}


def _check_batch_options(options: dict[str, Any]) -> None:
    if options["dynamic_batch"] and options["opt_batch"] > options["max_batch"]:
        raise EdgevitError(f"--opt-batch {options['opt_batch']} is larger than --max-batch {options['max_batch']}; "
                           "TensorRT's optimisation profile needs 1 <= opt <= max")


def _check_quant(quant) -> None:
    if quant is None:
        raise EdgevitError("TensorRT int8 needs a quantization spec: use a recipe with a [quantization] table "
                           "(e.g. --recipe tensorrt-int8) and calibration images (--calib-data DIR)")
    if quant.mode == "dynamic":
        raise EdgevitError("TensorRT has no dynamic quantization (int8 comes from calibrated Q/DQ nodes); "
                           "use quantization mode static or qat")


def _quantize(model: nn.Module, fp32_path: Path, quant, options: dict[str, Any]):
    from edgevit.targets.tensorrt import int8 as tensorrt_qdq

    static_batch = None if options["dynamic_batch"] else 1
    graph, placement = tensorrt_qdq.quantize_for_tensorrt(fp32_path, quant, quant.float_module_names(model),
                                                          INPUT_NAME, static_batch)
    rules = collections.Counter(q.rule for q in placement.inputs)
    return graph, {
        "placement": "TensorRT explicit quantization (edgevit.targets.tensorrt.int8): Q/DQ on weighted-op inputs and "
                     "per-channel weights, residual adds quantized on the skip input only",
        "calibration_method": quant.method, "calibration_images": int(len(quant.calibration)),
        "quantized_inputs_by_rule": dict(sorted(rules.items())),
        "weighted_ops_quantized": len(placement.weights),
        "weighted_ops_kept_float": placement.float_weighted,
        **tensorrt_qdq.qdq_counts(graph),
    }


# ----------------------------------------------------------------------------------------- fp16

def to_float16(graph, sample: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """``graph`` (float32) in float16 for a strongly typed TensorRT network: float32 I/O, Casts
    at every float16/float32 boundary, :data:`FP16_KEEP_FLOAT32` ops and the ops the range
    pre-check flags on ``sample`` left in float32. Returns the graph and what was kept."""
    risks = float16_range_risks(graph, sample)
    converted, round_trips = onnx_target.convert_to_float16(graph, True, FP16_KEEP_FLOAT32, keep_nodes=sorted(risks))
    kept = collections.Counter(n.op_type for n in graph.graph.node if n.op_type in FP16_KEEP_FLOAT32)
    return converted, {
        "kept_float32_op_types": dict(sorted(kept.items())),
        "kept_float32_for_range": {name: round(peak, 1) for name, peak in sorted(risks.items())},
        "range_precheck": f"float32 values on {len(sample)} sample(s) within {FP16_HEADROOM:g}x of float16's "
                          f"{FP16_MAX:g} keep their producing and consuming ops in float32",
        "casts": sum(1 for n in converted.graph.node if n.op_type == "Cast"),
        "float16_round_trips_removed": round_trips,
    }


def float16_range_risks(graph, sample: np.ndarray) -> dict[str, float]:
    """Nodes that would overflow float16: every producer and consumer of a float32 tensor whose
    largest magnitude on ``sample`` exceeds float16's range divided by :data:`FP16_HEADROOM`."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(graph)
    float_values = {v.name: v for v in inferred.graph.value_info
                    if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    probe = onnx.ModelProto()
    probe.CopyFrom(inferred)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(v for name, v in float_values.items() if name not in existing)
    session = ort_runtime.build_session(probe.SerializeToString(), optimize=False)  # keeps every tensor
    names = [o.name for o in session.get_outputs()]
    peaks: dict[str, float] = collections.defaultdict(float)
    static = session.get_inputs()[0].shape[0]
    size = static if isinstance(static, int) else len(sample)
    for start in range(0, len(sample) - size + 1, size):
        for tensor, value in zip(names, session.run(None, {INPUT_NAME: sample[start:start + size].astype(np.float32)})):
            if value.size and np.issubdtype(value.dtype, np.floating):
                peaks[tensor] = max(peaks[tensor], float(np.abs(value).max()))
    hot = {t for t, peak in peaks.items() if peak > FP16_MAX / FP16_HEADROOM}
    risks: dict[str, float] = {}
    for node in graph.graph.node:
        touched = [peaks[t] for t in (*node.input, *node.output) if t in hot]
        if touched:
            risks[node.name] = max(touched)
    return risks


# ------------------------------------------------------------------------------------- trtexec

def engine_files(model_name: str) -> dict[str, str]:
    return {"engine": f"{model_name}.engine", "metadata": f"{model_name}.engine.json",
            "timing_cache": f"{model_name}.timing.cache"}


def profile_shapes(sample_shape: tuple[int, ...], options: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """min/opt/max input shapes of the optimisation profile (None: static batch)."""
    if not options["dynamic_batch"]:
        return None
    return {"min": (1, *sample_shape), "opt": (options["opt_batch"], *sample_shape),
            "max": (options["max_batch"], *sample_shape)}


def trtexec_command(onnx_file: str, engine_file: str, cache_file: str, sample_shape: tuple[int, ...],
                    precision: str, options: dict[str, Any]) -> list[str]:
    """trtexec arguments that build the engine :func:`build_engine` builds (TensorRT >= 10;
    --stronglyTyped is the default and a no-op on 11): precision comes from the ONNX, so no
    --fp16/--int8; fp32 turns TF32 off. Paths are relative to the bundle folder."""
    command = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}", "--stronglyTyped",
               f"--memPoolSize=workspace:{options['workspace_mb']}M", f"--timingCacheFile={cache_file}"]
    if precision == "fp32":
        command.append("--noTF32")
    shapes = profile_shapes(sample_shape, options)
    if shapes:
        command += [f"--{which}Shapes={INPUT_NAME}:{'x'.join(map(str, shape))}" for which, shape in shapes.items()]
    return [*command, "--skipInference"]


# --------------------------------------------------------------------------------- engine build

def default_timing_cache(facts: dict[str, str]) -> Path:
    """One timing cache per GPU model and TensorRT version, shared by every export on the machine."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", facts["gpu"]).strip("-").lower()
    return (Path.home() / ".cache" / "edgevit" / "tensorrt" /
            f"timing-{slug}-sm{facts['compute_capability'].replace('.', '')}-trt{facts['tensorrt']}.cache")


def build_engine(onnx_path: Path, out_dir: Path, precision: str, options: dict[str, Any]) -> dict[str, Any]:
    """Parse ``onnx_path`` and build a serialized engine beside it with the TensorRT Python API
    (the same settings as :func:`trtexec_command`); returns the engine's manifest facts."""
    trt = tensorrt_module()
    facts = gpu_facts()
    files = engine_files(onnx_path.stem)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    creation = trt.NetworkDefinitionCreationFlag
    # TensorRT >= 10: precision comes from the graph's types (11 accepts the flag and ignores it).
    strongly_typed = hasattr(creation, "STRONGLY_TYPED")
    flags = 1 << int(creation.STRONGLY_TYPED) if strongly_typed else 1 << int(creation.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgevitError(f"TensorRT {facts['tensorrt']} cannot parse {onnx_path.name}: {errors}; "
                           f"export with another --opset or report the op it names")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options["workspace_mb"] << 20)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TensorRT's default TF32 convolutions/matmuls are not fp32
    if not strongly_typed:  # TensorRT < 10: weak typing, precision from builder flags
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    shapes = profile_shapes(tuple(network.get_input(0).shape)[1:], options)
    if shapes:
        profile = builder.create_optimization_profile()
        profile.set_shape(network.get_input(0).name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    shared_cache = Path(options["timing_cache"]).expanduser() if options["timing_cache"] else default_timing_cache(facts)
    cache = config.create_timing_cache(shared_cache.read_bytes() if shared_cache.is_file() else b"")
    if not config.set_timing_cache(cache, False):
        raise EdgevitError(f"timing cache {shared_cache} was made with another GPU or TensorRT version; "
                           "delete it or give --timing-cache another file")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EdgevitError(f"TensorRT {facts['tensorrt']} failed to build an engine from {onnx_path.name} on "
                           f"{facts['gpu']}; rerun build-engine.sh with --verbose to see why")
    with open(out_dir / files["engine"], "wb") as f:
        f.write(serialized)
    timing = bytes(config.get_timing_cache().serialize())
    (out_dir / files["timing_cache"]).write_bytes(timing)
    shared_cache.parent.mkdir(parents=True, exist_ok=True)
    shared_cache.write_bytes(timing)
    built = {**facts, "precision": precision, "strongly_typed": strongly_typed, "workspace_mb": options["workspace_mb"],
             "input": INPUT_NAME, "profile": {k: list(v) for k, v in shapes.items()} if shapes else None}
    (out_dir / files["metadata"]).write_text(json.dumps(built, indent=2) + "\n")
    return {"built": True, "file": files["engine"], **built, "timing_cache": files["timing_cache"],
            "shared_timing_cache": str(shared_cache), "build_seconds": round(seconds, 2), "host": platform.node()}


def int8_exactness(result: ExportResult) -> dict[str, Any] | None:
    """No CPU runs a TensorRT int8 engine; NVIDIA's int8 tensor-core (IMMA) and DP4A paths
    accumulate four-way byte products in int32, with no 16-bit step to saturate."""
    if "int8" not in result.details:
        return None
    return {"checked_weights": None, "exact_on": ["NVIDIA GPUs (int32 accumulation)"], "not_exact_on": {}}


def precheck(result: ExportResult, model: nn.Module, example: torch.Tensor, precision: str) -> PrecheckResult:
    """The TensorRT-ready ONNX that export() wrote for ``model``, run in onnxruntime on the CPU,
    against the deploy model in PyTorch."""
    import onnxruntime as ort

    path = result.evidence.get("onnx") if result is not None else None
    if path is None or not path.is_file():
        raise EdgevitError("the TensorRT pre-check runs the ONNX export() wrote: pass its ExportResult")
    # int8: every Q/DQ pair computed as ONNX defines it, in float, as TensorRT's int32 accumulation
    # does, not on onnxruntime's CPU int8 kernels (whose results depend on the host's ISA).
    candidate = runtimes.load("onnxruntime", path, options={"optimize": precision != "int8"}).run(example.numpy())
    with torch.no_grad():
        reference = model(example).numpy()
    form = {"fp32": "float32", "fp16": "float16 compute, float32 I/O",
            "int8": "Q/DQ int8, simulated in float by onnxruntime"}[precision]
    return PrecheckResult(
        name=f"TensorRT-ready ONNX ({form}) in onnxruntime {ort.__version__} (CPU)",
        reference=reference, candidate=candidate,
        notes=["TensorRT builds its engine from this ONNX; the engine's own kernels (tactics, accumulation, fusions) "
               "were not run here",
               f"reference: the deploy model in PyTorch (float32); {path.name} is the file to build from"],
    )
