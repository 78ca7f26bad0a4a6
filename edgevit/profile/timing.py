"""The latency protocol: warm up until stable, time many runs, report percentiles.

Shared by the benchmarks and the profiler, so every latency edgevit prints is measured the same
way: first-call (load/compile) time kept apart, a bounded warm-up that stops once consecutive
windows agree, at least ``runs`` timed calls, and a noise flag when the spread is high.

Standard library only: the profiler copies this file next to its runner script onto devices that
have a runtime but neither torch nor edgevit. GPU work is timed with CUDA events
(:func:`cuda_event_clock`), which wait for the device instead of timing the kernel launches.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

# p90/p50 or p50/min above this means the machine was busy or the runtime unstable: say so next to
# the number. The second catches contention that slows most runs alike (the best run shows what
# the device can do; a quiet machine keeps the median within a few percent of it).
NOISY_SPREAD = 1.5


@dataclass(frozen=True)
class Timing:
    first_call_ms: float
    warmup_runs: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    mean_ms: float
    noisy: bool
    samples_ms: list[float] = field(default_factory=list)  # every timed run, in the order it ran

    def to_dict(self) -> dict:
        return asdict(self)


def _percentile(sorted_ms: list[float], q: float) -> float:
    index = min(len(sorted_ms) - 1, max(0, round(q * (len(sorted_ms) - 1))))
    return sorted_ms[index]


Clock = Callable[[Callable[[], object]], float]


def wall_clock(fn: Callable[[], object]) -> float:
    """Milliseconds one call of ``fn`` takes on the host (CPU runtimes return when done)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def cuda_event_clock(fn: Callable[[], object]) -> float:
    """Milliseconds one call of ``fn`` takes on the current CUDA device: events recorded around
    it on the stream, then a synchronisation, so queued kernels are counted, not just launched."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def measure(fn: Callable[[], object], runs: int = 50, min_warmup: int = 5, max_warmup: int = 100,
            window: int = 5, stable_within: float = 0.05, clock: Clock = wall_clock) -> Timing:
    """Time ``fn()``; the first call is reported apart, then warm-up until two consecutive
    windows of ``window`` runs have medians within ``stable_within`` (at most ``max_warmup``)."""
    first_call_ms = clock(fn)
    warm: list[float] = []
    while len(warm) < max_warmup:
        warm.append(clock(fn))
        if len(warm) >= max(min_warmup, 2 * window):
            previous = statistics.median(warm[-2 * window:-window])
            latest = statistics.median(warm[-window:])
            if abs(latest - previous) <= stable_within * previous:
                break
    return summarize(first_call_ms, len(warm), [clock(fn) for _ in range(runs)])


def summarize(first_call_ms: float, warmup_runs: int, in_order: list[float]) -> Timing:
    """Percentiles and the noise flag of timed runs (also for runs timed elsewhere, e.g. by
    ExecuTorch's executor_runner on a phone, whose per-iteration times are read from its log)."""
    samples = sorted(in_order)
    p50 = _percentile(samples, 0.5)
    p90 = _percentile(samples, 0.9)
    return Timing(
        first_call_ms=first_call_ms, warmup_runs=warmup_runs, runs=len(samples), p50_ms=p50, p90_ms=p90,
        p99_ms=_percentile(samples, 0.99), min_ms=samples[0], mean_ms=statistics.fmean(samples),
        noisy=p90 > NOISY_SPREAD * p50 or p50 > NOISY_SPREAD * samples[0], samples_ms=list(in_order),
    )


def thread_settings() -> dict:
    """What the measurement ran on: CPU affinity and the thread counts in force (torch's only
    where torch is loaded: on a device without it, importing it here would fail)."""
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    settings = {"cpu_count": os.cpu_count(), "affinity": affinity,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                # Contention that lasts a whole run slows every sample alike, which no spread can
                # flag; the load average (other processes included) is the trace it leaves.
                "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if "torch" in sys.modules:
        settings["torch_threads"] = sys.modules["torch"].get_num_threads()
    return settings
