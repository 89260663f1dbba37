"""The ``edgekit`` command line: parse options, call one API function, render its report, return an exit code.

Exit codes: 0 success / gate passed; 1 a check failed (accuracy gate, export tolerance); 2 bad input,
usage error or interrupted run; 3 an internal error (a bug: run with --debug for the traceback).
Only click is imported at module level so that ``edgekit --help`` stays fast.
"""

from __future__ import annotations

import sys

import click

from edgekit import __version__
from edgekit.errors import EXIT_CHECK_FAILED, EXIT_USAGE, EdgekitError
from edgekit.cli.common import json_option, output_width, stack as _stack, write_json
from edgekit.cli.targets import target_options  # bench on GPU / Jetson / over SSH (imports click only)

EXIT_INTERNAL = 3


def _quiet_libraries() -> None:
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
        except KeyboardInterrupt:
            click.secho("Interrupted: the unfinished output was removed, nothing complete-looking was written.",
                        fg="red", err=True)
            ctx.exit(EXIT_USAGE)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # a bug, not a user error
            if debug:
                raise
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
        _quiet_libraries()


# ---- shared option groups ---------------------------------------------------------------------------


overwrite_option = click.option("--overwrite", is_flag=True, help="Replace the output folder if it is not empty.")
task_option = click.option("--task", type=click.Choice(["text-classification", "token-classification", "feature-extraction"]),
                           help="Override the task detected from config.json.")
threads_option = click.option("--threads", type=click.IntRange(1), help="Threads for every runtime (default: all cores).")
data_options = _stack(
    click.option("--text-column", help="Column holding the text (tokens for token-classification)."),
    click.option("--label-column", help="Column holding the labels (names or ids); optional."),
    click.option("--tsv-quoting", is_flag=True, help="Honour quotes in TSV (off by default, as GLUE)."),
    click.option("--limit", type=click.IntRange(1), help="Use only the first N examples."),
)
gate_options = _stack(
    click.option("--max-drop", type=float, default=1.0, show_default=True,
                 help="Largest allowed drop of the labeled metric, in absolute points."),
    click.option("--max-relative-drop", type=float, help="Largest allowed drop as a fraction of the original (0.01 = 1%)."),
    click.option("--min-agreement", type=float, help="Smallest allowed top-1 agreement with the original, in %."),
    click.option("--min-cosine", type=float, help="feature-extraction: smallest allowed mean cosine (default 0.99)."),
    click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="Write the gate as JUnit XML."),
)
quantize_options = _stack(
    click.option("--mode", type=click.Choice(["dynamic", "static"]), default="dynamic", show_default=True,
                 help="dynamic: INT8 weights, activations quantized at run time (best on CPU); static: QDQ calibrated."),
    click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales per output channel."),
    click.option("--optimize/--no-optimize", default=None,
                 help="Fuse the transformer graph before quantizing (default: on for dynamic where supported)."),
    click.option("--calibration-data", type=click.Path(), help="Static mode: text to calibrate activation ranges on."),
    click.option("--calibration-samples", type=click.IntRange(1), default=128, show_default=True),
    click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
                 show_default=True),
    click.option("--exclude-nodes", multiple=True, help="Node name to keep in float (repeat, or comma-separate)."),
    click.option("--exclude-op-types", multiple=True, help="Op type to keep in float, e.g. Attention (repeatable)."),
    click.option("--reduce-range/--no-reduce-range", default=None,
                 help="7-bit weights (default: only on CPUs without VNNI)."),
    click.option("--symmetric-activations", is_flag=True,
                 help="Static mode: zero-point-free activation scales, as TensorRT needs for Q/DQ engines."),
)


def _split(values) -> list[str]:
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


