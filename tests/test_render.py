"""Markdown and the terminal draw the same sections: same headers, same cells; the bench table fits 80 columns."""

import dataclasses
import re

import pytest

from edgekit import render
from edgekit.benchmarks.bench import BenchReport, LatencyStats
from edgekit.compress.prune import PruneReport
from edgekit.compress.quantize import QuantizeReport
from edgekit.pipeline import CompressReport
from edgekit.release.gate import RegressionGateReport
from edgekit.reports import to_markdown, to_rich
from edgekit.runtimes.export import ExportReport
from edgekit.verify import VerifyReport

MIB = 2**20


def _latency(center_ms: float) -> dict:
    ns = [int(1e6 * center_ms * (0.9 + 0.002 * i)) for i in range(100)]
    return dataclasses.asdict(LatencyStats.from_ns(ns))


def _variant(name, runtime, p50, rss_mib, size_mib, **extra):
    return {"name": name, "path": f"/runs/bert-base-sst2/{runtime}", "runtime": runtime, "size_bytes": int(size_mib * MIB),
            "load_seconds": 1.2, "first_call_ms": 40.0 * p50, "latency": _latency(p50),
            "throughput_samples_s": 1000 / p50, "rss_baseline_bytes": 80 * MIB, "rss_peak_bytes": int(rss_mib * MIB),
            "samples_ms": [], "device": None, **extra}


BENCH = {
    "kind": "BenchReport",
    "variants": [
        _variant("torch FP32 (original)", "torch-fp32", 123.456, 1234.5, 417.7),
        _variant("onnxruntime FP32 pruned 50%", "onnxruntime", 9.5123, 512.3, 208.9,
                 rss_load_peak_bytes=400 * MIB, rss_run_peak_bytes=12 * MIB),  # the fields of newer reports
        _variant("onnxruntime INT8 pruned 50% (dynamic)", "onnxruntime", 0.4512, 150.2, 52.31),
    ],
    "environment": {"cpu_model": "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "isa_flags": ["avx2", "avx512f", "avx512_vnni"],
                    "logical_cores": 8, "threads": 8, "libraries": {"onnxruntime": "1.20.1", "torch": "2.5.1", "tensorrt": None}},
    "inputs": {"description": "200 real examples from eval.tsv at batch 1, token lengths median 12 (min 4, max 40)",
               "batch_size": 1},
    "method": "one process per variant, interleaved in rounds of 10 iterations, the order rotating each round",
    "config": {}, "schema_version": 1,
}

EXPORT = ExportReport(source="/ckpt/bert-base-sst2", output="/runs/bert-base-sst2/onnx", task="text-classification",
                      opset=18, max_abs_diff=3.2e-6, atol=1e-4, validation_inputs="32 examples from eval.tsv",
                      shapes_checked=[[8, 12]], onnx_bytes=int(417.7 * MIB), seconds=12.5)

VERIFY = VerifyReport(task="text-classification", original="/ckpt/bert-base-sst2", candidate="/runs/bert-base-sst2/int8",
                      runtimes={"original": "torch-fp32", "candidate": "onnxruntime"}, data={"path": "eval.tsv"},
                      n_examples=872, original_metrics={"accuracy": 92.32}, candidate_metrics={"accuracy": 90.02},
                      agreement={"top1_agreement": 96.1, "max_abs_logit_diff": 0.8123},
                      checks=[{"name": "accuracy_drop_points", "value": 2.3, "threshold": 1.0, "comparison": "<=",
                               "passed": False}],
                      passed=False, seconds=30.0)

QUANTIZE = {"source": "/runs/bert-base-sst2/onnx/model.onnx", "output": "/runs/bert-base-sst2/int8", "mode": "dynamic",
            "size_before": int(417.7 * MIB), "size_after": int(105.2 * MIB), "fused": {"Attention": 12, "SkipLayerNorm": 24},
            "quantized_nodes": 96, "nodes_in_float": [{"name": "/classifier/Gemm", "op_type": "Gemm"}],
            "float_op_counts": {}, "calibration": None, "seconds": 9.0, "config": {}}

