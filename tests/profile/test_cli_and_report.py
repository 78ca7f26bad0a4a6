"""`edgevit profile` end to end: real measurements, results files, reports; bad input as one line."""
import json

import pytest

from edgevit.core import host
from tests.profile.conftest import FAST
from tests.test_cli import assert_one_line_error as assert_cli_error


def assert_one_line_error(code, err, *fragments):
    assert_cli_error(code, "", err, *fragments)


@pytest.fixture(scope="module")
def two_runs(artifacts_dir, tmp_path_factory):
    """host-cpu over onnxruntime at 1 and at 2 threads: two real results files."""
    from edgevit.cli import app, main
    from edgevit.cli.profile import profile_group

    if "profile" not in app.commands:
        app.add_command(profile_group)
    out = tmp_path_factory.mktemp("results")
    paths = []
    for threads, repeats in ((1, 2), (2, 1)):  # repeats: each in a fresh process, the 10 runs split among them
        path = out / f"levit-{threads}t.json"
        assert main(["profile", "levit_128s", "--device", "host-cpu", "--targets", "onnx", "--threads", str(threads),
                     "--artifacts", str(artifacts_dir), "--save", str(path), *FAST, "--repeats", str(repeats)]) == 0
        paths.append(path)
    return paths


def test_results_file_holds_the_protocol(two_runs):
    data = json.loads(two_runs[0].read_text())
    assert data["schema"] == "edgevit-profile/1" and data["device"]["name"] == "host-cpu"
    assert data["device"]["fingerprint"]["cpu_count"] >= 1
    assert data["device"]["fingerprint"]["isa"] == host.host_isa()  # the worker ran as a script, without edgevit
    (entry,) = data["measurements"]
    assert entry["status"] == "measured" and entry["threads"] == 1 and entry["isolated"]
    assert entry["artifact"]["sha256"] and entry["artifact"]["verified"] is True and entry["runtime_version"]
    for key in ("p50_ms", "p90_ms", "p99_ms", "min_ms", "load_ms", "first_call_ms", "warmup_runs", "peak_rss_mb"):
        assert entry[key] > 0, key
    assert len(entry["samples_ms"]) == entry["runs"] == 10 == len(entry["cpu_samples_ms"]) == len(entry["switches"])
    assert [r["runs"] for r in entry["repeats"]] == [5, 5] and all(r["p50_ms"] > 0 and r["load_ms"] > 0 for r in entry["repeats"])
    assert entry["cpu_ms"] > 0 and entry["noisy"] == bool(entry["noise"])
    assert entry["settings"]["runtime_options"]["allow_spinning"] is False
    assert len(json.loads(two_runs[1].read_text())["measurements"][0]["repeats"]) == 1