def _quantize_config(kw, text_column=None):
    from edgekit.compress.quantize import QuantizeConfig

    return QuantizeConfig(mode=kw["mode"], per_channel=kw["per_channel"], optimize=kw["optimize"],
                          calibration_data=kw["calibration_data"], calibration_samples=kw["calibration_samples"],
                          calibration_method=kw["calibration_method"], text_column=text_column,
                          exclude_nodes=_split(kw["exclude_nodes"]), exclude_op_types=_split(kw["exclude_op_types"]),
                          reduce_range=kw["reduce_range"], symmetric_activations=kw["symmetric_activations"])


def _gate_config(kw):
    from edgekit.verify import GateConfig

    return GateConfig(max_drop=kw["max_drop"], max_relative_drop=kw["max_relative_drop"],
                      min_agreement=kw["min_agreement"], min_cosine=kw["min_cosine"])


def _verify_config(kw, data, task=None, threads=None):
    from edgekit.verify import VerifyConfig

    return VerifyConfig(data=data, text_column=kw["text_column"], label_column=kw["label_column"], task=task,
                        limit=kw["limit"], tsv_quoting=kw["tsv_quoting"], threads=threads)


# ---- output -----------------------------------------------------------------------------------------


def _consoles(json_out):
    from rich.console import Console

    # Progress always goes to stderr; tables go to stdout unless stdout carries the JSON.
    return Console(stderr=True), Console(stderr=json_out == "-", width=output_width())


def _emit(json_out, report_dict, console, renderables) -> None:
    from edgekit.cli.recipe import embed_recipe

    write_json(json_out, embed_recipe(report_dict))  # with the resolved recipe of this run (edgekit.cli.recipe)
    for r in renderables:
        console.print(r)


def _run(json_out, fn):
    """Run ``fn(progress)`` under rich progress bars on stderr; returns (result, output console)."""
    from edgekit.progress import RichProgress

    import contextlib

    err, out = _consoles(json_out)
    # Libraries print to stdout (onnxruntime's calibrator does); stdout is kept for our report alone.
    with RichProgress(err) as progress, contextlib.redirect_stdout(sys.stderr):
        result = fn(progress)
    return result, out


def _verify_outcome(vdict, junit_path, console) -> int:
    from edgekit.render import verify_tables

    if junit_path:
        from edgekit.verify import VerifyReport

        fields = {k: v for k, v in vdict.items() if k != "kind"}
        VerifyReport(**fields).write_junit(junit_path)
    for t in verify_tables(vdict):
        console.print(t)
    return 0 if vdict["passed"] else EXIT_CHECK_FAILED


# ---- commands ---------------------------------------------------------------------------------------


@main.command()
@click.argument("checkpoint")
@click.option("-o", "--output", required=True, help="Folder to write model.onnx, config and tokenizer into.")
@task_option
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (17 or newer).")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Largest allowed |ONNX - PyTorch|.")
@click.option("--data", type=click.Path(), help="Validate on real examples from this file (synthetic otherwise).")
@click.option("--text-column", help="Text column of --data.")
@overwrite_option
@json_option
def export(checkpoint, output, task, opset, atol, data, text_column, overwrite, json_out):
    """Export CHECKPOINT to ONNX and check it against PyTorch (a tolerance breach is exit 1)."""
    from edgekit.render import export_table
    from edgekit.runtimes.export import ExportConfig, export as run_export

    cfg = ExportConfig(task=task, opset=opset, atol=atol, data=data, text_column=text_column)
    report, out = _run(json_out, lambda p: run_export(checkpoint, output, cfg, overwrite, p))
    _emit(json_out, report.to_dict(), out, [export_table(report.to_dict())])


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, help="Folder for the INT8 model.")
@quantize_options
@task_option
@click.option("--opset", type=int, default=18, show_default=True, help="Opset when MODEL is a checkpoint.")
@click.option("--data", type=click.Path(), help="Verify the result against the original on this file (exit like verify).")
@click.option("--original", type=click.Path(), help="Original checkpoint, when MODEL is ONNX (default: recorded at export).")
@data_options
@gate_options
@overwrite_option
@json_option
def quantize(model, output, task, opset, data, original, overwrite, json_out, junit_path, **kw):
    """Quantize MODEL (an ONNX folder, or a checkpoint: exported first) to INT8."""
    from edgekit.pipeline import quantize as run_quantize
    from edgekit.render import quantize_table

    vcfg = _verify_config(kw, data, task) if data else None
    report, out = _run(json_out, lambda p: run_quantize(
        model, output, _quantize_config(kw, kw["text_column"]), task=task, opset=opset, verify_config=vcfg,
        gate=_gate_config(kw), original=original, overwrite=overwrite, progress=p))
    _emit(json_out, report.to_dict(), out, [quantize_table(report.to_dict())])
    if report.verification is not None:
        sys.exit(_verify_outcome(report.verification, junit_path, out))


