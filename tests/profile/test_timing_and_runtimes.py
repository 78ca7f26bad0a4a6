"""The timing protocol and the measuring worker, with real runtimes."""
import json
import subprocess
import sys

import pytest
import torch

from edgevit.profile import runtimes, timing
from edgevit.profile.remote import Request, measure_in_subprocess


def test_protocol_keeps_first_call_apart_and_every_run():
    calls = iter([50.0] + [1.0] * 1000)
    result = timing.measure(lambda: None, runs=60, clock=lambda fn: next(calls))
    assert result.first_call_ms == 50.0 and result.runs == 60 and len(result.samples_ms) == 60
    assert result.p50_ms == result.p99_ms == 1.0 and not result.noisy
    assert 10 <= result.warmup_runs <= 100


def test_noise_flag_when_spread_is_high():
    samples = [1.0] * 70 + [3.0] * 30
    assert timing.summarize(5.0, 0, samples).noisy
    assert not timing.summarize(5.0, 0, [1.0] * 100).noisy
    assert timing.summarize(5.0, 0, [1.0] + [2.0] * 99).noisy  # most runs slowed alike: contention


def test_cuda_clock_skips_cleanly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the skip path cannot be checked here")
    with pytest.raises(runtimes.RuntimeUnavailable, match="no CUDA device"):
        runtimes.load("torch-cuda", None, 1, model="levit_128s")
    with pytest.raises(runtimes.RuntimeUnavailable, match="TensorRT is not installed"):
        runtimes.load("tensorrt", None, 1)


def test_onnxruntime_in_process_records_threads_and_affinity(artifacts_dir):
    artifact = artifacts_dir / "levit_128s-onnx-fp32" / "levit_128s.onnx"
    result = runtimes.measure_artifact("onnxruntime", artifact, threads=1, runs=10, max_warmup=10)
    assert result["threads"] == 1 and result["settings"]["affinity"]
    assert result["input_shape"] == [1, 3, 224, 224] and len(result["samples_ms"]) == 10
    assert 0 < result["min_ms"] <= result["p50_ms"] <= result["p99_ms"]


def test_executorch_in_a_fresh_process_reports_peak_memory(tiny_pte):
    result = measure_in_subprocess(Request("executorch", tiny_pte, threads=1, runs=10, max_warmup=10))
    assert result["runtime_version"] and result["threads"] == 1 and result["peak_rss_mb"] > 0
    assert result["load_ms"] > 0 and result["p50_ms"] > 0


def test_worker_script_reports_an_unavailable_runtime(tiny_pte):
    completed = subprocess.run([sys.executable, runtimes.__file__, "coreml" if sys.platform != "darwin" else "tensorrt",
                                str(tiny_pte)], capture_output=True, text=True, timeout=120)
    assert completed.returncode == runtimes.EXIT_UNAVAILABLE
    assert "unavailable" in json.loads(completed.stdout.splitlines()[-1])
