"""Reports over results files: p50 latency per model × device/runtime, each as a ratio to the
desktop GPU measured for the same model, in a terminal table, Markdown, JSON and a PNG plot.

Ratios are only as good as both numbers: a ratio that involves a roofline estimate is marked
(``est.``), never shown as if it were measured. The baseline is the fastest *measured* desktop-GPU
run of the model; an estimate stands in only when no measurement exists, and says so.

Accuracy (optional; edgevit's ``eval`` will write it): a JSON file ::

    {"schema": "edgevit-accuracy/1",
     "results": [{"model": "levit_128s", "top1": 76.5, "target": "onnx", "precision": "fp32"}]}

``target`` and ``precision`` may be left out; the most specific entry for a run is used.
"""
from __future__ import annotations

import itertools
import json
import textwrap
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from edgevit.core.errors import EdgevitError

BASELINE_KIND = "desktop-gpu"
NO_BASELINE = "no desktop-GPU baseline in these results"
ACCURACY_SCHEMA = "edgevit-accuracy/1"


@dataclass
class Row:
    model: str
    device: str
    device_kind: str
    runtime: str
    target: str
    precision: str
    threads: int | None
    status: str  # measured | estimate
    p50_ms: float
    p90_ms: float | None
    noisy: bool
    noise: list[str] = field(default_factory=list)  # the measurement's reasons for ``noisy``
    cpu_ms: float | None = None  # the process's CPU time per run: contention barely moves it
    ratio_to_baseline: float | None = None  # p50 / baseline p50: how many times slower than the desktop GPU
    ratio_note: str = ""  # "" both measured; "est." an estimate is involved
    top1: float | None = None
    source: str = ""
    host: str = ""  # the machine that measured it: its hostname, else the device's name
    isa: dict[str, Any] | None = None  # its CPU's int8 features (edgevit.core.host); None: not recorded

    label: str = ""  # "#k": the k-th of several runs of the same model, device, runtime and threads

    @property
    def column(self) -> str:
        return f"{self.device} · {self.runtime}" + (f" · {self.threads}t" if self.threads else "") + \
            (f" · {self.label}" if self.label else "")


def build_rows(documents: list[dict[str, Any]], accuracy: list[dict[str, Any]] | None = None) -> tuple[list[Row], str | None]:
    """Every non-skipped measurement as a row, with its ratio to the model's baseline; the second
    value is a note on the baseline: missing, or estimated (None when every baseline is measured)."""
    rows = [
        Row(model=doc["model"], device=doc["device"]["name"], device_kind=doc["device"]["kind"],
            runtime=m["runtime"], target=m["target"], precision=doc["precision"], threads=m.get("threads"),
            status=m["status"], p50_ms=m["p50_ms"], p90_ms=m.get("p90_ms"), noisy=bool(m.get("noisy")),
            noise=list(m.get("noise") or ([_OLD_NOISE] if m.get("noisy") else [])), cpu_ms=m.get("cpu_ms"),
            source=doc.get("source", ""), **_host(doc["device"]))
        for doc in documents for m in doc["measurements"] if m["status"] != "skipped"
    ]
    repeats = Counter((row.model, row.column) for row in rows)
    numbered: Counter = Counter()
    for row in rows:  # in the order the files were given: run #1 of every model in one column
        key = (row.model, row.column)
        if repeats[key] > 1:
            numbered[key] += 1
            row.label = f"#{numbered[key]}"
    baselines: dict[str, Row] = {}
    for row in rows:
        best = baselines.get(row.model)
        # A measurement always beats an estimate; then the fastest.
        if row.device_kind == BASELINE_KIND and (best is None or _rank(row) < _rank(best)):
            baselines[row.model] = row
    for row in rows:
        baseline = baselines.get(row.model)
        if baseline is not None:
            row.ratio_to_baseline = row.p50_ms / baseline.p50_ms
            row.ratio_note = "est." if "estimate" in (row.status, baseline.status) else ""
        row.top1 = _top1(accuracy or [], row)
    if not baselines:
        return rows, NO_BASELINE
    estimated = sorted(model for model, row in baselines.items() if row.status == "estimate")
    return rows, (f"desktop-GPU baseline estimated (roofline, no launch overheads), not measured, for "
                  f"{', '.join(estimated)}: its ratios are marked est." if estimated else None)


