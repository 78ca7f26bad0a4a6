"""Export recipes: TOML presets (the repo's ``export/`` folder) naming a target, a precision,
target options and verification tolerances. The CLI's defaults come from the presets marked
``default = true``; ``--recipe`` takes a preset name or a user's own file.

A recipe file::

    name = "onnx-fp16"
    target = "onnx"
    precision = "fp16"
    default = true              # the preset used for this target/precision when none is named
    [options]                   # any of the target's options (see `edgevit export --help`)
    opset = 18
    [verify]
    batch = 4                   # verification batch size
    min_cosine = 0.9999         # any of: max_rel_error, min_cosine, min_top1_agreement
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevit.datafiles import data_dir, read_toml
from edgevit.errors import EdgevitError
from edgevit.export import get_target

_TOLERANCE_KEYS = ("max_rel_error", "min_cosine", "min_top1_agreement")
_TOP_KEYS = {"name", "target", "precision", "default", "description", "options", "verify"}


@dataclass(frozen=True)
class Tolerances:
    max_rel_error: float | None = None
    min_cosine: float | None = None
    min_top1_agreement: float | None = None

    def failures(self, figures: dict[str, float]) -> list[str]:
        """The bounds ``figures`` break, as readable phrases."""
        broken = []
        if self.max_rel_error is not None and figures["max_rel_error"] > self.max_rel_error:
            broken.append(f"max relative error {figures['max_rel_error']:.3g} > {self.max_rel_error:g}")
        if self.min_cosine is not None and figures["cosine"] < self.min_cosine:
            broken.append(f"cosine {figures['cosine']:.6f} < {self.min_cosine:g}")
        if self.min_top1_agreement is not None and figures["top1_agreement"] < self.min_top1_agreement:
            broken.append(f"top-1 agreement {figures['top1_agreement']:.3f} < {self.min_top1_agreement:g}")
        return broken


@dataclass(frozen=True)
class Recipe:
    name: str
    target: str
    precision: str
    options: dict[str, Any] = field(default_factory=dict)
    tolerances: Tolerances = Tolerances()
    verify_batch: int = 4
    default: bool = False
    description: str = ""
    source: str = ""

    def with_changes(self, precision: str | None = None, options: dict[str, Any] | None = None,
                     tolerances: dict[str, float] | None = None) -> "Recipe":
        """This recipe with command-line overrides, validated like a file."""
        data = self.to_dict()
        if precision:
            data["precision"] = precision
        data["options"] = {**self.options, **(options or {})}
        data["verify"] = {**data["verify"], **(tolerances or {})}
        return parse_recipe(data, source=self.source + " + command line" if options or tolerances or precision else self.source)

    def to_dict(self) -> dict[str, Any]:
        verify = {k: getattr(self.tolerances, k) for k in _TOLERANCE_KEYS if getattr(self.tolerances, k) is not None}
        return {"name": self.name, "target": self.target, "precision": self.precision,
                "options": dict(self.options), "verify": {"batch": self.verify_batch, **verify},
                "default": self.default, "description": self.description}


def parse_recipe(data: dict[str, Any], source: str) -> Recipe:
    where = f"recipe {source}"
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise EdgevitError(f"{where}: unknown keys {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("name", "target", "precision"):
        if not isinstance(data.get(key), str):
            raise EdgevitError(f"{where}: '{key}' must be a string")
    target = get_target(data["target"])
    if data["precision"] not in target.precisions:
        raise EdgevitError(
            f"{where}: target {target.name} has no precision {data['precision']!r} "
            f"(it offers {', '.join(target.precisions)})"
        )
    options = dict(data.get("options", {}))
    for name, value in options.items():
        spec = target.option(name)
        if spec is None:
            offered = ", ".join(o.name for o in target.options) or "none"
            raise EdgevitError(f"{where}: target {target.name} has no option {name!r} (its options: {offered})")
        if type(value) is not type(spec.default):
            raise EdgevitError(f"{where}: option {name} must be {type(spec.default).__name__}, got {value!r}")
        if spec.minimum is not None and value < spec.minimum:
            raise EdgevitError(f"{where}: option {name} must be at least {spec.minimum}, got {value}")
        if spec.choices and value not in spec.choices:
            raise EdgevitError(f"{where}: option {name} must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
    verify = dict(data.get("verify", {}))
    batch = verify.pop("batch", 4)
    bad = set(verify) - set(_TOLERANCE_KEYS)
    if bad:
        raise EdgevitError(f"{where}: unknown [verify] keys {', '.join(sorted(bad))} (allowed: batch, {', '.join(_TOLERANCE_KEYS)})")
    if not isinstance(batch, int) or batch < 1:
        raise EdgevitError(f"{where}: [verify] batch must be a positive integer")
    return Recipe(
        name=data["name"], target=target.name, precision=data["precision"],
        options={o.name: options.get(o.name, o.default) for o in target.options},
        tolerances=Tolerances(**{k: float(v) for k, v in verify.items()}),
        verify_batch=batch, default=bool(data.get("default", False)),
        description=str(data.get("description", "")), source=source,
    )


def load_recipe_file(path: str | Path) -> Recipe:
    return parse_recipe(read_toml(path, "recipe file"), source=str(path))


def presets() -> dict[str, Recipe]:
    """The recipes shipped in ``export/``, by name."""
    found = {}
    for path in sorted(data_dir("export").glob("*.toml")):
        recipe = load_recipe_file(path)
        found[recipe.name] = recipe
    return found


def resolve_recipe(recipe: str | None, target: str | None, precision: str | None,
                   options: dict[str, Any] | None = None) -> Recipe:
    """The recipe to use: a preset name or file if given; else, for the target and precision,
    the preset whose options match all of ``options`` (``--backend coreml`` finds
    ``executorch-coreml-fp32``), falling back to the default preset."""
    if recipe:
        shipped = presets()
        chosen = shipped.get(recipe) or (load_recipe_file(recipe) if Path(recipe).suffix == ".toml" or Path(recipe).exists() else None)
        if chosen is None:
            raise EdgevitError(f"unknown recipe {recipe!r}: give a .toml file or one of {', '.join(shipped)}")
        if target and target != chosen.target:
            raise EdgevitError(f"recipe {chosen.name} is for target {chosen.target}, not {target}")
        return chosen.with_changes(precision=precision) if precision else chosen
    spec = get_target(target or "onnx")
    precision = precision or spec.default_precision
    if precision not in spec.precisions:
        raise EdgevitError(
            f"target {spec.name} has no precision {precision!r} (it offers {', '.join(spec.precisions)})"
        )
    fitting = [c for c in presets().values() if c.target == spec.name and c.precision == precision]
    if options:
        matching = [c for c in fitting if all(c.options.get(k) == v for k, v in options.items())]
        if matching:
            return min(matching, key=lambda c: not c.default)
    for candidate in fitting:
        if candidate.default:
            return candidate
    raise EdgevitError(f"no default recipe for {spec.name} {precision} in {data_dir('export')}")
