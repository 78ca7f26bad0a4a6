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
    [quantization]              # precision "int8" only
    mode = "static"             # dynamic | static | qat
    method = "minmax"           # minmax | percentile | entropy (static, qat)
    per_channel = true
    calibration_images = 64     # sample size drawn from --calib-data
    float_ops = ["softmax"]     # replaces the family's default (edgevit.quant.recipes)
    float_modules = ["head"]    # module-name patterns kept float, added to the family's default
    full_range_weights = 8      # ONNX: layers keeping full 8-bit (uint8) weights, most hurt first
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevit.core.datafiles import data_dir, read_toml
from edgevit.core.errors import EdgevitError
from edgevit.quant.spec import check_choices
from edgevit.targets import get_target
from edgevit.verify import TOLERANCE_KEYS, Tolerances

_TOP_KEYS = {"name", "target", "precision", "default", "description", "options", "verify", "quantization"}
# [quantization] keys and their types; absent keys take the family's defaults (edgevit.quant.recipes).
_QUANT_KEYS = {"mode": str, "method": str, "per_channel": bool, "calibration_images": int,
               "float_ops": list, "float_modules": list, "full_range_weights": int}


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
    quantization: dict[str, Any] = field(default_factory=dict)  # the [quantization] table (int8 only)

    def with_changes(self, precision: str | None = None, options: dict[str, Any] | None = None,
                     tolerances: dict[str, float] | None = None,
                     quantization: dict[str, Any] | None = None) -> "Recipe":
        """This recipe with command-line overrides, validated like a file."""
        data = self.to_dict()
        if precision:
            data["precision"] = precision
        data["options"] = {**self.options, **(options or {})}
        data["verify"] = {**data["verify"], **(tolerances or {})}
        if quantization:
            data["quantization"] = {**self.quantization, **quantization}
        changed = options or tolerances or precision or quantization
        return parse_recipe(data, source=self.source + " + command line" if changed else self.source)

    def to_dict(self) -> dict[str, Any]:
        verify = {k: getattr(self.tolerances, k) for k in TOLERANCE_KEYS if getattr(self.tolerances, k) is not None}
        data = {"name": self.name, "target": self.target, "precision": self.precision,
                "options": dict(self.options), "verify": {"batch": self.verify_batch, **verify},
                "default": self.default, "description": self.description}
        if self.quantization:
            data["quantization"] = dict(self.quantization)
        return data


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
    bad = set(verify) - set(TOLERANCE_KEYS)
    if bad:
        raise EdgevitError(f"{where}: unknown [verify] keys {', '.join(sorted(bad))} (allowed: batch, {', '.join(TOLERANCE_KEYS)})")
    if not isinstance(batch, int) or batch < 1:
        raise EdgevitError(f"{where}: [verify] batch must be a positive integer")
    quantization = _parse_quantization(data.get("quantization"), data["precision"], target, where)
    return Recipe(
        name=data["name"], target=target.name, precision=data["precision"], quantization=quantization,
        options={o.name: options.get(o.name, o.default) for o in target.options},
        tolerances=Tolerances(**{k: float(v) for k, v in verify.items()}),
        verify_batch=batch, default=bool(data.get("default", False)),
        description=str(data.get("description", "")), source=source,
    )


def _parse_quantization(table: Any, precision: str, target, where: str) -> dict[str, Any]:
    if table is None:
        if precision == "int8":
            raise EdgevitError(f"{where}: an int8 recipe needs a [quantization] table with at least mode = ...")
        return {}
    if precision != "int8":
        raise EdgevitError(f"{where}: [quantization] applies to precision int8 only, not {precision}")
    if not isinstance(table, dict):
        raise EdgevitError(f"{where}: [quantization] must be a table")
    unknown = set(table) - set(_QUANT_KEYS)
    if unknown:
        raise EdgevitError(f"{where}: unknown [quantization] keys {', '.join(sorted(unknown))} "
                           f"(allowed: {', '.join(_QUANT_KEYS)})")
    for key, kind in _QUANT_KEYS.items():
        if key in table and type(table[key]) is not kind:
            raise EdgevitError(f"{where}: [quantization] {key} must be {kind.__name__}, got {table[key]!r}")
    mode = table.get("mode")
    check_choices(mode, table.get("method"), table.get("float_ops"), where)
    if mode not in target.quant_modes:
        raise EdgevitError(f"{where}: target {target.name} has no {mode} quantization "
                           f"(it offers {', '.join(target.quant_modes) or 'none'})")
    if table.get("calibration_images", 1) < 1:
        raise EdgevitError(f"{where}: [quantization] calibration_images must be at least 1")
    if "full_range_weights" in table and (table["full_range_weights"] < 0 or target.name != "onnx"):
        raise EdgevitError(f"{where}: [quantization] full_range_weights is a count >= 0 for the onnx target only "
                           f"(got {table['full_range_weights']} for {target.name})")
    return dict(table)


