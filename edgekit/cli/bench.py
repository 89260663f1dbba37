"""``edgekit bench``: on this CPU, and beyond it (GPU runtimes, Jetson, SSH: the target options), with rendering.

Imports click at module level, and the configs (pydantic) only: ``edgekit --help`` stays light.
"""

from __future__ import annotations

import click

from edgekit.benchmarks.bench import BenchConfig
from edgekit.cli.common import emit, json_option, run_with_progress, stack as _stack
from edgekit.benchmarks.targets import TargetConfig
from edgekit.cli.options import build, config_options
from edgekit.runtimes.tensorrt_plan import EngineOptions


target_options = _stack(config_options(TargetConfig), config_options(EngineOptions, only=["fp16"]))


def _remote_line(d: dict) -> list:
    remote = d.get("remote")
    return [f"Measured on {remote['host']} (edgekit bench {' '.join(remote['bench_args'])})"] if remote else []


def bench_target(models: list, cfg, tcfg: TargetConfig, json_out, wide: bool = False) -> int:
    """The bench command for every target but the plain CPU; returns the exit code."""
    from edgekit.benchmarks.targets import bench_on_target
    from edgekit.render import bench_table, device_table, environment_line

    report, out = run_with_progress(json_out, lambda p: bench_on_target(models, cfg, tcfg, p))
    d = report if isinstance(report, dict) else report.to_dict()
    items = [bench_table(d, wide=wide), environment_line(d["environment"])]
    table = device_table(d)  # GPU phases and memory, Jetson board figures; None when the report has none
    if table is not None:
        items.append(table)
    emit(json_out, d, out, items + _remote_line(d))
    return 0


def bench_decoders(models: list, cfg, tcfg: TargetConfig, json_out) -> int:
    """The bench command for text-generation models: time to first token and decode tokens/s, on this CPU or
    on a target (GPU, Jetson, SSH: the same paths as encoders)."""
    from edgekit.benchmarks.decode import DecodeBenchReport, bench_decoders as run
    from edgekit.render import environment_line, to_rich

    if tcfg.beyond_this_cpu():
        from edgekit.benchmarks.targets import bench_on_target

        report, out = run_with_progress(json_out, lambda p: bench_on_target(models, cfg, tcfg, p))
    else:
        report, out = run_with_progress(json_out, lambda p: run(models, cfg, p))
    d = report if isinstance(report, dict) else report.to_dict()
    emit(json_out, d, out, [to_rich(DecodeBenchReport.sections_of(d)), environment_line(d["environment"])]
         + _remote_line(d))
    return 0


@click.command()
@click.argument("models", nargs=-1, required=True)
@config_options(BenchConfig, "bench", exclude=["round_size"])
@target_options
@click.option("--wide", is_flag=True, help="Every column of the latency table (the default fits 80 columns).")
@json_option
def bench(models, wide, json_out, **kw):
    """Latency and memory of one or more MODELS (checkpoints on torch, ONNX on onnxruntime), interleaved."""
    import sys

    from edgekit.benchmarks.bench import bench as run_bench
    from edgekit.benchmarks.environment import usable_cores
    from edgekit.render import bench_table, environment_line

    cfg = build(BenchConfig, kw)
    tcfg = build(TargetConfig, kw, device=cfg.device, threads_given=cfg.threads, engine=build(EngineOptions, kw))
    cfg = cfg.replace(threads=cfg.threads or usable_cores())
    from edgekit.benchmarks.decode import decoder_models

    if decoder_models(list(models)):
        sys.exit(bench_decoders(list(models), cfg, tcfg, json_out))
    if tcfg.beyond_this_cpu():  # GPU, Jetson, SSH: benchmarks/targets.py
        sys.exit(bench_target(list(models), cfg, tcfg, json_out, wide))
    report, out = run_with_progress(json_out, lambda p: run_bench(list(models), cfg, p))
    d = report.to_dict()
    emit(json_out, d, out, [bench_table(d, wide=wide), environment_line(d["environment"])])
