"""Each option is declared once: as a field of its stage's typed config.

A stage config (``ExportConfig``, ``QuantizeConfig``, ``PruneConfig``, ``VerifyConfig``, ``GateConfig``,
``BenchConfig``) is a pydantic model whose fields are declared with :func:`option`. That one declaration
carries the default, the constraints, the help text, the command-line spelling and the field's place in a
recipe; the Click options (``edgekit.cli.options``), the recipe schema and ``--dump-recipe``
(``edgekit.pipeline.CompressConfig`` and ``edgekit.recipe``) and the Python API are all derived from it,
in the spirit of Polygraphy's argument groups. Adding a field to a config adds it everywhere.

Two kinds of field are set apart:

- *run-wide* fields (``task``, ``threads``): the same value for every stage of a run. They are declared once
  here (:func:`task_option`, :func:`threads_option`), appear once at the top of a recipe and once on a
  command line, and are handed to every stage config that has them.
- *command-only* fields (``recipe=False``): how one command runs (the candidate's runtime in ``verify``, the
  data ``export`` validates on) rather than part of a compress recipe.

Only pydantic is imported here (``edgekit --help`` must stay light).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

META = "edgekit"  # key of the option metadata in json_schema_extra


def option(default: Any = None, help: str = "", *, flag: str | None = None, cli: bool = True, recipe: bool = True,
           run_wide: bool = False, metavar: str | None = None, recipe_key: str | None = None, choices=None,
           path: bool = False, fraction: bool = False, between: tuple | None = None, unit: str = "",
           default_factory=None, **constraints) -> Any:
    """A config field that is also a command-line option and a recipe key.

    ``flag``: the command-line spelling when it is not ``--field-name`` (``"--per-channel/--per-tensor"``
    for a boolean pair); ``cli=False``: not on the command line; ``recipe=False``: not in a recipe;
    ``recipe_key``: the key in the recipe section when it differs from the field name; ``choices``: a
    callable giving the allowed values of a string field whose list lives in a table elsewhere (tasks);
    ``path``: a file or folder (a recipe resolves it against its own folder); ``fraction``: a float also
    written as a percentage (``10%``), see :func:`parse_fraction`; ``between``: ``(low, high)``, the closed
    range of a number field (``high`` None: no upper bound), checked with a sentence that states the range
    (pydantic's ge/le messages name one bound only) and refusing nan and inf, so it holds for recipes too;
    ``unit`` is named after the range (" points", "%"). With ``between``, ``gt=low`` makes the low end open
    (checked by the same sentence, not by pydantic's).
    """
    low_open = between is not None and constraints.get("gt") == between[0]
    if low_open:
        constraints.pop("gt")
    meta = {"flag": flag, "cli": cli, "recipe": recipe, "run_wide": run_wide, "metavar": metavar,
            "recipe_key": recipe_key, "choices": choices, "path": path, "fraction": fraction,
            "between": between, "unit": unit, "low_open": low_open}
    extra = {META: meta}
    if recipe_key:  # a recipe spells it differently; the Python API keeps the field name (populate_by_name)
        constraints.setdefault("alias", recipe_key)
    if default_factory is not None:
        return Field(default_factory=default_factory, description=help, json_schema_extra=extra, **constraints)
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def task_option() -> Any:
    return option(None, "Override the task detected from config.json.", run_wide=True, choices=task_names)


def task_names() -> list[str]:
    from edgekit.tasks import TASKS  # the one table of tasks

    return list(TASKS)


def trust_remote_code_option() -> Any:
    # Command-only (recipe=False): consent to run a checkpoint's own code is given on the command line of
    # each run, never inherited from a recipe file someone else may have written.
    return option(False, "Allow a checkpoint that ships its own Python code (auto_map) to run it; off: such a "
                         "checkpoint is refused.", recipe=False)


def base_option() -> Any:
    return option(None, "For a LoRA/PEFT adapter folder: the base model's checkpoint folder (default: the local "
                        "folder the adapter records).", path=True, run_wide=True)


def threads_option() -> Any:
    return option(None, "Threads for every runtime (default: all cores).", run_wide=True, ge=1)


class StageConfig(BaseModel):
    """Base of the stage configs: unknown keys are refused (a misspelled option is an error, not ignored)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=False)

    @model_validator(mode="after")
    def _known_choices(self):
        for name in type(self).model_fields:
            choices = type(self).meta(name).get("choices")
            value = getattr(self, name)
            if choices is not None and value is not None and value not in choices():
                import difflib

                close = difflib.get_close_matches(str(value), choices(), n=1)
                hint = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(choices())
                raise ValueError(f"unknown {name} '{value}' ({hint})")
        return self

    @model_validator(mode="after")
    def _in_range(self):
        import math

        for name in type(self).model_fields:
            meta = type(self).meta(name)
            value = getattr(self, name)
            if meta.get("between") is None or value is None:
                continue
            low, high = meta["between"]
            open_low = meta.get("low_open")
            below = value <= low if open_low else value < low
            if isinstance(value, bool) or not math.isfinite(value) or below or (high is not None and value > high):
                spelled = (meta.get("flag") or f"--{name.replace('_', '-')}").split("/")[0]
                unit = meta.get("unit", "")
                if high is None:
                    valid = f"above {low}{unit}" if open_low else f"of at least {low}{unit}"
                else:
                    valid = f"above {low} and at most {high}{unit}" if open_low else f"from {low} to {high}{unit}"
                kind = "an integer" if isinstance(value, int) and not isinstance(value, bool) else "a finite number"
                raise ValueError(f"{name} ({spelled}) must be {kind} {valid}, not {value!r}")
        return self

    @classmethod
    def meta(cls, name: str) -> dict:
        extra = cls.model_fields[name].json_schema_extra or {}
        return dict(extra.get(META) or {}) if isinstance(extra, dict) else {}

    @classmethod
    def recipe_fields(cls) -> dict[str, str]:
        """field name -> recipe key, for the fields a recipe section holds (not run-wide, not command-only)."""
        out = {}
        for name in cls.model_fields:
            m = cls.meta(name)
            if m.get("recipe", True) and not m.get("run_wide"):
                out[name] = m.get("recipe_key") or name
        return out

    @classmethod
    def path_fields(cls) -> list[str]:
        return [n for n in cls.model_fields if cls.meta(n).get("path")]

    @classmethod
    def run_wide_fields(cls) -> list[str]:
        return [n for n in cls.model_fields if cls.meta(n).get("run_wide")]

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def not_in_recipe(cls) -> set[str]:
        """Field names a recipe section leaves out (run-wide ones sit at the recipe's top; command-only ones)."""
        return set(cls.model_fields) - set(cls.recipe_fields())

    def to_section(self) -> dict:
        """This config as its recipe section (recipe keys, in field order)."""
        return self.model_dump(mode="json", by_alias=True, exclude=self.not_in_recipe())

    def replace(self, **changes) -> "StageConfig":
        """A validated copy with some fields changed (``dataclasses.replace`` for configs)."""
        return type(self)(**{**self.model_dump(), **changes})



def config_error(where: str, e: ValidationError):
    """One EdgekitError sentence for a pydantic ValidationError of a config (the CLI turns these into exit 2)."""
    from edgekit.errors import EdgekitError

    problems = []
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ").rstrip(".")
        got = f" (got {err['input']!r})" if "input" in err and err["type"] != "value_error" else ""
        problems.append(f"{field}: {msg}{got}" if field else f"{msg}{got}")
    return EdgekitError(f"{where}: " + "; ".join(problems[:3]), "fix the value")


def parse_fraction(value):
    """'10%' or '0.1' (or 0.1) -> 0.1; a ValueError naming the value otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        f = float(value)
    else:
        text = str(value).strip()
        try:
            f = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a fraction: write 10% or 0.1") from None
    if f < 0:
        raise ValueError(f"{value!r} must not be negative")
    return f
