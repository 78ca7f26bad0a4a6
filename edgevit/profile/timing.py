"""The latency protocol: warm up until stable, time many runs, report percentiles, say when the
figures would not repeat.

Shared by the benchmarks and the profiler, so every latency edgevit prints is measured the same
way: first-call (load/compile) time kept apart, a bounded warm-up that stops once consecutive
windows agree, at least ``runs`` timed calls, and a noise flag with its reasons when another run
should not be expected to agree (see :func:`noise_reasons`).

Besides the wall time of every run it records what contention leaves behind, because on a shared
machine contention, not the runtime, is what moves the median between runs: the process's CPU
time per run (all its threads; other processes do not inflate it much), how many runs the kernel
switched the process out of involuntarily, and (Linux) how many cores other processes kept busy
on the cores this process may use during the timed runs.

Standard library only: the profiler copies this file next to its runner script onto devices that
have a runtime but neither torch nor edgevit. GPU work is timed with CUDA events
(:func:`cuda_event_clock`), which wait for the device instead of timing the kernel launches.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

try:
    import resource
except ImportError:  # Windows: no involuntary-switch counts
    resource = None

# p90/p50 or p50/min above this means the machine was busy or the runtime unstable: say so next to
# the number. The second catches contention that slows most runs alike (the best run shows what
# the device can do; a quiet machine keeps the median within a few percent of it).
NOISY_SPREAD = 1.5
# Medians of consecutive blocks of timed runs (or of repeats in fresh processes) further apart than
# this: conditions changed during the measurement, so a second one need not agree within it either.
REPEAT_TOLERANCE = 0.10
BLOCKS = 5  # the timed runs are cut into this many consecutive blocks for the drift check
# Other processes keeping more than this many cores busy beyond those the measured threads leave
# free: they took CPU time from the measurement.
CONTENDED_CORES = 0.25
# Shorter windows are too coarse for /proc/stat's clock ticks (10 ms on each core) to say anything.
MIN_CONTENTION_WINDOW_S = 0.2


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
    noise: list[str] = field(default_factory=list)  # why ``noisy`` (empty when it is not)
    cpu_ms: float | None = None  # median CPU time of the process per timed run, all threads
    preempted: float | None = None  # share of timed runs the process was switched out of involuntarily
    others_cores: float | None = None  # mean cores other processes kept busy during warm-up and timed runs
    free_cores: float | None = None  # cores the measured threads leave free for them
    cpu_samples_ms: list[float] = field(default_factory=list)  # per timed run, in order
    switches: list[int] = field(default_factory=list)  # involuntary context switches per timed run

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


def _involuntary_switches() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw if resource else 0


def usable_cores() -> list[int] | None:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _cpu_busy_s(cores: list[int] | None) -> float | None:
    """Seconds the given cores (all, if unknown) have spent busy since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            lines = [line.split() for line in stat if line.startswith("cpu")]
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cores} if cores else {"cpu"}
    busy = 0
    for name, *ticks in lines:
        if name in wanted:
            values = [int(t) for t in ticks[:8]]  # user nice system idle iowait irq softirq steal
            busy += sum(values) - values[3] - values[4]
    return busy / os.sysconf("SC_CLK_TCK")


