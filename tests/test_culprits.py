"""Culprit ranking (edgekit.compress.culprits) on a model that INT8 really breaks in one known MatMul, and static
INT8 in the QOperator form (quantize --format qoperator)."""

import json
from collections import Counter

import onnx
import pytest

from fragile import build_fragile_classifier, fragile_node
from helpers import assert_user_error, read_json, run_cli

from edgekit.compress.culprits import layer_of, rank_culprits
from edgekit.compress.quantize import QuantizeConfig
from edgekit.errors import EdgekitError


@pytest.fixture(scope="module")
def fragile(text_ckpt, tmp_path_factory):
    """The fragile copy of the tiny classifier and its export: {"ckpt", "onnx"} (read-only for the tests)."""
    root = tmp_path_factory.mktemp("fragile")
    ckpt = build_fragile_classifier(text_ckpt, root / "ckpt")
    run_cli("export", ckpt, "-o", root / "onnx")
    return {"ckpt": ckpt, "onnx": root / "onnx"}


@pytest.fixture(scope="module")
def ranking(fragile, data_dir):
    return rank_culprits(fragile["onnx"], QuantizeConfig(), data_dir / "eval.tsv")


def test_fragile_model_keeps_its_fp32_accuracy(text_ckpt, fragile, data_dir, tmp_path):
    run_cli("verify", text_ckpt, fragile["ckpt"], "--data", data_dir / "eval.tsv", "--json", tmp_path / "v.json")
    v = read_json(tmp_path / "v.json")
    assert v["candidate_metrics"]["accuracy"] == v["original_metrics"]["accuracy"] >= 90.0
    assert v["agreement"]["top1_agreement"] == 100.0 and v["agreement"]["max_abs_logit_diff"] < 1e-2


def test_dynamic_int8_of_the_fragile_model_fails_the_gate(fragile, data_dir, tmp_path):
    r = run_cli("quantize", fragile["onnx"], "-o", tmp_path / "q", "--data", data_dir / "eval.tsv", "--json",
                tmp_path / "q.json", expect=1)
    assert "FAIL" in r.output
    v = read_json(tmp_path / "q.json")["verification"]
    assert v["original_metrics"]["accuracy"] - v["candidate_metrics"]["accuracy"] > 20.0


def test_the_fragile_matmul_ranks_first(ranking, data_dir):
    first, second = ranking.nodes[0], ranking.nodes[1]
    assert ranking.worst == first["name"] == fragile_node()
    assert first["op_type"] == "MatMul" and first["layer"] == 1
    assert first["error"] > 100 * max(second["error"], 1e-9) and first["top1_flips"] > 0
    assert ranking.layers[0] == {"layer": 1, "nodes": 4, "error": pytest.approx(sum(
        n["error"] for n in ranking.nodes if n["layer"] == 1)), "worst": fragile_node()}
    assert ranking.samples == 64 and ranking.data == str((data_dir / "eval.tsv").resolve())
    assert ranking.distance.startswith("mean KL") and ranking.full["top1_flips"] >= first["top1_flips"] // 2
    # the nodes of the fused graph quantize_onnx quantizes: 2 layers x (Attention + 3 FFN/output MatMuls) + embeddings
    assert Counter(n["op_type"] for n in ranking.nodes) == {"MatMul": 6, "Attention": 2, "EmbedLayerNormalization": 1}
    d = json.loads(ranking.to_json())
    assert d["kind"] == "CulpritRanking" and d["schema_version"] >= 1 and d["config"]["mode"] == "dynamic"
    assert d["nodes"][0]["name"] == fragile_node() and d["timings"]["nodes"] > 0
    md = ranking.to_markdown()
    assert f"--exclude-nodes {fragile_node()}" in md and "### By layer" in md


def test_excluding_the_culprit_passes_the_gate(fragile, ranking, data_dir, tmp_path):
    run_cli("quantize", fragile["onnx"], "-o", tmp_path / "q", "--data", data_dir / "eval.tsv",
            "--exclude-nodes", ranking.worst, "--json", tmp_path / "q.json")
    rep = read_json(tmp_path / "q.json")
    assert rep["verification"]["passed"] and rep["nodes_in_float"] == [{"name": ranking.worst, "op_type": "MatMul"}]


