import json

import pytest

from conftest import tree_digest
from helpers import read_json, run_cli


def test_compress_end_to_end(text_ckpt, data_dir, tmp_path):
    before = tree_digest(text_ckpt)
    r = run_cli("compress", text_ckpt, "-o", tmp_path / "run", "--data", data_dir / "eval.tsv", "--bench-iterations", "10",
                "--bench-min-seconds", "0", "--junit", tmp_path / "j.xml")
    assert tree_digest(text_ckpt) == before
    run = tmp_path / "run"
    for f in ("onnx/model.onnx", "int8/model.onnx", "report.json", "report.md", "int8/tokenizer.json"):
        assert (run / f).is_file(), f
    rep = read_json(run / "report.json")
    assert rep["passed"] and rep["verify"]["passed"]
    assert [v["name"] for v in rep["bench"]["variants"]] == ["torch FP32 (original)", "onnxruntime FP32",
                                                             "onnxruntime INT8 (dynamic)"]
    assert rep["quantize"]["size_after"] < rep["quantize"]["size_before"]
    md = (run / "report.md").read_text()
    assert md.startswith("# edgekit compress: PASSED") and "## Benchmark" in md and "## Verify" in md
    assert "Report:" in r.output


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
def test_demo_on_bundled_minilm(tmp_path):
    r = run_cli("demo", "-o", tmp_path / "demo", "--json", tmp_path / "demo.json")
    rep = read_json(tmp_path / "demo.json")
    assert rep["passed"] and rep["verify"]["task"] == "feature-extraction"
    assert rep["verify"]["agreement"]["mean_cosine"] >= 0.99
    int8 = rep["bench"]["variants"][2]
    assert int8["size_bytes"] < rep["bench"]["variants"][1]["size_bytes"] / 3
    assert "Benchmark" in r.output


def test_recorded_paths_are_final_never_staging(text_ckpt, data_dir, tmp_path):
    # Every stage writes into a hidden .partial folder and renames it at the end: what the reports and the
    # artifact metadata record must be where the files are afterwards, pruned checkpoint included.
    run = tmp_path / "run"
    r = run_cli("compress", text_ckpt, "-o", run, "--prune", "0.3", "--calibration-data", data_dir / "calib.tsv",
                "--data", data_dir / "eval.tsv", "--bench-iterations", "5", "--bench-min-seconds", "0", "--json")
    assert ".partial" not in r.stdout
    written = sorted(run.rglob("*.json"))
    assert {"report.json", "onnx/edgekit.json", "int8/edgekit.json"} <= {str(p.relative_to(run)) for p in written}
    for f in written:
        assert ".partial" not in f.read_text(), f
    assert read_json(run / "onnx" / "edgekit.json")["source"] == str(run.resolve() / "pruned")
    assert read_json(run / "int8" / "edgekit.json")["quantized_from"] == str(run.resolve() / "onnx" / "model.onnx")
    assert read_json(run / "report.json")["quantize"]["source"] == str(run.resolve() / "onnx" / "model.onnx")
