"""``edgevit profile``: one model on one device, every target the device runs.

Artifacts are verified bundles handed in by the profile flow (``edgevit.pipeline.profile``,
which reuses a bundle of the same recipe or exports one); each is measured where the device profile says the device is (this machine, in-process or in a fresh
process; over ssh; over adb), or estimated from its peak figures where it cannot be reached.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any, Callable

from edgevit.core.errors import EdgevitError, MissingBackend
from edgevit import runtimes
from edgevit.profile import estimate, layers, remote, results, timing, worker
from edgevit.profile.profiles import DeviceProfile


def profile_model(model: str, profile: DeviceProfile, targets: list[str] | None = None, precision: str = "fp32",
                  runs: int = 50, max_warmup: int = 100, threads: int | None = None, batch: int = 1,
                  isolate: bool = True, estimate_only: bool = False, with_layers: bool = False,
                  bundles: dict[str, tuple[Path, dict[str, Any]]] | None = None,
                  progress: Callable[[str], None] = lambda _: None, repeats: int = 3,
                  layer_depth: int = 3) -> dict[str, Any]:
    """Measure (or estimate) ``model`` on ``profile`` for each target; the results document.

    Each measurement is ``repeats`` repeats (a fresh process each when isolated) of at least
    ``runs / repeats`` timed runs, the targets taking turns (onnx, executorch, onnx, …), so a
    change in the machine's load lands on every target alike and shows up as repeats that
    disagree (:func:`edgevit.profile.timing.combine`) instead of passing for a steady figure.
    ``bundles``: target → (artifact, manifest) for every measured target but torch.
    ``with_layers``: also per operator kind and per block, the blocks being the modules at
    ``layer_depth`` (:func:`edgevit.profile.layers.blocks_at_depth`)."""
    from edgevit.models import get_model_cfg

    get_model_cfg(model)  # an unknown name fails before any slow work
    targets = targets or list(profile.runtimes)
    chosen = check_plan(profile, targets, with_layers)
    document = results.new_results(profile, model, precision, batch)
    if with_layers:
        document |= {"layer_depth": layer_depth, "layer_blocks": _blocks(model, layer_depth)}
    threads = threads or profile.threads or None
    repeats = max(1, repeats)
    planned: list[tuple[dict[str, Any], remote.Request]] = []
    for target, runtime in chosen.items():
        entry: dict[str, Any] = {"target": target, "runtime": runtime}
        document["measurements"].append(entry)
        if estimate_only or not profile.measurable:
            progress(f"estimating {model} on {profile.name} ({runtime})")
            entry |= {"status": "estimate", **estimate.estimate(model, profile, precision, batch)}
            continue
        artifact, manifest = (None, None) if target == "torch" else (bundles or {})[target]
        entry["artifact"] = _artifact_facts(artifact, manifest)
        planned.append((entry, remote.Request(runtime, artifact, threads, timing.split_runs(runs, repeats), max_warmup,
                                              batch, model)))
    parts: dict[int, list[dict[str, Any]]] = {id(entry): [] for entry, _ in planned}
    for repeat in range(repeats):
        for entry, request in planned:
            if entry.get("status") == "skipped":
                continue
            progress(f"measuring {model} on {profile.name} with {request.runtime}"
                     + (f" (repeat {repeat + 1} of {repeats})" if repeats > 1 else ""))
            try:
                parts[id(entry)].append(_measure(profile, request, isolate))
            except runtimes.RuntimeUnavailable as unavailable:
                entry |= {"status": "skipped", "reason": str(unavailable)}
                entry.pop("artifact", None)
    for entry, request in planned:
        if entry.get("status") == "skipped":
            continue
        fingerprint = parts[id(entry)][0].pop("fingerprint", None)
        document["device"]["fingerprint"] = document["device"]["fingerprint"] or fingerprint
        entry |= {"status": "measured", "isolated": isolate or profile.method != "local",
                  **_pooled(parts[id(entry)])}
        entry.setdefault("peak_rss_mb", None)  # in-process: the whole process's, not the runtime's
        if with_layers and entry["target"] in ("onnx", "executorch"):
            progress(f"per-layer profile of {model} with {request.runtime}")
            entry["layers"] = _layers(model, entry["target"], request.artifact, bundles[entry["target"]][1],
                                      threads or os.cpu_count(), min(runs, 20), document["layer_blocks"], progress)
    if with_layers and precision in profile.peak_flops and profile.memory_bandwidth:
        document["layer_estimate_ms"] = estimate.estimate(model, profile, precision, batch)["layers_ms"]
    if not any(m["status"] != "skipped" for m in document["measurements"]):
        reasons = "; ".join(f"{m['runtime']}: {m['reason']}" for m in document["measurements"])
        raise MissingBackend(f"nothing could be measured on {profile.name} here ({reasons}); "
                           f"--estimate gives a roofline estimate instead")
    return document


def check_plan(profile: DeviceProfile, targets: list[str], with_layers: bool) -> dict[str, str]:
    """target → runtime on ``profile``; a target it does not run, or --layers off this machine,
    is one line before any slow work."""
    chosen = {target: profile.runtime_for(target) for target in targets}
    if with_layers and profile.method != "local":
        raise EdgevitError("--layers profiles on this machine only (device reach 'local')")
    return chosen


_TIMING_KEYS = set(timing.Timing.__dataclass_fields__)


def _pooled(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One measurement from its repeats: the timing pooled (:func:`timing.combine`), the facts
    of the first repeat, load time as the median, peak memory as the highest."""
    for part in parts:
        part.pop("fingerprint", None)
    pooled = {k: v for k, v in parts[0].items() if k not in _TIMING_KEYS}
    pooled |= timing.combine([{k: v for k, v in p.items() if k in _TIMING_KEYS} for p in parts])
    for repeat, part in zip(pooled["repeats"], parts):
        repeat |= {k: part[k] for k in ("load_ms", "peak_rss_mb") if k in part}
        repeat["load_average"] = (part.get("settings") or {}).get("load_average")
    if all("load_ms" in p for p in parts):
        pooled["load_ms"] = statistics.median(p["load_ms"] for p in parts)
    peaks = [p["peak_rss_mb"] for p in parts if p.get("peak_rss_mb")]
    if peaks:
        pooled["peak_rss_mb"] = max(peaks)
    return pooled


