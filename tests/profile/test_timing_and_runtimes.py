"""The timing protocol and the measuring worker, with real runtimes."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from edgevit import runtimes
from edgevit.core import host
from edgevit.profile import timing, worker
from edgevit.profile.remote import WORKER_FILES, Request, measure_in_subprocess


def test_protocol_keeps_first_call_apart_and_every_run():
    calls = iter([50.0] + [1.0] * 1000)
    result = timing.measure(lambda: None, runs=60, clock=lambda fn: next(calls))
    assert result.first_call_ms == 50.0 and result.runs == 60 and len(result.samples_ms) == 60
    assert result.p50_ms == result.p99_ms == 1.0 and not result.noisy
    assert 10 <= result.warmup_runs <= 100


def test_protocol_records_cpu_time_and_switches_per_run():
    result = timing.measure(lambda: sum(range(20000)), runs=30, max_warmup=10, threads=1)
    assert len(result.cpu_samples_ms) == len(result.switches) == 30 and result.cpu_ms > 0
    assert 0 <= result.preempted <= 1 and result.free_cores == max(0, len(timing.usable_cores()) - 1)


def test_noise_flag_when_spread_is_high():
    samples = [1.0] * 70 + [3.0] * 30
    assert timing.summarize(5.0, 0, samples).noise[0].startswith("spread: p90/p50 3.00")
    assert not timing.summarize(5.0, 0, [1.0] * 100).noisy
    assert timing.summarize(5.0, 0, [1.0] + [2.0] * 99).noisy  # most runs slowed alike: contention


def test_noise_flag_when_blocks_drift_or_others_take_the_cores():
    drifting = [1.0] * 40 + [1.2] * 10  # the last fifth of the runs 20 % slower: p90/p50 alone misses it
    (reason,) = timing.summarize(5.0, 0, drifting).noise
    assert reason.startswith("drift: medians of 5 consecutive blocks of runs range 1.00–1.20 ms (20.0% > 10%)")
    assert not timing.summarize(5.0, 0, [1.0, 1.05] * 25).noisy
    steady = [1.0] * 50
    (reason,) = timing.summarize(5.0, 0, steady, others_cores=0.9, free_cores=0.0, switches=[1] * 50).noise
    assert reason.startswith("contended: other processes kept 0.90 cores busy") and "switched out of 100% of runs" in reason
    assert not timing.summarize(5.0, 0, steady, others_cores=1.1, free_cores=1.0).noisy  # 1 thread, 1 core left free
    # Without /proc/stat (macOS), being switched out of most runs stands in.
    assert timing.summarize(5.0, 0, steady, switches=[1] * 30 + [0] * 20).noise[0].startswith("contended: the process")
    assert not timing.summarize(5.0, 0, steady, switches=[1] * 5 + [0] * 45).noisy


def test_repeats_pool_and_flag_when_they_disagree():
    def repeat(ms, others=0.0):
        return timing.summarize(30.0, 10, [ms] * 17, [ms] * 17, [0] * 17, others, 0.0).to_dict()

    agreeing = timing.combine([repeat(9.0), repeat(9.3), repeat(9.1)])
    assert not agreeing["noisy"] and agreeing["runs"] == 51 and agreeing["p50_ms"] == 9.1
    assert agreeing["warmup_runs"] == 30 and [r["p50_ms"] for r in agreeing["repeats"]] == [9.0, 9.3, 9.1]
    apart = timing.combine([repeat(9.0), repeat(5.6), repeat(9.1)])  # the levit_128s ORT 9.04 -> 5.56 case
    assert apart["noisy"] and any(r.startswith("drift: medians of repeats (fresh processes) range 5.60–9.10 ms")
                                  for r in apart["noise"])
    busy_once = timing.combine([repeat(9.0), repeat(9.2, others=1.2), repeat(9.1)])
    assert busy_once["others_cores"] == 1.2 and any(r.startswith("contended") for r in busy_once["noise"])
    assert timing.split_runs(50, 3) == 17 and timing.split_runs(50, 1) == 50


def test_cuda_runtimes_skip_with_the_reason_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the skip path cannot be checked here")
    with pytest.raises(runtimes.RuntimeUnavailable, match="no CUDA device"):
        runtimes.load("torch-cuda", None, threads=1, model="levit_128s")
    with pytest.raises(runtimes.RuntimeUnavailable, match="TensorRT is not installed"):
        runtimes.load("tensorrt", tmp_path / "levit_128s.engine", threads=1)
    with pytest.raises(runtimes.RuntimeUnavailable, match="no TensorRT engine: TensorRT is not installed here"):
        runtimes.load("tensorrt", tmp_path / "levit_128s.onnx")


def test_onnxruntime_in_process_records_threads_and_affinity(artifacts_dir):
    artifact = artifacts_dir / "levit_128s-onnx-fp32" / "levit_128s.onnx"
    result = worker.measure_artifact("onnxruntime", artifact, threads=1, runs=10, max_warmup=10)
    assert result["threads"] == 1 and result["settings"]["affinity"] and result["free_cores"] == len(result["settings"]["affinity"]) - 1
    assert result["input_shape"] == [1, 3, 224, 224] and len(result["samples_ms"]) == 10
    assert 0 < result["min_ms"] <= result["p50_ms"] <= result["p99_ms"]


def test_executorch_in_a_fresh_process_reports_peak_memory(tiny_pte):
    result = measure_in_subprocess(Request("executorch", tiny_pte, threads=1, runs=10, max_warmup=10))
    assert result["runtime_version"] and result["threads"] == 1 and result["peak_rss_mb"] > 0
    assert result["settings"]["runtime_options"] == {"threadpool_threads": 1}  # ExecuTorch's pool really resized
    assert result["load_ms"] > 0 and result["p50_ms"] > 0


def test_worker_copied_as_to_a_device_runs_without_edgevit(tiny_pte, tmp_path):
    """The files an ssh device receives, alone in a folder, with edgevit not importable: the
    worker runs ExecuTorch there, and reports a runtime the machine lacks as unavailable."""
    device = tmp_path / "device"
    device.mkdir()
    for source in WORKER_FILES:
        if source.is_dir():
            shutil.copytree(source, device / source.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, device)
    blocker = tmp_path / "blocker" / "edgevit"  # stands in front of the installed edgevit, as on a device without it
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('edgevit is not on this device')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    probe = subprocess.run([sys.executable, "-c", "import edgevit"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "not on this device" in probe.stderr
    ran = subprocess.run([sys.executable, str(device / "worker.py"), "executorch", str(tiny_pte), "--runs", "3",
                          "--threads", "1"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    measured = json.loads(ran.stdout.splitlines()[-1])
    assert measured["p50_ms"] > 0 and measured["fingerprint"]["isa"] == host.host_isa()
    completed = subprocess.run([sys.executable, str(device / "worker.py"), "coreml" if sys.platform != "darwin" else "tensorrt",
                                str(tiny_pte)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert completed.returncode == worker.EXIT_UNAVAILABLE
    assert "unavailable" in json.loads(completed.stdout.splitlines()[-1])


def test_fingerprint_records_the_host_isa():
    isa = worker.fingerprint()["isa"]
    assert isa == host.host_isa() and isa["int8_kernels"] == host.int8_kernel_class()


def test_executorch_reads_a_strided_batch_by_its_values(tiny_pte):
    """ExecuTorch's Python execute takes a channels-last strided tensor (a photo decoded HWC and
    transposed) and computes different logits from it; every feed of edgevit's goes through
    runtimes.base.run_in_chunks, which hands it a contiguous copy."""
    import numpy as np
    from executorch.runtime import Runtime

    base = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
    strided = np.ascontiguousarray(base.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # a decoded photo's HWC memory
    assert not strided.flags["C_CONTIGUOUS"] and np.array_equal(strided, base)
    method = Runtime.get().load_program(tiny_pte).load_method("forward")
    raw = [method.execute([torch.from_numpy(x)])[0].numpy() for x in (base, strided)]
    assert not np.allclose(raw[0], raw[1])  # the trap itself, as ExecuTorch 1.5.1 has it
    session = runtimes.load("executorch", tiny_pte)
    np.testing.assert_array_equal(session.run(strided), session.run(base))
