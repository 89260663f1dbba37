"""Issue 14, hardening: no code from a checkpoint runs without --trust-remote-code, no write path can land on
an input or the current folder, the final rename never replaces what appeared meanwhile, and a read-only or
full disk is one sentence naming the path.

Every bad input is refused with exit 2, one sentence, no traceback, the input byte-identical and nothing
left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest

from conftest import tree_digest
from helpers import assert_user_error, read_json, run_cli

from edgekit.artifacts import staged_output, write_text_atomic
from edgekit.errors import EXIT_USAGE, EdgekitError

# The checkpoint's "remote code": it leaves a marker file when it is executed, and is otherwise a plain BERT.
EVIL_PY = '''
import os
from transformers import BertConfig, BertForSequenceClassification

open(os.environ["EDGEKIT_TEST_MARKER"], "w").write("the checkpoint's own code ran")


class EvilConfig(BertConfig):
    pass


class EvilModel(BertForSequenceClassification):
    config_class = EvilConfig
'''


def _remote_code_copy(src: Path, dst: Path, where: str = "config") -> Path:
    shutil.copytree(src, dst)
    (dst / "evil.py").write_text(EVIL_PY, encoding="utf-8")
    if where == "config":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    else:
        tok = json.loads((dst / "tokenizer_config.json").read_text())
        if where == "tokenizer_auto_map":
            tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
        else:  # a tokenizer class that exists nowhere but in the folder's code
            tok["tokenizer_class"] = "EvilTokenizer"
        (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return dst


def _edgekit(*args, cwd: Path, env: dict, timeout: float = 120):
    """edgekit in its own process, with stdin *closed*: a prompt would fail loudly instead of waiting."""
    return subprocess.run([sys.executable, "-m", "edgekit", *map(str, args)], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, preexec_fn=lambda: os.close(0))


# ---- 1. code from a model folder never runs without --trust-remote-code --------------------------------


def test_remote_code_checkpoint_is_refused_up_front_without_running_it(text_ckpt, data_dir, tmp_path):
    ckpt = _remote_code_copy(text_ckpt, tmp_path / "remote")
    marker = tmp_path / "MARKER"
    before = tree_digest(ckpt)
    env = {"EDGEKIT_TEST_MARKER": str(marker), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    t0 = time.monotonic()
    r = _edgekit("verify", ckpt, ckpt, "--data", data_dir / "eval.tsv", cwd=tmp_path, env=env)
    seconds = time.monotonic() - t0
    assert r.returncode == EXIT_USAGE, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "[y/N]" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].endswith("."), r.stderr
    assert "config.json" in errors[0] and "auto_map" in errors[0] and "--trust-remote-code" in errors[0]
    # transformers' own prompt waits 15 s without a terminal; the refusal happens before any model is loaded
    assert seconds < 10, f"took {seconds:.1f} s"
    assert not marker.exists()
    assert not (tmp_path / "modules").exists()  # transformers never even copied the module to run it
    assert tree_digest(ckpt) == before


@pytest.mark.parametrize("where, named", [("tokenizer_auto_map", "auto_map"),
                                          ("tokenizer_class", "EvilTokenizer")])
def test_remote_tokenizer_is_refused(text_ckpt, tmp_path, monkeypatch, where, named):
    ckpt = _remote_code_copy(text_ckpt, tmp_path / "remote", where)
    monkeypatch.setenv("EDGEKIT_TEST_MARKER", str(tmp_path / "MARKER"))
    before = tree_digest(ckpt)
    r = run_cli("export", ckpt, "-o", tmp_path / "out", expect=None)
    assert_user_error(r, "tokenizer_config.json", named, "--trust-remote-code")
    assert not (tmp_path / "MARKER").exists()
    assert tree_digest(ckpt) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["remote"]


@pytest.mark.parametrize("command", ["export", "prune", "bench", "quantize", "compress"])
def test_every_command_that_opens_a_checkpoint_refuses_remote_code(text_ckpt, data_dir, tmp_path, monkeypatch,
                                                                   command):
    ckpt = _remote_code_copy(text_ckpt, tmp_path / "remote")
    monkeypatch.setenv("EDGEKIT_TEST_MARKER", str(tmp_path / "MARKER"))
    before = tree_digest(ckpt)
    args = {"export": ["-o", tmp_path / "out"], "quantize": ["-o", tmp_path / "out"],
            "prune": ["-o", tmp_path / "out", "--sparsity", "0.3", "--calibration-data", data_dir / "calib.tsv"],
            "compress": ["-o", tmp_path / "out", "--no-bench"], "bench": ["--iterations", "1"]}[command]
    r = run_cli(command, ckpt, *args, expect=None)
    assert_user_error(r, "auto_map", "--trust-remote-code")
    assert not (tmp_path / "MARKER").exists()
    assert tree_digest(ckpt) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["remote"]


def test_trust_remote_code_is_opt_in_and_recorded(text_ckpt, tmp_path):
    ckpt = _remote_code_copy(text_ckpt, tmp_path / "remote")
    marker = tmp_path / "MARKER"
    before = tree_digest(ckpt)
    env = {"EDGEKIT_TEST_MARKER": str(marker), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    r = _edgekit("export", ckpt, "-o", tmp_path / "out", "--trust-remote-code", "--json", tmp_path / "out.json",
                 cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert marker.exists()  # with the user's consent, the folder's code did run: the flag reaches transformers
    assert read_json(tmp_path / "out.json")["config"]["trust_remote_code"] is True
    assert read_json(tmp_path / "out" / "export_report.json")["config"]["trust_remote_code"] is True
    assert tree_digest(ckpt) == before


def test_plain_checkpoint_records_no_remote_code(text_onnx):
    assert read_json(text_onnx / "export_report.json")["config"]["trust_remote_code"] is False


# ---- 2. one path guard for everything edgekit writes ----------------------------------------------------


@pytest.fixture
def ckpt_copy(text_ckpt, tmp_path):
    return Path(shutil.copytree(text_ckpt, tmp_path / "ckpt"))


def _refused(args, inputs, leftovers_in: Path, expected_names, *fragments):
    before = {p: tree_digest(p) if p.is_dir() else p.read_bytes() for p in inputs}
    r = run_cli(*args, expect=None)
    line = assert_user_error(r, *fragments)
    for p, digest in before.items():
        assert (tree_digest(p) if p.is_dir() else p.read_bytes()) == digest, f"{p} changed"
    assert sorted(p.name for p in leftovers_in.iterdir()) == sorted(expected_names)
    return line


def test_junit_onto_the_checkpoint_weights_is_refused(ckpt_copy, text_onnx, data_dir, tmp_path):
    _refused(["verify", ckpt_copy, text_onnx, "--data", data_dir / "eval.tsv", "--junit",
              ckpt_copy / "model.safetensors"], [ckpt_copy], tmp_path, ["ckpt"],
             "--junit", "model.safetensors", "overlaps the input", "(is inside it)")


def test_json_onto_the_checkpoint_config_is_refused(ckpt_copy, tmp_path):
    _refused(["export", ckpt_copy, "-o", tmp_path / "out", "--json", ckpt_copy / "config.json"], [ckpt_copy],
             tmp_path, ["ckpt"], "--json", "config.json", "overlaps the input", "(is inside it)")


def test_json_onto_the_data_file_is_refused(ckpt_copy, text_onnx, data_dir, tmp_path):
    data = Path(shutil.copy(data_dir / "eval.tsv", tmp_path / "eval.tsv"))
    _refused(["verify", ckpt_copy, text_onnx, "--data", data, "--json", data], [ckpt_copy, data], tmp_path,
             ["ckpt", "eval.tsv"], "--json", "eval.tsv", "overlaps the input", "(is that input)")


def test_output_inside_the_checkpoint_is_refused(ckpt_copy, tmp_path):
    _refused(["export", ckpt_copy, "-o", ckpt_copy / "sub"], [ckpt_copy], tmp_path, ["ckpt"],
             "-o", "sub", "overlaps the input", "(is inside it)")


def test_output_holding_the_checkpoint_is_refused(ckpt_copy, tmp_path):
    _refused(["export", ckpt_copy, "-o", tmp_path, "--overwrite"], [ckpt_copy], tmp_path, ["ckpt"],
             "-o", "overlaps the input", "(holds it)")


def test_output_holding_a_data_file_named_only_in_the_recipe_is_refused(ckpt_copy, data_dir, tmp_path):
    """A data path the recipe names (not the command line) is an input like any other: -o may not replace
    the folder that holds it."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(data_dir / "eval.tsv", data / "eval.tsv")
    recipe = tmp_path / "edgekit.yaml"
    recipe.write_text("checkpoint: ckpt\ndata:\n  eval: data/eval.tsv\n")
    _refused(["compress", "--recipe", recipe, "-o", data, "--overwrite"], [ckpt_copy, data], tmp_path,
             ["ckpt", "data", "edgekit.yaml"], "-o", "overlaps the input", "eval.tsv", "(holds it)")
    _refused(["compress", "--recipe", recipe, "-o", tmp_path / "out", "--json", data / "eval.tsv"],
             [ckpt_copy, data], tmp_path, ["ckpt", "data", "edgekit.yaml"], "--json", "(is that input)")


