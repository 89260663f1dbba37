"""``edgekit devices`` (the device profiles) and ``edgekit engine build|plan`` (TensorRT engines).

Imports click and the configs at module level (``edgekit --help`` stays light), and no other command module.
"""

from __future__ import annotations

from dataclasses import asdict

import click

from edgekit.cli.common import json_option as _json, output_width, write_json
from edgekit.cli.options import build, config_options
from edgekit.runtimes.tensorrt_plan import EngineOptions


@click.command()
@_json
def devices(json_out):
    """The device profiles edgekit knows (use a name with bench --device), and whether this machine is a Jetson."""
    from edgekit.devices.detect import detect_jetson
    from edgekit.devices.profiles import list_profiles

    profiles = list_profiles()
    here = detect_jetson(query_power_mode=False)
    d = {"kind": "DeviceList", "schema_version": 1, "profiles": [asdict(p) for p in profiles],
         "this_machine": here.to_dict() if here else None}
    write_json(json_out, d)
    if json_out == "-":
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Device profiles (edgekit bench --device NAME)")
    for c in ("name", "kind", "memory", "JetPack / TensorRT", "power modes", "GPU"):
        t.add_column(c)
    for p in profiles:
        stacks = "; ".join(f"{s.jetpack} / {s.tensorrt or '?'}" for s in p.software if s.jetpack) or \
                 ", ".join(f"TensorRT {s.tensorrt}" for s in p.software if s.tensorrt) or "-"
        modes = ", ".join(m.name if m.id is None else f"{m.id}: {m.name}" for m in p.power_modes) or "-"
        gpu = f"{p.gpu_arch} (sm {p.compute_capability})" if p.gpu_arch else "-"
        t.add_row(p.name, p.kind, f"{p.memory_gb:g} GB" if p.memory_gb else "read at run time", stacks, modes, gpu)
    t.caption = (f"this machine: {here.model} ({here.profile or 'no matching profile'})" if here
                 else "this machine is not a Jetson")
    Console(width=output_width()).print(t)


_engine_options = config_options(EngineOptions)


@click.group()
def engine():
    """TensorRT engines, built on the device that will run them (engines are not portable)."""


@engine.command("build")
@click.argument("model")
@click.option("-o", "--output", required=True, help="Folder for model.engine, its sidecar, config and tokenizer.")
@_engine_options
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it is not empty.")
@_json
def engine_build(model, output, overwrite, json_out, **kw):
    """Build a TensorRT engine from an ONNX folder (Q/DQ INT8 models are built strongly typed)."""
    from edgekit.cli.common import emit as _emit, run_with_progress as _run
    from edgekit.runtimes.tensorrt import build_engine, engine_report

    opts = build(EngineOptions, kw)
    path, out = _run(json_out, lambda p: build_engine(model, output, opts, overwrite, p))
    r = engine_report(path).to_dict()
    lines = [f"Engine: {r['engine']} ({r['engine_bytes'] / 2**20:.1f} MiB, TensorRT {r['built_with']['tensorrt']}, "
             f"{r['built_with']['gpu_name']}, compute capability {r['built_with']['compute_capability']})"]
    lines += [f"  {n}" for n in r["plan"]["notes"]]
    _emit(json_out, r, out, lines)


@engine.command("plan")
@click.argument("model")
@_engine_options
@click.option("--tensorrt-version", help="Plan for this TensorRT release, e.g. 10.3 (default: the installed one, "
                                         "else the cuda-gpu profile's).")
@click.option("--device", "device_profile", metavar="PROFILE",
              help="Plan for the newest TensorRT this device profile records, e.g. jetson-orin-nano-8gb.")
@_json
def engine_plan(model, tensorrt_version, device_profile, json_out, **kw):
    """Show how an engine would be built (profiles, typing, FP16) without TensorRT or a GPU."""
    from edgekit.checkpoint import require_path
    from edgekit.runtimes.base import onnx_file
    from edgekit.runtimes.tensorrt import plan_engine, planning_version

    onnx = onnx_file(require_path(model, "model"))
    opts = build(EngineOptions, kw)
    tensorrt_version, version_source = planning_version(tensorrt_version, device_profile)
    plan = plan_engine(onnx, opts, tensorrt_version)[0]
    d = {"kind": "BuildPlan", "onnx": str(onnx), **plan.to_dict(), "tensorrt_source": version_source}
    write_json(json_out, d)
    if json_out == "-":
        return
    click.echo(f"TensorRT {plan.tensorrt}: {'strongly' if plan.strongly_typed else 'weakly'} typed"
               f"{', FP16 flag' if plan.fp16_flag else ''}")
    click.echo(f"  TensorRT version: {version_source}")
    for name, (lo, opt, hi) in plan.profiles.items():
        click.echo(f"  {name}: min {'x'.join(map(str, lo))}, opt {'x'.join(map(str, opt))}, max {'x'.join(map(str, hi))}")
    for n in plan.notes:
        click.echo(f"  {n}")
