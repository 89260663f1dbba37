import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import tree_digest
from helpers import read_json, run_cli


@pytest.mark.parametrize("kind,output", [("text", "logits"), ("token", "logits"), ("encoder", "last_hidden_state")])
def test_export_matches_pytorch(kind, output, _models, tmp_path):
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    ckpt = _models[kind]
    before = tree_digest(ckpt)
    run_cli("export", ckpt, "-o", tmp_path / "onnx")
    out = tmp_path / "onnx"
    assert tree_digest(ckpt) == before
    for f in ("model.onnx", "config.json", "tokenizer.json", "edgekit.json", "export_report.json"):
        assert (out / f).is_file(), f
    model_proto = onnx.load(out / "model.onnx")
    assert max(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = model_proto.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims), "batch and sequence axes must be dynamic"
    # independent check on inputs the export did not validate on
    cls = {"text": AutoModelForSequenceClassification, "token": AutoModelForTokenClassification, "encoder": AutoModel}[kind]
    model = cls.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["good movie and the plot", "awful grim film"], padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    got = sess.run([output], feeds)[0]
    with torch.no_grad():
        want = getattr(model(**{k: torch.from_numpy(v) for k, v in feeds.items()}), output).numpy()
    assert np.abs(got - want).max() < 1e-4
    assert read_json(out / "export_report.json")["max_abs_diff"] < 1e-4


def test_export_validates_on_real_data(text_ckpt, data_dir, tmp_path):
    r = run_cli("export", text_ckpt, "-o", tmp_path / "o", "--data", data_dir / "eval.tsv", "--json")
    report = json.loads(r.stdout)
    assert "eval.tsv" in report["validation_inputs"]
    assert report["max_abs_diff"] < 1e-4


def test_tolerance_breach_is_an_error_and_writes_nothing(text_ckpt, tmp_path):
    r = run_cli("export", text_ckpt, "-o", tmp_path / "o", "--atol", "1e-12", expect=1)
    assert "differs from PyTorch" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.*"))


def test_export_python_api(encoder_ckpt, tmp_path):
    import edgekit

    report = edgekit.export(encoder_ckpt, tmp_path / "e")
    assert report.passed and report.task == "feature-extraction"
    session = edgekit.load_runtime(tmp_path / "e")
    assert session.name == "onnxruntime" and session.output_name == "last_hidden_state"


def test_output_folder_gets_mkdir_permissions(text_ckpt, tmp_path):
    # The staging folder comes from mkdtemp (0700); once renamed into place it must look like any mkdir'd folder.
    import os

    umask = 0o027  # neither 0o077 (where 0700 would be right) nor the common 0o022
    old = os.umask(umask)
    try:
        run_cli("export", text_ckpt, "-o", tmp_path / "onnx")
    finally:
        os.umask(old)
    assert (tmp_path / "onnx").stat().st_mode & 0o777 == 0o777 & ~umask == 0o750
