"""Release bundles: manifest, verification (tampered, missing, extra files), load_bundle, reproducibility."""

import json
import shutil
import tarfile

import numpy as np
import pytest

from conftest import tree_digest
from helpers import assert_user_error, read_json, run_cli


@pytest.fixture(scope="module")
def run(text_ckpt, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "run"
    run_cli("compress", text_ckpt, "-o", out, "--data", data_dir / "eval.tsv", "--bench-iterations", "5",
            "--bench-min-seconds", "0")
    return out


@pytest.fixture(scope="module")
def dist(run, tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    r = run_cli("release", "build", run, "-o", d, "--include-fp32", "--name", "clf")
    assert "Tarball:" in r.output
    return d


def test_bundle_layout_and_manifest(dist, run, text_ckpt):
    from edgekit.artifacts import tree_sha256

    bundle = dist / "clf"
    assert (dist / "clf.tar.gz").is_file() and not list(dist.glob(".*"))  # no staging leftovers
    for f in ("manifest.json", "MODEL_CARD.md", "int8/model.onnx", "int8/tokenizer.json", "int8/config.json",
              "fp32/model.onnx"):
        assert (bundle / f).is_file(), f
    assert not list(bundle.rglob("*_report.json"))  # timings and paths stay out
    m = read_json(bundle / "manifest.json")
    assert m["schema_version"] == 1 and m["passed"] and m["task"] == "text-classification"
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m["files"]) == on_disk
    assert m["models"]["int8"]["sha256"] == m["files"]["int8/model.onnx"]["sha256"]
    assert m["source"]["sha256"] == tree_sha256(text_ckpt)[0]
    assert m["edgekit_version"] and m["libraries"]["onnxruntime"]
    assert m["recipe"]["checkpoint"] == str(text_ckpt.resolve())
    assert m["accuracy"]["candidate_metrics"]["accuracy"] > 90 and m["gates"]["checks"]
    assert m["bench"][0]["environment"]["cpu_model"] and len(m["bench"][0]["variants"]) == 3
    assert "nodes_in_float" in m["quantization"] and m["pruning"] is None
    card = (bundle / "MODEL_CARD.md").read_text()
    assert card.startswith("# clf") and "## Reproducibility" in card and "edgekit release verify" in card
    assert "/" not in json.dumps(read_json(bundle / "int8" / "edgekit.json"))  # no run paths in the bundle


def test_verify_and_load_bundle(dist):
    from edgekit.release.bundle import load_bundle

    for target in (dist / "clf", dist / "clf.tar.gz", dist):
        r = run_cli("release", "verify", target)
        assert "OK:" in r.output and "FAILED" not in r.output
    session = load_bundle(dist / "clf")
    ids = np.array([[2, 10, 11, 3]], dtype=np.int64)
    out = session.run({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    assert np.asarray(out).shape == (1, 2)
    assert load_bundle(dist / "clf", variant="fp32").run(
        {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}).shape == (1, 2)


def _damage(bundle, how):
    if how == "tampered":
        f = bundle / "int8" / "model.onnx"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
        return "int8/model.onnx"
    if how == "missing":
        (bundle / "int8" / "vocab.txt").unlink()
        return "int8/vocab.txt"
    (bundle / "int8" / "notes.txt").write_text("not shipped")
    return "int8/notes.txt"


@pytest.mark.parametrize("how", ["tampered", "missing", "extra"])
def test_damaged_bundle_is_refused(dist, tmp_path, how):
    from edgekit.release.bundle import BundleIntegrityError, load_bundle, write_deterministic_tar

    bundle = shutil.copytree(dist / "clf", tmp_path / "clf")
    name = _damage(bundle, how)
    r = run_cli("release", "verify", bundle, expect=1)
    problem = next(line for line in r.output.splitlines() if name in line)
    assert how in problem
    with pytest.raises(BundleIntegrityError, match=name):
        load_bundle(bundle)
    tarball = tmp_path / "clf.tar.gz"  # the same damage inside a tarball
    write_deterministic_tar(bundle, "clf", tarball)
    r = run_cli("release", "verify", tarball, expect=1)
    assert any(name in line and how in line for line in r.output.splitlines())


def test_tarball_is_deterministic(run, dist, tmp_path):
    from edgekit.artifacts import sha256_file

    r = run_cli("release", "build", run, "-o", tmp_path / "again", "--include-fp32", "--name", "clf")
    assert sha256_file(tmp_path / "again" / "clf.tar.gz") == sha256_file(dist / "clf.tar.gz"), r.output
    assert tree_digest(tmp_path / "again" / "clf") == tree_digest(dist / "clf")
    with tarfile.open(dist / "clf.tar.gz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
    assert (dist / "clf.tar.gz").read_bytes()[4:8] == b"\0\0\0\0"  # gzip header mtime


def test_models_are_byte_identical_across_compress_runs(run, text_ckpt, data_dir, tmp_path):
    """Rebuilding from the same checkpoint and recipe gives the same model bytes (reports differ: timings)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(read_json(run / "report.json")["config"]["recipe"]))  # JSON is YAML
    run_cli("compress", "--recipe", recipe, "--no-bench", "-o", tmp_path / "again")
    for f in ("int8/model.onnx", "onnx/model.onnx", "int8/tokenizer.json", "int8/config.json"):
        assert (tmp_path / "again" / f).read_bytes() == (run / f).read_bytes(), f
    assert (tmp_path / "again" / "report.json").read_bytes() != (run / "report.json").read_bytes()


def test_failed_run_is_not_released(run, tmp_path):
    failed = shutil.copytree(run, tmp_path / "failed")
    rep = read_json(failed / "report.json")
    rep["passed"] = False
    (failed / "report.json").write_text(json.dumps(rep))
    r = run_cli("release", "build", failed, "-o", tmp_path / "dist", expect=1)
    assert "failed its accuracy gate" in r.output and not (tmp_path / "dist" / "failed-int8").exists()
    run_cli("release", "build", failed, "-o", tmp_path / "dist", "--allow-failed", "--name", "f")
    assert read_json(tmp_path / "dist" / "f" / "manifest.json")["passed"] is False


def test_release_user_errors(run, dist, data_dir, tmp_path):
    assert_user_error(run_cli("release", "build", data_dir, "-o", tmp_path / "d", expect=2), "not an `edgekit compress` output")
    assert_user_error(run_cli("release", "build", run, "-o", dist, "--name", "clf", expect=2), "already exists")
    assert_user_error(run_cli("release", "verify", tmp_path / "nothing", expect=2), "does not exist")
    assert_user_error(run_cli("release", "build", run, "-o", run / "dist", expect=2), "overlaps the input")


def test_release_without_a_subcommand_names_release_build(run, tmp_path):
    # No silent default: `release RUN` used to mean `release build RUN`, and a run folder named "verify" would not.
    line = assert_user_error(run_cli("release", run, "-o", tmp_path / "d", expect=2), "not a release subcommand",
                             f"edgekit release build {run} -o DIST")
    assert line.count(". ") == 0  # one sentence
    assert not (tmp_path / "d").exists()
