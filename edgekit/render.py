"""Rich rendering of reports for the terminal (the CLI's only presentation code)."""

from __future__ import annotations

from rich.table import Table

from edgekit.reports import fmt_bytes


def _num(v, digits=4):
    return "-" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


def export_table(r: dict) -> Table:
    t = Table(title=f"Export ({r['task']}, opset {r['opset']})")
    for c in ("output", "size", "max abs diff vs PyTorch", "tolerance", "validated on"):
        t.add_column(c)
    t.add_row(r["output"], fmt_bytes(r["onnx_bytes"]), f"{r['max_abs_diff']:.2e}", f"{r['atol']:.0e}", r["validation_inputs"])
    return t


def quantize_table(r: dict) -> Table:
    t = Table(title=f"Quantize ({r['mode']} INT8)")
    for c in ("output", "size before", "size after", "smaller by", "INT8 nodes", "compute nodes in float"):
        t.add_column(c)
    floats = ", ".join(n["name"] for n in r["nodes_in_float"]) or "none"
    t.add_row(r["output"], fmt_bytes(r["size_before"]), fmt_bytes(r["size_after"]),
              f"{r['size_before'] / max(r['size_after'], 1):.2f}x", str(r["quantized_nodes"]), floats)
    if r.get("fused"):
        t.caption = "fused first: " + ", ".join(f"{k} x{v}" for k, v in r["fused"].items())
    return t


def prune_tables(r: dict) -> list[Table]:
    t = Table(title=f"Prune ({r['criterion']}, {r['calibration_samples']} calibration samples, {r['seconds']:.1f} s)")
    for c in ("", "before", "after", "removed"):
        t.add_column(c)
    t.add_row(f"encoder GFLOPs @ {r['seq_len']} tokens", f"{r['flops_before'] / 1e9:.3f}", f"{r['flops_after'] / 1e9:.3f}",
              f"{r['flops_reduction']:.1%}")
    t.add_row("parameters", f"{r['params_before']:,}", f"{r['params_after']:,}", f"{r['params_reduction']:.1%}")
    t.add_row("encoder parameters", f"{r['encoder_params_before']:,}", f"{r['encoder_params_after']:,}",
              f"{1 - r['encoder_params_after'] / max(r['encoder_params_before'], 1):.1%}")
    layers = Table(title="Per layer (kept)")
    for c in ("layer", "heads", "FFN neurons", "FLOPs removed"):
        layers.add_column(c)
    for lr in r["layers"]:
        layers.add_row(str(lr["layer"]), f"{lr['heads_kept']}/{lr['heads_total']}",
                       f"{lr['neurons_kept']}/{lr['neurons_total']}",
                       f"{1 - lr['flops_after'] / max(lr['flops_before'], 1):.0%}")
    return [t, layers]


def verify_tables(r: dict) -> list[Table]:
    head = "[green]PASSED[/]" if r["passed"] else "[bold red]FAILED[/]"
    tables = []
    if r["original_metrics"]:
        t = Table(title=f"Verify {head}: {r['task']}, {r['n_examples']} examples")
        for c in ("metric", "original", "candidate", "delta"):
            t.add_column(c, justify="right" if c != "metric" else "left")
        for k, v in r["original_metrics"].items():
            c = r["candidate_metrics"][k]
            t.add_row(k, f"{v:.2f}", f"{c:.2f}", f"{c - v:+.2f}")
        tables.append(t)
    a = Table(title=None if tables else f"Verify {head}: {r['task']}, {r['n_examples']} examples")
    a.add_column("agreement with original")
    a.add_column("value", justify="right")
    for k, v in r["agreement"].items():
        a.add_row(k, _num(v))
    tables.append(a)
    g = Table(title="Gate")
    for c in ("check", "value", "threshold", "result"):
        g.add_column(c)
    for c in r["checks"]:
        g.add_row(c["name"], _num(c["value"]), f"{c['comparison']} {c['threshold']}",
                  "[green]pass[/]" if c["passed"] else "[bold red]FAIL[/]")
    tables.append(g)
    return tables


def bench_table(r: dict) -> Table:
    t = Table(title="Benchmark", caption=f"{r['inputs']['description']}; {r['method']}")
    heads = ["variant", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "samples/s", "first call ms", "peak RSS", "size",
             "p50 vs first", "size vs first"]
    for h in heads:
        t.add_column(h, justify="left" if h == "variant" else "right")
    base = r["variants"][0]
    for v in r["variants"]:
        lat = v["latency"]
        t.add_row(v["name"], f"{lat['p50_ms']:.3f}", f"{lat['p90_ms']:.3f}", f"{lat['p99_ms']:.3f}", f"{lat['mean_ms']:.3f}",
                  f"{lat['std_ms']:.3f}", f"{v['throughput_samples_s']:.1f}", f"{v['first_call_ms']:.2f}",
                  fmt_bytes(v["rss_peak_bytes"]), fmt_bytes(v["size_bytes"]),
                  f"{lat['p50_ms'] / base['latency']['p50_ms']:.2f}x", f"{v['size_bytes'] / max(base['size_bytes'], 1):.2f}x")
    return t


def environment_line(env: dict) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items() if v)
    return (f"{env['cpu_model']} ({' '.join(env['isa_flags'])}), {env['logical_cores']} logical cores, "
            f"{env['threads']} threads; {libs}")