@main.command()
@click.argument("original")
@click.argument("candidate")
@click.option("--data", required=True, type=click.Path(), help="Evaluation data: TSV, CSV, JSONL or Parquet.")
@task_option
@data_options
@gate_options
@threads_option
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--runtime", type=click.Choice(["onnxruntime", "tensorrt", "torch"]),
              help="Runtime of the CANDIDATE (default: from the artifact; a TensorRT engine folder runs on tensorrt).")
@click.option("--device", default="cpu", show_default=True,
              help="Where the CANDIDATE runs: cpu, cuda or tensorrt (onnxruntime's provider); the gate is the same.")
@json_option
def verify(original, candidate, data, task, threads, batch_size, runtime, device, json_out, junit_path, **kw):
    """The accuracy gate: CANDIDATE against the ORIGINAL checkpoint (exit 0 pass, 1 fail, 2 bad input)."""
    from edgekit.verify import verify as run_verify

    vcfg = _verify_config(kw, data, task, threads)
    vcfg.batch_size = batch_size
    vcfg.runtime, vcfg.device = runtime, device
    report, out = _run(json_out, lambda p: run_verify(original, candidate, vcfg, _gate_config(kw), p))
    d = report.to_dict()
    _emit(json_out, d, out, [])
    sys.exit(_verify_outcome(d, junit_path, out))


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--iterations", type=click.IntRange(1), default=100, show_default=True, help="At least this many timed runs.")
@click.option("--min-seconds", type=click.FloatRange(0), default=5.0, show_default=True, help="And at least this long.")
@click.option("--warmup", type=click.IntRange(0), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True)
@click.option("--seq-len", type=click.IntRange(1), help="Fixed synthetic sequence length (default 128 without --data).")
@click.option("--data", type=click.Path(), help="Real lengths: tokenize examples from this file.")
@click.option("--text-column")
@click.option("--samples", type=click.IntRange(1), default=200, show_default=True, help="Examples taken from --data.")
@threads_option
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda, tensorrt (onnxruntime's provider), jetson, or a device profile (edgekit devices).")
@task_option
@target_options
@json_option
def bench(models, iterations, min_seconds, warmup, batch_size, seq_len, data, text_column, samples, threads, device,
          task, json_out, **target):
    """Latency and memory of one or more MODELS (checkpoints on torch, ONNX on onnxruntime), interleaved."""
    import os

    from edgekit.benchmarks.bench import BenchConfig, bench as run_bench
    from edgekit.render import bench_table, environment_line

    cfg = BenchConfig(iterations=iterations, min_seconds=min_seconds, warmup=warmup, batch_size=batch_size,
                      seq_len=seq_len, data=data, text_column=text_column, samples=samples,
                      threads=threads or len(os.sched_getaffinity(0)), device=device, task=task)
    from edgekit.cli.targets import bench_target, wants_target

    if wants_target(device, target):  # GPU, Jetson, SSH: benchmarks/targets.py
        sys.exit(bench_target(list(models), cfg, device, dict(target, threads=threads), json_out))
    report, out = _run(json_out, lambda p: run_bench(list(models), cfg, p))
    d = report.to_dict()
    _emit(json_out, d, out, [bench_table(d), environment_line(d["environment"])])


@main.command()
@click.argument("checkpoint")
@click.option("-o", "--output", required=True, help="Folder for the pruned checkpoint.")
@click.option("--sparsity", type=float, help="Fraction of encoder FLOPs (and parameters) to remove, e.g. 0.4.")
@click.option("--heads", type=float, help="Or: fraction of all attention heads to remove (ranked globally).")
@click.option("--ffn", type=float, help="And/or: fraction of all FFN neurons to remove.")
@click.option("--calibration-data", type=click.Path(), help="In-domain examples to rank heads and neurons on "
              "(TSV/CSV/JSONL/Parquet; labels optional).")
@click.option("--calibration-samples", type=click.IntRange(1), default=256, show_default=True)
@click.option("--text-column", help="Column holding the text.")
@click.option("--label-column", help="Column holding the labels; without labels the criterion is output reconstruction.")
@click.option("--no-labels", is_flag=True, help="Ignore labels: rank by reconstruction of the original outputs.")
@click.option("--seq-len", type=click.IntRange(1), default=128, show_default=True,
              help="Sequence length the FLOPs are counted and budgeted at.")
@click.option("--no-rearrange", is_flag=True, help="Skip the mask rearrangement step.")
@click.option("--no-refit", is_flag=True, help="Skip the least-squares re-fit of the output projections.")
@click.option("--recover-steps", type=click.IntRange(0), default=0, show_default=True,
              help="Then distil from the original for N steps on the calibration text.")
@click.option("--recover-lr", type=click.FloatRange(0, min_open=True), default=5e-5, show_default=True)
@overwrite_option
@json_option
def prune(checkpoint, output, sparsity, heads, ffn, calibration_data, calibration_samples, text_column, label_column,
          no_labels, seq_len, no_rearrange, no_refit, recover_steps, recover_lr, overwrite, json_out):
    """Remove attention heads and FFN neurons from CHECKPOINT (physically), re-fit, write a new checkpoint."""
    from edgekit.compress.prune import PruneConfig, prune as run_prune
    from edgekit.render import prune_tables

    def work(p):
        cfg = PruneConfig(sparsity=sparsity, heads=heads, ffn=ffn, calibration_samples=calibration_samples,
                          seq_len=seq_len, use_labels=not no_labels, rearrange=not no_rearrange, refit=not no_refit,
                          recover_steps=recover_steps, recover_lr=recover_lr, calibration_data=calibration_data)
        return run_prune(checkpoint, output, cfg, None, text_column, label_column, overwrite, p)

    report, out = _run(json_out, work)
    d = report.to_dict()
    _emit(json_out, d, out, prune_tables(d))


def _compress_common(f):
    return _stack(
        click.option("-o", "--output", required=True, help="Folder for onnx/, int8/, report.json, report.md."),
        quantize_options, task_option,
        click.option("--data", type=click.Path(), help="Evaluation data for the gate and real benchmark lengths."),
        click.option("--prune", "prune_sparsity", type=float, metavar="SPARSITY",
                     help="Prune this fraction of encoder FLOPs first (calibrated on --calibration-data)."),
        click.option("--prune-recover-steps", type=click.IntRange(0), default=0, show_default=True,
                     help="With --prune: distillation steps after pruning."),
        data_options, gate_options, threads_option,
        click.option("--bench/--no-bench", "do_bench", default=True, show_default=True),
        click.option("--bench-iterations", type=click.IntRange(1), default=50, show_default=True),
        click.option("--bench-min-seconds", type=click.FloatRange(0), default=3.0, show_default=True),
        overwrite_option, json_option,
    )(f)


def _render_compress(report, json_out, junit_path, out) -> int:
    from edgekit.render import bench_table, environment_line, export_table, prune_tables, quantize_table

    d = report.to_dict()
    items = (prune_tables(d["prune"])[:1] if d.get("prune") else []) + [export_table(d["export"]),
                                                                       quantize_table(d["quantize"])]
    if d["bench"]:
        items += [bench_table(d["bench"]), environment_line(d["bench"]["environment"])]
    _emit(json_out, d, out, items)
    code = _verify_outcome(d["verify"], junit_path, out) if d["verify"] else 0
    out.print(f"Report: {d['output']}/report.md" + ("" if report.passed else "  [bold red](gate FAILED)[/]"))
    return code


@main.command()
@click.argument("checkpoint")
@_compress_common
def compress(checkpoint, output, task, data, threads, do_bench, bench_iterations, bench_min_seconds, overwrite, json_out,
             junit_path, prune_sparsity, prune_recover_steps, **kw):
    """[prune ->] export -> quantize -> verify -> bench in one run (exit 1 if the gate fails; artifacts stay, marked failed)."""
    import os

    from edgekit.pipeline import CompressConfig, compress as run_compress
    from edgekit.benchmarks.bench import BenchConfig
    from edgekit.runtimes.export import ExportConfig

    threads = threads or len(os.sched_getaffinity(0))
    cfg = CompressConfig(
        task=task, export=ExportConfig(task=task), quantize=_quantize_config(kw, kw["text_column"]),
        verify=_verify_config(kw, data, task, threads) if data else _verify_config(kw, "", task, threads),
        gate=_gate_config(kw),
        bench=BenchConfig(iterations=bench_iterations, min_seconds=bench_min_seconds, threads=threads) if do_bench else None,
    )
    from edgekit.cli.recipe import compress_config_from_context

    # The resolved recipe (--recipe, with the options given here on top) is the run; it carries --prune and
    # --prune-recover-steps as its prune section (cli_recipe.PER_COMMAND), so they need no handling here.
    cfg = compress_config_from_context(cfg)
    report, out = _run(json_out, lambda p: run_compress(checkpoint, output, cfg, overwrite, p))
    sys.exit(_render_compress(report, json_out, junit_path, out))


@main.command()
@click.option("-o", "--output", default="edgekit-demo", show_default=True, help="Folder for the demo's artifacts.")
@threads_option
@overwrite_option
@json_option
def demo(output, threads, overwrite, json_out):
    """The whole pipeline on the bundled all-MiniLM-L6-v2 (needs the 'demo' extra)."""
    import os

    from edgekit.pipeline import demo as run_demo

    threads = threads or len(os.sched_getaffinity(0))
    report, out = _run(json_out, lambda p: run_demo(output, overwrite, threads, p))
    sys.exit(_render_compress(report, json_out, None, out))


from edgekit.cli.devices import devices, engine  # noqa: E402 - registered last: it needs `main`

main.add_command(devices)
main.add_command(engine)
from edgekit.cli.release import gate, release  # noqa: E402 - click only
from edgekit.cli.recipe import install as _install_recipe_options  # noqa: E402

main.add_command(release)
main.add_command(gate)
_install_recipe_options(main)  # --dump-recipe on every pipeline command, --recipe on compress: keep this last


def run() -> None:
    """Console entry point: ``main`` with a SIGINT handler that is safe inside native code.

    Python's default handler raises KeyboardInterrupt wherever the interpreter happens to be; when that is a
    callback from onnxruntime's pybind11 bindings (quantization, session creation) the C++ side calls
    std::terminate and the process dies with SIGABRT, leaving staging folders behind. This handler instead
    removes the staging and scratch folders, says so, and exits with code 2 at once.
    """
    import os
    import signal

    def on_sigint(signum, frame):
        from edgekit.artifacts import remove_active

        remove_active()
        sys.stderr.write("Interrupted: the unfinished output was removed, nothing complete-looking was "
                         "written.\n")
        sys.stderr.flush()
        os._exit(EXIT_USAGE)

    signal.signal(signal.SIGINT, on_sigint)
    main()
