"""Recipes on the command line: ``--dump-recipe`` on every command, ``--recipe`` on ``compress``.

``install(main)`` is called once at the bottom of ``edgekit/cli.py``. It adds ``--dump-recipe`` to every
command of the pipeline (export, quantize, verify, bench, compress, demo, prune, release, gate),
``--recipe FILE`` to ``compress``, and wraps each callback so that, before the command runs:

- the resolved recipe is built: the ``--recipe`` file (or the defaults), then every option given on the
  command line on top (``ctx.get_parameter_source`` tells given options from defaults);
- with ``--dump-recipe`` it is printed as YAML and the command exits 0 having run nothing (so ``-o`` and
  compress's CHECKPOINT are not required then);
- otherwise it is kept in ``ctx.meta`` for the command: ``compress`` runs exactly
  ``resolved.to_compress_config()`` (see ``compress_config_from_context``) and ``--json`` reports embed it.

Only click is imported here at module level (``edgekit --help`` must stay light).
"""

from __future__ import annotations

import functools
from pathlib import Path

import click
from click.core import ParameterSource

META_KEY = "edgekit.recipe"
EXPLICIT = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)

_QUANTIZE = ("mode", "per_channel", "optimize", "calibration_data", "calibration_samples", "calibration_method",
             "exclude_nodes", "exclude_op_types", "reduce_range", "symmetric_activations")
# option name -> recipe keys it sets; per-command tables override the common one.
COMMON: dict[str, tuple[str, ...]] = {
    "task": ("task",), "threads": ("threads",), "data": ("data.eval",), "text_column": ("data.text_column",),
    "label_column": ("data.label_column",), "tsv_quoting": ("data.tsv_quoting",), "limit": ("data.limit",),
    "max_drop": ("gates.max_drop",), "max_relative_drop": ("gates.max_relative_drop",),
    "min_agreement": ("gates.min_agreement",), "min_cosine": ("gates.min_cosine",),
    "opset": ("export.opset",), "atol": ("export.atol",), **{k: (f"quantize.{k}",) for k in _QUANTIZE},
}
PER_COMMAND: dict[str, dict[str, tuple[str, ...]]] = {
    "export": {"checkpoint": ("checkpoint",)},
    "quantize": {"text_column": ("data.text_column", "quantize.text_column")},
    "verify": {"original": ("checkpoint",), "batch_size": ("data.batch_size",)},
    "bench": {"data": ("bench.data",), "text_column": ("bench.text_column",),
              **{k: (f"bench.{k}",) for k in ("iterations", "min_seconds", "warmup", "batch_size", "seq_len",
                                               "samples", "device")}},
    "compress": {"checkpoint": ("checkpoint",), "text_column": ("data.text_column", "quantize.text_column"),
                 "bench_iterations": ("bench.iterations",), "bench_min_seconds": ("bench.min_seconds",),
                 "prune_sparsity": ("prune.sparsity",), "prune_recover_steps": ("prune.recover_steps",)},
    "prune": {"checkpoint": ("checkpoint",), "calibration_samples": ("prune.calibration_samples",),
              "calibration_data": ("prune.calibration_data",), "no_labels": ("prune.use_labels",),
              "no_rearrange": ("prune.rearrange",), "no_refit": ("prune.refit",),
              **{k: (f"prune.{k}",) for k in ("sparsity", "heads", "ffn", "seq_len", "recover_steps", "recover_lr")}},
}
NEGATED = {"no_labels", "no_rearrange", "no_refit"}  # --no-X flags that set a positive recipe key
NO_RECIPE = {"release build", "release verify", "gate", "demo"}  # recipes read from their inputs
# Commands that are (part of) a compress run; others (devices, engine, ...) have no recipe to print.
RECIPE_COMMANDS = {"export", "quantize", "verify", "bench", "compress", "prune"} | NO_RECIPE


def _value(key: str, value):
    if key in ("quantize.exclude_nodes", "quantize.exclude_op_types"):
        return [x.strip() for v in value or () for x in str(v).split(",") if x.strip()]
    if isinstance(value, tuple):
        return list(value)
    return value


def _option_values(name: str, params: dict, explicit: set[str] | None) -> dict:
    """Recipe keys set by the command's options (only the explicit ones when ``explicit`` is given)."""
    table = {**COMMON, **PER_COMMAND.get(name, {})}
    values = {}
    for param, value in params.items():
        if param in table and (explicit is None or param in explicit):
            for key in table[param]:
                values[key] = not value if param in NEGATED else _value(key, value)
    if "do_bench" in params and (explicit is None or "do_bench" in explicit) and not params["do_bench"]:
        values = {k: v for k, v in values.items() if not k.startswith("bench.")}
        values["bench"] = None
    if name == "compress" and params.get("prune_sparsity") is None:
        # compress prunes only with --prune (or a recipe's prune section); never create an empty section
        values.pop("prune.sparsity", None)
        if explicit is None or "prune_recover_steps" not in explicit:
            values.pop("prune.recover_steps", None)
    return values


