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
    if d.get("remote"):
        items.append(f"Measured on {d['remote']['host']} (edgekit bench {' '.join(d['remote']['bench_args'])})")
    emit(json_out, d, out, items)
    return 0


def bench_decoders(models: list, decoders: list, cfg, tcfg: TargetConfig, json_out) -> int:
    """The bench command for text-generation models: time to first token and decode tokens/s."""
    from edgekit.benchmarks.decode import DecodeBenchReport, bench_decoders as run
    from edgekit.errors import EdgekitError
    from edgekit.render import environment_line, to_rich

    if not all(decoders):
        raise EdgekitError("the models mix decoder language models with encoders", "benchmark each kind on its own")
    if tcfg.beyond_this_cpu():
        raise EdgekitError("decoder benchmarks run on this machine's CPU for now",
                           "drop --device/--host (GPU and Jetson decoder benchmarks are not in edgekit yet)")
    report, out = run_with_progress(json_out, lambda p: run(models, cfg, p))
    d = report.to_dict()
    emit(json_out, d, out, [to_rich(DecodeBenchReport.sections_of(d)), environment_line(d["environment"])])
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
    from edgekit.benchmarks.decode import is_decoder_artifact

    decoders = [is_decoder_artifact(m) for m in models]
    if any(decoders):
        sys.exit(bench_decoders(list(models), decoders, cfg, tcfg, json_out))
    if tcfg.beyond_this_cpu():  # GPU, Jetson, SSH: benchmarks/targets.py
        sys.exit(bench_target(list(models), cfg, tcfg, json_out, wide))
    report, out = run_with_progress(json_out, lambda p: run_bench(list(models), cfg, p))
    d = report.to_dict()
    emit(json_out, d, out, [bench_table(d, wide=wide), environment_line(d["environment"])])