def _host(device: dict[str, Any]) -> dict[str, Any]:
    fingerprint = device.get("fingerprint") or {}  # None: an estimate, adb, or a results file from before
    return {"host": fingerprint.get("hostname") or device["name"], "isa": fingerprint.get("isa")}


def _rank(row: Row) -> tuple[bool, float]:
    return row.status != "measured", row.p50_ms


def load_accuracy(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgevitError(f"accuracy file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise EdgevitError(f"accuracy file {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != ACCURACY_SCHEMA or not isinstance(data.get("results"), list):
        raise EdgevitError(f"{path} is not an accuracy file: expected {{\"schema\": \"{ACCURACY_SCHEMA}\", \"results\": [...]}}")
    for entry in data["results"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or not isinstance(entry.get("top1"), (int, float)):
            raise EdgevitError(f"{path}: every result needs \"model\" and a numeric \"top1\", got {entry!r}")
    return data["results"]


def _top1(accuracy: list[dict[str, Any]], row: Row) -> float | None:
    matches = [e for e in accuracy if e["model"] == row.model
               and e.get("target", row.target) == row.target and e.get("precision", row.precision) == row.precision]
    matches.sort(key=lambda e: ("target" in e) + ("precision" in e), reverse=True)
    return float(matches[0]["top1"]) if matches else None


def _cell(row: Row) -> str:
    text = ("~" if row.status == "estimate" else "") + f"{row.p50_ms:.2f} ms" + (" !" if row.noisy else "")
    if row.ratio_to_baseline is not None:
        text += f" (×{row.ratio_to_baseline:.1f}{' est.' if row.ratio_note else ''})"
    return text


def _pivot(rows: list[Row]) -> tuple[list[str], list[str], dict[tuple[str, str], Row]]:
    models = list(dict.fromkeys(r.model for r in rows))
    columns = list(dict.fromkeys(r.column for r in rows))
    return models, columns, {(r.model, r.column): r for r in rows}


LEGEND = ("p50 latency at batch 1; (×N): N times the desktop GPU's p50 for the same model; "
          "~: roofline estimate, not a measurement; est.: the ratio involves an estimate; "
          "!: noisy, another run need not agree (reasons below)")
_OLD_NOISE = "spread: p90 > 1.5 × p50 or p50 > 1.5 × min"  # results written before reasons were recorded


def noise_notes(rows: list[Row]) -> list[str]:
    """One line per noisy measurement: which, and why it would not repeat."""
    return [f"! {row.model} on {row.column}: " + "; ".join(row.noise) for row in rows if row.noisy]


# Their int8 runs on the GPU: the host CPU's ISA does not decide it.
GPU_RUNTIMES = ("onnxruntime-cuda", "onnxruntime-tensorrt", "torch-cuda", "tensorrt")


def isa_warnings(rows: list[Row]) -> list[str]:
    """One line per pair of hosts whose int8 latencies sit side by side though their CPUs run int8
    differently (VNNI or not, dot product or not: :mod:`edgevit.core.host`), so the gap may be the
    hosts' rather than the models'. A host that did not record its ISA (results from before it
    was recorded, adb) is warned about next to one that did; estimates ran nowhere."""
    hosts: dict[tuple[str, tuple | None], dict[str, Any] | None] = {}
    for row in rows:
        if row.precision == "int8" and row.status == "measured" and row.runtime not in GPU_RUNTIMES:
            hosts.setdefault((row.host, _isa_key(row.isa)), row.isa)
    lines = []
    for (a, key_a), (b, key_b) in itertools.combinations(hosts, 2):
        if key_a == key_b:  # the same ISA, or two hosts that both did not record it
            continue
        kind = "unknown" if None in (key_a, key_b) else "different"
        lines.append(f"warning: int8 latencies compared across hosts of {kind} ISA: {a} ({_isa_text(hosts[a, key_a])}) "
                     f"vs {b} ({_isa_text(hosts[b, key_b])}); int8 speed depends on it")
    return lines


def _isa_key(isa: Any) -> tuple | None:
    if not isinstance(isa, dict):
        return None
    return isa.get("machine"), isa.get("int8_kernels"), tuple(isa.get("features") or ())


def _isa_text(isa: Any) -> str:
    if not isinstance(isa, dict):
        return "ISA not recorded"
    features = " ".join(isa.get("features") or []) or "no int8 features found"
    return f"{isa.get('int8_kernels') or isa.get('machine') or 'unknown CPU'}: {features}"


def table(rows: list[Row], note: str | None) -> Table:
    models, columns, cells = _pivot(rows)
    result = Table(title="p50 latency by model and device/runtime", box=box.SIMPLE_HEAD,
                   caption="\n".join([LEGEND, *([note] if note else []), *isa_warnings(rows), *noise_notes(rows)]),
                   caption_justify="left")
    result.add_column("model", no_wrap=True)
    for column in columns:
        result.add_column(column, justify="right")
    for model in models:
        result.add_row(model, *(_cell(cells[(model, c)]) if (model, c) in cells else "–" for c in columns))
    return result


def markdown(rows: list[Row], note: str | None) -> str:
    models, columns, cells = _pivot(rows)
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for model in models:
        lines.append(f"| {model} | " + " | ".join(_cell(cells[(model, c)]) if (model, c) in cells else "–"
                                                for c in columns) + " |")
    notes = "".join(f"\n- {line}" for line in [*isa_warnings(rows), *noise_notes(rows)])
    return "\n".join(lines) + f"\n\n{LEGEND}." + (f"\n\n{note}." if note else "") + (f"\n{notes}" if notes else "") + "\n"


def to_json(rows: list[Row], note: str | None) -> str:
    return json.dumps({"baseline": BASELINE_KIND, "note": note, "warnings": isa_warnings(rows),
                       "rows": [asdict(r) for r in rows]}, indent=2) + "\n"


def plot(rows: list[Row], note: str | None, path: Path) -> Path:
    """Grouped bars of p50 per model (estimates hatched) and, with accuracy, top-1 vs latency."""
    try:
        import matplotlib
    except ImportError:
        raise EdgevitError("the plot needs matplotlib: pip install -c constraints.txt -e \".[report]\"") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, columns, cells = _pivot(rows)
    with_accuracy = any(r.top1 is not None for r in rows)
    figure, axes = plt.subplots(1, 2 if with_accuracy else 1, figsize=(11 if with_accuracy else 8, 4.8), squeeze=False)
    bars = axes[0][0]
    width = 0.8 / len(columns)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, column in enumerate(columns):
        for position, model in enumerate(models):
            row = cells.get((model, column))
            if row is None:
                continue
            x = position - 0.4 + width * (index + 0.5)
            bars.bar(x, row.p50_ms, width, color=colours[index % len(colours)], hatch=_hatch(row),
                     edgecolor="black", linewidth=0.5)
            marks = [f"{row.p50_ms:.3g} ms"]
            marks += [f"×{row.ratio_to_baseline:.1f}" + (" est." if row.ratio_note else "")] if row.ratio_to_baseline is not None else []
            marks += ["estimate"] if row.status == "estimate" else ["noisy"] if row.noisy else []
            bars.annotate("\n".join(marks), (x, row.p50_ms), ha="center", va="bottom", fontsize=7,
                          color="firebrick" if row.noisy else "black")
    # Log scale: one slow runtime (torch eager at ~900 ms) beside ~10 ms artifacts and sub-ms GPU
    # estimates would otherwise flatten every other bar.
    bars.set_yscale("log")
    shown = [row.p50_ms for row in cells.values() if row.p50_ms]
    if shown:
        bars.set_ylim(min(shown) / 2, max(shown) * 6)  # room above the tallest bar for its labels
    bars.set_xticks(range(len(models)), models, rotation=15)
    bars.set_ylabel("p50 latency, batch 1 (ms, log scale)")
    bars.set_title("p50 latency by model and device/runtime", fontsize=10)
    figure.text(0.01, 0.01, "\n".join(textwrap.wrap(
        "//: roofline estimate, not a measurement; xx: noisy measurement (another run need not agree; see the "
        "table's reasons); ×N: times the desktop GPU's p50. " + (note or ""), 150)), fontsize=7, va="bottom")
    from matplotlib.patches import Patch

    # Plain swatches for the columns (a bar's own may be hatched), then what each hatch means.
    handles = [Patch(facecolor=colours[index % len(colours)], edgecolor="black", label=column)
               for index, column in enumerate(columns)]
    handles += [Patch(facecolor="white", edgecolor="black", hatch=_hatch(kind), label=label)
                for kind, label in (("estimate", "estimate (roofline)"), ("noisy", "noisy measurement"))
                if any(_hatch(r) == _hatch(kind) for r in rows)]
    bars.legend(handles=handles, fontsize=8)
    bars.grid(axis="y", alpha=0.3)
    if with_accuracy:
        scatter = axes[0][1]
        for index, column in enumerate(columns):
            points = [(cells[(m, column)].p50_ms, cells[(m, column)].top1, m) for m in models
                      if (m, column) in cells and cells[(m, column)].top1 is not None]
            if points:
                scatter.scatter([p[0] for p in points], [p[1] for p in points], color=colours[index % len(colours)], label=column)
                for ms, top1, model in points:
                    scatter.annotate(model, (ms, top1), fontsize=7, xytext=(3, 3), textcoords="offset points")
        scatter.set_xscale("log")
        scatter.set_xlabel("p50 latency (ms, log scale)")
        scatter.set_ylabel("top-1 (%)")
        scatter.set_title("accuracy vs latency", fontsize=9)
        scatter.grid(alpha=0.3)
    figure.tight_layout(rect=(0, 0.08, 1, 1))  # room for the caption below the axes
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _hatch(row: "Row | str") -> str | None:
    kind = row if isinstance(row, str) else "estimate" if row.status == "estimate" else "noisy" if row.noisy else ""
    return {"estimate": "//", "noisy": "xx"}.get(kind)


def measurement_table(document: dict[str, Any]) -> Table:
    """The figures of one ``edgevit profile`` run, as printed after it; noisy measurements get a
    line each under the table saying why they would not repeat."""
    device = document["device"]
    result = Table(title=f"{document['model']} on {device['name']} ({document['precision']}, batch {document['batch']})",
                   box=box.SIMPLE_HEAD, caption_justify="left")
    columns = ("target", "runtime", "thr", "p50", "p90", "p99", "min", "cpu/run", "repeats' p50", "load", "1st call",
               "warm+runs", "peak MB")
    for column in columns:
        result.add_column(column, justify="left" if column in ("target", "runtime") else "right", no_wrap=True)
    result.add_column("note")
    captions = ["times in ms; cpu/run: the process's CPU time per run, all threads (other processes barely change it); "
                "repeats' p50: each repeat's, in a fresh process; load: the artifact's load/compile, runtime imported; "
                "peak MB: the measuring process's"]
    blank = ["–"] * (len(columns) - 2)
    for m in document["measurements"]:
        if m["status"] == "skipped":
            result.add_row(m["target"], m["runtime"], *blank, f"skipped: {m['reason']}")
        elif m["status"] == "estimate":
            result.add_row(m["target"], m["runtime"], "–", f"~{m['p50_ms']:.2f}", *blank[2:],
                           "ESTIMATE: roofline from the profile's peak figures, not a measurement")
        else:
            peak = f"{m['peak_rss_mb']:.0f}" if m.get("peak_rss_mb") else "–"
            cpu = f"{m['cpu_ms']:.2f}" if m.get("cpu_ms") is not None else "–"
            repeats = " ".join(f"{r['p50_ms']:.2f}" for r in m.get("repeats", [])) if len(m.get("repeats", [])) > 1 else "–"
            result.add_row(
                m["target"], m["runtime"], str(m["threads"]), *(f"{m[k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "min_ms")),
                cpu, repeats, f"{m['load_ms']:.0f}" if m.get("load_ms") is not None else "–", f"{m['first_call_ms']:.1f}",
                f"{m['warmup_runs']}+{m['runs']}", peak, "NOISY (below)" if m["noisy"] else "")
            if m["noisy"]:
                captions.append(f"NOISY {m['target']} ({m['runtime']}): " + "; ".join(m.get("noise") or [_OLD_NOISE]))
    result.caption = "\n".join(captions)
    return result