def measure(fn: Callable[[], object], runs: int = 50, min_warmup: int = 5, max_warmup: int = 100,
            window: int = 5, stable_within: float = 0.05, clock: Clock = wall_clock,
            threads: int | None = None) -> Timing:
    """Time ``fn()``; the first call is reported apart, then warm-up until two consecutive
    windows of ``window`` runs have medians within ``stable_within`` (at most ``max_warmup``).
    ``threads``: how many threads the runtime computes with (None: every usable core), which
    says how many cores other processes may use without taking any from it."""
    first_call_ms = clock(fn)
    # Contention is read over the warm-up and the timed runs together: the timed runs alone can be
    # too short a window for /proc/stat's clock ticks.
    cores = usable_cores()
    busy_before, own_before, start = _cpu_busy_s(cores), time.process_time(), time.perf_counter()
    warm: list[float] = []
    while len(warm) < max_warmup:
        warm.append(clock(fn))
        if len(warm) >= max(min_warmup, 2 * window):
            previous = statistics.median(warm[-2 * window:-window])
            latest = statistics.median(warm[-window:])
            if abs(latest - previous) <= stable_within * previous:
                break
    wall_ms, cpu_ms, switches = [], [], []
    for _ in range(runs):
        cpu, switched = time.process_time(), _involuntary_switches()
        wall_ms.append(clock(fn))
        cpu_ms.append((time.process_time() - cpu) * 1e3)
        switches.append(_involuntary_switches() - switched)
    elapsed, own, busy_after = time.perf_counter() - start, time.process_time() - own_before, _cpu_busy_s(cores)
    others = None
    if busy_before is not None and busy_after is not None and elapsed >= MIN_CONTENTION_WINDOW_S:
        others = max(0.0, (busy_after - busy_before - own) / elapsed)
    usable = len(cores) if cores else (os.cpu_count() or 1)
    free = float(max(0, usable - (threads or usable)))
    return summarize(first_call_ms, len(warm), wall_ms, cpu_ms, switches if resource else None, others, free)


def best_of_rounds(fns: dict[str, Callable[[], object]], rounds: int = 2, **protocol) -> dict[str, Timing]:
    """Each of ``fns`` timed by :func:`measure` (``protocol``: its arguments) ``rounds`` times,
    taking turns, keeping each one's round with the lowest p50: a burst of load from other
    processes then hurts none of them more than another, which matters where their figures are
    subtracted or divided."""
    best: dict[str, Timing] = {}
    for _ in range(max(1, rounds)):
        for key, fn in fns.items():
            timed = measure(fn, **protocol)
            if key not in best or timed.p50_ms < best[key].p50_ms:
                best[key] = timed
    return best


def summarize(first_call_ms: float, warmup_runs: int, in_order: list[float], cpu_ms: list[float] | None = None,
              switches: list[int] | None = None, others_cores: float | None = None,
              free_cores: float | None = None, blocks: list[list[float]] | None = None) -> Timing:
    """Percentiles, the noise flag and its reasons of timed runs (also for runs timed elsewhere,
    e.g. by ExecuTorch's executor_runner on a phone, whose per-iteration times are read from its
    log). ``blocks``: the runs grouped for the drift check (default: :data:`BLOCKS` consecutive)."""
    samples = sorted(in_order)
    p50 = _percentile(samples, 0.5)
    p90 = _percentile(samples, 0.9)
    preempted = sum(s > 0 for s in switches) / len(switches) if switches else None
    reasons = noise_reasons(samples, in_order if blocks is None else blocks, preempted, others_cores, free_cores,
                            grouped=blocks is not None)
    return Timing(
        first_call_ms=first_call_ms, warmup_runs=warmup_runs, runs=len(samples), p50_ms=p50, p90_ms=p90,
        p99_ms=_percentile(samples, 0.99), min_ms=samples[0], mean_ms=statistics.fmean(samples),
        noisy=bool(reasons), samples_ms=list(in_order), noise=reasons,
        cpu_ms=statistics.median(cpu_ms) if cpu_ms else None, preempted=preempted, others_cores=others_cores,
        free_cores=free_cores, cpu_samples_ms=list(cpu_ms or []), switches=list(switches or []),
    )