def test_gate_markdown_onto_its_baseline_is_refused(tmp_path):
    baseline = tmp_path / "report.json"
    baseline.write_text('{"kind": "CompressReport"}')
    _refused(["gate", tmp_path / "missing-run", "--baseline", baseline, "--markdown", baseline], [baseline], tmp_path,
             ["report.json"], "--markdown", "overlaps the input", "(is that input)")


@pytest.mark.parametrize("where", [".", ".."])
def test_output_at_the_current_folder_or_above_is_refused(ckpt_copy, tmp_path, monkeypatch, where):
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    (here / "unrelated.txt").write_text("must survive")
    monkeypatch.chdir(here)
    line = _refused(["export", ckpt_copy, "-o", where, "--overwrite"], [ckpt_copy], here, ["unrelated.txt"],
                    "-o", "current folder or a folder above it")
    assert (here / "unrelated.txt").read_text() == "must survive"
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["here"]
    assert line


def test_json_at_the_current_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unrelated.txt").write_text("x")
    _refused(["devices", "--json", "."], [], tmp_path, ["unrelated.txt"], "--json", "current folder")


def test_every_path_option_is_either_guarded_or_read():
    """A new option that writes a file must join the guard: every path-typed parameter is classified."""
    from edgekit.cli import main
    from edgekit.cli.common import INPUT_PARAMS, OUTPUT_PARAMS
    from edgekit.cli.options import ConfigOption

    unclassified = []

    def walk(group, prefix=""):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                walk(cmd, f"{prefix}{name} ")
                continue
            for p in cmd.params:
                declared_path = isinstance(p, ConfigOption) and p.config.meta(p.field).get("path")
                if isinstance(p.type, click.Path) and p.name not in OUTPUT_PARAMS + INPUT_PARAMS and not declared_path:
                    unclassified.append(f"{prefix}{name} {p.name}")

    walk(main)
    assert unclassified == []


