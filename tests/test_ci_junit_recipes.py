"""CI reporters, recipes that travel, float-exact thresholds (issue 13, deliverables 4, 6 and 7).

- Every JUnit file edgekit writes (verify pass/fail, compress, gate pass/fail/skipped) is read by junitparser and
  validates against Jenkins' xunit schema junit-10.xsd (vendored in tests/data, with its source and license).
- A recipe dumped into a project tree keeps working when the tree moves: compress from the moved recipe makes
  the same ONNX bytes, machine-dependent choices are recorded, and a moved run releases without --source.
- A drop of exactly the threshold passes, for every count out of 300, in verify and in the gate alike.
"""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import tree_digest
from helpers import assert_user_error, damaged_copy, read_json, run_cli

XSD = Path(__file__).parent / "data" / "junit-10.xsd"


# ---- JUnit that every reporter reads ------------------------------------------------------------------


def assert_reporters_read(path: Path, failures: int = 0, skipped: int = 0) -> list:
    """The file validates against junit-10.xsd and junitparser reads it; every case has a short `time`, every
    failure an explanation in its body as well as in `message`, every skip a message. Returns junitparser's cases."""
    import junitparser
    import xmlschema

    xmlschema.XMLSchema(str(XSD)).validate(str(path))  # raises, naming the attribute, when a reporter would refuse it
    raw = ET.parse(path).getroot()
    assert raw.tag == "testsuites" and "disabled" not in raw.attrib and "skipped" not in raw.attrib
    raw_cases = raw.findall("./testsuite/testcase")
    assert raw_cases, "no test case at all"
    for tc in raw_cases:
        t = tc.get("time")
        assert t is not None, f"{tc.get('name')} has no time"
        whole, _, decimals = t.partition(".")
        assert whole.isdigit() and len(decimals) <= 3, t
    for suite in raw.findall("testsuite"):
        assert "disabled" not in suite.attrib and len(suite.get("time").partition(".")[2]) <= 3
    cases = [c for suite in junitparser.JUnitXml.fromfile(str(path)) for c in suite]
    assert len(cases) == len(raw_cases)
    failed = [r for c in cases for r in c.result if isinstance(r, junitparser.Failure)]
    skips = [r for c in cases for r in c.result if isinstance(r, junitparser.Skipped)]
    assert (len(failed), len(skips)) == (failures, skipped), path.read_text()
    for f in failed:
        assert f.message and f.text and f.text.startswith(f.message), path.read_text()
    for s in skips:
        assert s.message, path.read_text()
    return cases


def test_junit_writer_rounds_and_never_drops_time(tmp_path):
    from edgekit.reports import JunitCase, write_junit

    write_junit(tmp_path / "j.xml", "suite", [JunitCase("noisy", "c", 0.1 + 0.2), JunitCase("instant", "c", 0.0),
                                               JunitCase("bad", "c", 1 / 3, failure="x = 2, must be <= 1", failure_detail="n=3"),
                                               JunitCase("unjudged", "c", skipped="no baseline")])
    cases = assert_reporters_read(tmp_path / "j.xml", failures=1, skipped=1)
    assert [c.time for c in cases] == [0.3, 0.0, 0.333, 0.0]
    root = ET.parse(tmp_path / "j.xml").getroot()
    assert root.get("time") == "0.633" and root.find("testsuite").get("skipped") == "1"
    assert root.find(".//failure").text == "x = 2, must be <= 1\nn=3"


@pytest.fixture(scope="module")
def damaged_ckpt(text_ckpt, tmp_path_factory):
    return damaged_copy(text_ckpt, tmp_path_factory.mktemp("damaged") / "ckpt")


def test_verify_junit_pass_and_fail(text_ckpt, text_onnx, damaged_ckpt, data_dir, tmp_path):
    run_cli("verify", text_ckpt, text_onnx, "--data", data_dir / "eval.tsv", "--limit", "60", "--junit", tmp_path / "p.xml")
    cases = assert_reporters_read(tmp_path / "p.xml")
    assert sum(c.time for c in cases) > 0  # the evaluation's time, shared by its checks
    run_cli("verify", text_ckpt, damaged_ckpt, "--data", data_dir / "eval.tsv", "--limit", "60", "--junit",
            tmp_path / "f.xml", expect=1)
    cases = assert_reporters_read(tmp_path / "f.xml", failures=1)
    body = next(r.text for c in cases for r in c.result)
    assert "accuracy_drop_points" in body and "60 examples" in body


