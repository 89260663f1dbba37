import json

import pytest

from helpers import damaged_copy, run_cli


@pytest.fixture(scope="module")
def onnx_models(_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("v")
    out = {}
    for kind in ("text", "token", "encoder"):
        run_cli("export", _models[kind], "-o", root / kind)
        out[kind] = root / kind
    damaged = damaged_copy(_models["text"], root / "damaged-ckpt")
    run_cli("export", damaged, "-o", root / "damaged")
    out["damaged"] = root / "damaged"
    out["damaged-ckpt"] = damaged
    return out


def test_gate_passes_on_unchanged_model(text_ckpt, onnx_models, data_dir, tmp_path):
    r = run_cli("verify", text_ckpt, onnx_models["text"], "--data", data_dir / "eval.tsv", "--json", "--junit",
                tmp_path / "j.xml")
    rep = json.loads(r.stdout)
    assert rep["passed"] and rep["n_examples"] == 200
    assert rep["original_metrics"]["accuracy"] > 90  # the tiny model really learned its task
    assert rep["agreement"]["top1_agreement"] == 100.0 and rep["agreement"]["max_abs_logit_diff"] < 1e-3
    assert rep["runtimes"] == {"original": "torch-fp32", "candidate": "onnxruntime"}
    assert 'failures="0"' in (tmp_path / "j.xml").read_text()
    # the gate recorded is the one applied: labeled accuracy drop only, nothing left unsaid
    assert rep["config"]["gate"] == {"max_drop": 1.0, "max_relative_drop": None, "min_agreement": None, "min_cosine": None}
    assert rep["notes"] == []


def test_gate_fails_on_damaged_model(text_ckpt, onnx_models, data_dir, tmp_path):
    r = run_cli("verify", text_ckpt, onnx_models["damaged"], "--data", data_dir / "eval.tsv", "--junit",
                tmp_path / "j.xml", expect=1)
    assert "FAILED" in r.output
    junit = (tmp_path / "j.xml").read_text()
    assert 'failures="1"' in junit and "accuracy_drop_points" in junit


def test_damaged_checkpoint_candidate_goes_through_torch(text_ckpt, onnx_models, data_dir):
    import edgekit.api
    from edgekit.verify import VerifyConfig

    report = edgekit.api.verify(text_ckpt, onnx_models["damaged-ckpt"], VerifyConfig(data=str(data_dir / "eval.tsv")))
    assert not report and report.runtimes["candidate"] == "torch-fp32"
    drop = report.original_metrics["accuracy"] - report.candidate_metrics["accuracy"]
    assert drop > 10


def test_relative_drop_and_agreement_thresholds(text_ckpt, onnx_models, data_dir):
    r = run_cli("verify", text_ckpt, onnx_models["damaged"], "--data", data_dir / "eval.tsv", "--max-drop", "100",
                "--max-relative-drop", "0.01", "--min-agreement", "99", "--json", expect=1)
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["accuracy_drop_points"]["passed"]
    assert not checks["accuracy_relative_drop"]["passed"] and not checks["top1_agreement"]["passed"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_formats_and_label_names(text_ckpt, onnx_models, data_dir, fmt):
    extra = ["--text-column", "sentence", "--label-column", "sentiment"] if fmt == "csv" else []
    r = run_cli("verify", text_ckpt, onnx_models["text"], "--data", data_dir / f"eval.{fmt}", *extra, "--json")
    rep = json.loads(r.stdout)
    assert rep["passed"] and rep["n_examples"] == 100 and rep["original_metrics"]["accuracy"] > 90


def test_without_labels_agreement_is_the_gate(text_ckpt, onnx_models, data_dir, tmp_path):
    (tmp_path / "u.tsv").write_text("text\n" + "good movie\nawful grim plot\n" * 10)
    rep = json.loads(run_cli("verify", text_ckpt, onnx_models["text"], "--data", tmp_path / "u.tsv", "--json").stdout)
    assert rep["original_metrics"] == {} and [c["name"] for c in rep["checks"]] == ["top1_agreement"]
    assert rep["config"]["gate"]["min_agreement"] == 98.0 and rep["config"]["gate"]["max_drop"] is None
    assert len(rep["notes"]) == 1 and "--max-drop" in rep["notes"][0] and "98.0%" in rep["notes"][0]


def test_token_classification_entity_f1(token_ckpt, onnx_models, data_dir):
    rep = json.loads(run_cli("verify", token_ckpt, onnx_models["token"], "--data", data_dir / "tokens.jsonl",
                             "--json").stdout)
    assert rep["task"] == "token-classification" and rep["passed"]
    assert rep["original_metrics"]["entity_f1"] > 80
    assert abs(rep["candidate_metrics"]["entity_f1"] - rep["original_metrics"]["entity_f1"]) < 0.5


def test_feature_extraction_cosine_and_retrieval(encoder_ckpt, onnx_models, data_dir):
    rep = json.loads(run_cli("verify", encoder_ckpt, onnx_models["encoder"], "--data", data_dir / "eval.tsv",
                             "--json").stdout)
    assert rep["passed"] and rep["agreement"]["mean_cosine"] > 0.9999
    assert [c["name"] for c in rep["checks"]] == ["mean_cosine"]
    # the same model on two runtimes: nearly every nearest neighbour kept (exact duplicates in the data are ties)
    assert rep["agreement"]["retrieval_agreement"] >= 95
    assert rep["config"]["gate"] == {"max_drop": None, "max_relative_drop": None, "min_agreement": None, "min_cosine": 0.99}


def test_feature_extraction_says_what_it_does_not_use(encoder_ckpt, onnx_models, data_dir, tmp_path):
    # eval.tsv has a label column and the CLI always passes --max-drop: neither can be used by a cosine gate
    r = run_cli("verify", encoder_ckpt, onnx_models["encoder"], "--data", data_dir / "eval.tsv", "--max-drop", "0.5",
                "--min-agreement", "50", "--json", "--junit", tmp_path / "j.xml")
    rep = json.loads(r.stdout)
    assert rep["config"]["gate"]["min_agreement"] == 50.0 and rep["config"]["gate"]["min_cosine"] == 0.99
    assert [c["name"] for c in rep["checks"]] == ["retrieval_agreement", "mean_cosine"]
    drop_note, label_note = rep["notes"]
    assert drop_note.startswith("feature-extraction has no labeled metric: --max-drop")
    assert "mean cosine >= 0.99" in drop_note and "retrieval agreement >= 50.0%" in drop_note
    assert "label column 'label' is not used" in label_note
    assert "Note: feature-extraction has no labeled metric" in " ".join(r.output.split())  # shown, not only in JSON
    assert 'tests="2"' in (tmp_path / "j.xml").read_text()  # a report with notes still round-trips to JUnit
    from edgekit.reports import to_markdown
    from edgekit.verify import VerifyReport

    assert "Note: feature-extraction has no labeled metric" in to_markdown(VerifyReport.sections_of(rep))


def test_entity_chunks():
    from edgekit.metrics import entities, entity_f1

    assert entities(["B-LOC", "I-LOC", "O", "B-POS", "I-LOC"]) == {("LOC", 0, 2), ("POS", 3, 4), ("LOC", 4, 5)}
    assert entity_f1([["B-LOC", "I-LOC"]], [["B-LOC", "O"]])["entity_f1"] == 0.0
    assert entity_f1([["B-LOC", "I-LOC"]], [["B-LOC", "I-LOC"]])["entity_f1"] == 100.0


def test_retrieval_agreement_counts_kept_nearest_neighbours():
    import numpy as np

    from edgekit.metrics import retrieval_agreement

    # three well-separated pairs: every row's nearest neighbour is its partner
    orig = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.1], [0, 0, 1], [0.1, 0, 0.9]])
    assert retrieval_agreement(orig, orig * 3.0) == 100.0  # cosine: the scale does not matter
    assert retrieval_agreement(orig, orig[:, ::-1]) == 100.0  # nor a permutation of the dimensions
    cand = orig.copy()
    cand[1] = [0, 0.2, 0.9]  # row 1 moves beside the third pair: row 1's and row 0's neighbours change, 4 of 6 kept
    assert retrieval_agreement(orig, cand) == pytest.approx(100 * 4 / 6)


def test_retrieval_agreement_falls_for_a_different_encoder(encoder_ckpt, onnx_models, data_dir, tmp_path):
    from conftest import build_encoder

    other = build_encoder(tmp_path / "damaged-encoder", onnx_models["damaged-ckpt"])
    run_cli("export", other, "-o", tmp_path / "other")
    r = run_cli("verify", encoder_ckpt, tmp_path / "other", "--data", data_dir / "eval.tsv", "--min-agreement", "90",
                "--json", expect=1)
    rep = json.loads(r.stdout)
    assert rep["agreement"]["retrieval_agreement"] < 90 and not rep["passed"]
