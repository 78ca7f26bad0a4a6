"""The latency protocol: warm up until stable, time many runs, report percentiles.

Shared by the benchmarks and the profiler, so every latency edgevit prints is measured the same
way: first-call (load/compile) time kept apart, a bounded warm-up that stops once consecutive
windows agree, at least ``runs`` timed calls, and a noise flag when the spread is high.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

# p90/p50 above this means the machine was busy or the runtime unstable: say so next to the number.
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

    def to_dict(self) -> dict:
        return asdict(self)


def _percentile(sorted_ms: list[float], q: float) -> float:
    index = min(len(sorted_ms) - 1, max(0, round(q * (len(sorted_ms) - 1))))
    return sorted_ms[index]


def measure(fn: Callable[[], object], runs: int = 50, min_warmup: int = 5, max_warmup: int = 100,
            window: int = 5, stable_within: float = 0.05) -> Timing:
    """Time ``fn()``; the first call is reported apart, then warm-up until two consecutive
    windows of ``window`` runs have medians within ``stable_within`` (at most ``max_warmup``)."""
    start = time.perf_counter()
    fn()
    first_call_ms = (time.perf_counter() - start) * 1e3

    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    warm: list[float] = []
    while len(warm) < max_warmup:
        warm.append(timed())
        if len(warm) >= max(min_warmup, 2 * window):
            previous = statistics.median(warm[-2 * window:-window])
            latest = statistics.median(warm[-window:])
            if abs(latest - previous) <= stable_within * previous:
                break
    samples = sorted(timed() for _ in range(runs))
    p50 = _percentile(samples, 0.5)
    p90 = _percentile(samples, 0.9)
    return Timing(
        first_call_ms=first_call_ms, warmup_runs=len(warm), runs=runs, p50_ms=p50, p90_ms=p90,
        p99_ms=_percentile(samples, 0.99), min_ms=samples[0], mean_ms=statistics.fmean(samples),
        noisy=p90 > NOISY_SPREAD * p50,
    )


def thread_settings() -> dict:
    """What the measurement ran on: CPU affinity and the thread counts in force."""
    import torch

    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_count": os.cpu_count(), "affinity": affinity, "torch_threads": torch.get_num_threads()}