# ---- recipes that travel ----------------------------------------------------------------------------------


def _project(root: Path, text_ckpt: Path, data_dir: Path) -> Path:
    """A CI repository's tree: the checkpoint, the evaluation data and (later) the recipe, side by side."""
    project = root / "project"
    shutil.copytree(text_ckpt, project / "models" / "clf")
    (project / "data").mkdir()
    shutil.copyfile(data_dir / "eval.tsv", project / "data" / "eval.tsv")
    return project


@pytest.fixture(scope="module")
def travel(text_ckpt, data_dir, tmp_path_factory):
    """Dump a recipe into a project, compress from it there, then move the whole tree elsewhere (the original is
    deleted, so no absolute path can still work) and compress again from the moved recipe, from another folder."""
    first, second = tmp_path_factory.mktemp("checkout-a"), tmp_path_factory.mktemp("checkout-b")
    project = _project(first, text_ckpt, data_dir)
    run_cli("compress", project / "models" / "clf", "--data", project / "data" / "eval.tsv", "--limit", "60",
            "--no-bench", "--max-drop", "5", "--dump-recipe-to", project / "ci" / "edgekit.yaml")
    recipe_text = (project / "ci" / "edgekit.yaml").read_text()
    run_cli("compress", "--recipe", project / "ci" / "edgekit.yaml", "-o", project / "run", "--junit",
            first / "verify.xml")
    moved = second / "project"
    shutil.copytree(project, moved)
    shutil.rmtree(project)
    cwd = os.getcwd()
    os.chdir(second)  # not the recipe's folder: its relative paths must still resolve against it
    try:
        run_cli("compress", "--recipe", Path("project") / "ci" / "edgekit.yaml", "-o", second / "run2")
    finally:
        os.chdir(cwd)
    return {"recipe": recipe_text, "moved": moved, "first": first, "run": moved / "run", "run2": second / "run2"}


def test_dumped_recipe_paths_are_relative_to_its_folder(travel):
    r = yaml.safe_load(travel["recipe"])
    assert r["checkpoint"] == "../models/clf" and r["data"]["eval"] == "../data/eval.tsv"
    assert r["gates"]["max_drop"] == 5.0 and r["bench"] is None
    assert "checkout-a" not in travel["recipe"]


def test_moved_recipe_gives_the_same_onnx_bytes(travel):
    for model in ("onnx/model.onnx", "int8/model.onnx"):
        assert (travel["run"] / model).read_bytes() == (travel["run2"] / model).read_bytes(), model
    rep = read_json(travel["run2"] / "report.json")
    assert rep["passed"] and rep["verify"]["n_examples"] == 60
    assert rep["source"] == str((travel["moved"] / "models" / "clf").resolve())


def test_compress_junit_is_read_by_every_reporter(travel):
    assert_reporters_read(travel["first"] / "verify.xml")


@pytest.mark.parametrize("case", ["pass", "fail", "skipped"])
def test_gate_junit_is_read_by_every_reporter(travel, tmp_path, case):
    rep = read_json(travel["run2"] / "report.json")
    if case == "fail":
        rep["verify"]["candidate_metrics"]["accuracy"] -= 5.0
    (tmp_path / "current").mkdir()
    (tmp_path / "current" / "report.json").write_text(json.dumps(rep))
    base = read_json(travel["run2"] / "report.json")
    if case == "skipped":
        base["verify"] = None  # a baseline without accuracy figures: that check cannot be made
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "report.json").write_text(json.dumps(base))
    r = run_cli("gate", tmp_path / "current" / "report.json", "--baseline", tmp_path / "base" / "report.json",
                "--json", "--junit", tmp_path / "g.xml", expect=1 if case == "fail" else 0)
    checks = json.loads(r.stdout)["checks"]
    cases = assert_reporters_read(tmp_path / "g.xml", failures=sum(c["passed"] is False for c in checks),
                                  skipped=sum(c["passed"] is None for c in checks))
    assert [c.name for c in cases] == [c["name"] for c in checks]
    results = {c.name: c.result for c in cases}
    if case == "fail":
        assert "-5.00 pt" in results["accuracy"][0].text
    if case == "skipped":
        assert results["accuracy"] and "baseline" in results["accuracy"][0].message