def _checkpoint_of(name: str, params: dict) -> str | None:
    """The checkpoint a single-stage command starts from, where there is one."""
    from edgekit.runtimes.base import artifact_kind, read_artifact_meta

    candidates = {"quantize": [params.get("model")], "bench": list(params.get("models") or ())}.get(name, [])
    for c in candidates:
        p = Path(c) if c else None
        if p is None or not p.exists():
            continue
        try:
            if artifact_kind(p) == "checkpoint":
                return str(p)
        except Exception:  # not a model folder: the command itself will say so
            continue
        if name == "quantize":
            return params.get("original") or read_artifact_meta(p).get("source")
    return None


def resolve(name: str, params: dict, ctx: click.Context):
    """The resolved recipe of command ``name`` invoked with ``params``."""
    from edgekit.recipe import PATH_FIELDS, Recipe, _abs, load_recipe

    if name == "demo":
        from edgekit.pipeline import demo_checkpoint, demo_config
        from edgekit.errors import EdgekitError
        from edgekit.recipe import recipe_from_compress_config

        try:
            ckpt = demo_checkpoint()
        except EdgekitError:  # the demo extra is missing; the recipe is still worth showing
            ckpt = None
        return recipe_from_compress_config(demo_config(params.get("threads")), ckpt)
    if name in NO_RECIPE:
        from edgekit.release.bundle import recipe_of

        return recipe_of(params.get("run_dir") or params.get("path") or params.get("current"))
    recipe_path = params.get("recipe_path")
    explicit = {p for p in params if ctx.get_parameter_source(p) in EXPLICIT} if recipe_path else None
    base = load_recipe(recipe_path) if recipe_path else Recipe()
    values = _option_values(name, params, explicit)
    if "checkpoint" not in values and (ck := _checkpoint_of(name, params)):
        values["checkpoint"] = ck
    for key in PATH_FIELDS:  # relative paths given on the command line are relative to where it runs
        if isinstance(values.get(key), str):
            values[key] = _abs(values[key], Path.cwd())
    return base.with_values(values)


def _wrap(cmd: click.Command, name: str) -> None:
    original = cmd.callback
    relaxed = []
    for p in cmd.params:  # needed to run, not to print the recipe: checked below instead
        if p.required and (p.name == "output" or (name == "compress" and p.name == "checkpoint")):
            p.required = False
            relaxed.append(p)

    @functools.wraps(original)
    def callback(*args, **kwargs):
        from edgekit.recipe import dump_recipe

        ctx = click.get_current_context()
        dump = kwargs.pop("dump_recipe", False)
        if name in NO_RECIPE and not dump:  # their reports carry the recipe of their inputs already
            return original(*args, **kwargs)
        recipe = resolve(name, kwargs, ctx)
        kwargs.pop("recipe_path", None)
        if dump:
            click.echo(dump_recipe(recipe), nl=False)
            ctx.exit(0)
        if name == "compress" and kwargs.get("checkpoint") is None:
            kwargs["checkpoint"] = recipe.checkpoint
        for p in relaxed:
            if kwargs.get(p.name) is None:
                if p.name == "checkpoint":
                    from edgekit.errors import EdgekitError

                    raise EdgekitError("compress needs a checkpoint", "pass CHECKPOINT, or --recipe FILE with 'checkpoint:'")
                raise click.MissingParameter(ctx=ctx, param=p)
        ctx.meta[META_KEY] = recipe
        return original(*args, **kwargs)

    cmd.callback = callback
    cmd.params.append(click.Option(["--dump-recipe"], is_flag=True,
                                   help="Print the resolved recipe (YAML) that reproduces this run, and exit."))
    if name == "compress":
        cmd.params.insert(0, click.Option(["--recipe", "recipe_path"], type=click.Path(dir_okay=False),
                                          help="Run the recipe in this YAML file; options given here override it."))


def install(group: click.Group, prefix: str = "") -> None:
    """Give the pipeline's commands (``RECIPE_COMMANDS``) ``--dump-recipe``; ``compress`` also ``--recipe``."""
    for name, cmd in group.commands.items():
        full = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            install(cmd, f"{full} ")
        elif full in RECIPE_COMMANDS and not any(p.name == "dump_recipe" for p in cmd.params):
            _wrap(cmd, full)


def current_recipe():
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if META_KEY in ctx.meta:
            return ctx.meta[META_KEY]
        ctx = ctx.parent
    return None


def compress_config_from_context(cfg):
    """``compress``: the run is exactly the resolved recipe (it already holds every option given here).

    Fields of ``cfg`` the recipe does not describe are kept as the command built them.
    """
    import dataclasses

    recipe = current_recipe()
    if recipe is None:
        return cfg
    resolved = recipe.to_compress_config()
    described = {"task", "export", "quantize", "verify", "gate", "bench", "recipe"} | (
        {"prune"} if recipe.prune is not None else set())
    for f in dataclasses.fields(cfg):
        if f.name not in described:
            setattr(resolved, f.name, getattr(cfg, f.name))
    return resolved


def embed_recipe(report_dict: dict) -> dict:
    """The report with the resolved recipe under ``recipe`` (unless it already carries one in its config)."""
    recipe = current_recipe()
    if recipe is None or "recipe" in report_dict or "recipe" in (report_dict.get("config") or {}):
        return report_dict
    return {**report_dict, "recipe": recipe.to_dict()}
