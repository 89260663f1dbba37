"""Issue 14, data and gate hardening: malformed data files, the label-mapping rule, text longer than the model,
a candidate with another number of labels, out-of-range opsets, regression heads and threshold validation.

Every bad input is checked for the exit code, the sentence, no traceback, the inputs byte-identical and
nothing written (the --json report a failed run would have written does not exist)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import NEG, POS, _config, _tokenizer, _train, make_sentence, tree_digest
from helpers import assert_user_error, read_json, run_cli


def _digests(*paths) -> dict:
    """sha256 of every file of the given inputs (a folder's tree, or one file)."""
    from edgekit.artifacts import sha256_file

    return {str(p): tree_digest(p) if Path(p).is_dir() else sha256_file(p) for p in paths}


def _refused(tmp_path, args, inputs, *fragments) -> str:
    """Run ``edgekit ARGS --json REPORT``: exit 2 with one sentence holding ``fragments``, inputs unchanged,
    no report and nothing else left in tmp_path."""
    before = _digests(*inputs)
    listing = sorted(p.name for p in tmp_path.iterdir())
    report = tmp_path / "report.json"
    r = run_cli(*args, "--json", report, expect=None)
    line = assert_user_error(r, *fragments)
    assert _digests(*inputs) == before
    assert not report.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    return line


def _verify(tmp_path, original, candidate, data, *extra, expect=0) -> dict:
    report = tmp_path / f"verify-{len(list(tmp_path.iterdir()))}.json"
    r = run_cli("verify", original, candidate, "--data", data, *extra, "--json", report, expect=expect)
    assert "Traceback" not in r.output
    return read_json(report)


# ---- data files ------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name,body,fragments", [
    ("extra.tsv", "text\tlabel\ngood film\t1\nbad film\t0\tstray\n",
     ["line 3 of", "extra.tsv", "3 fields but the header has 2", "remove the extra fields"]),
    ("extra.csv", "text,label\ngood film,1\nbad film,0,stray\n",
     ["line 3 of", "extra.csv", "3 fields but the header has 2"]),
    ("dup.tsv", "text\tlabel\ttext\ngood\t1\tfilm\n", ["line 1", "dup.tsv", "names the column 'text' twice"]),
    ("dup.csv", "label,text,label\n1,good,0\n", ["dup.csv", "names the column 'label' twice"]),
    ("dup.jsonl", '{"text": "good film", "label": 1}\n{"text": "bad", "label": 0, "label": 1}\n',
     ["line 2 of", "dup.jsonl", "has the key 'label' twice"]),
])
def test_malformed_rows_are_refused(tmp_path, text_ckpt, text_onnx, name, body, fragments):
    data = _write(tmp_path / name, body)
    _refused(tmp_path, ["verify", text_ckpt, text_onnx, "--data", data], [text_ckpt, text_onnx, data], *fragments)


@pytest.mark.parametrize("body,line,fragment", [
    # the quote opened on line 3 is closed on line 4: it would swallow the row break between them
    ('text\tlabel\ngood film\t1\n"bad film\t0\nfine plot"\t1\nnice\t1\n', 3, "not closed on that line"),
    # never closed: the rest of the file would become one field
    ('text\tlabel\ngood film\t1\n"bad film\t0\nnice\t1\n', 3, "unbalanced quote"),
    # text after the closing quote
    ('text\tlabel\n"good" film\t1\n', 2, "unbalanced quote"),
])
def test_unbalanced_quote_under_tsv_quoting_is_refused(tmp_path, text_ckpt, text_onnx, body, line, fragment):
    data = _write(tmp_path / "quoted.tsv", body)
    msg = _refused(tmp_path, ["verify", text_ckpt, text_onnx, "--data", data, "--tsv-quoting"],
                   [text_ckpt, text_onnx, data], f"line {line} of", "quoted.tsv", fragment)
    assert "drop --tsv-quoting" in msg


