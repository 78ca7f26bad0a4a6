"""TensorRT: a serialized engine run on a CUDA stream through torch tensors. An engine is tied to
the GPU architecture and TensorRT version that built it; ``MODEL.engine.json`` beside it (written
by ``edgevit.targets.tensorrt``) says which."""
from __future__ import annotations

import json
from pathlib import Path

from .base import ArtifactError, LoadRequest, RuntimeUnavailable, Session, run_in_chunks

BUILD_SCRIPT = "build-engine.sh"  # written beside every TensorRT bundle's ONNX


def tensorrt_module():
    import tensorrt

    return tensorrt


def unavailable_reason() -> str | None:
    """Why no engine can be built or run here (None: TensorRT and a CUDA GPU are there)."""
    try:
        tensorrt_module()
    except ImportError as exc:
        return "TensorRT is not installed here" if exc.name == "tensorrt" else f"TensorRT cannot load here ({exc})"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU here"
    return None


def gpu_facts() -> dict[str, str]:
    """What an engine is tied to: the GPU architecture and the TensorRT version."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "tensorrt": tensorrt_module().__version__}


def engine_mismatch(built_for: dict[str, str], here: dict[str, str]) -> str | None:
    """Why an engine built for ``built_for`` cannot run ``here`` (None: it can). Engines are
    tied to the GPU architecture (compute capability) and the exact TensorRT version."""
    differences = [f"{what} {built_for[key]} (here {here[key]})"
                   for key, what in (("compute_capability", "compute capability"), ("tensorrt", "TensorRT"))
                   if built_for.get(key) != here.get(key)]
    if not differences:
        return None
    return (f"was built for {built_for.get('gpu', 'another GPU')} with {', '.join(differences)}; "
            f"an engine runs only on the GPU architecture and TensorRT version that built it: rebuild it here "
            f"with {BUILD_SCRIPT} (trtexec) or edgevit export --target tensorrt")


class EngineRunner:
    """A deserialized engine that runs float32 NCHW batches on a CUDA stream through torch tensors.

    ``run(x)`` takes and returns CUDA tensors; it orders itself after the current stream's work
    and makes the current stream wait for it, so CUDA events recorded around a call on the
    current stream (``edgevit.profile.timing.cuda_event_clock``) time the engine itself."""

    def __init__(self, engine_path: Path) -> None:
        import torch

        trt = tensorrt_module()
        engine_path = Path(engine_path)
        metadata = engine_path.with_name(engine_path.name + ".json")
        if not metadata.is_file():
            raise ArtifactError(f"{metadata.name} is missing beside {engine_path.name}: edgevit cannot tell which GPU and "
                                f"TensorRT version built the engine; rebuild it with {BUILD_SCRIPT} or edgevit export")
        mismatch = engine_mismatch(json.loads(metadata.read_text()), gpu_facts())
        if mismatch:
            raise ArtifactError(f"TensorRT engine {engine_path.name} {mismatch}")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT {trt.__version__} could not load {engine_path.name}; rebuild it with {BUILD_SCRIPT}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        self.output_dtype = dtypes.get(self.engine.get_tensor_dtype(self.output_name), torch.float32)
        self.input_dtype = dtypes.get(self.engine.get_tensor_dtype(self.input_name), torch.float32)
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.sample_shape = shape[1:]
        # Largest batch one call takes: the profile's max, or the static batch.
        self.max_batch = (self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0] if shape[0] == -1 else shape[0])
        self.stream = torch.cuda.Stream()

    def run(self, x):
        import torch

        x = x.to(device="cuda", dtype=self.input_dtype).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype, device="cuda")
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ArtifactError("TensorRT failed to enqueue the engine (see TensorRT's log above)")
        current.wait_stream(self.stream)
        return out

    def __call__(self, batch):
        """A float32 NCHW numpy batch in, float32 outputs out."""
        import numpy as np
        import torch

        def run_chunk(chunk):
            return self.run(torch.from_numpy(np.ascontiguousarray(chunk))).float().cpu().numpy()

        return run_in_chunks(run_chunk, batch, self.max_batch)

    def bind(self, batch: int = 1):
        """One timed inference for the profiler: a fixed random batch already on the GPU."""
        import torch

        if batch > self.max_batch:
            raise ArtifactError(f"the engine takes at most batch {self.max_batch}; export with --dynamic-batch "
                                f"--max-batch {batch}")
        x = torch.randn((batch, *self.sample_shape), generator=torch.Generator().manual_seed(0)).cuda()
        return lambda: self.run(x)


def load(request: LoadRequest) -> Session:
    """The engine on this GPU. A bundle without one (its artifact is the ONNX TensorRT consumes)
    raises :class:`RuntimeUnavailable`; the target's pre-check then runs that ONNX instead."""
    path = Path(request.artifact)
    reason = unavailable_reason()
    if path.suffix == ".onnx":
        raise RuntimeUnavailable(f"no TensorRT engine: {reason or 'no engine was built for this ONNX'}; "
                                 f"{BUILD_SCRIPT} builds it with trtexec")
    if reason:
        raise RuntimeUnavailable(reason)
    engine = EngineRunner(path)
    return Session(engine, engine.bind(request.batch), [request.batch, *engine.sample_shape], None, {"engine": path.name})