def load_recipe_file(path: str | Path) -> Recipe:
    return parse_recipe(read_toml(path, "recipe file"), source=str(path))


def presets() -> dict[str, Recipe]:
    """The recipes shipped in ``export/``, by name."""
    found = {}
    for path in sorted(data_dir("export").glob("*.toml")):
        recipe = load_recipe_file(path)
        found[recipe.name] = recipe
    return found


def resolve_recipe(recipe: "str | Recipe | None", target: str | None, precision: str | None,
                   options: dict[str, Any] | None = None, mode: str | None = None) -> Recipe:
    """The recipe to use: a preset name or file if given; else, for the target and precision,
    the preset whose options (and quantization ``mode``) match (``--backend coreml`` finds
    ``executorch-coreml-fp32``), falling back to the default preset. A ``mode`` no preset has
    is set on the default int8 preset, and checked against the target's modes."""
    if mode and precision not in (None, "int8"):
        raise EdgevitError(f"quantization mode {mode} makes int8 artifacts; it cannot be combined with precision {precision}")
    if isinstance(recipe, Recipe):  # already resolved (the quantize API adjusts one, then exports)
        return _with_mode(recipe, mode)
    if recipe:
        shipped = presets()
        chosen = shipped.get(recipe) or (load_recipe_file(recipe) if Path(recipe).suffix == ".toml" or Path(recipe).exists() else None)
        if chosen is None:
            raise EdgevitError(f"unknown recipe {recipe!r}: give a .toml file or one of {', '.join(shipped)}")
        if target and target != chosen.target:
            raise EdgevitError(f"recipe {chosen.name} is for target {chosen.target}, not {target}")
        if mode and chosen.precision != "int8":
            raise EdgevitError(f"recipe {chosen.name} is {chosen.precision}; quantization needs an int8 recipe")
        chosen = chosen.with_changes(precision=precision) if precision and precision != chosen.precision else chosen
        return _with_mode(chosen, mode)
    spec = get_target(target or "onnx")
    precision = precision or ("int8" if mode else spec.default_precision)
    if precision not in spec.precisions:
        raise EdgevitError(
            f"target {spec.name} has no precision {precision!r} (it offers {', '.join(spec.precisions)})"
        )
    if mode and mode not in spec.quant_modes:
        raise EdgevitError(f"target {spec.name} has no {mode} quantization (it offers {', '.join(spec.quant_modes) or 'none'})")
    fitting = [c for c in presets().values() if c.target == spec.name and c.precision == precision]
    if mode:
        fitting = [c for c in fitting if c.quantization.get("mode") == mode] or fitting
    if options:
        matching = [c for c in fitting if all(c.options.get(k) == v for k, v in options.items())]
        if matching:
            return _with_mode(min(matching, key=lambda c: not c.default), mode)
    for candidate in sorted(fitting, key=lambda c: not c.default):
        return _with_mode(candidate, mode)
    raise EdgevitError(f"no default recipe for {spec.name} {precision} in {data_dir('export')}")


def _with_mode(recipe: Recipe, mode: str | None) -> Recipe:
    """``recipe`` in quantization ``mode``; named for it (``onnx-int8`` in qat: ``onnx-int8-qat``, as
    the shipped ``onnx-int8-dynamic`` is), so its bundle does not replace the preset's."""
    if not mode or recipe.quantization.get("mode") == mode:
        return recipe
    return dataclasses.replace(recipe.with_changes(quantization={"mode": mode}), name=f"{recipe.name}-{mode}")
