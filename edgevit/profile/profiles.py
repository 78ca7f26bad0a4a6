"""Device profiles: ``profiles/<name>.toml``, one per device, or a user's own file.

A profile says what the device is, which runtime runs each export target there, how to reach
it, and its reference peak figures (for roofline estimates, each with where it comes from)::

    name = "raspberry-pi-5"
    kind = "sbc"                       # phone | laptop | jetson | sbc | desktop-gpu | host
    description = "Raspberry Pi 5, 8 GB (Cortex-A76 ×4 at 2.4 GHz)"
    threads = 4                        # 0: every core of the machine that runs it
    [runtimes]                         # target → runtime (edgevit.runtimes.RUNTIMES)
    onnx = "onnxruntime"
    executorch = "executorch"
    [reach]
    method = "ssh"                     # local | ssh | adb | none (estimate only)
    host = "pi@raspberrypi.local"      # ssh: host, port, identity, python, workdir
    [peak.flops]                       # FLOP/s by precision
    fp32 = { value = 1.5e11, source = "…" }
    [peak.memory_bandwidth]            # bytes/s
    value = 1.7e10
    source = "…"
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevit.core.datafiles import data_dir, read_toml
from edgevit.core.errors import EdgevitError
from edgevit.targets import TARGETS
from edgevit.runtimes import RUNTIMES

KINDS = ("phone", "laptop", "jetson", "sbc", "desktop-gpu", "host")
REACH_METHODS = {  # method → the keys it takes (the first ones it requires)
    "local": ((), ()),
    "none": ((), ()),
    "ssh": (("host",), ("port", "identity", "python", "workdir", "connect_timeout", "options")),
    "adb": ((), ("serial", "runner", "workdir", "adb")),  # no serial: the one device attached
}
_TOP_KEYS = {"name", "kind", "description", "threads", "precision", "runtimes", "reach", "peak"}
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class PeakFigure:
    value: float
    source: str


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str
    description: str
    threads: int
    precision: str  # what its runtimes run natively: `edgevit profile`'s default --precision
    runtimes: dict[str, str]  # target → runtime
    reach: dict[str, Any]
    peak_flops: dict[str, PeakFigure]  # precision → FLOP/s
    memory_bandwidth: PeakFigure | None  # bytes/s
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def method(self) -> str:
        return self.reach["method"]

    @property
    def measurable(self) -> bool:
        return self.method != "none"

    def runtime_for(self, target: str) -> str:
        if target not in self.runtimes:
            offered = ", ".join(self.runtimes) or "none"
            raise EdgevitError(f"device {self.name} runs no {target!r} target (its runtimes run: {offered})")
        return self.runtimes[target]


def parse_profile(data: dict[str, Any], source: str) -> DeviceProfile:
    where = f"device profile {source}"

    def fail(message: str):
        raise EdgevitError(f"{where}: {message}")

    unknown = set(data) - _TOP_KEYS
    if unknown:
        fail(f"unknown keys {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("name", "kind"):
        if not isinstance(data.get(key), str) or not data[key]:
            fail(f"'{key}' must be a non-empty string")
    if data["kind"] not in KINDS:
        fail(f"kind {data['kind']!r} is not one of {', '.join(KINDS)}")
    threads = data.get("threads", 0)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        fail("'threads' must be a whole number >= 0 (0: every core)")
    precision = data.get("precision", "fp32")
    if precision not in PRECISIONS:
        fail(f"'precision' must be one of {', '.join(PRECISIONS)}, got {precision!r}")

    runtimes = data.get("runtimes")
    if not isinstance(runtimes, dict) or not runtimes:
        fail("[runtimes] must map at least one target to a runtime, e.g. onnx = \"onnxruntime\"")
    for target, runtime in runtimes.items():
        if runtime not in RUNTIMES:
            fail(f"runtime {runtime!r} for {target} is unknown (known: {', '.join(RUNTIMES)})")
        if target not in (*TARGETS, "torch"):
            fail(f"target {target!r} is unknown (known: {', '.join(TARGETS)}, torch)")
        if RUNTIMES[runtime].target != target:
            fail(f"runtime {runtime} runs {RUNTIMES[runtime].target} artifacts, not {target}")

    reach = data.get("reach")
    if not isinstance(reach, dict) or reach.get("method") not in REACH_METHODS:
        fail(f"[reach] method must be one of {', '.join(REACH_METHODS)}")
    required, optional = REACH_METHODS[reach["method"]]
    missing = [k for k in required if not reach.get(k)]
    if missing:
        fail(f"[reach] method {reach['method']} needs {', '.join(missing)}")
    extra = set(reach) - {"method", *required, *optional}
    if extra:
        fail(f"[reach] method {reach['method']} takes no {', '.join(sorted(extra))}")

    peak = data.get("peak", {})
    if not isinstance(peak, dict) or set(peak) - {"flops", "memory_bandwidth"}:
        fail("[peak] takes only [peak.flops] and [peak.memory_bandwidth]")
    flops = {precision: _figure(figure, f"peak.flops.{precision}", fail)
             for precision, figure in peak.get("flops", {}).items()}
    bandwidth = _figure(peak["memory_bandwidth"], "peak.memory_bandwidth", fail) if "memory_bandwidth" in peak else None
    if reach["method"] == "none" and not (flops and bandwidth):
        fail("a device that cannot be reached (method none) needs [peak.flops] and [peak.memory_bandwidth] "
             "for its estimates")
    return DeviceProfile(
        name=data["name"], kind=data["kind"], description=str(data.get("description", "")), threads=threads,
        precision=precision, runtimes=dict(runtimes), reach=dict(reach), peak_flops=flops, memory_bandwidth=bandwidth,
        source=source, raw=data,
    )


def _figure(data: Any, where: str, fail) -> PeakFigure:
    if not isinstance(data, dict) or set(data) != {"value", "source"}:
        fail(f"{where} must be {{ value = <number>, source = \"<where the figure comes from>\" }}")
    value, source = data["value"], data["source"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        fail(f"{where} value must be a positive number, got {value!r}")
    if not isinstance(source, str) or not source.strip():
        fail(f"{where} needs a source (a datasheet, a paper, or how it was derived)")
    return PeakFigure(float(value), source)


def load_profile_file(path: str | Path) -> DeviceProfile:
    return parse_profile(read_toml(path, "device profile"), source=str(path))


def shipped_profiles() -> dict[str, Path]:
    """The profiles in the repo's ``profiles/`` folder, by file stem."""
    return {path.stem: path for path in sorted(data_dir("profiles").glob("*.toml"))}


def resolve_profile(device: str | None, profile_file: str | None) -> DeviceProfile:
    """``--profile FILE`` if given, else the shipped profile named ``--device``."""
    if profile_file:
        profile = load_profile_file(profile_file)
        if device and device != profile.name:
            raise EdgevitError(f"--device {device} does not match the profile in {profile_file} (it is {profile.name})")
        return profile
    shipped = shipped_profiles()
    if not device:
        raise EdgevitError(f"give --device (one of {', '.join(shipped)}) or --profile FILE")
    if device not in shipped:
        raise EdgevitError(f"unknown device {device!r}; known devices: {', '.join(shipped)} (or --profile FILE)")
    return load_profile_file(shipped[device])
