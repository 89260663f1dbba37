"""Pieces every command module shares (cli.py, cli_targets, cli_devices, cli_release). Imports click only.

They live apart from cli.py because cli.py imports those modules while it is still being initialised.
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