def test_every_command_runs_the_guard():
    from edgekit.cli import main

    def callbacks(group):
        for cmd in group.commands.values():
            yield from callbacks(cmd) if isinstance(cmd, click.Group) else [cmd]

    unguarded = []
    for cmd in callbacks(main):
        f = cmd.callback
        while f is not None and not getattr(f, "_edgekit_path_guard", False):
            f = getattr(f, "__wrapped__", None)
        if f is None:
            unguarded.append(cmd.name)
    assert unguarded == []


# ---- the final rename: nothing that appeared meanwhile is replaced; one of two runs wins ---------------


def _no_partials(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".partial") or ".old-" in p.name]


@pytest.mark.parametrize("with_file", [True, False])
def test_folder_created_while_the_stage_runs_is_not_deleted(tmp_path, with_file):
    out = tmp_path / "out"
    with pytest.raises(EdgekitError) as e:
        with staged_output(out) as staging:
            (staging / "model.onnx").write_text("ours")
            out.mkdir()  # another program (or run) creates the output before this one renames into it
            if with_file:
                (out / "theirs.txt").write_text("theirs")
    assert e.value.exit_code == EXIT_USAGE
    assert "was created or replaced by someone else" in str(e.value) and str(out) in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == (["theirs.txt"] if with_file else [])
    assert _no_partials(tmp_path) == []