def test_quotes_are_text_without_tsv_quoting_and_fields_with_it(tmp_path, text_ckpt, text_onnx):
    """GLUE style (the default): a bare quote is a character; with --tsv-quoting a quoted tab is text."""
    plain = _write(tmp_path / "plain.tsv", 'text\tlabel\n"good film\t1\nbad "film\t0\n')
    rep = _verify(tmp_path, text_ckpt, text_onnx, plain)
    assert rep["n_examples"] == 2
    quoted = _write(tmp_path / "quoted.tsv", 'text\tlabel\n"good\tfilm"\t1\n"bad ""film"""\t0\n')
    rep = _verify(tmp_path, text_ckpt, text_onnx, quoted, "--tsv-quoting")
    assert rep["n_examples"] == 2 and rep["data"]["label_mapping"] == "ids"


def test_bom_is_stripped_from_the_header(tmp_path, text_ckpt, text_onnx, data_dir):
    body = (data_dir / "eval.tsv").read_text(encoding="utf-8")
    data = tmp_path / "bom.tsv"
    data.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    rep = _verify(tmp_path, text_ckpt, text_onnx, data, "--text-column", "text")
    plain = _verify(tmp_path, text_ckpt, text_onnx, data_dir / "eval.tsv")
    assert rep["data"]["text_column"] == "text" and rep["n_examples"] == plain["n_examples"] == 200
    assert rep["original_metrics"] == plain["original_metrics"]


# ---- the label-mapping rule --------------------------------------------------------------------------------