def _measure(profile: DeviceProfile, request: remote.Request, isolate: bool) -> dict[str, Any]:
    if profile.method == "ssh":
        return remote.SshDevice(profile.reach).measure(request)
    if profile.method == "adb":
        return remote.AdbDevice(profile.reach).measure(request)
    if isolate:
        return remote.measure_in_subprocess(request)
    return worker.measure_artifact(request.runtime, request.artifact, request.threads, request.runs,
                                     request.batch, request.model, request.max_warmup)


def _artifact_facts(artifact: Path | None, manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    if artifact is None:
        return None
    return {"path": str(artifact), "sha256": manifest["artifact"]["sha256"], "bytes": manifest["artifact"]["bytes"],
            "recipe": manifest["recipe"]["name"], "verified": manifest["verification"].get("passed")}


def _blocks(model: str, depth: int) -> list[str]:
    from edgevit.models import create_model, to_deploy

    return layers.blocks_at_depth([name for name, _ in to_deploy(create_model(model)).named_modules()], depth)


def _layers(model: str, target: str, artifact: Path, manifest: dict[str, Any], threads: int, runs: int,
            blocks: list[str], progress: Callable[[str], None]) -> dict[str, Any]:
    from edgevit.models import create_model, to_deploy

    if target == "onnx":
        names = {name for name, _ in to_deploy(create_model(model)).named_modules() if name}
        return {**layers.onnxruntime_layers(artifact, threads, runs, names),
                "per_block": layers.onnxruntime_block_ms(artifact, blocks, threads, runs)}
    found = layers.executorch_layers(artifact, threads, runs)
    if manifest["precision"] != "fp32":
        return found | {"per_block": None, "per_block_missing": (
            f"no per-block column for the {manifest['precision']} .pte: XNNPACK's events name no module, and its "
            "program cut at each block would have to be quantized again from calibration images the profile does "
            "not have (per operator kind below)")}
    import torch

    from edgevit.targets.executorch.probe import as_graph, lowering_input

    config = manifest["model"]["config"]
    # Random weights for the prefixes (the bundle may name no checkpoint): a float program's speed
    # does not depend on the weights' values; the whole program timed is the bundle's own .pte.
    deploy = to_deploy(create_model(model, num_classes=config["num_classes"], input_size=tuple(config["input_size"])))
    example = torch.randn(*manifest["input"]["shape"])
    backend = manifest["recipe"]["options"].get("backend", "xnnpack")
    lowered, _details = lowering_input(deploy, example, "fp32", backend)
    return found | {"per_block": layers.executorch_block_ms(as_graph(lowered, example), example, backend, blocks, threads,
                                                            runs, progress, whole=artifact)}
