"""Recipes: one YAML file that describes a whole ``edgekit compress`` run, checked before anything runs.

A recipe names the checkpoint, the task and every stage's options (prune, export, quantize, the evaluation
data, the accuracy gates, the benchmark, the target devices). ``edgekit compress --recipe edgekit.yaml`` runs
it; options given on the command line override it; ``--dump-recipe`` on any command prints the resolved
recipe that reproduces the run. Every section forbids unknown keys, so a misspelled option is an error that
names the key and its place instead of a silently ignored setting.

Relative paths in a recipe file are resolved against the recipe file's folder, so a recipe committed beside
the model and data works from any working directory. The resolved recipe holds absolute paths; a dumped one
(``--dump-recipe``, ``--dump-recipe-to FILE``) holds them relative to the folder it is written for wherever
they lie in that folder's tree, so a recipe travels with a checkout. Choices a run leaves to the machine
(``threads``, ``quantize.reduce_range``) are made once by compress and recorded in its report's recipe.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from pydantic import BaseModel, ValidationError

from edgekit.errors import EdgekitError
from edgekit.pipeline import (RECIPE_VERSION, CompressConfig, relative_paths as _relative_paths,
                              resolve_paths as _resolve_paths, section_class)

Recipe = CompressConfig  # a recipe is a CompressConfig written as YAML
__all__ = ["RECIPE_VERSION", "Recipe", "load_recipe", "dump_recipe", "validate_recipe", "with_values", "flatten",
           "recipe_from_report", "recipe_from_compress_config"]

def with_values(recipe: CompressConfig, values: dict[str, object]) -> CompressConfig:
    """A copy with dotted recipe keys set (``{"quantize.mode": "static", "bench": None}``), validated again."""
    data = recipe.to_recipe()
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
        node[leaf] = value
    return validate_recipe(data, "the resolved options")


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested sections as dotted keys: {"quantize": {"mode": "static"}} -> {"quantize.mode": "static"}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


PATH_FIELDS = tuple(CompressConfig.path_keys())


def recipe_inputs(recipe) -> list[str]:
    """The paths a resolved recipe reads (checkpoint, base, data and calibration files): inputs for the path
    guard, wherever they were named (command line or recipe file)."""
    return [v for k, v in flatten(recipe.to_recipe()).items() if k in PATH_FIELDS and isinstance(v, str) and v]


def resolve_paths(data: dict, base: Path) -> dict:
    """Make the recipe's path fields absolute, relative ones against ``base``."""
    return _resolve_paths(data, base, PATH_FIELDS)


# ---- errors that name the key -------------------------------------------------------------------------


def _fields_by_key(model: type[BaseModel]) -> dict[str, str]:
    """recipe key (the alias where there is one) -> field name."""
    return {(f.alias or name): name for name, f in model.model_fields.items()}


def _known_keys(model: type[BaseModel]) -> list[str]:
    if model is CompressConfig:
        return list(_fields_by_key(model))
    return list(model.recipe_fields().values())


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The section model that holds the last key of ``loc`` (None inside lists and scalars)."""
    if len(loc) == 1:
        return CompressConfig
    if len(loc) == 2 and isinstance(loc[0], str):
        name = _fields_by_key(CompressConfig).get(loc[0])
        try:
            return section_class(name) if name else None
        except StopIteration:
            return None
    return None


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    where = "at top level" if len(loc) == 1 else f"in section '{'.'.join(str(x) for x in loc[:-1])}'"
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        model = _model_at(loc)
        known = _known_keys(model) if model is not None else []
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(known)}"
        return f"unknown key '{key}' {where} ({hint})"
    msg = err["msg"].removeprefix("Value error, ").rstrip(".")
    dotted = ".".join(str(x) for x in loc) or "the file"
    if err["type"] in ("model_type", "dict_type"):
        return f"'{dotted}' must be a mapping of keys to values, not {type(err.get('input')).__name__}"
    return f"'{dotted}': {msg} (got {err.get('input')!r})" if "input" in err and err["type"] != "value_error" else f"'{dotted}': {msg}"


def validate_recipe(data: object, origin: str) -> CompressConfig:
    """A ``CompressConfig`` from parsed YAML/JSON, or one EdgekitError naming each problem and where it is."""
    if data is None:
        raise EdgekitError(f"{origin} is empty", "write at least 'checkpoint:' and the sections you change")
    if not isinstance(data, dict):
        raise EdgekitError(f"{origin} must be a mapping of sections, not a {type(data).__name__}",
                           "see examples/edgekit.yaml")
    try:
        return CompressConfig.model_validate(data)
    except ValidationError as e:
        problems = [_describe(err) for err in e.errors()]
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise EdgekitError(f"{origin}: " + "; ".join(problems[:3]) + more,
                           "fix the recipe (see examples/edgekit.yaml for every key)") from None


def load_recipe(path) -> Recipe:
    """Read and validate a YAML recipe; relative paths are resolved against the file's folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"the recipe {path} does not exist", "check the path given to --recipe")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise EdgekitError(f"recipe {path.name} is not valid YAML{where} ({problem})", "fix the YAML syntax") from None
    except UnicodeDecodeError:
        raise EdgekitError(f"recipe {path.name} is not UTF-8 text", "save it as UTF-8 YAML") from None
    if isinstance(data, dict):
        data = resolve_paths(data, path.resolve().parent)
    return validate_recipe(data, f"recipe {path.name}")


def dump_recipe(recipe: CompressConfig, relative_to=None) -> str:
    """YAML in the recipe's own key order (stable), every key present: the resolved recipe. With
    ``relative_to`` (the folder the recipe file will sit in), paths inside that folder's tree are written
    relative to it, so the recipe keeps working when the tree is checked out or copied elsewhere."""
    import yaml

    data = recipe.to_recipe()
    if relative_to is not None:
        data = _relative_paths(data, Path(relative_to).resolve(), PATH_FIELDS)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def recipe_from_compress_config(cfg: CompressConfig, checkpoint=None, devices: list[str] | None = None) -> CompressConfig:
    """The recipe of a run of ``cfg`` on ``checkpoint``: the config itself, with the checkpoint and absolute paths."""
    if devices is not None:
        cfg = cfg.model_copy(update={"devices": list(devices)})
    return cfg.resolved(Path(checkpoint).resolve() if checkpoint else None)


def recipe_from_report(report: dict) -> CompressConfig | None:
    """The recipe a compress ``report.json`` embeds (None for reports that predate recipes)."""
    recipe = (report.get("config") or {}).get("recipe")
    return validate_recipe(recipe, "the recipe embedded in the report") if recipe else None