def noise_reasons(samples: list[float], in_order, preempted: float | None, others_cores: float | None,
                  free_cores: float | None, grouped: bool = False) -> list[str]:
    """Why these figures should not be expected to repeat: one line per cause, none when they should.

    - spread: p90 > 1.5 × p50, or p50 > 1.5 × the best run;
    - drift: the medians of consecutive blocks of runs (or of ``grouped`` repeats, each in a
      fresh process) differ by more than :data:`REPEAT_TOLERANCE`;
    - contended: other processes kept more than :data:`CONTENDED_CORES` cores busy beyond the
      free ones during the warm-up and timed runs (where /proc/stat cannot tell, the process being switched
      out of more than half of the runs stands in).
    """
    reasons = []
    p50, p90 = _percentile(samples, 0.5), _percentile(samples, 0.9)
    if p90 > NOISY_SPREAD * p50 or p50 > NOISY_SPREAD * samples[0]:
        reasons.append(f"spread: p90/p50 {p90 / p50:.2f}, p50/min {p50 / samples[0]:.2f} (limit {NOISY_SPREAD})")
    if grouped:
        groups, what = [g for g in in_order if g], "repeats (fresh processes)"
    else:
        size = len(in_order) // BLOCKS
        groups, what = ([in_order[k * size:(k + 1) * size] for k in range(BLOCKS)] if size >= 4 else []), \
            f"{BLOCKS} consecutive blocks of runs"
    if len(groups) >= 2:
        medians = [statistics.median(g) for g in groups]
        if max(medians) > (1 + REPEAT_TOLERANCE) * min(medians):
            reasons.append(f"drift: medians of {what} range {min(medians):.2f}–{max(medians):.2f} ms "
                           f"({(max(medians) / min(medians) - 1) * 100:.1f}% > {REPEAT_TOLERANCE:.0%})")
    if others_cores is not None and free_cores is not None:
        if others_cores > free_cores + CONTENDED_CORES:
            reasons.append(f"contended: other processes kept {others_cores:.2f} cores busy while it ran, "
                           f"{free_cores:g} left free by the measured threads"
                           + (f"; switched out of {preempted:.0%} of runs" if preempted is not None else ""))
    elif preempted is not None and preempted > 0.5:
        reasons.append(f"contended: the process was switched out of {preempted:.0%} of runs")
    return reasons


def combine(parts: list[dict]) -> dict:
    """Repeats of one measurement (each :meth:`Timing.to_dict`, run in a fresh process) pooled:
    percentiles over every run, plus the drift check across the repeats' medians, so a
    measurement whose repeats disagree says so. ``repeats`` keeps each one's summary."""
    if len(parts) == 1:
        return {**parts[0], "repeats": [_repeat_summary(parts[0])]}
    samples = [s for p in parts for s in p["samples_ms"]]
    cpu = [c for p in parts for c in p.get("cpu_samples_ms") or []]
    switches = [s for p in parts for s in p.get("switches") or []]
    others = [p["others_cores"] for p in parts if p.get("others_cores") is not None]
    free = [p["free_cores"] for p in parts if p.get("free_cores") is not None]
    pooled = summarize(statistics.median(p["first_call_ms"] for p in parts), sum(p["warmup_runs"] for p in parts),
                       samples, cpu if len(cpu) == len(samples) else None,
                       switches if len(switches) == len(samples) else None,
                       max(others) if others else None, min(free) if free else None,
                       blocks=[p["samples_ms"] for p in parts]).to_dict()
    # Conditions that came and went inside one repeat (its own drift or contention) are kept.
    for index, part in enumerate(parts, 1):
        pooled["noise"] += [f"repeat {index}: {r}" for r in part.get("noise", []) if r.startswith("drift")]
    pooled["noisy"] = bool(pooled["noise"])
    pooled["repeats"] = [_repeat_summary(p) for p in parts]
    return pooled


def _repeat_summary(part: dict) -> dict:
    keys = ("p50_ms", "p90_ms", "min_ms", "cpu_ms", "preempted", "others_cores", "warmup_runs", "runs", "noise")
    return {k: part.get(k) for k in keys}


def split_runs(runs: int, repeats: int) -> int:
    """Timed runs per repeat so that the repeats together time at least ``runs``."""
    return math.ceil(runs / max(1, repeats))


def thread_settings() -> dict:
    """What the measurement ran on: CPU affinity and the thread counts in force (torch's only
    where torch is loaded: on a device without it, importing it here would fail)."""
    settings = {"cpu_count": os.cpu_count(), "affinity": usable_cores(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                # Contention that lasts a whole run slows every sample alike, which no spread can
                # flag; the load average (other processes included) is the trace it leaves.
                "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if "torch" in sys.modules:
        settings["torch_threads"] = sys.modules["torch"].get_num_threads()
    return settings