def test_machine_choices_are_recorded(travel):
    from edgekit.benchmarks.environment import usable_cores
    from edgekit.compress.quantize import default_reduce_range

    assert yaml.safe_load(travel["recipe"])["quantize"]["reduce_range"] is None  # the recipe leaves it to the machine
    rep = read_json(travel["run2"] / "report.json")
    recipe = rep["config"]["recipe"]
    assert recipe["quantize"]["reduce_range"] is default_reduce_range() and recipe["threads"] == usable_cores()
    assert rep["config"]["resolved_on_this_machine"] == {"threads": usable_cores(),
                                                         "quantize.reduce_range": default_reduce_range()}
    assert rep["quantize"]["config"]["reduce_range"] is default_reduce_range()  # what the quantizer used


def test_gate_recipe_diff_shows_machine_choices(travel, tmp_path):
    rep = read_json(travel["run2"] / "report.json")
    recipe = rep["config"]["recipe"]
    recipe["quantize"]["reduce_range"] = not recipe["quantize"]["reduce_range"]  # as on a runner with(out) VNNI
    recipe["threads"] += 6
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "report.json").write_text(json.dumps(rep))
    out = json.loads(run_cli("gate", travel["run2"] / "report.json", "--baseline", tmp_path / "other" / "report.json",
                             "--json", expect=None).stdout)
    changes = {c["key"]: (c["baseline"], c["current"]) for c in out["recipe_changes"]}
    mine = read_json(travel["run2"] / "report.json")["config"]["recipe"]
    assert changes["quantize.reduce_range"] == (not mine["quantize"]["reduce_range"], mine["quantize"]["reduce_range"])
    assert changes["threads"] == (mine["threads"] + 6, mine["threads"])


def test_moved_run_releases_without_source(travel, tmp_path):
    run = travel["run"]
    assert not Path(read_json(run / "report.json")["source"]).exists()  # the recorded absolute path is gone
    run_cli("release", "build", run, "-o", tmp_path / "dist", "--name", "clf")
    manifest = read_json(tmp_path / "dist" / "clf" / "manifest.json")
    assert manifest["source"]["checkpoint"] == str((travel["moved"] / "models" / "clf").resolve())
    run_cli("release", "verify", tmp_path / "dist" / "clf")


def test_moved_run_without_its_checkpoint_names_the_fix(travel, tmp_path):
    run = tmp_path / "lonely-run"
    shutil.copytree(travel["run"], run)  # the checkpoint did not come along
    before = tree_digest(run)
    line = assert_user_error(run_cli("release", "build", run, "-o", tmp_path / "dist", expect=2),
                             "is not there to hash", "--source")
    assert tree_digest(run) == before and not (tmp_path / "dist").exists(), line


def test_dump_recipe_on_stdout_is_relative_to_the_current_folder(text_ckpt, data_dir, tmp_path, monkeypatch):
    project = _project(tmp_path, text_ckpt, data_dir)
    monkeypatch.chdir(project)
    r = yaml.safe_load(run_cli("compress", "models/clf", "--data", "data/eval.tsv", "--dump-recipe").stdout)
    assert r["checkpoint"] == "models/clf" and r["data"]["eval"] == "data/eval.tsv"



@pytest.mark.parametrize("target", ["config.json", "recipe"])
def test_dump_recipe_to_an_input_is_refused(text_ckpt, data_dir, tmp_path, target):
    project = _project(tmp_path, text_ckpt, data_dir)
    recipe = project / "edgekit.yaml"
    recipe.write_text("checkpoint: models/clf\ndata:\n  eval: data/eval.tsv\n")
    before = tree_digest(project)
    path = project / "models" / "clf" / "config.json" if target == "config.json" else recipe
    line = assert_user_error(run_cli("compress", "--recipe", recipe, "--dump-recipe-to", path, expect=2),
                             "--dump-recipe-to path", "overlaps the input", "never modifies its input")
    assert tree_digest(project) == before, line  # byte-identical, and no temporary file left beside it


