"""The regression gate between two runs or releases: accuracy, size, latency only on matching environments."""

import json

import pytest

from helpers import assert_user_error, read_json, run_cli


@pytest.fixture(scope="module")
def runs(released_run):
    return released_run


def _edited(runs, tmp_path, edit, name="current.json"):
    rep = read_json(runs / "run" / "report.json")
    edit(rep)
    path = tmp_path / name
    path.write_text(json.dumps(rep))
    return path


def _int8(rep):
    return next(v for v in rep["bench"]["variants"] if "INT8" in v["name"])


def test_identical_runs_pass(runs, tmp_path):
    # --no-rebench: the latency recorded by the runs is shown, not gated (tests/test_gate_rebench.py rebenches)
    r = run_cli("gate", runs / "run" / "report.json", "--baseline", runs / "run", "--no-rebench", "--json", "--junit",
                tmp_path / "g.xml", "--markdown", tmp_path / "g.md")
    rep = json.loads(r.stdout)
    assert rep["passed"] and [w.split(":")[0] for w in rep["warnings"]] == ["p50 latency"]
    names = [c["name"] for c in rep["checks"]]
    assert names[:2] == ["accuracy", "INT8 model size"] and sum(n.startswith("p50 latency") for n in names) == 1
    assert 'failures="0"' in (tmp_path / "g.xml").read_text()
    md = (tmp_path / "g.md").read_text()
    assert "| check | baseline | current | delta | threshold | verdict |" in md and "PASSED" in md


def test_run_against_its_release(runs):
    for baseline in (runs / "dist" / "model", runs / "dist" / "model.tar.gz", runs / "dist"):
        run_cli("gate", runs / "run", "--baseline", baseline, "--no-rebench")
    run_cli("gate", runs / "dist" / "model" / "manifest.json", "--baseline", runs / "run", "--no-rebench")


def test_accuracy_drop_fails(runs, tmp_path):
    def drop(rep):
        rep["verify"]["candidate_metrics"]["accuracy"] -= 2.0

    current = _edited(runs, tmp_path, drop)
    r = run_cli("gate", current, "--baseline", runs / "run", "--junit", tmp_path / "g.xml", "--markdown", tmp_path / "g.md",
                expect=1)
    assert "FAIL" in r.output
    assert 'failures="1"' in (tmp_path / "g.xml").read_text()
    row = next(line for line in (tmp_path / "g.md").read_text().splitlines() if line.startswith("| accuracy"))
    assert "-2.00 pt" in row and "FAIL" in row
    run_cli("gate", current, "--baseline", runs / "run", "--max-accuracy-drop", "2.5")


def test_cross_run_latency_is_shown_never_gated(runs, tmp_path):
    def slower(rep):
        _int8(rep)["latency"]["p50_ms"] *= 1.5

    current = _edited(runs, tmp_path, slower)  # a lone report.json: its models are not beside it to rebench
    rep = json.loads(run_cli("gate", current, "--baseline", runs / "run", "--json").stdout)
    lat = [c for c in rep["checks"] if c["name"].startswith("p50")]
    assert len(lat) == 1 and "INT8" in lat[0]["name"] and lat[0]["delta"] == pytest.approx(0.5)
    assert lat[0]["passed"] is None and lat[0]["threshold"] == "not gated: measured on different runs"
    run_cli("gate", current, "--baseline", runs / "run", "--require", "latency", expect=1)
    run_cli("gate", current, "--baseline", runs / "run", "--max-latency-regression", "0.6")


def test_different_environments_give_no_latency_verdict(runs, tmp_path):
    def elsewhere(rep):
        rep["bench"]["environment"]["cpu_model"] = "Some Other CPU"
        rep["bench"]["environment"]["threads"] = 64
        _int8(rep)["latency"]["p50_ms"] *= 3

    current = _edited(runs, tmp_path, elsewhere)
    r = run_cli("gate", current, "--baseline", runs / "run", "--json")
    rep = json.loads(r.stdout)
    lat = next(c for c in rep["checks"] if c["name"].startswith("p50"))
    assert rep["passed"] and lat["passed"] is None
    assert "not gated" in lat["note"] and "Some Other CPU" in lat["note"] and "threads" in lat["note"]
    warning = next(line for line in r.output.splitlines() if line.startswith("Warning:"))
    assert "latency measured on different runs is not gated" in warning


def test_size_growth(runs, tmp_path):
    def bigger(rep):
        rep["quantize"]["size_after"] = int(rep["quantize"]["size_after"] * 1.1)

    current = _edited(runs, tmp_path, bigger)
    run_cli("gate", current, "--baseline", runs / "run", expect=1)
    run_cli("gate", current, "--baseline", runs / "run", "--max-size-growth", "20%")


def test_unverified_current_fails(runs, tmp_path):
    def unverified(rep):
        rep["verify"] = None

    r = run_cli("gate", _edited(runs, tmp_path, unverified), "--baseline", runs / "run", "--json", expect=1)
    acc = json.loads(r.stdout)["checks"][0]
    assert acc["name"] == "accuracy" and acc["passed"] is False and "without --data" in acc["note"]


def test_bad_inputs(runs, tmp_path):
    assert_user_error(run_cli("gate", tmp_path / "nope.json", "--baseline", runs / "run", expect=2), "does not exist")
    (tmp_path / "other.json").write_text('{"kind": "BenchReport"}')
    assert_user_error(run_cli("gate", tmp_path / "other.json", "--baseline", runs / "run", expect=2),
                      "neither an edgekit compress report nor a release manifest")
    (tmp_path / "broken.json").write_text("{")
    assert_user_error(run_cli("gate", tmp_path / "broken.json", "--baseline", runs / "run", expect=2), "not valid JSON")

    def other_task(rep):
        rep["verify"]["task"] = "token-classification"

    assert_user_error(run_cli("gate", _edited(runs, tmp_path, other_task), "--baseline", runs / "run", expect=2),
                      "token-classification")
    r = run_cli("gate", runs / "run", "--baseline", runs / "run", "--max-latency-regression", "fast", expect=2)
    assert "not a fraction" in r.output


def test_python_api(runs):
    from edgekit.release.gate import RegressionGateConfig, regression_gate

    report = regression_gate(runs / "run", runs / "dist" / "model", RegressionGateConfig(max_accuracy_drop=0.0))
    assert report and report.passed and "## edgekit gate" in report.to_markdown()
