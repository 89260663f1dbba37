"""Recipes: one YAML file that describes a whole ``edgekit compress`` run, checked before anything runs.

A recipe names the checkpoint, the task and every stage's options (prune, export, quantize, the evaluation
data, the accuracy gates, the benchmark, the target devices). ``edgekit compress --recipe edgekit.yaml`` runs
it; options given on the command line override it; ``--dump-recipe`` on any command prints the resolved
recipe that reproduces the run. Every section forbids unknown keys, so a misspelled option is an error that
names the key and its place instead of a silently ignored setting.

Relative paths in a recipe file are resolved against the recipe file's folder, so a recipe committed beside
the model and data works from any working directory. The resolved recipe holds absolute paths.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Literal, Optional, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgekit.errors import EdgekitError

RECIPE_VERSION = 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PruneSection(_Section):
    """Carried to the prune stage (``edgekit.compress.prune.PruneConfig``) when the run prunes."""

    sparsity: Optional[float] = None
    heads: Optional[float] = None
    ffn: Optional[float] = None
    calibration_data: Optional[str] = None  # default in compress: quantize.calibration_data
    calibration_samples: int = Field(256, ge=1)
    seq_len: int = Field(128, ge=1)
    max_length: int = Field(128, ge=1)
    batch_size: int = Field(32, ge=1)
    use_labels: bool = True
    rearrange: bool = True
    refit: bool = True
    recover_steps: int = Field(0, ge=0)
    recover_lr: float = Field(5e-5, gt=0)
    seed: int = 0


class ExportSection(_Section):
    opset: int = Field(18, ge=17)
    atol: float = Field(1e-4, gt=0)


class QuantizeSection(_Section):
    mode: Literal["dynamic", "static"] = "dynamic"
    per_channel: bool = True
    optimize: Optional[bool] = None
    calibration_data: Optional[str] = None
    calibration_samples: int = Field(128, ge=1)
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    text_column: Optional[str] = None
    exclude_nodes: list[str] = Field(default_factory=list)
    exclude_op_types: list[str] = Field(default_factory=list)
    reduce_range: Optional[bool] = None
    symmetric_activations: bool = False
    max_length: int = Field(128, ge=1)


class DataSection(_Section):
    eval: Optional[str] = None  # evaluation data for the gate (and real benchmark lengths)
    text_column: Optional[str] = None
    label_column: Optional[str] = None
    limit: Optional[int] = Field(None, ge=1)
    tsv_quoting: bool = False
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(128, ge=1)


class GatesSection(_Section):
    max_drop: float = 1.0
    max_relative_drop: Optional[float] = None
    min_agreement: Optional[float] = None
    min_cosine: Optional[float] = None


class BenchSection(_Section):
    # Defaults are those of `edgekit compress`, not of `edgekit bench` (a pipeline run benches briefly).
    iterations: int = Field(50, ge=1)
    min_seconds: float = Field(3.0, ge=0)
    warmup: int = Field(10, ge=0)
    round_size: int = Field(10, ge=1)
    batch_size: int = Field(1, ge=1)
    seq_len: Optional[int] = Field(None, ge=1)
    data: Optional[str] = None  # default: the evaluation data's lengths
    text_column: Optional[str] = None
    samples: int = Field(200, ge=1)
    device: str = "cpu"


class Recipe(_Section):
    """A whole compress run. ``threads: null`` means every usable core of the machine that runs it."""

    recipe_version: int = RECIPE_VERSION
    checkpoint: Optional[str] = None
    task: Optional[str] = None
    threads: Optional[int] = Field(None, ge=1)
    prune: Optional[PruneSection] = None
    export: ExportSection = Field(default_factory=ExportSection)
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    data: DataSection = Field(default_factory=DataSection)
    gates: GatesSection = Field(default_factory=GatesSection)
    bench: Optional[BenchSection] = Field(default_factory=BenchSection)
    devices: list[str] = Field(default_factory=list)

    @field_validator("recipe_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != RECIPE_VERSION:
            raise ValueError(f"this edgekit reads recipe_version {RECIPE_VERSION}, not {v}")
        return v

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str | None) -> str | None:
        from edgekit.tasks import TASKS

        if v is not None and v not in TASKS:
            close = difflib.get_close_matches(v, list(TASKS), n=1)
            raise ValueError(f"unknown task '{v}' ({f'did you mean {close[0]!r}?' if close else 'known: ' + ', '.join(TASKS)})")
        return v

    @field_validator("devices")
    @classmethod
    def _known_devices(cls, names: list[str]) -> list[str]:
        from edgekit.devices.profiles import list_profiles

        known = [p.name for p in list_profiles()]
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
                raise ValueError(f"unknown device profile '{name}' ({hint})")
        return names

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def with_values(self, values: dict[str, object]) -> "Recipe":
        """A copy with dotted keys set (``{"quantize.mode": "static", "bench": None}``), validated again."""
        data = self.to_dict()
        for dotted, value in values.items():
            *parents, leaf = dotted.split(".")
            node = data
            for p in parents:
                if node.get(p) is None:
                    node[p] = {}
                node = node[p]
            node[leaf] = value
        return validate_recipe(data, "the resolved options")

    def to_compress_config(self):
        """The ``CompressConfig`` this recipe describes (``cfg.recipe`` keeps the recipe for the report)."""
        from edgekit.pipeline import CompressConfig
        from edgekit.benchmarks.bench import BenchConfig
        from edgekit.compress.quantize import QuantizeConfig
        from edgekit.runtimes.export import ExportConfig
        from edgekit.verify import GateConfig, VerifyConfig

        from edgekit.benchmarks.environment import usable_cores

        threads = self.threads or usable_cores()
        q = self.quantize.model_dump()
        q["text_column"] = q["text_column"] or self.data.text_column
        d = self.data
        cfg = CompressConfig(
            task=self.task,
            export=ExportConfig(task=self.task, opset=self.export.opset, atol=self.export.atol),
            quantize=QuantizeConfig(**q),
            verify=VerifyConfig(data=d.eval or "", text_column=d.text_column, label_column=d.label_column,
                                task=self.task, limit=d.limit, batch_size=d.batch_size, max_length=d.max_length,
                                tsv_quoting=d.tsv_quoting, threads=threads),
            gate=GateConfig(**self.gates.model_dump()),
            bench=BenchConfig(**self.bench.model_dump(), threads=threads) if self.bench is not None else None,
        )
        names = {f.name for f in dataclasses.fields(cfg)}
        if self.prune is not None and "prune" not in names:
            raise EdgekitError("this recipe prunes, but compress here does not run the prune stage",
                               "run `edgekit prune` first, point 'checkpoint' at its output and set 'prune: null'")
        if self.prune is not None:
            from edgekit.compress.prune import PruneConfig

            cfg.prune = PruneConfig(**self.prune.model_dump())
        if "recipe" in names:
            cfg.recipe = self.to_dict()
        return cfg


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested sections as dotted keys: {"quantize": {"mode": "static"}} -> {"quantize.mode": "static"}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _abs(path: str | None, base: Path) -> str | None:
    if path is None or path == "":
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


PATH_FIELDS = ("checkpoint", "data.eval", "quantize.calibration_data", "prune.calibration_data", "bench.data")


def resolve_paths(data: dict, base: Path) -> dict:
    """Make the recipe's path fields absolute, relative ones against ``base``."""
    for dotted in PATH_FIELDS:
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            node[leaf] = _abs(node[leaf], base)
    return data


