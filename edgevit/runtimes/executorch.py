"""ExecuTorch: ``executorch.runtime`` loads a .pte and runs its ``forward`` method."""
from __future__ import annotations

import sys
from pathlib import Path

from .base import ArtifactError, LoadRequest, RuntimeUnavailable, Session, captured_stderr, captured_text, example_input, run_in_chunks

BACKEND_NAMES = {"xnnpack": "XnnpackBackend", "coreml": "CoreMLBackend"}


def load(request: LoadRequest) -> Session:
    """``options``: ``backend`` (the delegate the program was lowered to, default xnnpack)."""
    import numpy as np
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    backend = request.options.get("backend", "xnnpack")
    if backend == "coreml" and sys.platform != "darwin":
        raise RuntimeUnavailable(f"the Core ML delegate runs only on macOS/iOS, not on {sys.platform}")
    with captured_stderr() as log:
        runtime = Runtime.get()
        if request.threads:
            # XNNPACK's work runs on ExecuTorch's own thread pool (pthreadpool), not torch's.
            # Resetting it works: with 2 threads, 100 runs of levit_128s put 54 and 49 CPU ticks on two threads.
            portable_lib._unsafe_reset_threadpool(request.threads)
        needed = BACKEND_NAMES[backend]
        if not runtime.backend_registry.is_available(needed):
            registered = ", ".join(runtime.backend_registry.registered_backend_names) or "none"
            raise RuntimeUnavailable(f"this executorch runtime has no {needed} (it has {registered})")
        try:
            program = runtime.load_program(Path(request.artifact), enable_etdump=bool(request.trace_prefix))
            method = program.load_method("forward")
        except RuntimeError as exc:
            raise ArtifactError(f"executorch.runtime cannot load {Path(request.artifact).name}: {exc} "
                               f"({captured_text(log) or 'no runtime log'})") from None
    shape = list(program.metadata("forward").input_tensor_meta(0).sizes())
    fixed = [torch.from_numpy(example_input(shape))]

    def run_chunk(chunk: np.ndarray) -> np.ndarray:
        return method.execute([torch.from_numpy(chunk.astype(np.float32, copy=False))])[0].numpy()

    def write_etdump() -> str:
        program.write_etdump_result_to_file(f"{request.trace_prefix}.etdp", f"{request.trace_prefix}.debug")
        return f"{request.trace_prefix}.etdp"

    def intermediates(batch: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        # A method's outputs have no names: a program lowered with inner tensors as extra
        # outputs (edgevit.targets.executorch.probe) names them by position, "1", "2", …
        values: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for start in range(0, len(batch), shape[0]):
            chunk = np.ascontiguousarray(batch[start:start + shape[0]], dtype=np.float32)
            outputs = method.execute([torch.from_numpy(chunk)])
            for name in names:
                values[name].append(outputs[int(name)].numpy().astype(np.float32))
        return {name: np.concatenate(parts) for name, parts in values.items()}

    pool = portable_lib._threadpool_get_thread_count()
    return Session(lambda batch: run_in_chunks(run_chunk, batch, shape[0]), lambda: method.execute(fixed), shape, pool,
                   {"threadpool_threads": pool}, write_etdump if request.trace_prefix else None,
                   intermediates=intermediates)
