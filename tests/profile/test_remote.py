"""Remote runners: ssh against a real OpenSSH server on 127.0.0.1, adb's commands and log."""
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from edgevit.core import host
from edgevit.core.errors import EdgevitError
from edgevit.profile.remote import AdbDevice, Request, SshDevice


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sshd_binary() -> str | None:
    if not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()) and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "openssh-server"], capture_output=True, timeout=300,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """sshd on a free 127.0.0.1 port with its own config, host key and a throwaway client key."""
    binary = _sshd_binary()
    if binary is None or not shutil.which("ssh") or not shutil.which("scp"):
        pytest.skip("no OpenSSH server/client here and it could not be installed (needs root and apt-get)")
    home = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)], check=True)
    (home / "authorized_keys").write_text((home / "client_key.pub").read_text())
    os.chmod(home, 0o700)
    port = _free_port()
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home / 'host_key'}\nPidFile {home / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {home / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nPermitRootLogin yes\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory sshd insists on
    server = subprocess.Popen([binary, "-D", "-e", "-f", str(home / "sshd_config")], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if server.poll() is not None:
            pytest.skip(f"sshd did not start: {server.stderr.read().strip()[-300:]}")
        time.sleep(0.1)
    reach = {"method": "ssh", "host": f"{os.environ.get('USER', 'root')}@127.0.0.1", "port": port,
             "identity": str(home / "client_key"), "connect_timeout": 5,
             "options": ["StrictHostKeyChecking=no", f"UserKnownHostsFile={home / 'known_hosts'}"]}
    yield reach
    server.terminate()
    server.wait(timeout=10)


def test_ssh_runner_measures_on_a_real_sshd(sshd, artifacts_dir):
    artifact = artifacts_dir / "levit_128s-onnx-fp32" / "levit_128s.onnx"
    result = SshDevice(sshd).measure(Request("onnxruntime", artifact, threads=1, runs=10, max_warmup=10))
    assert result["runtime"] == "onnxruntime" and result["threads"] == 1 and len(result["samples_ms"]) == 10
    assert result["peak_rss_mb"] > 0 and result["fingerprint"]["hostname"]
    leftovers = SshDevice(sshd)._ssh("ls -d /tmp/edgevit-profile.* 2>/dev/null | wc -l", 20, "listing")
    assert leftovers.stdout.strip() == "0"  # the remote work folder was removed


def test_ssh_results_record_the_isa(sshd, artifacts_dir):
    # The worker runs where edgevit cannot be imported: host.py travels beside it.
    artifact = artifacts_dir / "levit_128s-onnx-fp32" / "levit_128s.onnx"
    found = SshDevice(sshd).measure(Request("onnxruntime", artifact, threads=1, runs=10, max_warmup=10))
    assert found["fingerprint"]["isa"] == host.host_isa()


def test_unreachable_ssh_host_fails_fast_with_one_line():
    reach = {"method": "ssh", "host": "127.0.0.1", "port": _free_port(), "connect_timeout": 3}
    start = time.monotonic()
    with pytest.raises(EdgevitError, match="cannot reach 127.0.0.1 over ssh"):
        SshDevice(reach).measure(Request("onnxruntime", Path(__file__), threads=1))
    assert time.monotonic() - start < 30


def test_adb_commands_and_log_parsing(tmp_path):
    device = AdbDevice({"method": "adb", "serial": "ABC123"})
    pte = tmp_path / "levit_128s.pte"
    setup_dir, push, run = device.commands(Request("executorch", pte, threads=4, runs=50), warmup=20)
    assert setup_dir == ["adb", "-s", "ABC123", "shell", "mkdir", "-p", "/data/local/tmp/edgevit"]
    assert push == ["adb", "-s", "ABC123", "push", str(pte), "/data/local/tmp/edgevit/levit_128s.pte"]
    assert run == ["adb", "-s", "ABC123", "shell", "/data/local/tmp/executor_runner",
                   "--model_path=/data/local/tmp/edgevit/levit_128s.pte", "--num_executions=71",
                   "--cpu_threads=4", "--print_output=none"]
    log = "\n".join(f"I 00:00:01.{i:03d} executorch:executor_runner.cpp:500] Iteration {i + 1} of 71: "
                    f"{30.0 if i == 0 else 10.0 + (i % 3) * 0.1:.3f} ms" for i in range(71))
    summary = AdbDevice.summarize_log(log, warmup=20)
    assert summary.first_call_ms == 30.0 and summary.runs == 50 and summary.warmup_runs == 20
    assert 10.0 <= summary.p50_ms <= 10.2
    with pytest.raises(EdgevitError, match="no per-iteration times"):
        AdbDevice.summarize_log("Model executed successfully 71 time(s) in 700.0 ms.", warmup=20)
    with pytest.raises(EdgevitError, match="ExecuTorch programs only"):
        device.commands(Request("onnxruntime", pte, threads=4), warmup=20)
