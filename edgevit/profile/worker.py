"""The profiler's measuring worker: load one artifact in one runtime, then the timing protocol.

Imported for in-process measurements, run as a script for isolated ones (a fresh process per
measurement: clean load time and peak memory), and copied onto ssh devices with ``timing.py``,
``host.py`` and the ``runtimes/`` package beside it, which need Python, numpy and the runtime
but neither torch nor edgevit. Hence the standard library and numpy only at import time.

    python3 worker.py RUNTIME ARTIFACT [--threads N] [--runs N] [--batch N] [--model NAME]

prints one JSON object (:func:`measure_artifact`'s) as its last line of stdout; a runtime that
cannot run on the machine exits with :data:`EXIT_UNAVAILABLE` and the reason in the object.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import sys
from pathlib import Path

import numpy as np

if __package__:
    from edgevit import runtimes
    from edgevit.profile import timing
else:  # run as a script (isolated, or copied to a device): its companions are beside it, and
    import runtimes  # importing edgevit would load torch into the measured process for nothing
    import timing

# The worker's own protocol with edgevit.profile.remote (not the CLI's exit codes).
EXIT_UNAVAILABLE, EXIT_ARTIFACT_ERROR = 10, 11
CLOCKS = {"wall": timing.wall_clock, "cuda_events": timing.cuda_event_clock}


def measure_artifact(runtime: str, artifact: Path | None, threads: int | None, runs: int = 50, batch: int = 1,
                     model: str | None = None, max_warmup: int = 100) -> dict:
    """Load (timed apart), then the timing protocol; what ran, where, and how fast.
    ``threads`` None: every core of this machine."""
    threads = threads or os.cpu_count()
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for runtimes that size their pools from it
    session = runtimes.load(runtime, artifact, threads=threads, batch=batch, model=model)
    result = timing.measure(session.bench, runs=runs, max_warmup=max_warmup,
                            clock=CLOCKS[runtimes.RUNTIMES[runtime].clock], threads=session.threads)
    return {
        "runtime": runtime,
        "runtime_version": package_version(runtimes.RUNTIMES[runtime].package),
        "input_shape": session.input_shape,
        "threads": session.threads,
        "settings": {**timing.thread_settings(), "runtime_options": session.options},
        "load_ms": session.load_ms,
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
    """:func:`edgevit.core.host.host_isa`: int8 latencies compare only across hosts of one ISA
    class. As a script (copied onto a device), ``host.py`` is loaded from its file beside this
    one; None where it is not there, which reports treat as an unknown ISA."""
    if __package__:
        from edgevit.core.host import host_isa as record

        return record()
    path = Path(__file__).resolve().parent / "host.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("edgevit_host", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.host_isa()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time one artifact in one runtime; prints JSON.")
    parser.add_argument("runtime", choices=sorted(runtimes.RUNTIMES))
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
    except runtimes.RuntimeUnavailable as exc:
        print(json.dumps({"unavailable": str(exc)}))
        return EXIT_UNAVAILABLE
    except runtimes.ArtifactError as exc:
        print(json.dumps({"error": str(exc)}))
        return EXIT_ARTIFACT_ERROR
    # The process's high-water mark: in a process of its own, the runtime's and the model's.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