PRUNE = {"source": "/ckpt", "output": "/runs/pruned", "model_type": "bert", "task": "text-classification",
         "criterion": "fisher-labels", "calibration_samples": 256, "seq_len": 128, "params_before": 109_483_778,
         "params_after": 80_123_456, "encoder_params_before": 85_054_464, "encoder_params_after": 55_694_142,
         "flops_before": 22_000_000_000, "flops_after": 11_000_000_000, "flops_reduction": 0.5, "params_reduction": 0.268,
         "layers": [{"layer": i, "heads_kept": 8, "heads_total": 12, "neurons_kept": 1536, "neurons_total": 3072,
                     "flops_before": 1_800_000_000, "flops_after": 900_000_000,
                     "refit": {"attention": {"error_before": 0.1234, "error_after": 0.0456}}} for i in range(2)],
         "recover": {"steps": 100, "loss_before": 0.52, "loss_after": 0.61, "reverted": True},
         "seconds": 95.2, "stage_seconds": {"importance": 60.1, "refit": 30.0}, "config": {}}

GATE = {"current": "runs/new", "baseline": "runs/main", "passed": False, "recipe_changes": [
            {"key": "quantize.mode", "baseline": "dynamic", "current": "static"}],
        "warnings": ["latency not compared: the environments differ (cpu_model Some Other CPU vs Intel, threads 4 vs 8)"],
        "checks": [{"name": "accuracy", "unit": "points", "baseline": 92.3, "current": 90.3, "delta": -2.0,
                    "threshold": "-0.5 pt", "passed": False},
                   {"name": "int8 size", "unit": "bytes", "baseline": 110_000_000, "current": 110_000_000, "delta": 0.0,
                    "threshold": "+5%", "passed": True},
                   {"name": "p50 onnxruntime INT8", "unit": "ms", "baseline": 1.2, "current": 1.3, "delta": 0.08,
                    "threshold": "+10%", "passed": None}]}

REPORTS = {
    "bench": BenchReport.sections_of(BENCH),
    "bench wide": BenchReport.sections_of(BENCH, wide=True),
    "export": EXPORT.sections(),
    "verify": VERIFY.sections(),
    "quantize": QuantizeReport.sections_of(QUANTIZE),
    "prune": PruneReport.sections_of(PRUNE),
    "gate": RegressionGateReport.sections_of(GATE),
}


def _terminal(renderables, width=200, crop=True) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, color_system=None)
    for r in renderables if isinstance(renderables, list) else [renderables]:
        console.print(r, crop=crop)
    return console.export_text()


def _md_tables(md: str) -> list:
    """(headers, rows) of every Markdown table, verdict marks taken off."""
    tables, current = [], None
    for line in md.splitlines():
        if re.fullmatch(r"\|(-+:?\|)+", line):
            continue
        if not line.startswith("| "):
            current = None
            continue
        cells = [re.sub(r"^(✅|❌|⚠️) |\*\*", "", c.strip()).replace("\\|", "|") for c in line[2:-2].split(" | ")]
        if current is None:
            current = (cells, [])
            tables.append(current)
        else:
            current[1].append(cells)
    return tables


def _rich_tables(text: str) -> list:
    """(headers, rows) of every table rich drew (wide enough that nothing wraps)."""
    tables = []
    for line in text.splitlines():
        edge = line[:1]
        if edge == "┏":
            tables.append(([], []))
        elif edge in "┃│" and line:
            cells = [c.strip() for c in re.split("[┃│]", line)[1:-1]]
            tables[-1][0 if edge == "┃" else 1].append(cells)
    # a header may take several lines: join each column's pieces
    return [([" ".join(p for p in parts if p) for parts in zip(*heads)], rows) for heads, rows in tables]


def _words(text: str) -> str:
    return " ".join(text.replace("`", "").split())


@pytest.mark.parametrize("name", REPORTS)
def test_markdown_and_terminal_show_the_same_table(name):
    sections = REPORTS[name]
    md, text = to_markdown(sections), _terminal(to_rich(sections))
    described = [(list(s.headers), [[c.text for c in row] for row in s.rows]) for s in sections if s.headers]
    assert described and _md_tables(md) == described
    assert _rich_tables(text) == described
    for s in sections:
        for words in ([s.title] if s.title else []) + [_words(n.text) for n in s.notes]:
            assert words in _words(md) and words in _words(text), words


