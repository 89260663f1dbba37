"""Recipes on the command line: ``--dump-recipe`` on every command, ``--recipe`` on ``compress``.

``install(main)`` is called once at the bottom of ``edgekit/cli/__init__.py``. It adds ``--dump-recipe`` to every
command of the pipeline (export, quantize, verify, bench, compress, demo, prune, release, gate),
``--recipe FILE`` to ``compress``, and wraps each callback so that, before the command runs:

- the resolved recipe is built: the ``--recipe`` file (or the defaults), then every option given on the
  command line on top (``ctx.get_parameter_source`` tells given options from defaults);
- with ``--dump-recipe`` it is printed as YAML and the command exits 0 having run nothing (so ``-o`` and
  compress's CHECKPOINT are not required then);
- otherwise it is kept in ``ctx.meta`` for the command: ``compress`` runs exactly the resolved recipe (a
  ``CompressConfig``) and ``--json`` reports embed it.

Which recipe key an option sets is not written here: each option derived from a stage config knows it
(``edgekit.cli.options.ConfigOption``).

Only click is imported here at module level (``edgekit --help`` must stay light).
"""

from __future__ import annotations

import functools
from pathlib import Path

import click
from click.core import ParameterSource

from edgekit.cli.common import META_KEY

EXPLICIT = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)

# The checkpoint argument of the commands that name one (others find it in their inputs: _checkpoint_of).
CHECKPOINT_ARGUMENT = {"export": "checkpoint", "compress": "checkpoint", "prune": "checkpoint", "verify": "original",
                       "search": "checkpoint"}
NO_RECIPE = {"release build", "release verify", "gate", "demo"}  # recipes read from their inputs
# Commands that are (part of) a compress run; others (devices, engine, ...) have no recipe to print.
# search's recipe is the base every trial starts from (--recipe FILE, the options given on top).
RECIPE_COMMANDS = {"export", "quantize", "verify", "bench", "compress", "prune", "search"} | NO_RECIPE


def _option_values(cmd: click.Command, name: str, params: dict, explicit: set[str] | None) -> dict:
    """Recipe keys set by the command's options (only the explicit ones when ``explicit`` is given).

    Every option derived from a stage config (``edgekit.cli.options.ConfigOption``) knows its recipe key, so
    no table maps options to keys here.
    """
    from edgekit.cli.options import ConfigOption

    values = {}
    for p in cmd.params:
        if not isinstance(p, ConfigOption) or p.recipe_key is None or p.name not in params:
            continue
        if explicit is not None and p.name not in explicit:
            continue
        value = p.config_value(params[p.name])
        values[p.recipe_key] = value
        if p.recipe_key == "data.text_column" and "quantize.text_column" not in values:
            values["quantize.text_column"] = value  # the calibration text is read like the evaluation data
    if name == "bench":  # bench's --data and --text-column are the benchmark's, not the gate's
        values.pop("quantize.text_column", None)
    if "do_bench" in params and (explicit is None or "do_bench" in explicit) and not params["do_bench"]:
        values = {k: v for k, v in values.items() if not k.startswith("bench.")}
        values["bench"] = None
    if name == "compress" and params.get("prune_sparsity") is None and params.get("prune_layers") is None:
        # compress prunes only with a target (--prune, --prune-layers, or a recipe's prune section); never create
        # a prune section without one
        values = {k: v for k, v in values.items() if not k.startswith("prune.")}
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
    from edgekit.pipeline import absolute_path
    from edgekit.recipe import PATH_FIELDS, Recipe, load_recipe, with_values

    if name == "demo":
        from edgekit.errors import EdgekitError
        from edgekit.pipeline import demo_checkpoint, demo_config
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
    values = _option_values(ctx.command, name, params, explicit)
    argument = CHECKPOINT_ARGUMENT.get(name)
    if argument and params.get(argument):
        values["checkpoint"] = params[argument]
    elif "checkpoint" not in values and (ck := _checkpoint_of(name, params)):
        values["checkpoint"] = ck
    for key in PATH_FIELDS:  # relative paths given on the command line are relative to where it runs
        if isinstance(values.get(key), str):
            values[key] = absolute_path(values[key], Path.cwd())
    return with_values(base, values)


def _write_recipe(ctx: click.Context, params: dict, recipe, path: str) -> None:
    """``--dump-recipe-to FILE``: the recipe written completely or not at all, its paths relative to FILE's folder,
    never onto an input (the checkpoint, the data, the recipe read) nor the current folder."""
    from edgekit.artifacts import check_write_path, write_text_atomic
    from edgekit.cli.common import command_paths
    from edgekit.recipe import dump_recipe, recipe_inputs

    inputs = command_paths(ctx.command, params)[1] + recipe_inputs(recipe)
    target = check_write_path(path, inputs, "--dump-recipe-to path")
    write_text_atomic(target, dump_recipe(recipe, relative_to=target.parent))
    click.echo(f"Wrote the recipe to {path}.", err=True)


def _wrap(cmd: click.Command, name: str) -> None:
    original = cmd.callback
    relaxed = []
    for p in cmd.params:  # needed to run, not to print the recipe: checked below instead
        if p.required and (p.name == "output" or (name == "compress" and p.name == "checkpoint")):
            p.required = False
            relaxed.append(p)
            if isinstance(p, click.Option):  # still shown as required: it is, unless only printing the recipe
                p.help = f"{p.help or ''}  [required]".strip()

    @functools.wraps(original)
    def callback(*args, **kwargs):
        from edgekit.recipe import dump_recipe

        ctx = click.get_current_context()
        dump_to = kwargs.pop("dump_recipe_to", None)
        dump = kwargs.pop("dump_recipe", False) or dump_to is not None
        if name in NO_RECIPE and not dump:  # their reports carry the recipe of their inputs already
            return original(*args, **kwargs)
        recipe = resolve(name, kwargs, ctx)
        if dump_to is not None:
            _write_recipe(ctx, kwargs, recipe, dump_to)
            ctx.exit(0)
        kwargs.pop("recipe_path", None)
        if dump:
            # Paths relative to the current folder, where `--dump-recipe > edgekit.yaml` puts the file (and
            # absolute where they lead out of its tree): a committed recipe then works in any checkout.
            click.echo(dump_recipe(recipe, relative_to=Path.cwd()), nl=False)
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
                                   help="Print the resolved recipe (YAML) that reproduces this run, and exit; paths "
                                        "are relative to the current folder."))
    cmd.params.append(click.Option(["--dump-recipe-to", "dump_recipe_to"], type=click.Path(dir_okay=False),
                                   metavar="FILE",
                                   help="Write the resolved recipe to FILE, with paths relative to FILE's folder, "
                                        "and exit."))
    if name in ("compress", "search"):
        what = "Run the recipe" if name == "compress" else "Start every trial from the recipe"
        cmd.params.insert(0, click.Option(["--recipe", "recipe_path"], type=click.Path(dir_okay=False),
                                          help=f"{what} in this YAML file; options given here override it."))


def install(group: click.Group, prefix: str = "") -> None:
    """Give the pipeline's commands (``RECIPE_COMMANDS``) ``--dump-recipe``; ``compress`` also ``--recipe``."""
    for name, cmd in group.commands.items():
        full = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            install(cmd, f"{full} ")
        elif full in RECIPE_COMMANDS and not any(p.name == "dump_recipe" for p in cmd.params):
            _wrap(cmd, full)