def test_report_without_a_gpu_baseline(cli, two_runs, tmp_path):
    md, js, png = tmp_path / "r.md", tmp_path / "r.json", tmp_path / "r.png"
    code, out, err = cli("profile", "report", *map(str, two_runs), "--markdown", str(md), "--json", str(js), "--plot", str(png))
    assert code == 0, err
    assert "no desktop-GPU baseline in these results" in out + md.read_text()
    rows = json.loads(js.read_text())["rows"]
    assert {r["threads"] for r in rows} == {1, 2} and all(r["ratio_to_baseline"] is None for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_noisy_measurements_say_why_in_every_report(tmp_path):
    from edgevit.profile import report

    def document(device, kind, entry):
        return {"model": "levit_128s", "precision": "fp32", "device": {"name": device, "kind": kind},
                "measurements": [entry]}

    quiet = {"status": "measured", "target": "onnx", "runtime": "onnxruntime", "threads": 2, "p50_ms": 9.0,
             "p90_ms": 9.5, "noisy": False, "noise": []}
    busy = {**quiet, "threads": 1, "p50_ms": 20.0, "noisy": True,
            "noise": ["contended: other processes kept 1.60 cores busy while it ran, 1 left free by the measured threads"]}
    legacy = {**quiet, "threads": 4, "noisy": True}  # a results file from before reasons were recorded
    guess = {"status": "estimate", "target": "onnx", "runtime": "onnxruntime", "p50_ms": 3.0}
    rows, note = report.build_rows([document("host-cpu", "host", e) for e in (quiet, busy, legacy)]
                                   + [document("pixel-8", "phone", guess)])
    assert [report._hatch(r) for r in rows] == [None, "xx", "xx", "//"]
    text = report.markdown(rows, note)
    assert "! levit_128s on host-cpu · onnxruntime · 1t: contended: other processes kept 1.60 cores" in text
    assert "host-cpu · onnxruntime · 4t: spread" in text and "~3.00 ms" in text
    assert report.plot(rows, note, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_report_marks_ratios_to_an_estimated_baseline(cli, two_runs, tmp_path):
    gpu = tmp_path / "gpu.json"
    code, _, err = cli("profile", "levit_128s", "--device", "desktop-gpu", "--targets", "torch", "--estimate", "--save", str(gpu))
    assert code == 0, err
    accuracy = tmp_path / "acc.json"
    accuracy.write_text(json.dumps({"schema": "edgevit-accuracy/1", "results": [{"model": "levit_128s", "top1": 76.5}]}))
    js = tmp_path / "r.json"
    code, out, err = cli("profile", "report", str(gpu), *map(str, two_runs), "--json", str(js), "--accuracy", str(accuracy),
                         "--plot", str(tmp_path / "r.png"))
    assert code == 0, err
    rows = {r["device"] + str(r["threads"]): r for r in json.loads(js.read_text())["rows"]}
    assert rows["desktop-gpuNone"]["status"] == "estimate"
    assert rows["host-cpu1"]["ratio_note"] == "est." and rows["host-cpu1"]["ratio_to_baseline"] > 1
    assert rows["host-cpu1"]["top1"] == 76.5


def _elsewhere(source, path, precision="int8", hostname=None, isa=None, runtime=None, legacy=False):
    """A real results file rewritten as if measured at another precision, on another host (with
    ``isa``), in another runtime, or before the ISA was recorded (``legacy``)."""
    data = json.loads(source.read_text())
    data["precision"] = precision
    fingerprint = data["device"]["fingerprint"]
    fingerprint["hostname"] = hostname or fingerprint["hostname"]
    fingerprint["isa"] = isa or fingerprint["isa"]
    if legacy:
        del fingerprint["isa"]
    for entry in data["measurements"]:
        entry["runtime"] = runtime or entry["runtime"]
    path.write_text(json.dumps(data))
    return path


def _other_isa():
    """An int8 kernel class this machine is not of: the second host's."""
    if host.int8_kernel_class() == host.X86_NO_VNNI:
        return {"machine": "x86_64", "features": ["avx2", "avx512f", "avx512bw", "avx512_vnni"],
                "int8_kernels": host.X86_VNNI}
    return {"machine": "x86_64", "features": ["avx2"], "int8_kernels": host.X86_NO_VNNI}


def _reports(cli, paths, tmp_path):
    """The printed table (whitespace folded: rich wraps the caption), the Markdown and the JSON."""
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    code, out, err = cli("profile", "report", *map(str, paths), "--markdown", str(md), "--json", str(js))
    assert code == 0, err
    return " ".join(out.split()), md.read_text(), json.loads(js.read_text())


def _hostname(two_runs):
    return json.loads(two_runs[0].read_text())["device"]["fingerprint"]["hostname"]


def _this_host(two_runs):
    features = " ".join(host.cpu_features() or []) or "no int8 features found"
    return f"{_hostname(two_runs)} ({host.int8_kernel_class()}: {features})"


def test_int8_across_isa_classes_warns_in_every_report(cli, two_runs, tmp_path):
    other = _other_isa()
    here = _elsewhere(two_runs[0], tmp_path / "here.json")
    there = _elsewhere(two_runs[1], tmp_path / "there.json", hostname="other-host", isa=other)
    table, md, js = _reports(cli, [here, there], tmp_path)
    expected = (f"warning: int8 latencies compared across hosts of different ISA: {_this_host(two_runs)} vs other-host "
                f"({other['int8_kernels']}: {' '.join(other['features'])}); int8 speed depends on it")
    assert js["warnings"] == [expected] and f"\n- {expected}\n" in md and expected in table
    assert {r["host"] for r in js["rows"]} == {"other-host", _hostname(two_runs)}


def test_no_isa_warning_for_one_isa_for_fp32_or_for_estimates(cli, two_runs, tmp_path):
    other = _other_isa()
    here = _elsewhere(two_runs[0], tmp_path / "here.json")
    twin = _elsewhere(two_runs[1], tmp_path / "twin.json", hostname="twin-host")  # another host of the same ISA
    fp32 = _elsewhere(two_runs[1], tmp_path / "fp32.json", precision="fp32", hostname="other-host", isa=other)
    gpu = _elsewhere(two_runs[1], tmp_path / "gpu.json", hostname="gpu-host", isa=other, runtime="tensorrt")
    estimate = tmp_path / "estimate.json"  # a real int8 estimate: no host at all
    code, _, err = cli("profile", "levit_128s", "--device", "desktop-gpu", "--targets", "torch", "--precision", "int8",
                       "--estimate", "--save", str(estimate))
    assert code == 0, err
    for paths in ([here, twin], [two_runs[0], fp32], [here, gpu, estimate]):
        table, md, js = _reports(cli, paths, tmp_path)
        assert js["warnings"] == [] and "warning:" not in md + table, paths


def test_results_without_isa_warn_that_it_is_unknown(cli, two_runs, tmp_path):
    here = _elsewhere(two_runs[0], tmp_path / "here.json")
    old = _elsewhere(two_runs[1], tmp_path / "old.json", hostname="old-host", legacy=True)
    table, md, js = _reports(cli, [here, old], tmp_path)
    expected = (f"warning: int8 latencies compared across hosts of unknown ISA: {_this_host(two_runs)} vs old-host "
                "(ISA not recorded); int8 speed depends on it")
    assert js["warnings"] == [expected] and expected in md and expected in table
    older = _elsewhere(two_runs[0], tmp_path / "older.json", hostname="older-host", legacy=True)
    assert _reports(cli, [old, older], tmp_path)[2]["warnings"] == []  # nothing recorded to compare: as before


def test_desktop_gpu_skips_cleanly_without_cuda(cli, artifacts_dir):
    code, _, err = cli("profile", "levit_128s", "--device", "desktop-gpu", "--artifacts", str(artifacts_dir))
    assert_one_line_error(code, err, "nothing could be measured on desktop-gpu", "CUDA", "TensorRT", "--estimate")


def test_bad_input_is_one_line(cli, tmp_path):
    code, _, err = cli("profile", "levit_128s", "--device", "pixel-9")
    assert_one_line_error(code, err, "unknown device 'pixel-9'", "host-cpu")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "mine"\nkind = "toaster"\n')
    code, _, err = cli("profile", "levit_128s", "--profile", str(bad))
    assert_one_line_error(code, err, "kind 'toaster' is not one of")
    bad.write_text('name = "mine"\nkind = "sbc"\n[runtimes]\nonnx = "executorch"\n[reach]\nmethod = "local"\n')
    code, _, err = cli("profile", "levit_128s", "--profile", str(bad))
    assert_one_line_error(code, err, "runtime executorch runs executorch artifacts, not onnx")
    bad.write_text("name = [")
    code, _, err = cli("profile", "levit_128s", "--profile", str(bad))
    assert_one_line_error(code, err, "not valid TOML")
    code, _, err = cli("profile", "levit_128s", "--device", "host-cpu", "--targets", "coreml")
    assert_one_line_error(code, err, "device host-cpu runs no 'coreml' target")
    code, _, err = cli("profile", "report", str(tmp_path / "missing.json"))
    assert_one_line_error(code, err, "results file not found")


def test_unreachable_ssh_device_is_one_line(cli, artifacts_dir, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mine = tmp_path / "pi.toml"
    mine.write_text(f'name = "my-pi"\nkind = "sbc"\n[runtimes]\nonnx = "onnxruntime"\n'
                    f'[reach]\nmethod = "ssh"\nhost = "127.0.0.1"\nport = {port}\nconnect_timeout = 3\n')
    code, _, err = cli("profile", "levit_128s", "--profile", str(mine), "--artifacts", str(artifacts_dir))
    assert_one_line_error(code, err, "cannot reach 127.0.0.1 over ssh")


def test_every_shipped_profile_loads():
    from edgevit.profile.profiles import resolve_profile, shipped_profiles

    names = set(shipped_profiles())
    assert {"host-cpu", "desktop-gpu", "iphone-12", "pixel-8", "jetson-orin-nano", "raspberry-pi-5"} <= names
    for name in names:
        profile = resolve_profile(name, None)
        assert profile.name == name and all(f.source for f in profile.peak_flops.values())


def test_targets_take_turns_and_repeats_are_pooled(monkeypatch, tmp_path):
    """Repeats alternate between targets (a change in load lands on both), and pool into one entry."""
    from edgevit.profile import profiler, timing
    from edgevit.profile.profiles import resolve_profile

    manifest = {"artifact": {"sha256": "0" * 64, "bytes": 1}, "recipe": {"name": "r"}, "verification": {"passed": True}}
    bundles = {target: (tmp_path / f"m.{target}", manifest) for target in ("onnx", "executorch")}
    order, p50 = [], {"onnxruntime": iter([9.0, 5.6, 9.1]), "executorch": iter([10.0, 10.2, 10.1])}

    def fake_measure(profile, request, isolate):
        order.append(request.runtime)
        ms = next(p50[request.runtime])
        return {"runtime": request.runtime, "threads": request.threads, "load_ms": 50.0, "peak_rss_mb": 100.0 + len(order),
                "settings": {"load_average": [0.1, 0.1, 0.1]}, "fingerprint": {"cpu": "x"},
                **timing.summarize(20.0, 10, [ms] * request.runs).to_dict()}

    monkeypatch.setattr(profiler, "_measure", fake_measure)
    document = profiler.profile_model("levit_128s", resolve_profile("host-cpu", None), ["onnx", "executorch"], runs=50,
                                      bundles=bundles)
    assert order == ["onnxruntime", "executorch"] * 3
    ort, et = document["measurements"]
    assert ort["runs"] == et["runs"] == 51 and len(ort["repeats"]) == 3 and et["peak_rss_mb"] == 106.0
    assert any(r.startswith("drift: medians of repeats (fresh processes) range 5.60–9.10 ms") for r in ort["noise"])
    assert not et["noisy"] and et["status"] == "measured" and et["artifact"]["verified"] is True
    assert document["device"]["fingerprint"] == {"cpu": "x"}


def test_tables_keep_every_number_in_a_pipe(two_runs):
    """Piped (a log, CI), the report's table keeps its natural width: no cell is cut to "…"."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "edgevit", "profile", "report", *map(str, two_runs)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout
    for path in two_runs:
        for measurement in json.loads(path.read_text())["measurements"]:
            assert f"{measurement['p50_ms']:.2f} ms" in done.stdout, (measurement["p50_ms"], done.stdout)