def test_the_cli_renderers_draw_what_report_md_holds():
    # What the commands print (edgekit.render) against what report.md / to_markdown() writes, from one report.
    pairs = [(render.export_table(EXPORT.to_dict()), EXPORT.to_markdown()),
             (render.verify_tables(VERIFY.to_dict()), VERIFY.to_markdown()),
             (render.quantize_table(QUANTIZE), to_markdown(QuantizeReport.sections_of(QUANTIZE))),
             (render.prune_tables(PRUNE), to_markdown(PruneReport.sections_of(PRUNE))),
             (render.bench_table(BENCH, wide=True), to_markdown(BenchReport.sections_of(BENCH, wide=True)))]
    for drawn, md in pairs:
        assert _rich_tables(_terminal(drawn)) == _md_tables(md)
    assert render.environment_line(BENCH["environment"]) in to_markdown(BenchReport.sections_of(BENCH))


@pytest.mark.parametrize("wide", [False, True])
def test_bench_table_at_80_columns_cuts_nothing(wide):
    text = _terminal(render.bench_table(BENCH, wide=wide), width=80)
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    if wide:
        return  # every column cannot fit 80: rich folds (never truncates) what it must
    section = BenchReport.sections_of(BENCH)[0]
    assert list(section.headers) == ["variant", "p50 (ms)", "p90 (ms)", "p99 (ms)", "RSD (%)", "peak RSS (MiB)",
                                     "size (MiB)", "p50 vs first"]
    body = text.split("┡")[1]  # below the header: every figure and every word of a name whole, on one line
    for row in section.rows:
        for cell in row:
            for word in cell.text.split():
                assert re.search(rf"(^|[\s│]){re.escape(word)}($|[\s│])", body, re.M), (word, text)
    assert "0.0037x" in body and "0.00x" not in body  # a large speed-up keeps its digits


def test_bench_wide_has_every_column_and_tolerates_older_reports():
    wide = BenchReport.sections_of(BENCH, wide=True)[0]
    for h in ("first call (ms)", "mean (ms)", "std (ms)", "samples/s", "load RSS (MiB)", "steady RSS growth (MiB)",
              "size vs first"):
        assert h in wide.headers
    assert wide.column("load RSS (MiB)") == ["-", "400.0", "-"]
    old = {**BENCH, "variants": [{k: v for k, v in var.items() if k not in ("rss_load_peak_bytes", "rss_run_peak_bytes")}
                                 for var in BENCH["variants"]]}
    for var in old["variants"]:
        var["latency"] = {k: v for k, v in var["latency"].items() if k != "rsd_percent"}
    old_wide = BenchReport.sections_of(old, wide=True)[0]
    assert "load RSS (MiB)" not in old_wide.headers  # no column of dashes
    assert old_wide.column("RSD (%)") == wide.column("RSD (%)")  # from std / mean when the report predates it


def test_verdicts_are_marked_in_both_forms():
    md = VERIFY.to_markdown()
    assert md.startswith("## Verify: FAILED (text-classification, 872 examples)")
    assert "❌ **FAIL**" in md and "Original on torch-fp32, candidate on onnxruntime." in md
    gate_md = to_markdown(REPORTS["gate"])
    row = next(line for line in gate_md.splitlines() if line.startswith("| accuracy"))
    assert "-2.00 pt" in row and "FAIL" in row
    assert "<details><summary>Recipe changes</summary>" in gate_md and "> ⚠️ latency not compared" in gate_md
    warning = next(line for line in _terminal(to_rich(REPORTS["gate"]), width=60, crop=False).splitlines()
                   if line.startswith("Warning:"))
    assert warning.endswith("threads 4 vs 8)")  # one unbroken line, even on a narrow terminal


def test_compress_report_is_its_stages_sections():
    d = {"source": "/ckpt", "output": "/runs/x", "passed": True, "export": EXPORT.to_dict(), "quantize": QUANTIZE,
         "verify": {**VERIFY.to_dict(), "passed": True}, "bench": BENCH, "prune": PRUNE, "config": {}}
    md = to_markdown(CompressReport.sections_of(d, wide=True))
    assert md.startswith("# edgekit compress: PASSED") and "## Benchmark" in md and "## Verify" in md
    assert md.index("## Prune") < md.index("## Export") < md.index("## Quantize") < md.index("## Verify") < md.index(
        "## Benchmark")
    assert "samples/s" in md  # report.md carries the wide benchmark table
