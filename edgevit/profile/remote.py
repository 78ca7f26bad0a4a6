"""Measuring on another machine: over ssh (any device with Python and the runtime), over adb
(Android, with ExecuTorch's ``executor_runner``), or in a fresh local process.

Every way runs the same worker, ``worker.py`` with ``timing.py``, ``host.py`` and the ``runtimes/``
package beside it, except adb, where
the phone runs ExecuTorch's own C++ runner and its per-iteration log is summarised with the same
protocol (:func:`edgevit.profile.timing.summarize`). Every call has a bounded timeout.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from edgevit import runtimes
from edgevit.core import host
from edgevit.core.errors import EdgevitError
from edgevit.profile import timing, worker

# The worker and what it imports: all an ssh device needs from edgevit.
# host.py goes along so that results measured over ssh record the device's ISA.
WORKER_FILES = (Path(worker.__file__), Path(timing.__file__), Path(host.__file__), Path(runtimes.__file__).parent)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds edgevit/
# Seconds for one measurement: loading, warm-up and the runs of a small model on a slow board.
MEASURE_TIMEOUT_S = 600
COPY_TIMEOUT_S = 300


@dataclass(frozen=True)
class Request:
    """One measurement: a runtime, its artifact (None for the torch runtime) and the protocol's knobs."""

    runtime: str
    artifact: Path | None
    threads: int | None  # None: every core of the machine that runs it
    runs: int = 50
    max_warmup: int = 100
    batch: int = 1
    model: str | None = None

    def worker_args(self, artifact: str | None) -> list[str]:
        return [self.runtime, artifact or "-", *(["--threads", str(self.threads)] if self.threads else []), "--runs", str(self.runs),
                "--max-warmup", str(self.max_warmup), "--batch", str(self.batch),
                *(["--model", self.model] if self.model else [])]


def _run(argv: list[str], timeout: float, what: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise EdgevitError(f"{what} did not finish within {timeout:g} s") from None
    except FileNotFoundError:
        raise EdgevitError(f"{what} needs {argv[0]}, which is not installed here") from None


def _worker_result(completed: subprocess.CompletedProcess, where: str) -> dict[str, Any]:
    """The worker's JSON (its last line of stdout); a runtime it lacks raises RuntimeUnavailable."""
    lines = completed.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if completed.returncode == worker.EXIT_UNAVAILABLE and result:
        raise runtimes.RuntimeUnavailable(f"{result['unavailable']} (on {where})")
    if completed.returncode == worker.EXIT_ARTIFACT_ERROR and result:
        raise EdgevitError(f"{result['error']} (on {where})")
    if completed.returncode != 0 or not isinstance(result, dict):
        detail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgevitError(f"the measurement on {where} failed (exit {completed.returncode}): {detail}")
    return result


def measure_in_subprocess(request: Request) -> dict[str, Any]:
    """The worker in a fresh local Python: its own load time and peak memory, nothing left over
    from exporting or from the previous measurement."""
    artifact = str(request.artifact) if request.artifact else None
    # `import edgevit` loads nothing heavy, so the worker runs as its module; this checkout goes on
    # its path (an editable install whose source moved would otherwise lose it).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    completed = _run([sys.executable, "-m", worker.__name__, *request.worker_args(artifact)],
                     MEASURE_TIMEOUT_S, f"measuring {request.runtime} in a subprocess", env)
    return _worker_result(completed, "this machine, in a subprocess")


def artifact_files(artifact: Path | None) -> list[Path]:
    """The artifact and what its runtime reads beside it (a TensorRT engine's ``.json``: the GPU
    and TensorRT version it was built for)."""
    if artifact is None:
        return []
    companion = artifact.with_name(artifact.name + ".json")
    return [artifact, *([companion] if companion.is_file() else [])]


