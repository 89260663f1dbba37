"""The ``edgekit`` command line: parse options, call one API function, render its report, return an exit code.

One module per command group (``stages``: export, quantize, verify, prune, compress, demo; ``bench``;
``devices``: devices and engine; ``release``: release and gate; ``recipe``: --recipe / --dump-recipe), shared
helpers in ``common`` and the options derived from the stage configs in ``options``. This module only makes
the group, maps exceptions to exit codes once, and registers the commands.

Exit codes: 0 success / gate passed; 1 a check failed (accuracy gate, export tolerance); 2 bad input,
usage error or interrupted run; 3 an internal error (a bug: run with --debug for the traceback).
Only click is imported at module level so that ``edgekit --help`` stays fast.
"""

from __future__ import annotations

import sys

import click
from pydantic import ValidationError

from edgekit.cli.bench import bench
from edgekit.cli.common import install_path_guard, quiet_libraries
from edgekit.cli.devices import devices, engine
from edgekit.cli.generate import generate
from edgekit.cli.recipe import install as install_recipe_options
from edgekit.cli.release import gate, release
from edgekit.cli.search import search
from edgekit.cli.serve import serve
from edgekit.cli.stages import COMMANDS
from edgekit.errors import EXIT_USAGE, EdgekitError
from edgekit.version import __version__

EXIT_INTERNAL = 3


class EdgekitGroup(click.Group):
    """Maps exceptions to exit codes once, for every command (Polygraphy's _main.py pattern)."""

    def invoke(self, ctx):
        debug = "--debug" in sys.argv[1:] or ctx.params.get("debug")
        try:
            return super().invoke(ctx)
        except EdgekitError as e:
            if debug:
                raise
            click.secho(f"Error: {e}", fg="red", err=True)
            ctx.exit(e.exit_code)
        except ValidationError as e:  # a config value out of range, from a recipe or an option: a user error
            if debug:
                raise
            from edgekit.options import config_error

            click.secho(f"Error: {config_error(e.title, e)}", fg="red", err=True)
            ctx.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            click.secho("Interrupted: the unfinished output was removed, nothing complete-looking was written.",
                        fg="red", err=True)
            ctx.exit(EXIT_USAGE)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # a bug, not a user error
            if debug:
                raise
            from edgekit.artifacts import disk_error

            err = disk_error(e)  # the environment, not a bug: a read-only or full disk, a path not permitted
            if err is not None:
                click.secho(f"Error: {err}", fg="red", err=True)
                ctx.exit(err.exit_code)
            click.secho(f"Internal error: {type(e).__name__}: {e} (run again with --debug for the traceback, "
                        "and please report it)", fg="red", err=True)
            ctx.exit(EXIT_INTERNAL)


@click.group(cls=EdgekitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show tracebacks and library logs.")
@click.version_option(__version__, prog_name="edgekit")
@click.pass_context
def main(ctx, debug):
    """edgekit: fine-tuned Hugging Face encoders -> INT8 ONNX, verified against the original and benchmarked.

    \b
    Exit codes: 0 ok, 1 a gate or tolerance check failed, 2 bad input or interrupted, 3 internal error.
    """
    ctx.obj = {"debug": debug}
    if not debug:
        quiet_libraries()


for _command in (*COMMANDS, search, bench, generate, devices, engine, release, gate, serve):
    main.add_command(_command)
install_path_guard(main)  # before the recipe options: the guard then sees the checkpoint a recipe names
install_recipe_options(main)  # --dump-recipe on every pipeline command, --recipe on compress: keep this last


def _stop_children(grace: float = 1.0) -> None:
    """Stop the worker processes this process started (bench's per-variant workers) before it exits.

    ``os._exit`` skips multiprocessing's atexit hook that terminates daemon children, and a worker whose
    parent vanished would only notice at its next pipe read, after finishing its round. The workers ignore
    SIGINT (the parent owns the interrupt) and die on SIGTERM's default action, so this is quiet.
    """
    import time

    mp = sys.modules.get("multiprocessing")  # never import it here: no children without it
    if mp is None:
        return
    children = mp.active_children()
    for p in children:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in children:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(0.5)


def run() -> None:
    """Console entry point: ``main`` with SIGINT and SIGTERM handlers that are safe inside native code.

    Python's default handler raises KeyboardInterrupt wherever the interpreter happens to be; when that is a
    callback from onnxruntime's pybind11 bindings (quantization, session creation) the C++ side calls
    std::terminate and the process dies with SIGABRT, leaving staging folders behind; SIGTERM's default
    action kills the process without any cleanup at all. This handler instead stops the worker processes,
    removes the staging and scratch folders, says so, and exits with code 2 at once.
    """
    import os
    import signal

    def on_signal(signum, frame):
        from edgekit.artifacts import committed_outputs, remove_active

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_children()
        remove_active()
        done = committed_outputs()
        if done:  # the work was finished and in place; only the summary that follows it was cut short
            sys.stderr.write(f"Interrupted after the output was complete: {', '.join(map(str, done))} is kept; "
                             "any unfinished output was removed.\n")
        else:
            sys.stderr.write("Interrupted: the unfinished output was removed, nothing complete-looking was "
                             "written.\n")
        sys.stderr.flush()
        os._exit(EXIT_USAGE)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        main()
    finally:
        # The command has finished (its output is in place, its exit code decided): an interrupt that arrives
        # while the interpreter shuts down can undo nothing, and would otherwise kill the process by the signal's
        # default action (exit -2 or -15: CPython restores it while finalizing) instead of the command's own code.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
