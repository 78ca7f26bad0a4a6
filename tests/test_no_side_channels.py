"""What export() made reaches precheck() through its ExportResult, not through module-level
caches keyed by model objects (which outlive the export and tie two calls together unseen)."""
from __future__ import annotations

import ast
from pathlib import Path

import edgevit


def _module_level_caches(source: str) -> list[str]:
    """Module-level weak maps, and names bound to an empty dict (a table filled at run time)."""
    found = []
    for node in ast.parse(source).body:
        text = ast.unparse(node)
        if isinstance(node, (ast.Import, ast.ImportFrom)) and "weakref" in text:
            found.append(text)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            value = ast.unparse(node.value)
            if "Weak" in value or value in ("{}", "dict()") or value.startswith(("collections.defaultdict", "defaultdict")):
                found.append(text)
    return found


def test_the_check_sees_a_cache():
    assert _module_level_caches("import weakref\n_SEEN: dict = {}\nTABLE = {'a': 1}\n") == ["import weakref", "_SEEN: dict = {}"]


# Registration tables, filled once at import by @register_model (timm's pattern): they hold
# constructors, never a model, a program or a path.
REGISTRIES = {"models/registry.py": ["_FAMILIES: dict[str, Family] = {}", "_MODELS: dict[str, _Entry] = {}"]}


def test_no_module_level_caches_of_models_programs_or_paths():
    package = Path(edgevit.__file__).parent
    offenders = {str(p.relative_to(package)): found for p in sorted(package.rglob("*.py"))
                 if (found := _module_level_caches(p.read_text()))}
    assert offenders == REGISTRIES
