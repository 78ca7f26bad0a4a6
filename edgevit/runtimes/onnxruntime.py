"""onnxruntime: the one session builder (threads, spinning, providers, optimisation level) for
verification, evaluation, the TensorRT pre-check, the profiler and its per-layer traces."""
from __future__ import annotations

from .base import LoadRequest, RuntimeUnavailable, Session, example_input, run_in_chunks

CPU = ["CPUExecutionProvider"]


def build_session(model, threads: int | None = None, providers: list[str] | None = None, optimize: bool = True,
                  trace_prefix: str | None = None):
    """An ``InferenceSession`` of ``model`` (a path, or the serialized graph). ``optimize=False`` runs every node as the ONNX standard defines it:
    Q/DQ pairs round in float, where the optimised graph would fuse them into int8 kernels or drop
    some (measured on MobileViT v2's TensorRT int8 graph: even with Q/DQ fusion off, the optimised
    graph's logits differed by 4 % of their range)."""
    import onnxruntime as ort

    providers = providers or CPU
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise RuntimeUnavailable(f"onnxruntime {ort.__version__} here has no {', '.join(missing)} "
                                 f"(it has {', '.join(ort.get_available_providers())})")
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # Idle pool threads block instead of spinning. Where another process (or another session in
    # this one) wants the core, a spinning thread burns the time slice the working thread needed
    # (levit_128s, 2 threads, a busy 2-core host, alternating fresh processes: p50 42/29/40 ms
    # spinning, 25/14/21 not). On a quiet machine spinning may be faster; that could not be measured here.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if trace_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = trace_prefix
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)


def load(request: LoadRequest) -> Session:
    """``options``: ``providers`` (the runtime row's), ``optimize`` (default True)."""
    import numpy as np

    session = build_session(request.artifact, request.threads, request.options.get("providers"),
                            request.options.get("optimize", True), request.trace_prefix)
    meta = session.get_inputs()[0]
    static_batch = meta.shape[0] if isinstance(meta.shape[0], int) else None
    dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
    shape = [static_batch or request.batch, *meta.shape[1:]]
    feed = {meta.name: example_input(shape).astype(dtype)}

    def run(batch: np.ndarray) -> np.ndarray:
        return run_in_chunks(lambda chunk: session.run(None, {meta.name: chunk.astype(dtype)})[0], batch, static_batch)

    def intermediates(batch: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """The graph run once more with ``names`` as extra outputs (same options, same inputs)."""
        import onnx

        graph = onnx.load(str(request.artifact))
        present = {o.name for o in graph.graph.output}
        graph.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in present)
        probe = build_session(graph.SerializeToString(), request.threads, request.options.get("providers"),
                              request.options.get("optimize", True))
        outputs = [o.name for o in probe.get_outputs()]
        gathered: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for start in range(0, len(batch), static_batch or len(batch)):
            chunk = np.ascontiguousarray(batch[start:start + (static_batch or len(batch))]).astype(dtype)
            for name, value in zip(outputs, probe.run(None, {meta.name: chunk})):
                if name in gathered:
                    gathered[name].append(np.asarray(value, dtype=np.float32))
        return {name: np.concatenate(values) for name, values in gathered.items()}

    return Session(run, lambda: session.run(None, feed), shape, request.threads,
                   {"intra_op_num_threads": request.threads, "inter_op_num_threads": 1 if request.threads else None,
                    "allow_spinning": False, "optimize": request.options.get("optimize", True)},
                   session.end_profiling if request.trace_prefix else None, intermediates=intermediates)
