import json

import onnx

from conftest import tree_digest
from helpers import read_json, run_cli


def test_dynamic_is_smaller_and_agrees(text_ckpt, text_onnx, data_dir, tmp_path):
    before = tree_digest(text_onnx)
    r = run_cli("quantize", text_onnx, "-o", tmp_path / "int8", "--data", data_dir / "eval.tsv", "--json",
                tmp_path / "q.json", "--junit", tmp_path / "j.xml")
    assert tree_digest(text_onnx) == before
    rep = read_json(tmp_path / "q.json")
    assert rep["size_after"] < rep["size_before"] / 2
    assert rep["fused"]["Attention"] == 2  # ORT transformer fusion ran before quantizing
    assert rep["quantized_nodes"] >= 8 and rep["nodes_in_float"] == []
    v = rep["verification"]
    assert v["passed"] and v["agreement"]["top1_agreement"] >= 99.0
    assert v["candidate_metrics"]["accuracy"] >= v["original_metrics"]["accuracy"] - 1.0
    assert 'failures="0"' in (tmp_path / "j.xml").read_text()
    assert "Quantize (dynamic INT8)" in r.output
    meta = read_json(tmp_path / "int8" / "edgekit.json")
    assert meta["verified"] is True and meta["source"] == str(text_ckpt)


def test_quantize_accepts_a_checkpoint(text_ckpt, data_dir, tmp_path):
    before = tree_digest(text_ckpt)
    run_cli("quantize", text_ckpt, "-o", tmp_path / "int8", "--data", data_dir / "eval.tsv")
    assert tree_digest(text_ckpt) == before
    assert (tmp_path / "int8" / "model.onnx").is_file()
    ops = {n.op_type for n in onnx.load(tmp_path / "int8" / "model.onnx").graph.node}
    assert ops & {"QAttention", "MatMulInteger", "DynamicQuantizeMatMul"}
    # the ONNX it was quantized from was scratch space, gone now: what is recorded is the checkpoint
    meta = read_json(tmp_path / "int8" / "edgekit.json")
    assert meta["quantized_from"] == meta["source"] == str(text_ckpt)
    assert read_json(tmp_path / "int8" / "quantize_report.json")["source"] == str(text_ckpt)


def test_static_qdq_with_calibration_keeps_classifier_in_float(text_onnx, data_dir, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # onnxruntime's shape inference litters the current folder when it gives up
    r = run_cli("quantize", text_onnx, "-o", tmp_path / "s", "--mode", "static", "--calibration-data",
                data_dir / "calib.tsv", "--calibration-samples", "32", "--calibration-method", "percentile",
                "--data", data_dir / "eval.tsv", "--json")
    rep = json.loads(r.stdout)
    ops = [n.op_type for n in onnx.load(tmp_path / "s" / "model.onnx").graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert [n["name"] for n in rep["nodes_in_float"]] == ["/classifier/Gemm"]
    assert rep["calibration"]["samples"] == 32 and rep["calibration"]["method"] == "percentile"
    assert rep["verification"]["passed"]
    assert list(cwd.iterdir()) == []


def test_exclusions_keep_nodes_in_float(text_onnx, tmp_path):
    run_cli("quantize", text_onnx, "-o", tmp_path / "x", "--no-optimize",
            "--exclude-nodes", "/bert/encoder/layer.0/attention/self/query/MatMul", "--exclude-op-types", "Gather",
            "--json", tmp_path / "x.json")
    rep = read_json(tmp_path / "x.json")
    assert {"name": "/bert/encoder/layer.0/attention/self/query/MatMul", "op_type": "MatMul"} in rep["nodes_in_float"]
    assert rep["fused"] == {}


def test_unknown_exclude_node_is_a_user_error(text_onnx, tmp_path):
    from helpers import assert_user_error

    r = run_cli("quantize", text_onnx, "-o", tmp_path / "x", "--exclude-nodes", "no_such_node", expect=None)
    assert_user_error(r, "no_such_node")
    assert not (tmp_path / "x").exists()


def test_static_needs_calibration_data(text_onnx, tmp_path):
    from helpers import assert_user_error

    r = run_cli("quantize", text_onnx, "-o", tmp_path / "x", "--mode", "static", expect=None)
    assert_user_error(r, "--calibration-data")
    assert not (tmp_path / "x").exists()


def test_quantize_with_data_exits_like_verify(text_ckpt, tmp_path, data_dir):
    # an impossible agreement threshold: the artifact is written, marked failed, and the exit code is 1
    r = run_cli("quantize", text_ckpt, "-o", tmp_path / "q", "--data", data_dir / "eval.tsv", "--min-agreement", "100.5",
                expect=1)
    assert "FAIL" in r.output
    assert read_json(tmp_path / "q" / "edgekit.json")["verified"] is False


def test_symmetric_activations_for_tensorrt(text_onnx, data_dir, tmp_path):
    """TensorRT builds Q/DQ engines only from zero-point-free scales: --symmetric-activations gives them."""
    from onnx import numpy_helper

    run_cli("quantize", text_onnx, "-o", tmp_path / "sym", "--mode", "static", "--symmetric-activations",
            "--calibration-data", data_dir / "calib.tsv", "--calibration-samples", "16")
    model = onnx.load(tmp_path / "sym" / "model.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all((z == 0).all() for z in zero_points)