# ---- errors that name the key -------------------------------------------------------------------------


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The section model that holds the last key of ``loc`` (None inside lists and scalars)."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if isinstance(part, int) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        candidates = [ann, *get_args(ann)] if get_origin(ann) is not None else [ann]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    where = "at top level" if len(loc) == 1 else f"in section '{'.'.join(str(x) for x in loc[:-1])}'"
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        model = _model_at(loc)
        known = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(known)}"
        return f"unknown key '{key}' {where} ({hint})"
    msg = err["msg"].removeprefix("Value error, ").rstrip(".")
    dotted = ".".join(str(x) for x in loc) or "the file"
    if err["type"] in ("model_type", "dict_type"):
        return f"'{dotted}' must be a mapping of keys to values, not {type(err.get('input')).__name__}"
    return f"'{dotted}': {msg} (got {err.get('input')!r})" if "input" in err and err["type"] != "value_error" else f"'{dotted}': {msg}"


def validate_recipe(data: object, origin: str) -> Recipe:
    """A ``Recipe`` from parsed YAML/JSON, or one EdgekitError naming each problem and where it is."""
    if data is None:
        raise EdgekitError(f"{origin} is empty", "write at least 'checkpoint:' and the sections you change")
    if not isinstance(data, dict):
        raise EdgekitError(f"{origin} must be a mapping of sections, not a {type(data).__name__}",
                           "see examples/edgekit.yaml")
    try:
        return Recipe.model_validate(data)
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


