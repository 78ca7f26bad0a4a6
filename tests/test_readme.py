"""The README is a promise: every command in it runs here, in order, in one fresh folder, as a
user would type them after the set-up. Most run as written; the few that cannot are listed in
COVERAGE with what is run instead and why. A command added to the README without an entry
here fails the suite, and so does an entry whose command left the README.

Files the README takes as the user's own (an authors' checkpoint) are written from
../shared/reference in that source's format; files it shows (``my-recipe.toml``) are written
from the README's own block.
"""
from __future__ import annotations

import glob
import re
import shlex
from dataclasses import dataclass, field

import pytest

from edgevit.cli import main
from tests.data import require_fashion_mnist
from tests.reference_data import REPO_ROOT, write_as_published

README = REPO_ROOT / "README.md"
CI_SCRIPT = REPO_ROOT / ".ci" / "run"


@dataclass(frozen=True)
class Coverage:
    how: str  # "as written", "reduced", "fails here", "ci"
    why: str = ""
    extra: tuple[str, ...] = ()  # reduced: arguments appended
    error: str = ""  # fails here: what the one-line error says


AS_WRITTEN = Coverage("as written")
CI = Coverage("ci", ".ci/run runs it on every CI build (the README's set-up, lint and test commands)")
# Timing runs: the protocol's defaults (>= 50 runs in 3 fresh processes per target) take minutes
# and measure nothing the suite checks; the command, its exports and its tables are the same.
FEWER_RUNS = Coverage("reduced", "fewer timed runs", ("--runs", "6", "--repeats", "1"))

COVERAGE: dict[str, Coverage] = {
    "sudo apt-get install -y dataset-fashion-mnist": CI,
    'python3 -m pip install -c constraints.txt -e ".[all,dev]"': CI,
    "python3 -m ruff check . && lint-imports": CI,
    "python3 -m pytest": CI,
    "edgevit export efficientformer_l1": AS_WRITTEN,
    "edgevit export levit_128s --target executorch": AS_WRITTEN,
    "edgevit export mobilevitv2_050 --target coreml --precision fp16 --image-input": AS_WRITTEN,
    "edgevit export efficientformer_l1 --precision fp16 --weights efficientformer_l1.pth": AS_WRITTEN,
    "edgevit export levit_128s --dynamic-batch --exporter dynamo --out build/": AS_WRITTEN,
    "edgevit export levit_128s --recipe my-recipe.toml": AS_WRITTEN,
    "edgevit export --help": AS_WRITTEN,
    "edgevit data fashion-mnist train/ --per-class 100": AS_WRITTEN,
    "edgevit data fashion-mnist val/ --split test --per-class 20": AS_WRITTEN,
    "edgevit train levit_128s --data train/ --input-size 64 --epochs 3 --eval-data val/ --out levit-fmnist.safetensors":
        AS_WRITTEN,
    "edgevit calibrate levit_128s --weights levit-fmnist.safetensors --calib-data train/ --images 64 "
    "--out levit.calib.safetensors": AS_WRITTEN,
    "edgevit quantize levit_128s --weights levit-fmnist.safetensors --target onnx --calib-stats levit.calib.safetensors":
        AS_WRITTEN,
    "edgevit quantize levit_128s --weights levit-fmnist.safetensors --target executorch "
    "--calib-stats levit.calib.safetensors": AS_WRITTEN,
    "edgevit quantize levit_128s --weights levit-fmnist.safetensors --target coreml --calib-data train/": AS_WRITTEN,
    "edgevit quantize levit_128s --weights levit-fmnist.safetensors --target tensorrt --calib-data train/": AS_WRITTEN,
    "edgevit quantize levit_128s --weights levit-fmnist.safetensors --mode dynamic": AS_WRITTEN,
    "edgevit eval artifacts/levit_128s-onnx-int8 --data val/": AS_WRITTEN,
    "edgevit quantize levit_128s --weights levit-fmnist.safetensors --calib-data train/ --max-drop 0.5 --eval-data val/ "
    "--out search/": AS_WRITTEN,
    "edgevit quantize levit_128s --weights levit-fmnist.safetensors --mode qat --calib-data train/ --train-data train/ "
    "--out qat/": AS_WRITTEN,
    "edgevit quantize levit_128s --random-weights --mode dynamic --out latency-only/": AS_WRITTEN,
    "edgevit inspect artifacts/levit_128s-onnx-int8 artifacts/levit_128s-executorch-xnnpack-int8 "
    "artifacts/levit_128s-tensorrt-int8 --data val/ --depth 2": AS_WRITTEN,
    "edgevit inspect artifacts/levit_128s-coreml-ios17-w8a8 --data val/ --depth 2 --no-advice": AS_WRITTEN,
    "edgevit inspect qat/levit_128s-onnx-int8-qat --data val/ --depth 2": AS_WRITTEN,
    "edgevit export levit_128s --weights levit-fmnist.safetensors --out fp32/": AS_WRITTEN,
    "edgevit export levit_128s --weights levit-fmnist.safetensors --target executorch --out fp32/": AS_WRITTEN,
    "edgevit inspect fp32/levit_128s-onnx-fp32 fp32/levit_128s-executorch-xnnpack-fp32 --latency --json inspect.json":
        AS_WRITTEN,
    "edgevit profile levit_128s --device host-cpu": FEWER_RUNS,
    "edgevit profile levit_128s --device host-cpu --targets onnx --threads 1 --layers": FEWER_RUNS,
    "edgevit profile levit_128s --device iphone-12": AS_WRITTEN,
    "edgevit profile levit_128s --profile my-board.toml": FEWER_RUNS,
    "edgevit profile levit_128s --device raspberry-pi-5": Coverage(
        "fails here", "no board answers to the shipped profile's reach.host (the README says to set it first); "
        "the ssh path itself is tested against a real sshd in tests/profile/test_remote.py",
        error="cannot reach raspberrypi.local over ssh"),
    "edgevit profile report profile-results/*.json --markdown r.md --json r.json --plot r.png": AS_WRITTEN,
    "edgevit export levit_128s --target tensorrt": AS_WRITTEN,
    "edgevit export levit_128s --target tensorrt --precision fp32": AS_WRITTEN,
    "edgevit export levit_128s --target tensorrt --dynamic-batch --opt-batch 4 --max-batch 16 --workspace-mb 2048": AS_WRITTEN,
    "edgevit list": AS_WRITTEN,
    "edgevit list 'levit_*' --json": AS_WRITTEN,
    "edgevit info efficientformer_l1": AS_WRITTEN,
    "edgevit info levit_128s --weights LeViT-128S.pth": AS_WRITTEN,
}
# The user's own files the README names: the authors' checkpoints, as they publish them.
USER_FILES = {"efficientformer_l1.pth": "snap__efficientformer_l1", "LeViT-128S.pth": "fb__LeViT_128S"}


