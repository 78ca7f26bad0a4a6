"""Run one artifact in one runtime under the timing protocol: the profiler's measuring worker.

Imported for in-process measurements, run as a script for isolated ones (a fresh process per
measurement: clean load time and peak memory), and copied with ``timing.py`` onto ssh devices,
which need Python, numpy and the runtime but neither torch nor edgevit. Hence the standard
library and numpy only at import time; each runtime is imported when it is used.

    python3 runtimes.py RUNTIME ARTIFACT [--threads N] [--runs N] [--batch N] [--model NAME]

prints one JSON object (:func:`measure_artifact`'s) as its last line of stdout; a runtime that
cannot run on the machine exits with :data:`EXIT_UNAVAILABLE` and the reason in the object.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

if __package__:
    from edgevit.profile import timing
else:  # run as a script (isolated, or copied to a device): timing.py is beside it, and importing
    import timing  # edgevit would load torch into the measured process for nothing

EXIT_UNAVAILABLE = 3


class RuntimeUnavailable(Exception):
    """This runtime cannot run here (the reason is the message). Kept apart from
    ``edgevit.export.base.RuntimeUnavailable`` because this file must run without edgevit."""


@dataclass(frozen=True)
class Runtime:
    name: str
    target: str  # the export target whose artifact it runs ("torch": the eager model, no artifact)
    clock: Callable  # how one call is timed: wall clock on CPU, CUDA events on GPU
    package: str  # the distribution whose version is recorded
    description: str
    modules: tuple[str, ...] = ()  # imported before the load clock starts: load time is the artifact's


@dataclass
class Loaded:
    """A runtime ready to run: one call of ``run`` is one timed inference."""

    run: Callable[[], object]
    input_shape: list[int]
    threads: int | None  # as the runtime reports it, or as set where it cannot report it
    end_trace: Callable[[], str] | None = None  # with a trace requested: write it, return its path
    load_ms: float = 0.0  # runtime imported beforehand: the artifact's load (and compile) alone
    options: dict = field(default_factory=dict)  # the runtime's settings that bear on the timing


def _onnxruntime(providers: list[str]):
    def load(artifact: Path, threads: int, batch: int, model: str | None, profile_prefix: str | None) -> Loaded:
        import onnxruntime as ort

        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise RuntimeUnavailable(f"onnxruntime {ort.__version__} here has no {', '.join(missing)} "
                                     f"(it has {', '.join(ort.get_available_providers())})")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads block instead of spinning. Where another process wants the core, a
        # spinning thread burns the time slice the working thread needed (levit_128s, 2 threads, a
        # busy 2-core host, alternating fresh processes: p50 42/29/40 ms spinning, 25/14/21 not).
        # On a quiet machine spinning may be faster (it shares the work more evenly: 89/87 CPU
        # ticks on the two threads against 75/22); that could not be measured here.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        session = ort.InferenceSession(str(artifact), options, providers=providers)
        meta = session.get_inputs()[0]
        shape = [meta.shape[0] if isinstance(meta.shape[0], int) else batch, *meta.shape[1:]]
        dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
        feed = {meta.name: _example(shape).astype(dtype)}
        return Loaded(lambda: session.run(None, feed), shape, threads,
                      session.end_profiling if profile_prefix else None,
                      options={"intra_op_num_threads": threads, "inter_op_num_threads": 1, "allow_spinning": False})

    return load


def _executorch(artifact: Path, threads: int, batch: int, model: str | None, profile_prefix: str | None) -> Loaded:
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime as ExecutorchRuntime

    # XNNPACK's work runs on ExecuTorch's own thread pool (pthreadpool), not torch's. Resetting it
    # works: with 2 threads, 100 runs of levit_128s put 54 and 49 CPU ticks on two threads.
    with quiet_stderr():
        portable_lib._unsafe_reset_threadpool(threads)
        program = ExecutorchRuntime.get().load_program(artifact, enable_etdump=bool(profile_prefix))
    method = program.load_method("forward")
    meta = program.metadata("forward").input_tensor_meta(0)
    shape = list(meta.sizes())
    inputs = [torch.from_numpy(_example(shape))]

    def write_etdump() -> str:
        program.write_etdump_result_to_file(f"{profile_prefix}.etdp", f"{profile_prefix}.debug")
        return f"{profile_prefix}.etdp"

    pool = portable_lib._threadpool_get_thread_count()
    return Loaded(lambda: method.execute(inputs), shape, pool, write_etdump if profile_prefix else None,
                  options={"threadpool_threads": pool})


def _torch(device: str):
    def load(artifact: Path | None, threads: int, batch: int, model: str | None, profile_prefix: str | None) -> Loaded:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailable(f"torch {torch.__version__} sees no CUDA device here")
        if not model:
            raise RuntimeUnavailable("the torch runtime needs --model (it runs the deploy form, not an artifact)")
        from edgevit.models import create_model, to_deploy

        torch.set_num_threads(threads)
        deploy = to_deploy(create_model(model)).eval().to(device)
        shape = [batch, *deploy.cfg.input_size]
        x = torch.from_numpy(_example(shape)).to(device)

        def run():
            with torch.inference_mode():
                return deploy(x)

        return Loaded(run, shape, torch.get_num_threads())

    return load


def _tensorrt(artifact: Path, threads: int, batch: int, model: str | None, profile_prefix: str | None) -> Loaded:
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        raise RuntimeUnavailable("TensorRT is not installed here (NVIDIA's libraries and the tensorrt "
                                 "package; pip extra [tensorrt])") from None
    raise RuntimeUnavailable("running TensorRT engines is not implemented yet: build engines with trtexec "
                             "and profile with `trtexec --loadEngine` until it is")


def _coreml(artifact: Path, threads: int, batch: int, model: str | None, profile_prefix: str | None) -> Loaded:
    if sys.platform != "darwin":
        raise RuntimeUnavailable(f"Core ML runs only on macOS/iOS, not on {sys.platform}")
    import coremltools as ct

    mlmodel = ct.models.MLModel(str(artifact))
    description = mlmodel.get_spec().description.input[0]
    shape = list(description.type.multiArrayType.shape)
    feed = {description.name: _example(shape)}
    return Loaded(lambda: mlmodel.predict(feed), shape, None)


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("onnxruntime", "onnx", timing.wall_clock, "onnxruntime", "onnxruntime, CPU execution provider",
            ("onnxruntime",)),
    Runtime("onnxruntime-cuda", "onnx", timing.wall_clock, "onnxruntime-gpu",
            "onnxruntime, CUDA execution provider (outputs copied back: run() returns when done)", ("onnxruntime",)),
    Runtime("onnxruntime-tensorrt", "onnx", timing.wall_clock, "onnxruntime-gpu",
            "onnxruntime, TensorRT execution provider", ("onnxruntime",)),
    Runtime("executorch", "executorch", timing.wall_clock, "executorch", "executorch.runtime (XNNPACK on CPU)",
            ("executorch.runtime",)),
    Runtime("torch", "torch", timing.wall_clock, "torch", "PyTorch eager, deploy form, CPU", ("torch", "edgevit.models")),
    Runtime("torch-cuda", "torch", timing.cuda_event_clock, "torch", "PyTorch eager, deploy form, CUDA",
            ("torch", "edgevit.models")),
    Runtime("tensorrt", "onnx", timing.cuda_event_clock, "tensorrt", "TensorRT engine built from the ONNX"),
    Runtime("coreml", "coreml", timing.wall_clock, "coremltools", "Core ML (MLModel.predict), macOS"),
)}

_LOADERS = {
    "onnxruntime": _onnxruntime(["CPUExecutionProvider"]),
    "onnxruntime-cuda": _onnxruntime(["CUDAExecutionProvider"]),
    "onnxruntime-tensorrt": _onnxruntime(["TensorrtExecutionProvider", "CUDAExecutionProvider"]),
    "executorch": _executorch,
    "torch": _torch("cpu"),
    "torch-cuda": _torch("cuda"),
    "tensorrt": _tensorrt,
    "coreml": _coreml,
}


def load(runtime: str, artifact: Path | None, threads: int | None, batch: int = 1, model: str | None = None,
         profile_prefix: str | None = None) -> Loaded:
    """``runtime`` ready to run ``artifact``; ``profile_prefix``: also trace each operator (the
    runtime's profiler: onnxruntime's JSON, ExecuTorch's ETDump), written by ``end_trace``."""
    threads = threads or os.cpu_count()
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    try:
        for module in RUNTIMES[runtime].modules:
            with quiet_stderr():  # executorch's and torchao's import-time notes
                importlib.import_module(module)
        start = time.perf_counter()
        loaded = _LOADERS[runtime](artifact, threads, batch, model, profile_prefix)
    except ImportError as exc:
        raise RuntimeUnavailable(f"{runtime} is not installed here ({exc})") from None
    loaded.load_ms = (time.perf_counter() - start) * 1e3
    return loaded


def measure_artifact(runtime: str, artifact: Path | None, threads: int | None, runs: int = 50, batch: int = 1,
                     model: str | None = None, max_warmup: int = 100) -> dict:
    """Load (timed apart), then the timing protocol; what ran, where, and how fast.
    ``threads`` None: every core of this machine."""
    os.environ["OMP_NUM_THREADS"] = str(threads or os.cpu_count())  # for runtimes that size their pools from it
    loaded = load(runtime, artifact, threads, batch, model)
    result = timing.measure(loaded.run, runs=runs, max_warmup=max_warmup, clock=RUNTIMES[runtime].clock,
                            threads=loaded.threads)
    return {
        "runtime": runtime,
        "runtime_version": package_version(RUNTIMES[runtime].package),
        "input_shape": loaded.input_shape,
        "threads": loaded.threads,
        "settings": {**timing.thread_settings(), "runtime_options": loaded.options},
        "load_ms": loaded.load_ms,
        **result.to_dict(),
        "fingerprint": fingerprint(),
    }


def package_version(name: str) -> str | None:
    from importlib import metadata

    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(name)
    return None


def fingerprint() -> dict:
    """What machine this is, as far as the software can tell."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Hardware", "Model")):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"hostname": platform.node(), "system": platform.system(), "release": platform.release(),
            "machine": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__, "isa": host_isa()}


def host_isa() -> dict | None:
    """:func:`edgevit.host.host_isa`: int8 latencies compare only across hosts of one ISA class.
    As a script, ``host.py`` is loaded from its file (beside this one when copied to a device,
    one folder up in a checkout), since importing edgevit would load torch; None where it is not
    there, which reports treat as an unknown ISA."""
    if __package__:
        from edgevit.host import host_isa as record

        return record()
    here = Path(__file__).resolve().parent
    # One folder up only inside an edgevit checkout: on a device that folder is the shared /tmp.
    for path in (here / "host.py", *([here.parent / "host.py"] if here.parent.name == "edgevit" else [])):
        if path.is_file():
            spec = importlib.util.spec_from_file_location("edgevit_host", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module.host_isa()
    return None


def _example(shape: list[int]) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


@contextlib.contextmanager
def quiet_stderr():
    """ExecuTorch's C++ logs (thread-pool and cpuinfo notes) go straight to file descriptor 2."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time one artifact in one runtime; prints JSON.")
    parser.add_argument("runtime", choices=sorted(RUNTIMES))
    parser.add_argument("artifact", help="the artifact file ('-' for the torch runtime)")
    parser.add_argument("--threads", type=int, default=None, help="default: every core")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--max-warmup", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    artifact = None if args.artifact == "-" else Path(args.artifact)
    try:
        result = measure_artifact(args.runtime, artifact, args.threads, args.runs, args.batch, args.model,
                                  args.max_warmup)
    except RuntimeUnavailable as exc:
        print(json.dumps({"unavailable": str(exc)}))
        return EXIT_UNAVAILABLE
    # The process's high-water mark: in a process of its own, the runtime's and the model's.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
