"""``edgekit search``: the fastest recipe that passes the gate, found by Optuna through the real stages.

Ctrl-C once: the running trial finishes, then the report is written (exit 2); Ctrl-C twice: stop at once
(``--resume OUT`` continues either way). Only click is imported at module level.
"""

from __future__ import annotations

import signal
import sys
import threading

import click

from edgekit.benchmarks.bench import BenchConfig
from edgekit.cli.common import current_recipe, emit, json_option, overwrite_option, stack
from edgekit.cli.options import build, config_options
from edgekit.cli.stages import base_opt, data_options, task_opt, threads_opt
from edgekit.compress.quantize import QuantizeConfig
from edgekit.search.config import SearchConfig
from edgekit.verify import GateConfig, VerifyConfig

search_options = stack(
    config_options(VerifyConfig, "data", only=["data"]),
    config_options(QuantizeConfig, "quantize", only=["calibration_data", "calibration_samples"]),
    data_options, config_options(GateConfig, "gates"), task_opt, base_opt, threads_opt,
    click.option("--bench/--no-bench", "do_bench", default=True, show_default=True,
                 help="Time every trial (--no-bench: only with --objective size)."),
    config_options(BenchConfig, "bench", only=["iterations", "min_seconds"], prefix="bench_"),
    config_options(SearchConfig),
)


def _trial_line(out):
    from edgekit.search.report import mended

    def show(record: dict, best: dict | None) -> None:
        checks = (record.get("verify") or {}).get("checks") or []
        first = f"{checks[0]['name']} {checks[0]['value']:.4g}" if checks else "-"
        m = record.get("metrics") or {}
        speed = (f"{m['latency_ratio']:.3f}x FP32" if "latency_ratio" in m else
                 f"{m['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in m else "")
        state = {"passed": "[green]pass[/]", "failed": "[bold red]FAIL[/]"}.get(record["state"],
                                                                               f"[yellow]{record['state']}[/]")
        changed = mended(record.get("culprits") or {})
        extra = f", {changed}" if changed else ""
        again = " (reused)" if record.get("reused") else ""
        why = f": {record.get('error')}" if record["state"] == "crashed" else ""
        best_txt = f"best so far: trial {best['number']}" if best else "no passing trial yet"
        out.print(f"trial {record['number']:>3} {state}{again} {record.get('description', '')}  {first}  {speed}"
                  f"{extra}{why}  [dim]{best_txt}[/]", highlight=False)
    return show


@click.command()
@click.argument("checkpoint", required=False)
@click.option("-o", "--output", help="Folder for the search: trials.jsonl, report.md, pareto.png, recipe.yaml, best/.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), metavar="OUT",
              help="Continue the search in OUT: finished trials are reused (keyed by their recipe), not recomputed.")
@search_options
@overwrite_option
@json_option
def search(checkpoint, output, resume_dir, overwrite, json_out, **kw):
    """Find the fastest variant of CHECKPOINT that passes the gate (exit 0), or say none did (exit 1).

    Each trial is a recipe (prune sparsity and layers, quantization mode and calibration, per-channel, fusion,
    nodes in float) run through the real stages: prune, export, quantize, verify against the original, bench.
    """
    from edgekit.errors import EXIT_CHECK_FAILED, EXIT_USAGE, EdgekitError
    from edgekit.search.run import search as run_search

    if checkpoint is None:
        raise click.MissingParameter(param_hint="'CHECKPOINT'", param_type="argument")
    if resume_dir and output and click.format_filename(resume_dir) != click.format_filename(output):
        raise EdgekitError("--resume and -o name different folders", "give one: --resume OUT continues OUT")
    out_dir = resume_dir or output
    if not out_dir:
        raise EdgekitError("search needs a folder to write into", "pass -o OUT (or --resume OUT to continue one)")
    if not kw.get("data"):
        raise click.MissingParameter(param_hint="'--data'", param_type="option")
    cfg = build(SearchConfig, kw)
    base = current_recipe()
    from edgekit.cli.common import consoles
    from edgekit.progress import RichProgress

    err, out = consoles(json_out)
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):
        if stop.is_set():  # the second Ctrl-C: stop now, as every other command does
            signal.signal(signal.SIGINT, previous)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        stop.set()
        err.print("[yellow]Ctrl-C: stopping after the running trial, then writing the report (Ctrl-C again to "
                  "stop at once).[/]")

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        import contextlib

        with RichProgress(err) as progress, contextlib.redirect_stdout(sys.stderr):
            report = run_search(checkpoint, out_dir, cfg, base, resume=bool(resume_dir), overwrite=overwrite,
                                progress=progress, on_trial=_trial_line(err), stop=stop,
                                trust_remote_code=kw["trust_remote_code"],
                                library_logs=bool((click.get_current_context().find_root().obj or {}).get("debug")))
    finally:
        signal.signal(signal.SIGINT, previous)
    d = report.to_dict()
    from edgekit.reports import to_rich

    emit(json_out, d, out, [to_rich(report.sections(wide=False)[:1])])
    out.print(f"Report: {d['output']}/report.md", highlight=False)
    if report.state == "interrupted":
        err.print("[red]Interrupted: the report covers the finished trials; --resume continues the search.[/]")
        sys.exit(EXIT_USAGE)
    sys.exit(0 if report.passed else EXIT_CHECK_FAILED)
