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
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2)


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