class SshDevice:
    """A machine reached with the system's OpenSSH client, keys only (BatchMode: never a prompt)."""

    def __init__(self, reach: dict[str, Any]):
        self.host = reach["host"]
        self.python = reach.get("python", "python3")
        self.workdir = reach.get("workdir", "/tmp")
        self.connect_timeout = int(reach.get("connect_timeout", 10))
        options = ["BatchMode=yes", f"ConnectTimeout={self.connect_timeout}", "StrictHostKeyChecking=accept-new",
                   *reach.get("options", [])]
        self._common = [arg for option in options for arg in ("-o", option)]
        if reach.get("identity"):
            self._common += ["-i", str(reach["identity"])]
        self._port = str(reach.get("port", 22))

    def ssh_argv(self, command: str) -> list[str]:
        return ["ssh", *self._common, "-p", self._port, self.host, command]

    def scp_argv(self, sources: list[Path], destination: str) -> list[str]:
        return ["scp", *self._common, "-P", self._port, "-r", "-q", *map(str, sources), f"{self.host}:{destination}"]

    def _ssh(self, command: str, timeout: float, what: str) -> subprocess.CompletedProcess:
        completed = _run(self.ssh_argv(command), timeout, f"{what} on {self.host}")
        if completed.returncode == 255:  # ssh's own failure, not the remote command's
            detail = (completed.stderr.strip().splitlines() or ["no message"])[-1]
            raise EdgevitError(f"cannot reach {self.host} over ssh: {detail}")
        return completed

    def measure(self, request: Request) -> dict[str, Any]:
        """Copy the artifact and the worker into a fresh remote folder, run, read the JSON, clean up."""
        made = self._ssh(f"mktemp -d {shlex.quote(self.workdir)}/edgevit-profile.XXXXXX",
                         self.connect_timeout + 30, "making a work folder")
        if made.returncode != 0:
            raise EdgevitError(f"cannot make a work folder under {self.workdir} on {self.host}: {made.stderr.strip()}")
        remote_dir = made.stdout.strip()
        try:
            sources = [*WORKER_FILES, *artifact_files(request.artifact)]
            copied = _run(self.scp_argv(sources, remote_dir), COPY_TIMEOUT_S, f"copying to {self.host}")
            if copied.returncode != 0:
                raise EdgevitError(f"copying the artifact to {self.host} failed: {copied.stderr.strip()}")
            remote = PurePosixPath(remote_dir)
            artifact = str(remote / request.artifact.name) if request.artifact else None
            command = shlex.join([self.python, str(remote / WORKER_FILES[0].name), *request.worker_args(artifact)])
            completed = self._ssh(command, MEASURE_TIMEOUT_S, f"measuring {request.runtime}")
            return _worker_result(completed, self.host)
        finally:
            self._ssh(f"rm -rf {shlex.quote(remote_dir)}", self.connect_timeout + 30, "cleaning up")


class AdbDevice:
    """An Android device: ExecuTorch's ``executor_runner`` (built for Android with XNNPACK and
    pushed to ``runner`` beforehand) runs the .pte, and its per-iteration log is summarised.

    Untested on hardware: no Android device was available while writing it; the commands and
    the log parsing are tested.
    """

    ITERATION = re.compile(r"Iteration (\d+) of (\d+): ([0-9.]+) ms")

    def __init__(self, reach: dict[str, Any]):
        self.adb = [reach.get("adb", "adb"), *(["-s", reach["serial"]] if reach.get("serial") else [])]
        self.runner = reach.get("runner", "/data/local/tmp/executor_runner")
        self.workdir = PurePosixPath(reach.get("workdir", "/data/local/tmp/edgevit"))

    def commands(self, request: Request, warmup: int) -> list[list[str]]:
        if request.runtime != "executorch" or request.artifact is None:
            raise EdgevitError(f"over adb edgevit runs ExecuTorch programs only, not {request.runtime}")
        on_device = self.workdir / request.artifact.name
        return [
            [*self.adb, "shell", "mkdir", "-p", str(self.workdir)],
            [*self.adb, "push", str(request.artifact), str(on_device)],
            [*self.adb, "shell", self.runner, f"--model_path={on_device}", f"--num_executions={1 + warmup + request.runs}",
             f"--cpu_threads={request.threads or -1}", "--print_output=none"],
        ]

    def measure(self, request: Request, warmup: int = 20) -> dict[str, Any]:
        *setup, run = self.commands(request, warmup)
        for argv in setup:
            completed = _run(argv, COPY_TIMEOUT_S, "adb")
            if completed.returncode != 0:
                raise EdgevitError(f"{shlex.join(argv)} failed: {completed.stderr.strip() or completed.stdout.strip()}")
        completed = _run(run, MEASURE_TIMEOUT_S, "executor_runner over adb")
        return {"runtime": request.runtime, "threads": request.threads,
                **self.summarize_log(completed.stdout + completed.stderr, warmup).to_dict()}

    @classmethod
    def summarize_log(cls, log: str, warmup: int) -> timing.Timing:
        """First iteration apart, a fixed warm-up (the runner cannot stop when stable), the rest timed."""
        times = [float(ms) for _, _, ms in cls.ITERATION.findall(log)]
        if len(times) < warmup + 2:
            raise EdgevitError("executor_runner printed no per-iteration times (it needs ExecuTorch >= 1.0 "
                               "built with logging enabled); its output ended: " + log.strip()[-200:])
        return timing.summarize(times[0], warmup, times[1 + warmup:])
