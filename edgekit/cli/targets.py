"""``edgekit bench`` beyond this CPU: the target options (GPU runtimes, Jetson, SSH) and their rendering.

Kept apart from cli.py so that the bench command only gains one decorator and one dispatch line, and
imported by cli.py at start-up, so it imports click alone (``edgekit --help`` stays light).
"""

from __future__ import annotations

import click

from edgekit.cli.common import stack as _stack


target_options = _stack(
    click.option("--runtime", type=click.Choice(["onnxruntime", "tensorrt", "torch"]),
                 help="Runtime (default: from the artifact). tensorrt builds an engine from each ONNX first, here "
                      "or on the --host device."),
    click.option("--host", help="Benchmark on this device over SSH: user@address[:port] (the artifact is copied there)."),
    click.option("--key", type=click.Path(dir_okay=False),
                 help="SSH private key for --host (default: ssh-agent, ~/.ssh)."),
    click.option("--known-hosts", type=click.Path(dir_okay=False),
                 help="known_hosts for --host (default ~/.ssh/known_hosts)."),
    click.option("--remote-python", help="The Python that has edgekit on the --host device (default python3)."),
    click.option("--compute", type=click.Choice(["gpu", "cpu"]),
                 help="Jetson: run the model on its GPU (default) or its CPU cores."),
    click.option("--lock-clocks", is_flag=True,
                 help="Jetson: lock clocks with jetson_clocks for the run (root); restored after."),
    click.option("--power-mode", type=click.IntRange(0),
                 help="Jetson: nvpmodel mode id to set with --lock-clocks; restored after."),
    click.option("--memory-budget", type=float, metavar="GB",
                 help="Memory the model may use on a profiled device, checked before anything is copied "
                      "(default: the profile's)."),
    click.option("--fp16", is_flag=True,
                 help="TensorRT engine builds: FP16 builder flag (TensorRT 10; 11 needs an FP16 ONNX)."),
)

TARGET_KEYS = ("runtime", "host", "key", "known_hosts", "remote_python", "compute", "lock_clocks", "power_mode",
               "memory_budget", "fp16")


def wants_target(device: str, options: dict) -> bool:
    """Anything beyond a plain CPU bench? (Otherwise bench's original path runs, untouched.)"""
    return device != "cpu" or any(options.get(k) is not None and options.get(k) is not False for k in TARGET_KEYS)


def device_table(report: dict):
    """GPU phases and memory, and Jetson board figures, per variant; None when the report has none."""
    from functools import partial

    from rich.table import Table

    from edgekit.render import _num

    _fmt = partial(_num, digits=3)

    from edgekit.reports import fmt_bytes

    rows = [(v["name"], v.get("device")) for v in report.get("variants", []) if v.get("device")]
    if not rows:
        return None
    t = Table(title="Device")
    heads = ["variant", "H2D p50 ms", "compute p50 ms", "D2H p50 ms", "GPU mem (NVML)", "TRT activations",
             "RAM peak MB", "GR3D %", "module power mW", "mJ / inference", "NvMap model MB"]
    for h in heads:
        t.add_column(h, justify="left" if h == "variant" else "right")
    for name, d in rows:
        ph = d.get("phases") or {}
        js = (d.get("jetson") or {})
        ts = js.get("tegrastats") or {}
        t.add_row(name, *(_fmt((ph.get(k) or {}).get("p50")) for k in ("h2d_ms", "compute_ms", "d2h_ms")),
                  fmt_bytes(d.get("gpu_memory_bytes")), fmt_bytes(d.get("activation_bytes")),
                  _fmt(ts.get("ram_peak_mb")), _fmt(ts.get("gr3d_mean_load_pct")), _fmt(ts.get("module_power_mean_mw")),
                  _fmt(ts.get("energy_per_inference_mj")), _fmt(js.get("nvmap_model_mb")))
    notes = sorted({d.get("gpu_memory_note") for _, d in rows if d.get("gpu_memory_note")})
    t.caption = "; ".join(notes) if notes else None
    return t


def target_config(device: str, options: dict):
    from edgekit.benchmarks.targets import TargetConfig
    from edgekit.runtimes.tensorrt_plan import EngineOptions

    return TargetConfig(
        device=device, runtime=options.get("runtime"), host=options.get("host"), key=options.get("key"),
        known_hosts=options.get("known_hosts"), remote_python=options.get("remote_python") or "python3",
        threads_given=options.get("threads"), compute=options.get("compute") or "gpu",
        lock_clocks=bool(options.get("lock_clocks")), power_mode=options.get("power_mode"),
        memory_budget_gb=options.get("memory_budget"), engine=EngineOptions(fp16=bool(options.get("fp16"))))


def bench_target(models: list, cfg, device: str, options: dict, json_out) -> int:
    """The bench command for every target but the plain CPU; returns the exit code."""
    from edgekit.benchmarks.targets import bench_on_target
    from edgekit.cli import _emit, _run
    from edgekit.render import bench_table, environment_line

    tcfg = target_config(device, options)
    report, out = _run(json_out, lambda p: bench_on_target(models, cfg, tcfg, p))
    d = report if isinstance(report, dict) else report.to_dict()
    items = [bench_table(d), environment_line(d["environment"])]
    table = device_table(d)
    if table is not None:
        items.append(table)
    if d.get("remote"):
        items.append(f"Measured on {d['remote']['host']} (edgekit bench {' '.join(d['remote']['bench_args'])})")
    _emit(json_out, d, out, items)
    return 0