# ---- float-exact thresholds --------------------------------------------------------------------------------

N = 300


def _accuracies(n: int) -> list[float]:
    """The accuracy edgekit computes (metrics.classification_metrics) for k = 0..n correct out of n."""
    from edgekit.metrics import classification_metrics

    out = []
    for k in range(n + 1):
        logits = np.zeros((n, 2), dtype=np.float32)
        logits[:k, 0] = logits[k:, 1] = 1.0
        out.append(classification_metrics(logits, [0] * n)["accuracy"])
    return out


def test_verify_passes_a_drop_of_exactly_the_threshold_for_every_count():
    from edgekit.verify import _checks, effective_gate, GateConfig

    acc = _accuracies(N)
    assert sum(acc[k + 3] - acc[k] > 1.0 for k in range(N - 2)) == 39  # the float noise the issue measured
    for k0 in range(N + 1):
        for k in range(k0 + 1):
            exact = float(Fraction(100 * (k0 - k), N))  # the drop as a person writes it: --max-drop 1.0
            applied = effective_gate("text-classification", True, GateConfig(max_drop=exact))
            check = _checks("text-classification", "accuracy", {"accuracy": acc[k0]}, {"accuracy": acc[k]}, {}, applied)[0]
            assert check.passed, (k0, k, check)
            if k < k0:  # one example more than allowed fails
                tighter = effective_gate("text-classification", True,
                                         GateConfig(max_drop=float(Fraction(100 * (k0 - k - 1), N))))
                assert not _checks("text-classification", "accuracy", {"accuracy": acc[k0]}, {"accuracy": acc[k]}, {},
                                   tighter)[0].passed, (k0, k)


def test_gate_passes_a_drop_of_exactly_the_threshold_for_every_count(travel, tmp_path):
    """The regression gate compares with verify's tolerance: every 1-point drop at n=300 passes --max-accuracy-drop 1."""
    from edgekit.release.gate import RegressionGateConfig, regression_gate

    acc = _accuracies(N)
    rep = read_json(travel["run2"] / "report.json")
    rep["verify"]["n_examples"] = N
    (tmp_path / "base").mkdir()
    (tmp_path / "cur").mkdir()
    cfg, strict = RegressionGateConfig(max_accuracy_drop=1.0), RegressionGateConfig(max_accuracy_drop=2 / 3)
    for k0 in range(3, N + 1):
        for where, k in (("base", k0), ("cur", k0 - 3)):
            rep["verify"]["candidate_metrics"]["accuracy"] = acc[k]
            (tmp_path / where / "report.json").write_text(json.dumps(rep))
        got = regression_gate(tmp_path / "cur" / "report.json", tmp_path / "base" / "report.json", cfg)
        check = next(c for c in got.checks if c["name"] == "accuracy")
        assert check["passed"] is True, (k0, check)
        if k0 % 50 == 0:
            tight = regression_gate(tmp_path / "cur" / "report.json", tmp_path / "base" / "report.json", strict)
            assert next(c for c in tight.checks if c["name"] == "accuracy")["passed"] is False


def test_verify_cli_passes_the_exact_drop(text_ckpt, damaged_ckpt, data_dir, tmp_path):
    """Through the command: at n=100 every drop is a whole number of points; exactly it passes, one less fails."""
    args = ("verify", text_ckpt, damaged_ckpt, "--data", data_dir / "eval.tsv", "--limit", "100")
    rep = json.loads(run_cli(*args, "--max-drop", "100", "--json").stdout)
    drop = next(c["value"] for c in rep["checks"] if c["name"] == "accuracy_drop_points")
    points = round(drop)
    assert points >= 1 and abs(drop - points) < 1e-9
    run_cli(*args, "--max-drop", str(points), "--junit", tmp_path / "pass.xml")
    assert_reporters_read(tmp_path / "pass.xml")
    run_cli(*args, "--max-drop", str(points - 1), expect=1)
