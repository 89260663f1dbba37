"""The pipeline's commands: export, quantize, verify, prune, compress, demo.

Each parses its options into the stage's typed config (the options themselves are derived from the configs:
``edgekit.cli.options``), calls one API function, renders its report and returns an exit code. Only click
is imported at module level.
"""

from __future__ import annotations

import sys

import click

from edgekit.cli.common import emit, json_option, overwrite_option, run_with_progress, stack, verify_outcome
from edgekit.benchmarks.bench import BenchConfig
from edgekit.cli.options import build, config_options
from edgekit.compress.prune import PruneConfig
from edgekit.compress.quantize import QuantizeConfig
from edgekit.options import StageConfig, base_option, task_option, threads_option
from edgekit.runtimes.export import ExportConfig
from edgekit.verify import GateConfig, VerifyConfig


class _RunWide(StageConfig):
    """The run-wide options (``--task``, ``--threads``): declared once in edgekit.options, given once per command."""

    task: str | None = task_option()
    threads: int | None = threads_option()
    base: str | None = base_option()


task_opt = config_options(_RunWide, only=["task"])
base_opt = config_options(_RunWide, only=["base"])
threads_opt = config_options(_RunWide, only=["threads"])
junit_option = click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="Write the gate as JUnit XML.")
data_options = config_options(VerifyConfig, "data", exclude=["data", "batch_size", "runtime", "device"], run_wide=False)
gate_options = stack(config_options(GateConfig, "gates"), junit_option)
quantize_options = config_options(QuantizeConfig, "quantize")


def _threads(threads):
    from edgekit.benchmarks.environment import usable_cores

    return threads or usable_cores()


@click.command()
@click.argument("checkpoint")
@click.option("-o", "--output", required=True, help="Folder to write model.onnx, config and tokenizer into.")
@task_opt
@base_opt
@config_options(ExportConfig, "export", exclude=["validation_samples"], run_wide=False)
@overwrite_option
@json_option
def export(checkpoint, output, overwrite, json_out, **kw):
    """Export CHECKPOINT to ONNX and check it against PyTorch (a tolerance breach is exit 1)."""
    from edgekit.render import export_table
    from edgekit.runtimes.export import export as run_export

    cfg = build(ExportConfig, kw)
    report, out = run_with_progress(json_out, lambda p: run_export(checkpoint, output, cfg, overwrite, p))
    emit(json_out, report.to_dict(), out, [export_table(report.to_dict())])


@click.command()
@click.argument("model")
@click.option("-o", "--output", required=True, help="Folder for the INT8 model.")
@quantize_options
@task_opt
@config_options(ExportConfig, "export", only=["opset"])
@config_options(VerifyConfig, "data", only=["data"])  # given: the result is verified (exit like verify)
@click.option("--original", type=click.Path(), help="Original checkpoint, when MODEL is ONNX (default: recorded at export).")
@data_options
@gate_options
@overwrite_option
@json_option
def quantize(model, output, task, opset, data, original, overwrite, json_out, junit_path, **kw):
    """Quantize MODEL (an ONNX folder, or a checkpoint: exported first) to INT8."""
    from edgekit.pipeline import quantize as run_quantize
    from edgekit.render import quantize_table

    vcfg = build(VerifyConfig, kw, data=data, task=task) if data else None
    qcfg = build(QuantizeConfig, kw, text_column=kw["text_column"])
    report, out = run_with_progress(json_out, lambda p: run_quantize(
        model, output, qcfg, task=task, opset=opset, verify_config=vcfg, gate=build(GateConfig, kw),
        original=original, overwrite=overwrite, progress=p, trust_remote_code=kw["trust_remote_code"]))
    emit(json_out, report.to_dict(), out, [quantize_table(report.to_dict())])
    if report.verification is not None:
        sys.exit(verify_outcome(report.verification, junit_path, out))