@dataclass
class Block:
    lang: str
    lines: list[str]
    names: str = ""  # the file the block is: the line before it ends with "`my-recipe.toml`:"
    commands: list[str] = field(default_factory=list)


def readme_blocks() -> list[Block]:
    blocks, text = [], README.read_text()
    for match in re.finditer(r"(?P<before>[^\n]*)\n\n?```(?P<lang>\w*)\n(?P<body>.*?)```", text, re.S):
        named = re.search(r"`([\w.-]+\.toml)`:$", match["before"].strip())
        block = Block(match["lang"], match["body"].splitlines(), named.group(1) if named else "")
        if block.lang == "bash":
            block.commands = [" ".join(_without_comment(line).split()) for line in block.lines if _without_comment(line)]
        blocks.append(block)
    return blocks


def _without_comment(line: str) -> str:
    return re.split(r"\s+#\s", f" {line}", maxsplit=1)[0].strip()


def test_every_readme_command_is_covered_and_every_entry_is_in_the_readme():
    commands = [command for block in readme_blocks() for command in block.commands]
    missing = [c for c in commands if c not in COVERAGE]
    stale = [c for c in COVERAGE if c not in commands]
    assert not missing, f"README commands with no COVERAGE entry (run as written, reduced, or say why not): {missing}"
    assert not stale, f"COVERAGE entries no longer in the README: {stale}"


def test_ci_runs_the_readme_setup_lint_and_test_commands():
    ci = CI_SCRIPT.read_text()
    for command, coverage in COVERAGE.items():
        if coverage.how == "ci":
            assert command.removeprefix("sudo ") in ci, f".ci/run does not run {command!r}"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One fresh folder for the whole README, with the user's own files in it."""
    require_fashion_mnist()
    folder = tmp_path_factory.mktemp("readme")
    for name, stem in USER_FILES.items():
        written = write_as_published(stem, folder)
        written.rename(folder / name)
    for block in readme_blocks():
        if block.names and block.lang == "toml":
            (folder / block.names).write_text("\n".join(block.lines) + "\n")
    return folder


RUNNABLE = [(index, block) for index, block in enumerate(readme_blocks())
            if block.lang == "python" or any(COVERAGE.get(c, CI).how != "ci" for c in block.commands)]


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for _, b in RUNNABLE], ids=[f"block{i}-{(b.commands or ['python'])[0][:40]}" for i, b in RUNNABLE])
def test_readme_block_runs(block, session, monkeypatch, capsys):
    monkeypatch.chdir(session)
    if block.lang == "python":
        exec(compile("\n".join(block.lines), "README.md", "exec"), {})
        return
    for command in block.commands:
        coverage = COVERAGE[command]
        if coverage.how == "ci":
            continue
        argv = [expanded for word in shlex.split(command)[1:]
                for expanded in (sorted(glob.glob(word)) or [word] if "*" in word else [word])]
        code = main([*argv, *coverage.extra])
        out, err = capsys.readouterr()
        if coverage.how == "fails here":
            assert code != 0 and coverage.error in err.strip().splitlines()[-1], (command, err[-2000:])
            continue
        assert code == 0, (command, err[-3000:])
        if command == "edgevit export efficientformer_l1":  # the README shows what it prints
            shown = next(b for b in readme_blocks() if b.lang == "" and b.lines[0].startswith("efficientformer_l1 → "))
            assert _shape(out.strip()) == _shape(shown.lines[0]), (out, shown.lines[0])


def _shape(line: str) -> str:
    """A printed line with its numbers blanked: the README's example must match what runs."""
    return re.sub(r"\d+(\.\d+)?(e[-+]\d+)?", "N", line)
