"""Every bad input: one sentence naming the problem and the fix, exit 2, no traceback, nothing written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import tree_digest, write_text_data
from helpers import assert_user_error, run_cli


@pytest.fixture
def ckpt_copy(text_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(text_ckpt, dst)
    return dst


def _nothing_written(tmp_path, name="out"):
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("command", ["export", "quantize", "compress"])
def test_path_missing(command, tmp_path):
    r = run_cli(command, tmp_path / "nope", "-o", tmp_path / "out", expect=None)
    assert_user_error(r, "does not exist", str(tmp_path / "nope"))
    _nothing_written(tmp_path)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"x")
    r = run_cli("export", tmp_path / "empty", "-o", tmp_path / "out", expect=None)
    assert_user_error(r, "no config.json")
    _nothing_written(tmp_path)


def test_weights_missing(ckpt_copy, tmp_path):
    (ckpt_copy / "model.safetensors").unlink()
    assert_user_error(run_cli("export", ckpt_copy, "-o", tmp_path / "out", expect=None), "no weights")
    _nothing_written(tmp_path)


def test_weights_truncated(ckpt_copy, tmp_path):
    w = ckpt_copy / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert_user_error(run_cli("quantize", ckpt_copy, "-o", tmp_path / "out", expect=None), "truncated")
    _nothing_written(tmp_path)


@pytest.mark.parametrize("arch,model_type,fragment", [
    ("BertForMaskedLM", "bert", "BertForMaskedLM is not a supported task"),
    ("BloomForCausalLM", "bloom", "model type 'bloom' is not a supported decoder language model"),
    ("GPT2Model", "gpt2", "gpt2 is a decoder family: edgekit takes its *ForCausalLM checkpoints"),
])
def test_unsupported_architecture(ckpt_copy, tmp_path, arch, model_type, fragment):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg.update(architectures=[arch], model_type=model_type)
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run_cli("export", ckpt_copy, "-o", tmp_path / "out", expect=None), fragment)
    _nothing_written(tmp_path)


def test_task_override_without_head(encoder_ckpt, tmp_path):
    r = run_cli("export", encoder_ckpt, "-o", tmp_path / "out", "--task", "text-classification", expect=None)
    assert_user_error(r, "ForSequenceClassification head")


def test_corrupt_onnx(tmp_path, text_ckpt, data_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.onnx").write_bytes(b"\x08\x07garbage that is not protobuf" * 10)
    shutil.copy(text_ckpt / "config.json", bad / "config.json")
    assert_user_error(run_cli("quantize", bad, "-o", tmp_path / "out", expect=None), "not a valid ONNX model")
    _nothing_written(tmp_path)
    r = run_cli("verify", text_ckpt, bad, "--data", data_dir / "eval.tsv", expect=None)
    assert_user_error(r, "not a valid ONNX model")
    assert_user_error(run_cli("bench", bad, expect=None), "not a valid ONNX model")


def test_data_missing_and_empty(text_ckpt, onnx_dir, tmp_path):
    assert_user_error(run_cli("verify", text_ckpt, onnx_dir, "--data", tmp_path / "no.tsv", expect=None),
                      "does not exist", "--data")
    (tmp_path / "empty.tsv").write_text("")
    assert_user_error(run_cli("verify", text_ckpt, onnx_dir, "--data", tmp_path / "empty.tsv", expect=None), "is empty")
    (tmp_path / "header.tsv").write_text("text\tlabel\n")
    assert_user_error(run_cli("verify", text_ckpt, onnx_dir, "--data", tmp_path / "header.tsv", expect=None),
                      "no examples")


def test_column_not_found_names_the_columns(text_ckpt, onnx_dir, data_dir, tmp_path):
    r = run_cli("verify", text_ckpt, onnx_dir, "--data", data_dir / "eval.tsv", "--text-column", "review", expect=None)
    assert_user_error(r, "column 'review'", "text, label")
    (tmp_path / "odd.csv").write_text("body,stars\ngood movie,1\n")
    r = run_cli("verify", text_ckpt, onnx_dir, "--data", tmp_path / "odd.csv", expect=None)
    assert_user_error(r, "body, stars", "--text-column")
    r = run_cli("verify", text_ckpt, onnx_dir, "--data", tmp_path / "odd.csv", "--text-column", "body",
                "--label-column", "rating", expect=None)
    assert_user_error(r, "column 'rating'", "body, stars")


def test_label_not_in_id2label(text_ckpt, onnx_dir, tmp_path):
    (tmp_path / "d.tsv").write_text("text\tlabel\ngood movie\tpositive\nbad movie\tneutral\n")
    assert_user_error(run_cli("verify", text_ckpt, onnx_dir, "--data", tmp_path / "d.tsv", expect=None),
                      "label 'neutral'", "negative, positive")
    (tmp_path / "i.tsv").write_text("text\tlabel\ngood movie\t7\n")
    assert_user_error(run_cli("verify", text_ckpt, onnx_dir, "--data", tmp_path / "i.tsv", expect=None), "label id 7")


def test_non_utf8_data(text_ckpt, onnx_dir, tmp_path):
    (tmp_path / "latin.tsv").write_bytes("text\tlabel\ncaf\u00e9 good\t1\n".encode("latin-1"))
    assert_user_error(run_cli("verify", text_ckpt, onnx_dir, "--data", tmp_path / "latin.tsv", expect=None), "not UTF-8")


def test_calibration_file_without_text_column(onnx_dir, tmp_path):
    (tmp_path / "c.csv").write_text("a,b\n1,2\n")
    r = run_cli("quantize", onnx_dir, "-o", tmp_path / "out", "--mode", "static", "--calibration-data", tmp_path / "c.csv",
                expect=None)
    assert_user_error(r, "no text column", "a, b")
    _nothing_written(tmp_path)


def test_output_exists_and_not_empty(text_ckpt, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert_user_error(run_cli("export", text_ckpt, "-o", tmp_path / "out", expect=None), "not empty", "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    run_cli("export", text_ckpt, "-o", tmp_path / "out", "--overwrite")
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.onnx").is_file()


def test_output_inside_input_is_refused(ckpt_copy):
    before = tree_digest(ckpt_copy)
    assert_user_error(run_cli("export", ckpt_copy, "-o", ckpt_copy / "onnx", expect=None), "overlaps the input")
    assert tree_digest(ckpt_copy) == before


@pytest.mark.parametrize("command,delay", [("export", 0.5), ("quantize", 0.5), ("quantize", 2.5), ("prune", 0.1)])
def test_ctrl_c_leaves_nothing(command, delay, text_ckpt, data_dir, tmp_path):
    """A real SIGINT while the command works (export, then ORT fusion/quantization inside native code):
    exit 2, the staging and scratch folders removed, the input untouched."""
    before = tree_digest(text_ckpt)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    extra = ["--sparsity", "0.3", "--calibration-data", str(data_dir / "eval.tsv")] if command == "prune" else []
    # The tiny models finish in seconds, faster on an idle machine: a run that ended before the signal landed
    # (exit 0, its output complete) proves nothing, so it is repeated with the signal sooner.
    for wait in (delay, delay / 3, 0.05):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-m", "edgekit", command, str(text_ckpt), "-o", str(tmp_path / "out"),
                                 *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 60
        while not list(tmp_path.glob(".out.*.partial")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the command finished before it could be interrupted"
        time.sleep(wait)  # inside the work, not at its very start
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        finished = proc.returncode == 0 or "Interrupted after the output was complete" in err
        if finished and (tmp_path / "out").is_dir():
            continue  # it had finished (at most its summary was cut short): too late to interrupt
        break
    else:
        pytest.fail(f"{command} finished every time before the interrupt")
    assert proc.returncode == 2, err
    assert "Interrupted" in err and "Traceback" not in err
    _nothing_written(tmp_path)
    assert tree_digest(text_ckpt) == before


def test_an_interrupt_after_the_output_is_in_place_says_it_was_kept(tmp_path):
    """The window between the final rename and the command's exit: the output is complete, so the interrupt
    message must not claim that nothing was written."""
    from edgekit.artifacts import committed_outputs, staged_output

    with pytest.raises(RuntimeError):
        with staged_output(tmp_path / "failed") as staging:
            (staging / "half").write_text("x")
            raise RuntimeError("the stage failed")
    assert tmp_path / "failed" not in committed_outputs() and not (tmp_path / "failed").exists()
    with staged_output(tmp_path / "done") as staging:
        (staging / "file").write_text("x")
    assert committed_outputs()[-1] == tmp_path / "done" and (tmp_path / "done" / "file").is_file()


def test_bad_data_for_bench(onnx_dir, tmp_path):
    write_text_data(tmp_path / "d.tsv", 5, seed=1)
    r = run_cli("bench", onnx_dir, "--data", tmp_path / "d.tsv", "--seq-len", "8", expect=None)
    assert_user_error(r, "--data and --seq-len")