@click.command()
@click.argument("original")
@click.argument("candidate")
@config_options(VerifyConfig, "data", flags={"data": "--data"})
@gate_options
@json_option
def verify(original, candidate, json_out, junit_path, **kw):
    """The accuracy gate: CANDIDATE against the ORIGINAL checkpoint (exit 0 pass, 1 fail, 2 bad input)."""
    from edgekit.verify import verify as run_verify

    if not kw.get("data"):
        raise click.MissingParameter(param_hint="'--data'", param_type="option")
    vcfg = build(VerifyConfig, kw)
    report, out = run_with_progress(json_out, lambda p: run_verify(original, candidate, vcfg, build(GateConfig, kw), p))
    d = report.to_dict()
    emit(json_out, d, out, [])
    sys.exit(verify_outcome(d, junit_path, out))


@click.command()
@click.argument("checkpoint")
@click.option("-o", "--output", required=True, help="Folder for the pruned checkpoint.")
@config_options(PruneConfig, "prune")
@config_options(VerifyConfig, "data", only=["text_column", "label_column"])
@overwrite_option
@json_option
def prune(checkpoint, output, text_column, label_column, overwrite, json_out, **kw):
    """Remove heads, FFN neurons and/or whole layers from CHECKPOINT (physically), re-fit, write a new checkpoint."""
    from edgekit.compress.prune import prune as run_prune
    from edgekit.render import prune_tables

    def work(p):
        return run_prune(checkpoint, output, build(PruneConfig, kw), None, text_column, label_column, overwrite, p)

    report, out = run_with_progress(json_out, work)
    d = report.to_dict()
    emit(json_out, d, out, prune_tables(d))


def _render_compress(report, json_out, junit_path, out) -> int:
    from edgekit.render import bench_table, environment_line, export_table, prune_tables, quantize_table

    d = report.to_dict()
    items = (prune_tables(d["prune"])[:1] if d.get("prune") else []) + [export_table(d["export"]),
                                                                       quantize_table(d["quantize"])]
    if d["bench"]:
        items += [bench_table(d["bench"]), environment_line(d["bench"]["environment"])]
    emit(json_out, d, out, items)
    code = verify_outcome(d["verify"], junit_path, out) if d["verify"] else 0
    out.print(f"Report: {d['output']}/report.md" + ("" if report.passed else "  [bold red](gate FAILED)[/]"))
    return code


@click.command()
@click.argument("checkpoint")
@click.option("-o", "--output", required=True, help="Folder for onnx/, int8/, report.json, report.md.")
@quantize_options
@task_opt
@base_opt
@config_options(VerifyConfig, "data", only=["data"])  # the gate's data, and the benchmark's real lengths
@config_options(PruneConfig, "prune", only=["sparsity", "layers", "recover_steps"], prefix="prune_",
                flags={"sparsity": "--prune"})
@data_options
@gate_options
@threads_opt
@click.option("--bench/--no-bench", "do_bench", default=True, show_default=True, help="Benchmark the variants.")
@config_options(BenchConfig, "bench", only=["iterations", "min_seconds"], prefix="bench_")
@overwrite_option
@json_option
def compress(checkpoint, output, overwrite, json_out, junit_path, **kw):
    """[prune ->] export -> quantize -> verify -> bench in one run (exit 1 if the gate fails; artifacts stay, marked failed).

    The run is exactly the resolved recipe (``--recipe`` with the options given here on top; see
    ``--dump-recipe``), so every option reaches the run through it.
    """
    from edgekit.cli.common import current_recipe
    from edgekit.pipeline import compress as run_compress

    cfg = current_recipe()
    report, out = run_with_progress(json_out, lambda p: run_compress(
        checkpoint, output, cfg, overwrite, p, trust_remote_code=kw["trust_remote_code"]))
    sys.exit(_render_compress(report, json_out, junit_path, out))


@click.command()
@click.option("-o", "--output", default="edgekit-demo", show_default=True, help="Folder for the demo's artifacts.")
@threads_opt
@overwrite_option
@json_option
def demo(output, threads, overwrite, json_out):
    """The whole pipeline on the bundled all-MiniLM-L6-v2 (needs the 'demo' extra)."""
    from edgekit.pipeline import demo as run_demo

    report, out = run_with_progress(json_out, lambda p: run_demo(output, overwrite, _threads(threads), p))
    sys.exit(_render_compress(report, json_out, None, out))


COMMANDS = (export, quantize, verify, prune, compress, demo)
