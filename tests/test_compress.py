import json

import pytest

from conftest import tree_digest
from helpers import read_json, run_cli


def test_compress_end_to_end(text_ckpt, data_dir, tmp_path):
    """prune -> export -> quantize -> verify -> bench into one run folder. Every stage writes into a hidden
    .partial folder and renames it at the end: what the reports and the artifact metadata record must be where
    the files are afterwards, the pruned checkpoint included."""
    before = tree_digest(text_ckpt)
    run = tmp_path / "run"
    r = run_cli("compress", text_ckpt, "-o", run, "--prune", "0.3", "--calibration-data", data_dir / "calib.tsv",
                "--data", data_dir / "eval.tsv", "--bench-iterations", "10", "--bench-min-seconds", "0",
                "--junit", tmp_path / "j.xml", "--json", tmp_path / "run.json")
    assert tree_digest(text_ckpt) == before
    for f in ("pruned/config.json", "onnx/model.onnx", "int8/model.onnx", "report.json", "report.md",
              "int8/tokenizer.json"):
        assert (run / f).is_file(), f
    rep = read_json(run / "report.json")
    assert rep["passed"] and rep["verify"]["passed"]
    assert [v["name"] for v in rep["bench"]["variants"]] == ["torch FP32 (original)", "onnxruntime FP32 pruned 30%",
                                                             "onnxruntime INT8 pruned 30% (dynamic)"]
    assert rep["quantize"]["size_after"] < rep["quantize"]["size_before"]
    md = (run / "report.md").read_text()
    assert md.startswith("# edgekit compress: PASSED") and "## Benchmark" in md and "## Verify" in md
    assert "Report:" in r.output
    written = sorted(run.rglob("*.json"))
    assert {"report.json", "onnx/edgekit.json", "int8/edgekit.json"} <= {str(p.relative_to(run)) for p in written}
    for f in [*written, tmp_path / "run.json"]:
        assert ".partial" not in f.read_text(), f
    assert read_json(run / "onnx" / "edgekit.json")["source"] == str(run.resolve() / "pruned")
    assert read_json(run / "int8" / "edgekit.json")["quantized_from"] == str(run.resolve() / "onnx" / "model.onnx")
    assert rep["quantize"]["source"] == str(run.resolve() / "onnx" / "model.onnx")


def test_compress_gate_failure_keeps_artifacts_marked_failed(text_ckpt, data_dir, tmp_path):
    # static INT8 calibrated on one word clips real text's activations: the accuracy really drops
    (tmp_path / "one.tsv").write_text("text\nthe\n")
    r = run_cli("compress", text_ckpt, "-o", tmp_path / "run", "--data", data_dir / "eval.tsv", "--no-bench",
                "--mode", "static", "--per-tensor", "--calibration-data", tmp_path / "one.tsv", expect=1)
    assert "gate FAILED" in r.output
    rep = read_json(tmp_path / "run" / "report.json")
    assert rep["passed"] is False and rep["bench"] is None
    v = rep["verify"]
    assert v["original_metrics"]["accuracy"] - v["candidate_metrics"]["accuracy"] > v["config"]["gate"]["max_drop"]
    assert read_json(tmp_path / "run" / "int8" / "edgekit.json")["verified"] is False
    assert (tmp_path / "run" / "report.md").read_text().startswith("# edgekit compress: FAILED")


def test_compress_python_api(token_ckpt, data_dir, tmp_path):
    import edgekit.api
    from edgekit.api import CompressConfig
    from edgekit.verify import VerifyConfig

    report = edgekit.api.compress(token_ckpt, tmp_path / "t", CompressConfig(verify=VerifyConfig(data=str(data_dir / "tokens.jsonl")),
                                                                        bench=None))
    assert report.passed and report.verify["task"] == "token-classification"
    assert json.loads((tmp_path / "t" / "report.json").read_text())["passed"]


@pytest.mark.slow
def test_demo_pipeline_on_bundled_minilm(tmp_path):
    """What `edgekit demo` runs, compress(demo_checkpoint(), OUT, demo_config()) (the command's options are
    test_recipe's --dump-recipe case; the README's quickstart runs the command itself), on the real
    all-MiniLM-L6-v2, with the benchmark's timed loop cut to 10 runs a variant: its length is not what this
    tests, and the demo's 3 s a variant were a third of the suite's longest test."""
    from edgekit.pipeline import compress, demo_checkpoint, demo_config

    cfg = demo_config()
    cfg = cfg.model_copy(update={"bench": cfg.bench.replace(iterations=10, min_seconds=0)})
    rep = compress(demo_checkpoint(), tmp_path / "demo", cfg).to_dict()
    assert rep["passed"] and rep["verify"]["task"] == "feature-extraction"
    assert rep["verify"]["agreement"]["mean_cosine"] >= 0.99
    int8 = rep["bench"]["variants"][2]
    assert int8["size_bytes"] < rep["bench"]["variants"][1]["size_bytes"] / 3
    assert "## Benchmark" in (tmp_path / "demo" / "report.md").read_text()
