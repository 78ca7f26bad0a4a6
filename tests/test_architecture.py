"""The house rules that keep edgevit easy to change: imports flow one way (the layers contract in
.importlinter, also run by the lint command), and the CLI starts without loading a framework."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "onnx", "onnxruntime", "onnxscript", "onnxslim", "executorch", "coremltools", "torchao",
         "safetensors", "PIL", "matplotlib", "huggingface_hub", "tensorrt"}


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    linter = shutil.which("lint-imports")
    if linter is None:
        pytest.fail("lint-imports is not installed: the dev extra (pip install -e '.[dev]') brings import-linter")
    return subprocess.run([linter, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_layers_contract_holds():
    done = _lint_imports(REPO_ROOT)
    assert done.returncode == 0 and "1 kept, 0 broken" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("module,bad_import,broken", [
    ("quant/spec.py", "import edgevit.targets.onnx", "edgevit.quant.spec -> edgevit.targets.onnx"),
    ("runtimes/base.py", "from edgevit.pipeline import export", "edgevit.runtimes.base -> edgevit.pipeline.export"),
    ("targets/recipes.py", "import edgevit.profile.timing", "edgevit.targets.recipes -> edgevit.profile.timing"),
])
def test_the_contract_catches_an_import_against_the_flow(tmp_path, module, bad_import, broken):
    """A copy of the package with one import that climbs a layer fails the contract, naming it."""
    shutil.copytree(REPO_ROOT / "edgevit", tmp_path / "edgevit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / ".importlinter", tmp_path)
    path = tmp_path / "edgevit" / module
    path.write_text(path.read_text() + f"\n{bad_import}  # noqa\n")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0 and broken in done.stdout, done.stdout + done.stderr


def test_help_of_every_command_loads_no_framework():
    """`edgevit --help` and each subcommand's --help import none of the heavy packages."""
    script = f"""
import json, sys
from edgevit.cli import app, main
from edgevit.cli.profile import profile_group
commands = [[]] + [[name] for name in app.commands] + [["profile", name] for name in profile_group.commands]
codes = [main([*command, "--help"]) for command in commands]
print(json.dumps({{"codes": codes, "heavy": sorted({{m.split(".")[0] for m in sys.modules}} & set({sorted(HEAVY)!r}))}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    result = json.loads(done.stdout.splitlines()[-1])
    assert len(result["codes"]) > 10 and set(result["codes"]) == {0}, done.stderr
    assert result["heavy"] == []
