"""The gate's latency verdict measured on one runner (--rebench) and its no-fail-open rules, through the CLI.

Timing targets (no false failure at 10%, a +25% model caught every time) belong to benchmarks/gate_noise.py;
here the slowed model is many times slower, so that the verdict is robust on a loaded 2-core machine.
"""

import json
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import tree_digest
from helpers import assert_user_error, read_json, run_cli
from tiny_onnx import append_matmul_chain

FAST = ("--rebench-rounds", "3")
# A model compared with a copy of itself must pass; how close to 10% the verdict holds is benchmarks/gate_noise.py's
# to measure. This model runs in about 55 us, where three short rounds on a loaded 2-core runner once read the
# same int8 model +15.1% slower than itself (rounds 1.19, 1.16, 1.10; in the full suite on the AVX-512 machine,
# 2026-12-07): the same-model tests give the verdict a margin it cannot need for a real change.
SAME_MODEL = ("--max-latency-regression", "0.5", "--latency-warn", "0.3")


@pytest.fixture(scope="module")
def runs(released_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("gate-rebench")
    for name in ("run", "dist"):
        shutil.copytree(released_run / name, root / name)
    shutil.copytree(root / "run", root / "slow")
    append_matmul_chain(root / "slow" / "int8" / "model.onnx", matmuls=8)  # a tiny model: many times slower
    (root / "lone").mkdir()
    shutil.copy(root / "dist" / "model" / "manifest.json", root / "lone" / "manifest.json")
    return root


def _cases(xml_path: Path) -> dict:
    """JUnit test case name -> 'passed' | 'failure' | ('skipped', message)."""
    out = {}
    for tc in ET.parse(xml_path).getroot().iter("testcase"):
        skipped, failure = tc.find("skipped"), tc.find("failure")
        out[tc.get("name")] = ("skipped", skipped.get("message")) if skipped is not None else \
            "failure" if failure is not None else "passed"
    return out


def _scratch() -> set:
    return set(Path(tempfile.gettempdir()).glob("edgekit-rebench-*"))


def _edited(runs, tmp_path, edit, name="current.json", src="run/report.json"):
    rep = read_json(runs / src)
    edit(rep)
    path = tmp_path / name
    path.write_text(json.dumps(rep))
    return path


def test_rebench_against_itself_passes(runs, tmp_path):
    before, scratch = tree_digest(runs / "dist"), _scratch()
    r = run_cli("gate", runs / "run", "--baseline", runs / "dist" / "model.tar.gz", *FAST, *SAME_MODEL, "--json",
                "--junit", tmp_path / "g.xml")
    rep = json.loads(r.stdout)
    latency = [c for c in rep["checks"] if c["kind"] == "latency"]
    assert [c["name"] for c in latency] == ["p50 latency: int8 (rebenched)"]  # the shipped model only
    assert latency[0]["passed"] is not False and rep["passed"]
    block = rep["rebench"]
    assert block["rounds"] == 3 and len(block["variants"][0]["round_ratios"]) == 3
    assert block["environment"]["libraries"]["onnxruntime"]  # the versions both sides ran with are recorded
    assert "interleaved" in block["method"] and "two halves of fresh worker processes" in block["method"]
    assert _cases(tmp_path / "g.xml")["p50 latency: int8 (rebenched)"] in ("passed", ("skipped", latency[0]["note"]))
    assert tree_digest(runs / "dist") == before and _scratch() == scratch  # the extracted bundle is gone


def test_rebench_halves_run_in_fresh_processes_in_swapped_order():
    from edgekit.release.rebench import _ordered, halves

    assert halves(10) == [(5, False), (5, True)] and halves(3) == [(2, False), (1, True)] and halves(1) == [(1, False)]
    pairs = [("b-int8", "c-int8"), ("b-fp32", "c-fp32")]
    assert _ordered(pairs, False) == ["b-int8", "c-int8", "b-fp32", "c-fp32"]
    assert _ordered(pairs, True) == ["c-int8", "b-int8", "c-fp32", "b-fp32"]


def test_rebench_all_variants(runs):
    rep = json.loads(run_cli("gate", runs / "run", "--baseline", runs / "run", *FAST, *SAME_MODEL, "--all-variants",
                             "--json").stdout)
    assert [c["name"] for c in rep["checks"] if c["kind"] == "latency"] == \
        ["p50 latency: int8 (rebenched)", "p50 latency: fp32 (rebenched)"]


def test_rebench_slowed_copy_fails(runs, tmp_path):
    before = tree_digest(runs / "run"), tree_digest(runs / "slow")
    r = run_cli("gate", runs / "slow", "--baseline", runs / "run", *FAST, "--json", "--junit", tmp_path / "g.xml",
                "--markdown", tmp_path / "g.md", expect=1)
    rep = json.loads(r.stdout)
    failed = [c for c in rep["checks"] if c["passed"] is False]
    assert [c["name"] for c in failed] == ["p50 latency: int8 (rebenched)"]
    assert failed[0]["delta"] > 1.0, failed[0]  # more than twice as slow, measured here
    assert all(ratio > 1.5 for ratio in rep["rebench"]["variants"][0]["round_ratios"])
    assert _cases(tmp_path / "g.xml")["p50 latency: int8 (rebenched)"] == "failure"
    assert "FAILED" in (tmp_path / "g.md").read_text()
    assert (tree_digest(runs / "run"), tree_digest(runs / "slow")) == before
    # without rebench the same pair is shown, not gated: cross-run latency never fails the gate
    rep = json.loads(run_cli("gate", runs / "slow", "--baseline", runs / "run", "--no-rebench", "--json").stdout)
    lat = next(c for c in rep["checks"] if c["kind"] == "latency")
    assert lat["passed"] is None and lat["threshold"] == "not gated: measured on different runs"


def test_lone_manifest_gives_skipped_cases_and_warnings(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    r = run_cli("gate", runs / "run", "--baseline", runs / "lone" / "manifest.json", "--junit", tmp_path / "g.xml",
                "--markdown", tmp_path / "g.md", "--json", tmp_path / "g.json")
    rep = read_json(tmp_path / "g.json")
    lat = next(c for c in rep["checks"] if c["kind"] == "latency")
    assert lat["passed"] is None and "lone file without its models" in lat["note"] and rep["rebench"] is None
    cases = _cases(tmp_path / "g.xml")
    assert cases[lat["name"]][0] == "skipped" and "not gated" in cases[lat["name"]][1]
    assert cases["accuracy"] == "passed" and cases["INT8 model size"] == "passed"
    assert any(line.startswith("::warning::p50 latency: not rebenched") for line in r.output.splitlines())
    assert "not gated" in (tmp_path / "g.md").read_text()
    monkeypatch.delenv("GITHUB_ACTIONS")
    monkeypatch.setenv("GITLAB_CI", "true")
    r = run_cli("gate", runs / "run", "--baseline", runs / "lone" / "manifest.json")
    assert "\x1b[0Ksection_start:" in r.output and "\x1b[0Ksection_end:" in r.output and "::warning::" not in r.output


def test_require_latency_with_lone_manifest_fails(runs, tmp_path):
    r = run_cli("gate", runs / "run", "--baseline", runs / "lone", "--require", "latency,size", "--json",
                "--junit", tmp_path / "g.xml", expect=1)
    rep = json.loads(r.stdout)
    lat = next(c for c in rep["checks"] if c["kind"] == "latency")
    assert lat["passed"] is False and lat["note"].startswith("required (--require latency) but not checked")
    assert _cases(tmp_path / "g.xml")[lat["name"]] == "failure"
    # asking for a rebench that cannot be made is bad input, not a silent fallback
    before = tree_digest(runs / "lone")
    assert_user_error(run_cli("gate", runs / "run", "--baseline", runs / "lone", "--rebench", "--junit",
                              tmp_path / "r.xml", expect=2), "--rebench needs both sides' models on disk", "--no-rebench")
    assert not (tmp_path / "r.xml").exists() and tree_digest(runs / "lone") == before
    r = run_cli("gate", runs / "run", "--baseline", runs / "lone", "--require", "speed", expect=2)
    assert "Traceback" not in r.output and "require" in r.output


def test_missing_baseline(runs, tmp_path):
    before = tree_digest(runs / "run")
    line = assert_user_error(run_cli("gate", runs / "run", "--baseline", tmp_path / "none" / "manifest.json",
                                     "--junit", tmp_path / "g.xml", expect=2), "does not exist", "--allow-missing-baseline")
    assert "none/manifest.json" in line and not (tmp_path / "g.xml").exists()
    r = run_cli("gate", runs / "run", "--baseline", tmp_path / "none" / "manifest.json", "--allow-missing-baseline",
                "--junit", tmp_path / "g.xml", "--json")
    rep = json.loads(r.stdout)
    assert rep["passed"] and all(c["passed"] is None for c in rep["checks"]) and len(rep["checks"]) == 3
    cases = _cases(tmp_path / "g.xml")
    assert len(cases) == 3 and all(v[0] == "skipped" and "no baseline" in v[1] for v in cases.values())
    suite = ET.parse(tmp_path / "g.xml").getroot().find("testsuite")
    assert suite.get("skipped") == "3" and suite.get("failures") == "0"
    assert any("Warning: no baseline" in line for line in r.output.splitlines())
    assert tree_digest(runs / "run") == before


def test_data_change_refused(runs, data_dir, tmp_path):
    other = tmp_path / "eval-other.tsv"
    other.write_text((data_dir / "eval.tsv").read_text().replace("\n", "\n\n", 1).rstrip("\n") + "\n")

    def other_data(rep):
        rep["verify"]["data"]["path"] = str(other)

    current = _edited(runs, tmp_path, other_data)
    before = tree_digest(runs / "run"), current.read_bytes()
    assert_user_error(run_cli("gate", current, "--baseline", runs / "dist" / "model", "--junit", tmp_path / "g.xml",
                              expect=2), "evaluation data differ", "--allow-data-change")
    assert not (tmp_path / "g.xml").exists() and (tree_digest(runs / "run"), current.read_bytes()) == before
    r = run_cli("gate", current, "--baseline", runs / "dist" / "model", "--allow-data-change", "--json")
    assert any("evaluation data differ" in w for w in json.loads(r.stdout)["warnings"])


def test_nothing_compared_fails(runs, tmp_path):
    def bare(rep):
        rep["verify"], rep["bench"], rep["quantize"]["size_after"] = None, None, 0

    current, baseline = _edited(runs, tmp_path, bare), _edited(runs, tmp_path, bare, "baseline.json")
    r = run_cli("gate", current, "--baseline", baseline, "--json", "--junit", tmp_path / "g.xml", expect=1)
    rep = json.loads(r.stdout)
    assert not rep["passed"] and [c["passed"] for c in rep["checks"]] == [None, None, None, False]
    assert "nothing could be compared" in rep["checks"][-1]["note"]
    assert _cases(tmp_path / "g.xml")["anything compared"] == "failure"


def test_unverified_baseline_does_not_pass_on_size_alone(runs, tmp_path):
    def unverified(rep):
        rep["verify"] = None

    baseline = _edited(runs, tmp_path, unverified, "baseline.json")
    rep = json.loads(run_cli("gate", runs / "run" / "report.json", "--baseline", baseline, "--json").stdout)
    acc = rep["checks"][0]
    assert acc["kind"] == "accuracy" and acc["passed"] is None and "baseline has no accuracy" in acc["note"]
    assert any(w.startswith("accuracy: not checked") for w in rep["warnings"])
    run_cli("gate", runs / "run" / "report.json", "--baseline", baseline, "--require", "accuracy", expect=1)
