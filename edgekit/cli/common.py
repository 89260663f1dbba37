"""What every command module shares: the JSON writer, the consoles, the progress runner, the gate's outcome.

Imports click only, and nothing from the command modules (they import this one; ``edgekit.cli`` imports them).
"""

from __future__ import annotations

import json
import sys

import click

json_option = click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="[PATH]",
                           help="Write the report as JSON to PATH, or to stdout when no PATH is given.")


def stack(*decorators):
    """Several click decorators as one."""
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def write_json(json_out: str | None, d: dict) -> None:
    """``--json``: to stdout for "-", to the file for a path, nowhere when not given."""
    if json_out == "-":
        click.echo(json.dumps(d, indent=2))
    elif json_out:
        from edgekit.artifacts import write_text_atomic

        write_text_atomic(json_out, json.dumps(d, indent=2))


def output_width() -> int | None:
    """Off a terminal (CI logs, pipes) rich would wrap at 80 columns and cut the wide tables."""
    return None if sys.stdout.isatty() else 160


overwrite_option = click.option("--overwrite", is_flag=True, help="Replace the output folder if it is not empty.")


def consoles(json_out):
    from rich.console import Console

    # Progress always goes to stderr; tables go to stdout unless stdout carries the JSON.
    return Console(stderr=True), Console(stderr=json_out == "-", width=output_width())


def emit(json_out, report_dict, console, renderables) -> None:
    """Write the report (``--json``, with the run's resolved recipe) and print its tables."""
    write_json(json_out, embed_recipe(report_dict))
    for r in renderables:
        console.print(r, highlight=False)  # figures keep one colour: rich's number highlighter is noise here


def run_with_progress(json_out, fn):
    """Run ``fn(progress)`` under rich progress bars on stderr; returns (result, output console)."""
    import contextlib

    from edgekit.progress import RichProgress

    err, out = consoles(json_out)
    # Libraries print to stdout (onnxruntime's calibrator does); stdout is kept for our report alone.
    with RichProgress(err) as progress, contextlib.redirect_stdout(sys.stderr):
        result = fn(progress)
    return result, out


def verify_outcome(vdict, junit_path, console) -> int:
    """Print the gate's tables (its notes among them), write JUnit when asked; the exit code of the verdict."""
    from edgekit.errors import EXIT_CHECK_FAILED
    from edgekit.render import verify_tables

    if junit_path:
        from edgekit.verify import VerifyReport

        import dataclasses

        names = {f.name for f in dataclasses.fields(VerifyReport)}  # not "kind", nor the embedded "recipe"
        VerifyReport(**{k: v for k, v in vdict.items() if k in names}).write_junit(junit_path)
    for t in verify_tables(vdict):
        console.print(t)
    return 0 if vdict["passed"] else EXIT_CHECK_FAILED


# ---- the resolved recipe of the running command (set by edgekit.cli.recipe before the command runs) ----

META_KEY = "edgekit.recipe"


def current_recipe():
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if META_KEY in ctx.meta:
            return ctx.meta[META_KEY]
        ctx = ctx.parent
    return None


def embed_recipe(report_dict: dict) -> dict:
    """The report with the resolved recipe under ``recipe`` (unless it already carries one in its config)."""
    recipe = current_recipe()
    if recipe is None or "recipe" in report_dict or "recipe" in (report_dict.get("config") or {}):
        return report_dict
    return {**report_dict, "recipe": recipe.to_dict()}


# ---- the path guard of every command: nothing edgekit writes may land on what it reads ----------------

# Parameters that name something a command writes (``-o``, ``--json``, ``--junit``, ``--markdown``), and
# those that name something it reads. Config options declared ``path=True`` (--data, --calibration-data, ...)
# are inputs too. A new writing option must be added here; tests/test_hardening_paths.py checks every command.
OUTPUT_PARAMS = ("output", "json_out", "junit_path", "markdown_path", "dump_recipe_to", "triton_out", "resume_dir")
INPUT_PARAMS = ("checkpoint", "model", "models", "original", "candidate", "run_dir", "current", "baseline",
                "source", "bench_reports", "recipe_path", "path", "sign_key", "public_key", "compare", "bundle",
                "engine")


def command_paths(cmd, params: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """([(option spelling, path written)], [paths read]) of one invocation of ``cmd``."""
    from edgekit.cli.options import ConfigOption

    def values(v):
        return [str(x) for x in (v if isinstance(v, (list, tuple)) else [v]) if x not in (None, "", "-")]

    spelled = {p.name: (p.opts[0] if p.opts else p.name) for p in cmd.params}
    outputs = [(spelled.get(n, n), v) for n in OUTPUT_PARAMS for v in values(params.get(n))]
    inputs = [v for n in INPUT_PARAMS for v in values(params.get(n))]
    for p in cmd.params:
        if isinstance(p, ConfigOption) and p.config.meta(p.field).get("path") and p.name not in OUTPUT_PARAMS:
            inputs += values(params.get(p.name))
    return outputs, inputs


def guard_paths(cmd, params: dict) -> None:
    """Refuse (exit 2) before any work when a path the command writes is an input, inside or above one, or
    the current folder or above it (``edgekit.artifacts.check_write_path``, the one guard)."""
    import os
    from pathlib import Path

    from edgekit.artifacts import check_write_path
    from edgekit.errors import EdgekitError

    outputs, inputs = command_paths(cmd, params)
    recipe = current_recipe()  # set by the recipe options (edgekit.cli.recipe), which run before this guard
    if recipe is not None:  # the paths a recipe file names are read like those given on the command line
        from edgekit.recipe import recipe_inputs

        inputs += recipe_inputs(recipe)
    for flag, path in outputs:
        check_write_path(path, inputs, f"{flag} path")
        if flag not in ("-o", "--resume") and Path(path).is_dir():  # those two name folders
            raise EdgekitError(f"the {flag} path {path} is a folder", f"give {flag} a file name")
        # A report file is written last: a read-only place is named now, not after minutes of work.
        # (os.access sees a read-only mount even as root.)
        existing = next(p for p in [Path(path).resolve().parent, *Path(path).resolve().parents] if p.exists())
        if not os.access(existing, os.W_OK):
            raise EdgekitError(f"the {flag} path {path} cannot be written: {existing} is read-only or not writable",
                               "choose a writable folder")


def install_path_guard(group) -> None:
    """Run :func:`guard_paths` before every command of ``group`` (and of its subgroups)."""
    import functools

    for cmd in group.commands.values():
        if isinstance(cmd, click.Group):
            install_path_guard(cmd)
            continue
        if cmd.callback is None or getattr(cmd.callback, "_edgekit_path_guard", False):
            continue

        def guarded(*args, _cmd=cmd, _callback=cmd.callback, **kwargs):
            guard_paths(_cmd, kwargs)
            return _callback(*args, **kwargs)

        functools.update_wrapper(guarded, cmd.callback)
        guarded._edgekit_path_guard = True
        cmd.callback = guarded


def quiet_libraries() -> None:
    """Third-party chatter (optimum's opset notice, ORT's pre-processing hint) is not for our users."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("optimum", "transformers", "onnxruntime", "root", "fusion_embedlayer", "onnx_model", "fusion_utils"):
        logging.getLogger(name).setLevel(logging.ERROR)