def test_folder_created_while_the_stage_runs_exits_2_through_the_cli(tmp_path, monkeypatch, ckpt_copy):
    """The same through `edgekit export`: the folder appears while the model is being exported."""
    import edgekit.runtimes.export as export_module

    out = tmp_path / "out"
    real = export_module.export_model

    def export_then_someone_writes(*args, **kwargs):
        report = real(*args, **kwargs)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        return report

    monkeypatch.setattr(export_module, "export_model", export_then_someone_writes)
    before = tree_digest(ckpt_copy)
    r = run_cli("export", ckpt_copy, "-o", out, expect=None)
    assert_user_error(r, str(out), "created or replaced by someone else")
    assert (out / "theirs.txt").read_text() == "theirs" and sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]
    assert tree_digest(ckpt_copy) == before


def _race(out: Path, overwrite: bool) -> list:
    """Two runs stage into one output at the same time and finish together: their outcomes."""
    barrier = threading.Barrier(2)
    results = [None, None]

    def run(i):
        try:
            with staged_output(out, overwrite) as staging:
                (staging / "who").write_text(str(i))
                barrier.wait(timeout=30)  # both have staged their result before either renames
            results[i] = "won"
        except EdgekitError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_runs_into_one_output_cannot_both_succeed(tmp_path, overwrite):
    out = tmp_path / "out"
    if overwrite:  # both were started with --overwrite on the same old output
        out.mkdir()
        (out / "who").write_text("old")
    results = _race(out, overwrite)
    winners = [i for i, r in enumerate(results) if r == "won"]
    assert len(winners) == 1, results
    loser = results[1 - winners[0]]
    assert isinstance(loser, EdgekitError) and "created or replaced by someone else" in str(loser)
    assert (out / "who").read_text() == str(winners[0])  # the winner's result is intact, not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folder left