@pytest.fixture
def digit_names_ckpt(text_ckpt, tmp_path):
    """The text classifier with classes named "1" (id 0) and "2" (id 1): every name is also an id."""
    dst = tmp_path / "digits"
    shutil.copytree(text_ckpt, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(id2label={"0": "1", "1": "2"}, label2id={"1": 0, "2": 1})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _relabel(src: Path, dst: Path, names: list[str]) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()
    rows = [line.rsplit("\t", 1) for line in lines[1:]]
    return _write(dst, lines[0] + "\n" + "".join(f"{t}\t{names[int(y)]}\n" for t, y in rows))


def test_labels_map_by_ids_or_by_names(tmp_path, text_ckpt, text_onnx, data_dir):
    by_id = _verify(tmp_path, text_ckpt, text_onnx, data_dir / "eval.tsv")
    assert by_id["data"]["label_mapping"] == "ids"
    named = _relabel(data_dir / "eval.tsv", tmp_path / "named.tsv", ["negative", "POSITIVE"])  # any case
    by_name = _verify(tmp_path, text_ckpt, text_onnx, named)
    assert by_name["data"]["label_mapping"] == "names"
    assert by_name["original_metrics"] == by_id["original_metrics"]  # the same classes, either way


def test_digit_names_map_by_name(tmp_path, digit_names_ckpt, text_ckpt, text_onnx, data_dir):
    """id2label names "1","2": a file of 1s and 2s is read by name, all of it (1 -> class 0)."""
    reference = _verify(tmp_path, text_ckpt, text_onnx, data_dir / "eval.tsv")
    data = _relabel(data_dir / "eval.tsv", tmp_path / "digits.tsv", ["1", "2"])
    rep = _verify(tmp_path, digit_names_ckpt, text_onnx, data)
    assert rep["data"]["label_mapping"] == "names"
    assert rep["original_metrics"] == reference["original_metrics"]


def test_ambiguous_label_is_refused(tmp_path, digit_names_ckpt, text_onnx, data_dir):
    """A file of 0s and 1s for classes named "1","2": "0" can only be an id, but "1" is also a name."""
    data = shutil.copy(data_dir / "eval.tsv", tmp_path / "eval.tsv")
    _refused(tmp_path, ["verify", digit_names_ckpt, text_onnx, "--data", data], [digit_names_ckpt, text_onnx, data],
             "label '1'", "is ambiguous", "name of class 0 and the id of class 1")


def test_names_and_ids_mixed_are_refused(tmp_path, text_ckpt, text_onnx):
    data = _write(tmp_path / "mixed.tsv", "text\tlabel\ngood film\tpositive\nbad film\t0\nnice plot\tpositive\n")
    _refused(tmp_path, ["verify", text_ckpt, text_onnx, "--data", data], [text_ckpt, text_onnx, data],
             "mixes names and ids", "'positive' (row 1 of mixed.tsv)")


# ---- text longer than the model's positions ------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_ckpt(tmp_path_factory):
    """A classifier with 32 positions whose tokenizer claims 512: edgekit's 128 would overrun both."""
    import torch
    from transformers import BertForSequenceClassification

    folder = tmp_path_factory.mktemp("short") / "ckpt"
    tok = _tokenizer(folder)
    tok.model_max_length = 512
    torch.manual_seed(3)
    model = BertForSequenceClassification(_config(2, max_position_embeddings=32, id2label={0: "negative", 1: "positive"},
                                                  label2id={"negative": 0, "positive": 1}))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _long_data(path: Path) -> Path:
    rng = random.Random(7)
    rows = []
    for i in range(40):
        words, y = make_sentence(rng)
        if i % 2:  # 20 texts of 60+ words: longer than the 32 positions
            words = (words * 20)[:60]
        rows.append(f"{' '.join(words)}\t{y}\n")
    return _write(path, "text\tlabel\n" + "".join(rows))


def test_long_text_is_truncated_to_the_models_positions(tmp_path, short_ckpt):
    data = _long_data(tmp_path / "long.tsv")
    before = _digests(short_ckpt, data)
    rep = _verify(tmp_path, short_ckpt, short_ckpt, data)
    assert rep["passed"] and rep["n_examples"] == 40
    assert rep["data"]["max_length"] == 32 and rep["data"]["truncated_examples"] == 20
    assert any("20 of 40 examples are longer than 32 tokens" in n for n in rep["notes"])
    # export validates on the same long examples, through ONNX
    r = run_cli("export", short_ckpt, "-o", tmp_path / "onnx", "--data", data, "--json", tmp_path / "export.json")
    assert "Traceback" not in r.output
    assert max(s[1] for s in read_json(tmp_path / "export.json")["shapes_checked"]) == 32
    assert _digests(short_ckpt, data) == before


def test_long_calibration_text_is_truncated_by_prune_and_static_quantize(tmp_path, short_ckpt):
    """The calibration readers (prune's importance, static quantization) take the same limit."""
    data = _long_data(tmp_path / "long.tsv")
    before = _digests(short_ckpt, data)
    r = run_cli("prune", short_ckpt, "-o", tmp_path / "pruned", "--sparsity", "0.3", "--calibration-data", data)
    assert "Traceback" not in r.output and (tmp_path / "pruned" / "config.json").is_file()
    r = run_cli("quantize", short_ckpt, "-o", tmp_path / "static", "--mode", "static", "--calibration-data", data)
    assert "Traceback" not in r.output and (tmp_path / "static" / "model.onnx").is_file()
    assert _digests(short_ckpt, data) == before


# ---- a candidate with another number of labels -------------------------------------------------------------


def test_candidate_with_other_label_count_is_refused(tmp_path, text_ckpt, data_dir):
    import torch
    from transformers import BertForSequenceClassification

    three = tmp_path / "three"
    tok = _tokenizer(three)
    torch.manual_seed(1)
    BertForSequenceClassification(_config(3)).save_pretrained(three)
    tok.save_pretrained(three)
    data = shutil.copy(data_dir / "eval.tsv", tmp_path / "eval.tsv")
    _refused(tmp_path, ["verify", text_ckpt, three, "--data", data], [text_ckpt, three, data],
             "a number of labels of 3 but the original has 2")


# ---- opset range ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", ["99", "16"])
def test_opset_out_of_range_is_refused_before_export(tmp_path, text_ckpt, opset):
    before = tree_digest(text_ckpt)
    r = run_cli("export", text_ckpt, "-o", tmp_path / "out", "--opset", opset, expect=None)
    assert_user_error(r, "--opset", "17<=x<=20")
    assert len(r.output.splitlines()) <= 6, r.output  # no torch IR dump
    assert tree_digest(text_ckpt) == before and list(tmp_path.iterdir()) == []


def test_opset_range_in_a_recipe(tmp_path, text_ckpt, data_dir):
    recipe = _write(tmp_path / "r.yaml", f"checkpoint: {text_ckpt}\nexport:\n  opset: 99\ndata:\n  eval: {data_dir / 'eval.tsv'}\n")
    r = run_cli("compress", "--recipe", recipe, "-o", tmp_path / "out", expect=None)
    assert_user_error(r, "opset", "from 17 to 20", "not 99")
    assert not (tmp_path / "out").exists()


def test_max_opset_is_what_the_exporter_writes(tmp_path, text_ckpt):
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

    from edgekit.runtimes.export import MAX_OPSET

    assert MAX_OPSET == ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    run_cli("export", text_ckpt, "-o", tmp_path / "out", "--opset", str(MAX_OPSET), "--json", tmp_path / "e.json")
    assert read_json(tmp_path / "e.json")["opset"] == MAX_OPSET


# ---- regression heads -----------------------------------------------------------------------------------------


def _build_regressor(folder: Path, seed: int, target) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    tok = _tokenizer(folder)
    model = BertForSequenceClassification(_config(1, problem_type="regression"))
    rng = random.Random(seed)
    batches = []
    for _ in range(20):
        words = [make_sentence(rng)[0] for _ in range(32)]
        enc = tok([" ".join(w) for w in words], padding=True, return_tensors="pt")
        batches.append((dict(enc), torch.tensor([[float(target(w))] for w in words])))
    _train(model, batches, 120)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def regressors(tmp_path_factory):
    root = tmp_path_factory.mktemp("regression")
    sentiment = _build_regressor(root / "sentiment", 0, lambda w: sum(x in POS for x in w) - sum(x in NEG for x in w))
    length = _build_regressor(root / "length", 1, lambda w: len(w) / 3)
    run_cli("export", sentiment, "-o", root / "sentiment-onnx")
    return {"sentiment": sentiment, "length": length, "onnx": root / "sentiment-onnx"}


def test_regression_head_passes_against_its_own_export(tmp_path, regressors, data_dir):
    cfg = json.loads((regressors["sentiment"] / "config.json").read_text())
    assert cfg["problem_type"] == "regression" and len(cfg["id2label"]) == 1
    rep = _verify(tmp_path, regressors["sentiment"], regressors["onnx"], data_dir / "eval.tsv")
    assert rep["passed"] and rep["data"]["regression_head"] is True
    assert [c["name"] for c in rep["checks"]] == ["max_abs_diff", "mean_abs_diff", "relative_rmse"]
    assert rep["agreement"]["relative_rmse"] < 1e-3 and rep["agreement"]["original_std"] > 0.1
    gate = rep["config"]["gate"]
    assert gate["max_relative_rmse"] == 0.1 and gate["max_drop"] is None and gate["min_agreement"] is None
    assert gate["max_abs_diff"] == pytest.approx(0.5 * rep["agreement"]["original_std"])
    assert any("label column 'label' is not used" in n for n in rep["notes"])
    assert "top1_agreement" not in rep["agreement"]


def test_unrelated_regression_models_fail_the_gate(tmp_path, regressors, data_dir):
    rep = _verify(tmp_path, regressors["sentiment"], regressors["length"], data_dir / "eval.tsv", expect=1)
    checks = {c["name"]: c for c in rep["checks"]}
    assert not rep["passed"] and not checks["relative_rmse"]["passed"]
    assert rep["agreement"]["relative_rmse"] > 0.5


def test_regression_thresholds_are_applied_as_given(tmp_path, regressors, data_dir):
    """A tolerance on the absolute difference that the ONNX export cannot meet fails it: the check is live."""
    rep = _verify(tmp_path, regressors["sentiment"], regressors["onnx"], data_dir / "eval.tsv",
                  "--max-abs-diff", "0", "--max-relative-rmse", "1", expect=None)
    checks = {c["name"]: c for c in rep["checks"]}
    assert checks["max_abs_diff"]["threshold"] == 0.0 and checks["relative_rmse"]["threshold"] == 1.0
    assert checks["max_abs_diff"]["passed"] == (rep["agreement"]["max_abs_diff"] == 0.0)
    assert rep["passed"] == checks["max_abs_diff"]["passed"]


# ---- thresholds --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option,value,fragments", [
    ("--max-drop", "-5", ["--max-drop", "0<=x<=100"]),
    ("--min-agreement", "150", ["--min-agreement", "0<=x<=100"]),
    ("--max-drop", "nan", ["max_drop (--max-drop) must be a finite number from 0 to 100 points, not nan"]),
    ("--min-agreement", "nan", ["min_agreement (--min-agreement) must be a finite number from 0 to 100%"]),
    ("--min-agreement", "inf", ["--min-agreement", "0<=x<=100"]),
    ("--max-relative-drop", "1.5", ["--max-relative-drop", "0<=x<=1"]),
    ("--min-cosine", "nan", ["min_cosine (--min-cosine) must be a finite number from 0 to 1"]),
    ("--max-relative-rmse", "-0.1", ["--max-relative-rmse", "0<=x<=1"]),
    ("--max-abs-diff", "inf", ["max_abs_diff (--max-abs-diff) must be a finite number of at least 0, not inf"]),
    ("--max-mean-abs-diff", "-1", ["--max-mean-abs-diff", "x>=0"]),
])
def test_thresholds_out_of_range_are_refused(tmp_path, text_ckpt, text_onnx, data_dir, option, value, fragments):
    data = shutil.copy(data_dir / "eval.tsv", tmp_path / "eval.tsv")
    _refused(tmp_path, ["verify", text_ckpt, text_onnx, "--data", data, option, value],
             [text_ckpt, text_onnx, data], *fragments)


