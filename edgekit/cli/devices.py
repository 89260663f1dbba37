"""``edgekit devices`` (the device profiles) and ``edgekit engine build|plan`` (TensorRT engines).

Registered at the end of cli.py. Nothing heavy is imported at module level (click only), and nothing
from edgekit.cli either: cli.py imports this module while it is still being initialised.
"""

from __future__ import annotations

from dataclasses import asdict

import click

from edgekit.cli.common import json_option as _json, output_width, stack, write_json


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


_engine_options = stack(
        click.option("--fp16", is_flag=True,
                     help="FP16: the builder flag on TensorRT 10; on 11 the ONNX must carry FP16 types."),
        click.option("--batch", help="Batch range MIN,OPT,MAX of the engine's profile (default 1,1,32)."),
        click.option("--seq", help="Sequence range MIN,OPT,MAX (default 1,128,512, capped at the model's positions)."),
        click.option("--min-shapes", help="Whole shapes instead: input_ids:1x1,attention_mask:1x1 (with opt and max)."),
        click.option("--opt-shapes", help="Shapes TensorRT tunes for, e.g. input_ids:1x128."),
        click.option("--max-shapes", help="Largest shapes, e.g. input_ids:32x512."),
        click.option("--workspace-mb", type=click.IntRange(1), help="Builder workspace limit in MiB (default: TensorRT's)."),
        click.option("--timing-cache", type=click.Path(dir_okay=False),
                     help="Timing cache file (default: one per TensorRT version and GPU under ~/.cache/edgekit)."),
        click.option("--no-timing-cache", is_flag=True, help="Build without a timing cache."),
)


def engine_options_from(kw):
    from edgekit.runtimes.tensorrt_plan import EngineOptions, parse_range, parse_shapes

    shapes = {k: parse_shapes(kw[k], k.replace("_", "-")) if kw.get(k) else None
              for k in ("min_shapes", "opt_shapes", "max_shapes")}
    return EngineOptions(fp16=kw["fp16"], batch=parse_range(kw["batch"], "batch") if kw.get("batch") else None,
                         seq=parse_range(kw["seq"], "seq") if kw.get("seq") else None, **shapes,
                         workspace_mb=kw.get("workspace_mb"), timing_cache=kw.get("timing_cache"),
                         use_timing_cache=not kw.get("no_timing_cache"))


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
    from edgekit.cli import _emit, _run
    from edgekit.runtimes.tensorrt import build_engine, engine_report

    opts = engine_options_from(kw)
    path, out = _run(json_out, lambda p: build_engine(model, output, opts, overwrite, p))
    r = engine_report(path).to_dict()
    lines = [f"Engine: {r['engine']} ({r['engine_bytes'] / 2**20:.1f} MiB, TensorRT {r['built_with']['tensorrt']}, "
             f"{r['built_with']['gpu_name']}, compute capability {r['built_with']['compute_capability']})"]
    lines += [f"  {n}" for n in r["plan"]["notes"]]
    _emit(json_out, r, out, lines)


@engine.command("plan")
@click.argument("model")
@_engine_options
@click.option("--tensorrt-version", help="Plan for this TensorRT release, e.g. 10.3 (default: the installed one).")
@_json
def engine_plan(model, tensorrt_version, json_out, **kw):
    """Show how an engine would be built (profiles, typing, FP16) without TensorRT or a GPU."""
    from edgekit.checkpoint import require_path
    from edgekit.errors import EdgekitError, MissingExtra
    from edgekit.runtimes.base import onnx_file
    from edgekit.runtimes.tensorrt import import_tensorrt, plan_engine

    onnx = onnx_file(require_path(model, "model"))
    opts = engine_options_from(kw)
    if tensorrt_version is None:
        try:
            tensorrt_version = str(import_tensorrt().__version__)
        except MissingExtra:
            raise EdgekitError("TensorRT is not installed here, so its version is unknown",
                               "pass the target's version, e.g. --tensorrt-version 10.3 (JetPack 6), or "
                               "pip install 'edgekit[tensorrt]'") from None
    plan = plan_engine(onnx, opts, tensorrt_version)[0]
    d = {"kind": "BuildPlan", "onnx": str(onnx), **plan.to_dict()}
    write_json(json_out, d)
    if json_out == "-":
        return
    click.echo(f"TensorRT {plan.tensorrt}: {'strongly' if plan.strongly_typed else 'weakly'} typed"
               f"{', FP16 flag' if plan.fp16_flag else ''}")
    for name, (lo, opt, hi) in plan.profiles.items():
        click.echo(f"  {name}: min {'x'.join(map(str, lo))}, opt {'x'.join(map(str, opt))}, max {'x'.join(map(str, hi))}")
    for n in plan.notes:
        click.echo(f"  {n}")
