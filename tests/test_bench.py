import json

from helpers import run_cli


def test_bench_two_variants_interleaved(text_ckpt, tmp_path, data_dir):
    run_cli("export", text_ckpt, "-o", tmp_path / "onnx")
    r = run_cli("bench", text_ckpt, tmp_path / "onnx", "--iterations", "30", "--min-seconds", "0.2", "--warmup", "2",
                "--data", data_dir / "eval.tsv", "--samples", "40", "--threads", "1", "--json")
    rep = json.loads(r.stdout)
    torch_v, ort_v = rep["variants"]
    assert torch_v["runtime"] == "torch-fp32" and ort_v["runtime"] == "onnxruntime"
    for v in rep["variants"]:
        lat = v["latency"]
        assert lat["iterations"] >= 30 and lat["seconds"] >= 0.2
        assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert len(v["samples_ms"]) == lat["iterations"]
        assert v["first_call_ms"] > 0 and v["throughput_samples_s"] > 0
        assert v["rss_peak_bytes"] >= v["rss_baseline_bytes"] > 0
    # each variant in its own process: the ONNX one never imported torch, so its peak is far below torch's
    assert ort_v["rss_peak_bytes"] < torch_v["rss_peak_bytes"] / 2
    env = rep["environment"]
    assert env["threads"] == 1 and env["logical_cores"] >= 1 and env["libraries"]["onnxruntime"]
    assert "interleaved" in rep["method"] and "40 real examples" in rep["inputs"]["description"]


def test_bench_table_and_ratios(text_ckpt, tmp_path):
    run_cli("export", text_ckpt, "-o", tmp_path / "onnx")
    r = run_cli("bench", tmp_path / "onnx", tmp_path / "onnx", "--iterations", "10", "--min-seconds", "0",
                "--seq-len", "16", "--batch-size", "2")
    assert "p50 vs first" in r.output and "1.00x" in r.output
    assert "synthetic token ids, batch 2 x sequence 16" in r.output


def test_latency_stats():
    from edgekit.benchmarks.bench import LatencyStats

    s = LatencyStats.from_ns([1_000_000 * i for i in range(1, 101)])
    assert s.p50_ms == 50.5 and s.min_ms == 1 and s.max_ms == 100 and s.iterations == 100