def test_overwrite_still_replaces_the_folder_that_was_there(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_output(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_interrupt_between_the_overwrite_renames_waits_for_them(tmp_path, monkeypatch):
    """SIGINT arriving right after the old output was moved aside is handled once the new one is in place: the
    handler (the CLI's removes the unfinished folders, says whether the output is complete, and exits) finds the
    output complete and recorded as such, and no old folder is left."""
    import signal

    from edgekit.artifacts import committed_outputs, remove_active

    out = tmp_path / "out"
    out.mkdir()
    (out / "who").write_text("old")
    seen = []

    def handler(signum, frame):  # what edgekit.cli.run's handler reads, then its cleanup (without the exit)
        seen.append({"who": (out / "who").read_text() if (out / "who").is_file() else None,
                     "committed": out in committed_outputs()})
        remove_active()

    real_rename = Path.rename

    def rename_then_interrupt(self, target):
        result = real_rename(self, target)
        if Path(target).name.startswith(".out.old-"):  # the old output has just been moved aside
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Path, "rename", rename_then_interrupt)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        with staged_output(out, overwrite=True) as staging:
            (staging / "who").write_text("new")
        for _ in range(100):  # the handler runs at the next bytecode once the signal is unblocked
            if seen:
                break
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [{"who": "new", "committed": True}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "who").read_text() == "new"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_what_a_killed_run_left_is_swept(tmp_path):
    """SIGKILL cannot be held back: a killed run leaves its staging folder, and, killed while replacing an
    output, the folder it moved aside. The next run into that output removes them, or puts the old output back
    when the kill came before the new one was in place; a running process's folders are left alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "who").write_text("current")
    dead = tmp_path / f".out.old-{_dead_pid()}"
    dead.mkdir()
    (dead / "who").write_text("previous")
    alive = tmp_path / f".out.old-{os.getppid()}"  # another run, still going
    alive.mkdir()
    killed_staging = tmp_path / f".out.{_dead_pid()}.k2j4x9.partial"  # the OOM killer's victim, mid-quantize
    killed_staging.mkdir()
    (killed_staging / "model.onnx_data").write_bytes(b"\0" * 1024)
    running_staging = tmp_path / f".out.{os.getppid()}.a8b2c4.partial"
    running_staging.mkdir()
    other_output = tmp_path / f".out.{_dead_pid()}.{os.getppid()}.x7y8z9.partial"  # of the output "out.<n>"
    other_output.mkdir()
    with staged_output(out, overwrite=True) as staging:
        assert staging.name.startswith(f".out.{os.getpid()}.") and staging.name.endswith(".partial")
        (staging / "who").write_text("new")
    assert (out / "who").read_text() == "new" and not dead.exists() and alive.is_dir()
    assert not killed_staging.exists() and running_staging.is_dir() and other_output.is_dir()
    alive.rmdir()
    running_staging.rmdir()
    other_output.rmdir()
    # killed between the two renames: the output is missing, its complete previous self is moved aside
    shutil.rmtree(out)
    dead.mkdir()
    (dead / "who").write_text("previous")
    with pytest.raises(EdgekitError, match="exists and is not empty"):  # put back, so not replaced silently
        with staged_output(out):
            pass
    assert (out / "who").read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- 5 (part). a read-only or full output file system --------------------------------------------------


@contextlib.contextmanager
def _tmpfs(folder: Path, options: str):
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount privileges): {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_read_only_output_is_one_sentence(ckpt_copy, tmp_path):
    # tests run as root, where chmod 0o555 does not stop a write: a real read-only mount does
    with _tmpfs(tmp_path / "ro", "ro") as ro:
        before = tree_digest(ckpt_copy)
        r = run_cli("export", ckpt_copy, "-o", ro / "out", expect=None)
        assert_user_error(r, str(ro / "out"), "read-only")
        r = run_cli("devices", "--json", ro / "devices.json", expect=None)
        assert_user_error(r, str(ro / "devices.json"), "read-only")
        # the staging itself, as a Python caller meets it
        with pytest.raises(EdgekitError, match="read-only file system"):
            with staged_output(ro / "out"):
                pass
        with pytest.raises(EdgekitError, match="read-only file system"):
            write_text_atomic(ro / "report.json", "{}")
        assert list(ro.iterdir()) == []
        assert tree_digest(ckpt_copy) == before


def test_full_disk_is_one_sentence_and_leaves_nothing(ckpt_copy, tmp_path):
    with _tmpfs(tmp_path / "tiny", "size=64k") as tiny:
        before = tree_digest(ckpt_copy)
        r = run_cli("export", ckpt_copy, "-o", tiny / "out", expect=None)  # the ONNX model does not fit in 64 KiB
        assert_user_error(r, str(tiny / "out"), "full disk")
        assert list(tiny.iterdir()) == []  # the staging folder is gone, and no output looks complete
        assert tree_digest(ckpt_copy) == before


def test_full_disk_while_writing_a_report_leaves_no_truncated_file(tmp_path):
    with _tmpfs(tmp_path / "tiny", "size=64k") as tiny:
        filler = tiny / "filler"
        with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:  # until the disk is full
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        r = run_cli("devices", "--json", tiny / "devices.json", expect=None)
        assert_user_error(r, str(tiny / "devices.json"), "full disk")
        assert sorted(p.name for p in tiny.iterdir()) == ["filler"]