def test_static_ranking_calibrates_once_and_names_the_quantized_graph(fragile, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # onnxruntime's shape inference litters the current folder when it gives up
    cfg = QuantizeConfig(mode="static", format="qoperator", calibration_data=str(data_dir / "calib.tsv"),
                         calibration_samples=32)
    r = rank_culprits(fragile["onnx"], cfg, data_dir / "eval.tsv", samples=16)
    assert r.worst == fragile_node() and r.samples == 16 and r.config["format"] == "qoperator"
    names = {n["name"] for n in r.nodes}
    assert not [n for n in names if n.startswith("/classifier/")]  # static keeps the classifier in float
    assert {"Attention_0", "Attention_1"} <= names  # fused by default; QAttention through the dynamic pass
    run_cli("quantize", fragile["onnx"], "-o", tmp_path / "q", "--mode", "static", "--format", "qoperator",
            "--calibration-data", data_dir / "calib.tsv", "--calibration-samples", "32", "--exclude-nodes", r.worst,
            "--data", data_dir / "eval.tsv")
    assert list(tmp_path.iterdir()) == [tmp_path / "q"]


def test_static_qoperator_is_qlinear_and_verifies(text_onnx, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_cli("quantize", text_onnx, "-o", tmp_path / "s", "--mode", "static", "--format", "qoperator",
            "--calibration-data", data_dir / "calib.tsv", "--calibration-samples", "32", "--data",
            data_dir / "eval.tsv", "--json", tmp_path / "s.json")
    rep = read_json(tmp_path / "s.json")
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "s" / "model.onnx").graph.node)
    assert ops["QLinearMatMul"] == 6 and ops["QAttention"] == 2 and ops["QGemm"] == 1  # the pooler
    assert ops["MatMul"] == 1  # the classifier, which the fusion rewrites as MatMul + Add
    assert rep["fused"]["Attention"] == 2 and rep["config"]["optimize"] is True and rep["config"]["format"] == "qoperator"
    assert [n["name"] for n in rep["nodes_in_float"]] == ["/classifier/Gemm_MatMul"]
    assert rep["verification"]["passed"] and rep["verification"]["agreement"]["top1_agreement"] >= 99.0


def test_format_needs_static_mode(text_onnx, tmp_path):
    r = run_cli("quantize", text_onnx, "-o", tmp_path / "x", "--format", "qoperator", expect=None)
    assert_user_error(r, "--format qoperator", "--mode static")
    assert not (tmp_path / "x").exists()
    with pytest.raises(EdgekitError, match="--bits 4"):
        QuantizeConfig(mode="static", format="qoperator", bits=4)
    assert QuantizeConfig().to_section()["format"] == "qdq"  # a recipe key, today's Q/DQ by default
    assert "--format [qdq|qoperator]" in run_cli("quantize", "--help").output


def test_ranking_refuses_int4(fragile, data_dir):
    with pytest.raises(EdgekitError, match="INT8"):
        rank_culprits(fragile["onnx"], QuantizeConfig(bits=4), data_dir / "eval.tsv")


def test_layer_of_reads_the_exporters_names():
    from onnx import helper

    def node(name, out="y"):
        return helper.make_node("MatMul", ["a", "b"], [out], name=name)

    assert layer_of(node("/bert/encoder/layer.3/output/dense/MatMul")) == 3
    assert layer_of(node("/encoder/layer.11/intermediate/dense/MatMul")) == 11
    assert layer_of(node("/transformer/layer.2/ffn/lin2/MatMul")) == 2
    assert layer_of(node("/model/layers.5/mlp/down_proj/MatMul")) == 5
    assert layer_of(node("/transformer/h.0/attn/c_attn/Gemm")) == 0
    assert layer_of(node("Attention_4", "/encoder/layer.4/attention/self/Reshape_3_output_0")) == 4
    assert layer_of(node("/lm_head/MatMul", "logits")) is None
    assert layer_of(node("/layernorm.1/MatMul")) is None


def test_token_classification_and_feature_extraction_distances(token_ckpt, encoder_ckpt, data_dir, tmp_path):
    run_cli("export", token_ckpt, "-o", tmp_path / "tok")
    r = rank_culprits(tmp_path / "tok", QuantizeConfig(), data_dir / "tokens.jsonl", samples=8)
    assert r.task == "token-classification" and "per real token" in r.distance
    assert all(isinstance(n["top1_flips"], int) for n in r.nodes) and r.nodes[0]["error"] > 0
    run_cli("export", encoder_ckpt, "-o", tmp_path / "enc")
    r = rank_culprits(tmp_path / "enc", QuantizeConfig(optimize=False), data_dir / "eval.tsv", samples=8)
    assert r.task == "feature-extraction" and r.distance.startswith("1 - mean cosine")
    assert all(n["top1_flips"] is None for n in r.nodes) and r.nodes[0]["error"] > 0
    # unfused: the exported names, as --no-optimize quantizes them
    assert "/encoder/layer.0/attention/self/query/MatMul" in {n["name"] for n in r.nodes}


def test_text_generation_next_token_distance(tmp_path):
    from tiny_decoders import build, write_eval_text

    ckpt = build("llama", tmp_path / "llama", steps=10)  # trained or not, INT8 moves its logits
    run_cli("export", ckpt, "-o", tmp_path / "onnx")
    r = rank_culprits(tmp_path / "onnx", QuantizeConfig(), write_eval_text(tmp_path / "valid.txt"), samples=8)
    assert r.task == "text-generation" and "next-token" in r.distance
    layers = {n["name"]: n["layer"] for n in r.nodes}
    assert layers["/model/layers.1/mlp/down_proj/MatMul"] == 1 and layers["/lm_head/MatMul"] is None
    assert r.nodes[0]["error"] > 0 and r.full["top1_flips"] is not None