def dump_recipe(recipe: Recipe) -> str:
    """YAML in the recipe's own key order (stable), every key present: the resolved recipe."""
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)


def recipe_from_compress_config(cfg, checkpoint=None, devices: list[str] | None = None) -> Recipe:
    """The recipe that reproduces a ``CompressConfig`` (inverse of ``Recipe.to_compress_config``)."""
    q = {f: getattr(cfg.quantize, f) for f in QuantizeSection.model_fields if hasattr(cfg.quantize, f)}
    v = cfg.verify
    data = {"eval": v.data or None, "text_column": v.text_column, "label_column": v.label_column, "limit": v.limit,
            "tsv_quoting": v.tsv_quoting, "batch_size": v.batch_size, "max_length": v.max_length}
    bench = None
    if cfg.bench is not None:
        bench = {f: getattr(cfg.bench, f) for f in BenchSection.model_fields if hasattr(cfg.bench, f)}
    prune = getattr(cfg, "prune", None)
    if prune is not None:
        prune = {f: getattr(prune, f) for f in PruneSection.model_fields if hasattr(prune, f)}
    threads = v.threads if v.threads is not None else getattr(cfg.bench, "threads", None)
    raw = {"checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None, "task": cfg.task, "threads": threads,
           "prune": prune, "export": {"opset": cfg.export.opset, "atol": cfg.export.atol}, "quantize": q,
           "data": data,
           "gates": dataclasses.asdict(cfg.gate), "bench": bench, "devices": list(devices or [])}
    return validate_recipe(resolve_paths(raw, Path.cwd()), "the recipe of this CompressConfig")


def recipe_from_report(report: dict) -> Recipe | None:
    """The recipe a compress ``report.json`` embeds (rebuilt from its config for reports that predate recipes)."""
    config = report.get("config") or {}
    if config.get("recipe"):
        return validate_recipe(config["recipe"], "the recipe embedded in the report")
    if not {"export", "quantize", "verify", "gate"} <= set(config):
        return None
    from edgekit.pipeline import CompressConfig
    from edgekit.benchmarks.bench import BenchConfig
    from edgekit.compress.quantize import QuantizeConfig
    from edgekit.runtimes.export import ExportConfig
    from edgekit.verify import GateConfig, VerifyConfig

    def build(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    cfg = CompressConfig(task=config.get("task"), export=build(ExportConfig, config["export"]),
                         quantize=build(QuantizeConfig, config["quantize"]), verify=build(VerifyConfig, config["verify"]),
                         gate=build(GateConfig, config["gate"]),
                         bench=build(BenchConfig, config["bench"]) if config.get("bench") else None)
    return recipe_from_compress_config(cfg, report.get("source"))
