"""The results file of one ``edgevit profile`` run: one model on one device, a measurement (or
an estimate, or a skip with its reason) per target.

    {"schema": "edgevit-profile/1", "created", "edgevit_version",
     "device": {"name", "kind", "description", "reach", "fingerprint", "profile"},
     "model", "precision", "batch",
     "measurements": [
       {"status": "measured", "target", "runtime", "runtime_version", "artifact": {"path", "sha256",
        "bytes", "recipe", "verified"}, "threads", "settings" (affinity, thread counts, load average,
        "runtime_options": e.g. onnxruntime's spinning), "isolated", "load_ms", "first_call_ms",
        "warmup_runs", "runs", "samples_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "mean_ms",
        "noisy", "noise" (the reasons, one line each), "cpu_ms", "cpu_samples_ms", "switches",
        "preempted", "others_cores", "free_cores", "repeats" (each fresh-process repeat's p50/p90/min,
        cpu_ms, contention, load_ms, peak_rss_mb), "peak_rss_mb", "layers"?},
       {"status": "estimate", "target", "runtime", "p50_ms", "method", "flops", "bytes",
        "peak_flops", "memory_bandwidth", "layers_ms"},
       {"status": "skipped", "target", "runtime", "reason"}]}

The fingerprint (the measuring machine's hostname, cpu, …) holds ``isa``, its CPU's int8 features
and kernel class (:func:`edgevit.core.host.host_isa`; None where the worker ran without ``host.py``).
Over adb there is no fingerprint, and results written before ``isa`` lack it: reports take all
of these as an unknown ISA.

An estimate carries only ``p50_ms`` (no distribution): it is a roofline, not a run. Results
written before ``noise``/``repeats`` existed still load (a noisy flag without reasons).
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from edgevit.core.datafiles import read_json
from edgevit.core.errors import EdgevitError

SCHEMA = "edgevit-profile/1"
STATUSES = ("measured", "estimate", "skipped")


def new_results(profile, model: str, precision: str, batch: int) -> dict[str, Any]:
    import edgevit

    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "edgevit_version": edgevit.__version__,
        "device": {"name": profile.name, "kind": profile.kind, "description": profile.description,
                   "reach": profile.method, "fingerprint": None, "profile": profile.raw},
        "model": model, "precision": precision, "batch": batch, "measurements": [],
    }


def save(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def load(path: str | Path) -> dict[str, Any]:
    """A results file, checked enough that a report on it cannot fail half-way."""
    path = Path(path)
    data = read_json(path, "results file")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise EdgevitError(f"{path} is not an edgevit profile results file (schema {SCHEMA})")
    for entry in data.get("measurements", []):
        if entry.get("status") not in STATUSES:
            raise EdgevitError(f"{path}: a measurement has status {entry.get('status')!r} (known: {', '.join(STATUSES)})")
        if entry["status"] != "skipped" and not isinstance(entry.get("p50_ms"), (int, float)):
            raise EdgevitError(f"{path}: the {entry.get('target')} {entry['status']} has no p50_ms")
    data["source"] = str(path)
    return data