@pytest.mark.parametrize("key,value,fragment", [
    ("max_drop", "-5", "max_drop (--max-drop) must be a finite number from 0 to 100 points, not -5.0"),
    ("min_agreement", "150", "from 0 to 100%, not 150.0"),
    ("max_drop", ".nan", "max_drop (--max-drop) must be a finite number from 0 to 100 points, not nan"),
    ("min_agreement", ".inf", "not inf"),
])
def test_thresholds_out_of_range_in_a_recipe(tmp_path, text_ckpt, data_dir, key, value, fragment):
    recipe = _write(tmp_path / "r.yaml", f"checkpoint: {text_ckpt}\ndata:\n  eval: {data_dir / 'eval.tsv'}\n"
                                         f"gates:\n  {key}: {value}\n")
    before = tree_digest(text_ckpt)
    r = run_cli("compress", "--recipe", recipe, "-o", tmp_path / "out", expect=None)
    assert_user_error(r, "'gates'", fragment)
    assert tree_digest(text_ckpt) == before and not (tmp_path / "out").exists()


def test_threshold_defaults_are_valid_and_the_python_api_checks_too():
    from pydantic import ValidationError

    from edgekit.runtimes.export import ExportConfig
    from edgekit.verify import GateConfig

    GateConfig()
    ExportConfig()
    GateConfig(max_drop=0, min_agreement=100, max_relative_drop=1, min_cosine=1, max_abs_diff=0)  # the ends are in
    for bad in (dict(max_drop=100.01), dict(min_agreement=-0.1), dict(max_abs_diff=float("nan"))):
        with pytest.raises(ValidationError):
            GateConfig(**bad)
    for bad in (dict(atol=0), dict(atol=float("inf")), dict(opset=21)):
        with pytest.raises(ValidationError):
            ExportConfig(**bad)
