"""Issue 11: ``edgekit search`` on tiny fine-tuned models, through the real stages.

One grid search (shared by several tests) over a small space with pruning finds a passing variant, writes a
run folder, a recipe that reproduces it, trials.jsonl, a Pareto plot; a second run with --resume recomputes
nothing. A deliberately fragile model fails INT8 until its culprit node is kept in float; a one-trial budget
returns a result; Ctrl-C leaves a readable report; a worker killed mid-trial is recorded and the search goes
on; trials run on a real local Ray cluster. Bench settings are tiny: these tests check the search, not speed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tree_digest
from fragile import fragile_node
from helpers import assert_user_error, read_json, run_cli

QUICK = ["--bench-iterations", "5", "--bench-min-seconds", "0", "--threads", "1", "--confirm-top", "2"]
# Where the test is not about speed: trials ranked by size, not timed (the benchmark processes are most of a
# tiny trial's time)
UNTIMED = ["--objective", "size", "--no-bench"]


def _trials(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def _search_args(ckpt, out, data_dir, *extra):
    return ["search", ckpt, "-o", out, "--data", data_dir / "eval.tsv", "--calibration-data", data_dir / "calib.tsv",
            *QUICK, *extra]


GRID = ["--strategy", "grid", "--space", "prune.sparsity=0,0.5", "--space", "prune.layers=0",
        "--space", "prune.recover_steps=0", "--space", "quantize.mode=dynamic", "--space", "quantize.per_channel=true,false",
        "--space", "quantize.optimize=true", "--space", "quantize.exclude_op_types=none"]


@pytest.fixture(scope="module")
def searched(text_ckpt, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "out"
    before = tree_digest(text_ckpt)
    result = run_cli(*_search_args(text_ckpt, out, data_dir, *GRID))
    assert tree_digest(text_ckpt) == before  # the checkpoint is only read
    return out, result


def test_search_finds_a_passing_variant_and_writes_a_run_folder(searched, text_ckpt):
    out, result = searched
    report = read_json(out / "search.json")
    assert report["passed"] and report["state"] == "exhausted"  # the grid of 4 recipes, all tried
    trials = _trials(out)
    assert len(trials) == 4 and {t["state"] for t in trials} <= {"passed", "failed"}
    assert {(t["params"].get("prune.sparsity"), t["params"]["quantize.per_channel"]) for t in trials} == {
        ("none", True), ("none", False), (0.5, True), (0.5, False)}
    best = report["best"]
    assert best["state"] == "passed"
    # every trial was gated against the ORIGINAL and timed against the original's FP32 export
    for t in trials:
        assert t["verify"]["checks"][0]["name"] == "accuracy_drop_points"
        assert t["metrics"]["latency_ratio"] > 0 and t["metrics"]["reference_p50_ms"] > 0
        assert t["environment"]["threads"] == 1 and t["worker"]["pid"] != os.getpid()
    # the winner is a normal run folder made by its recipe, verified as the trial was
    run = read_json(out / "best" / "report.json")
    assert run["passed"] and run["search"]["trial"] == best["number"]
    assert run["verify"]["candidate_metrics"] == best["verify"]["candidate_metrics"]
    from edgekit.recipe import load_recipe
    from edgekit.search.space import recipe_key

    recipe = load_recipe(out / "recipe.yaml")
    assert recipe_key(recipe) == recipe_key(best["recipe"]) == recipe_key(run["config"]["recipe"])
    assert Path(recipe.checkpoint) == Path(text_ckpt).resolve()
    # the Pareto plot is a real PNG and the Markdown report links it
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "![accuracy against latency](pareto.png)" in md and "| # | recipe |" in md
    assert set(report["pareto"]) <= {t["number"] for t in trials if t["state"] == "passed"}


def test_trials_share_their_stages(searched):
    """One export per pruned model: the quantization trials of one model reuse its export."""
    out, _ = searched
    built = [s for t in _trials(out) for s in t["stages"] if not s["reused"]]
    exports = [s["key"] for s in built if s["stage"] == "onnx"]
    prunes = [s["key"] for s in built if s["stage"] == "pruned"]
    assert len(exports) == len(set(exports)) == 2  # the original's and the pruned model's, once each
    assert len(prunes) == 1
    reused = [s for t in _trials(out) for s in t["stages"] if s["reused"] and s["stage"] == "onnx"]
    assert reused  # later trials found them built


def test_resume_recomputes_nothing(searched, text_ckpt, data_dir, tmp_path):
    out, _ = searched
    again = tmp_path / "again"
    shutil.copytree(out, again)
    cache_before = sorted(p.name for p in (again / "cache").iterdir())
    best_before = (again / "best" / "report.json").stat().st_mtime_ns
    args = _search_args(text_ckpt, again, data_dir, *GRID)
    args[args.index("-o")] = "--resume"
    result = run_cli(*args)
    report = read_json(again / "search.json")
    assert len(report["trials"]) == 4 and all(t["reused"] for t in report["trials"]), result.output
    assert len(_trials(again)) == 4  # nothing appended
    assert sorted(p.name for p in (again / "cache").iterdir()) == cache_before
    assert (again / "best" / "report.json").stat().st_mtime_ns == best_before
    assert report["best"]["key"] == read_json(out / "search.json")["best"]["key"]


def test_resume_refuses_a_search_made_with_other_data(searched, text_ckpt, data_dir, tmp_path):
    out, _ = searched
    again = tmp_path / "again"
    shutil.copytree(out, again)
    other = tmp_path / "other.tsv"
    other.write_text((data_dir / "eval.tsv").read_text().replace("good", "bad", 3))
    args = _search_args(text_ckpt, again, data_dir, *GRID)
    args[args.index("-o")] = "--resume"
    args[args.index("--data") + 1] = other
    assert_user_error(run_cli(*args, expect=2), "other inputs", "data_sha256")


def test_time_budget_stops_after_the_running_trial_and_returns_the_default_recipe(text_ckpt, data_dir, tmp_path):
    """A budget spent during the first trial: that trial (the recipe `compress` would run) ends, is the answer
    and is written as the run folder. (--max-trials 1 stops the same way: the culprit tests use it.)"""
    out = tmp_path / "budget"
    run_cli(*_search_args(text_ckpt, out, data_dir, "--time-budget", "1s", *UNTIMED))
    report = read_json(out / "search.json")
    assert report["state"] == "budget" and report["passed"]
    (trial,) = report["trials"]
    assert trial["params"]["quantize.mode"] == "dynamic" and trial["params"]["prune.sparsity"] == "none"
    assert report["best"]["number"] == trial["number"]
    assert (out / "best" / "int8" / "model.onnx").is_file()


# ---- culprits: a model that INT8 breaks until one node stays in float ------------------------------------


@pytest.fixture(scope="module")
def fragile(text_ckpt, tmp_path_factory):
    from fragile import build_fragile_classifier

    return build_fragile_classifier(text_ckpt, tmp_path_factory.mktemp("fragile") / "ckpt")


def test_search_names_the_culprit_keeps_it_in_float_and_passes(fragile, data_dir, tmp_path):
    out = tmp_path / "culprit"
    run_cli(*_search_args(fragile, out, data_dir, "--max-trials", "1", *UNTIMED))
    report = read_json(out / "search.json")
    best = report["best"]
    assert report["passed"] and best["state"] == "passed"
    attempts = best["attempts"]
    assert not attempts[0]["passed"] and attempts[-1]["passed"]  # INT8 failed, the exclusion passed
    culprits = best["culprits"]
    assert culprits["diagnosis"] == "quantization"
    first = culprits["nodes"][0]["name"]
    assert first == fragile_node()  # the down-projection made INT8-hostile
    assert culprits["kept_in_float"] == [first]
    assert best["recipe"]["quantize"]["exclude_nodes"] == [first]
    # the ranking and what was kept in float reach the run's report and the release manifest
    run = read_json(out / "best" / "report.json")
    assert run["search"]["culprits"]["kept_in_float"] == [first]
    assert first in (out / "best" / "report.md").read_text()
    run_cli("release", "build", out / "best", "-o", tmp_path / "dist", "--name", "fragile")
    manifest = read_json(tmp_path / "dist" / "fragile" / "manifest.json")
    assert manifest["search"]["kept_in_float"] == [first]
    assert manifest["search"]["culprits"][0]["name"] == first


def test_two_culprits_are_kept_in_float_one_round_at_a_time(text_ckpt, data_dir, tmp_path):
    """Two fragile layers: keeping the worst node alone still fails, the worst two pass (1, then 2 in float)."""
    from fragile import build_fragile_classifier

    once = build_fragile_classifier(text_ckpt, tmp_path / "once", layer=0)
    twice = build_fragile_classifier(once, tmp_path / "twice", layer=1)
    out = tmp_path / "two"
    run_cli(*_search_args(twice, out, data_dir, "--max-trials", "1", *UNTIMED))
    best = read_json(out / "search.json")["best"]
    assert [len(a["exclude_nodes"]) for a in best["attempts"]] == [0, 1, 2]
    assert [a["passed"] for a in best["attempts"]] == [False, False, True]
    assert sorted(best["culprits"]["kept_in_float"]) == sorted([fragile_node(0), fragile_node(1)])
    assert best["recipe"]["quantize"]["exclude_nodes"] == best["culprits"]["kept_in_float"]


def test_a_culprit_per_channel_scales_mend_is_not_kept_in_float(text_ckpt, data_dir, tmp_path):
    """A per-tensor trial whose one culprit (a skewed fused Attention) needs only its own per-channel scales: the
    first retry gives it them, nothing is kept in float, and the recipe, report and manifest say so."""
    from fragile import build_skewed_attention_classifier, skewed_attention_node

    ckpt = build_skewed_attention_classifier(text_ckpt, tmp_path / "skewed")
    out, node = tmp_path / "skew", skewed_attention_node()
    run_cli(*_search_args(ckpt, out, data_dir, "--max-trials", "1", "--space", "prune.sparsity=0", "--space",
                          "prune.layers=0", "--space", "quantize.per_channel=false", *UNTIMED))
    best = read_json(out / "search.json")["best"]
    assert [(a["passed"], a["per_channel_nodes"], a["exclude_nodes"]) for a in best["attempts"]] == [
        (False, [], []), (True, [node], [])]
    culprits = best["culprits"]
    assert culprits["nodes"][0]["name"] == node
    assert culprits["per_channel"] == [node] and culprits["kept_in_float"] == []
    assert best["recipe"]["quantize"]["per_channel_nodes"] == [node] and best["recipe"]["quantize"]["per_channel"] is False
    assert read_json(out / "best" / "report.json")["search"]["culprits"]["per_channel"] == [node]
    assert "per-channel" in (out / "best" / "report.md").read_text()
    assert f"- {node}" in (out / "recipe.yaml").read_text()
    run_cli("release", "build", out / "best", "-o", tmp_path / "dist", "--name", "skewed")
    assert read_json(tmp_path / "dist" / "skewed" / "manifest.json")["search"]["per_channel"] == [node]


def test_no_passing_variant_is_exit_1_and_says_so(fragile, data_dir, tmp_path):
    out = tmp_path / "none"
    result = run_cli(*_search_args(fragile, out, data_dir, "--max-trials", "1", "--max-float-nodes", "0", *UNTIMED),
                     expect=1)
    report = read_json(out / "search.json")
    assert not report["passed"] and report["best"] is None
    assert "NO variant passed" in result.output and not (out / "recipe.yaml").exists()
    assert not (out / "best").exists()


# ---- interrupts and crashes, through a real process --------------------------------------------------


def _start(args: list, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgekit", *map(str, args)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(predicate, proc, seconds: float = 240.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"edgekit exited {proc.returncode} early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out")


def test_a_killed_worker_is_recorded_and_ctrl_c_stops_after_the_running_trial(text_ckpt, data_dir, tmp_path):
    """One search, two faults: its worker killed mid-trial (as the out-of-memory killer would) is recorded as
    crashed and the search goes on in a new worker; then Ctrl-C to the whole process group (what a terminal
    sends) lets the running trial finish and still writes the report."""
    import psutil

    out = tmp_path / "faults"
    proc = _start(_search_args(text_ckpt, out, data_dir, "--max-trials", "6", "--space", "prune.sparsity=0",
                               "--space", "prune.layers=0", *UNTIMED), tmp_path)

    def worker():
        for c in psutil.Process(proc.pid).children():
            cmd = " ".join(c.cmdline())
            if "spawn_main" in cmd and "resource_tracker" not in cmd:
                return c
        return None

    _wait_for(lambda: worker() is not None, proc)
    time.sleep(1.0)  # inside the first trial (imports, export)
    worker().send_signal(signal.SIGKILL)
    _wait_for(lambda: (out / "trials.jsonl").is_file() and (out / "trials.jsonl").read_text().count("\n") >= 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 2, output
    assert "Traceback" not in output and "stopping after the running trial" in output
    report = read_json(out / "search.json")
    assert report["state"] == "interrupted" and report["passed"]
    trials = _trials(out)
    assert 2 <= len(trials) < 6 and len(report["trials"]) == len(trials)
    assert trials[0]["state"] == "crashed" and "SIGKILL" in trials[0]["error"]
    # every later trial ran to its end in the new worker: the interrupted one was finished, not killed
    assert all(t["state"] in ("passed", "failed") for t in trials[1:])
    assert (out / "report.md").is_file() and (out / "recipe.yaml").is_file()
    assert not list(out.glob(".*.partial*"))


# ---- Ray: trials as tasks on a real local cluster ------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path):
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    temp = Path("/tmp") / f"ray-{port}"  # Ray's socket paths must stay short
    start = subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                            "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                            "--temp-dir", str(temp)], env=env, capture_output=True, text=True, timeout=180)
    if start.returncode != 0:
        pytest.fail(f"ray start failed:\n{start.stdout}\n{start.stderr}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_trials_run_on_a_real_ray_cluster_in_two_workers(text_ckpt, data_dir, tmp_path, ray_cluster):
    out = tmp_path / "ray"
    run_cli(*_search_args(text_ckpt, out, data_dir, "--ray-address", ray_cluster, "--workers", "2",
                          "--max-trials", "2", "--strategy", "grid", "--space", "prune.sparsity=0",
                          "--space", "prune.layers=0", "--space", "quantize.mode=dynamic",
                          "--space", "quantize.per_channel=true,false", "--space", "quantize.optimize=true",
                          "--space", "quantize.exclude_op_types=none", *UNTIMED))
    trials = _trials(out)
    assert len(trials) == 2 and all(t["state"] == "passed" for t in trials)
    workers = [t["worker"] for t in trials]
    assert all(w["pid"] != os.getpid() for w in workers)
    assert workers[0]["pid"] != workers[1]["pid"]  # two actors, one trial each, at the same time
    assert set(workers[0]["cores"]).isdisjoint(workers[1]["cores"])  # never timed on the same cores
    report = read_json(out / "search.json")
    assert report["config"]["runner"] == "ray" and report["config"]["workers"] == 2 and report["passed"]


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, fragments", [
    (["--space", "quantize.color=red"], ["quantize.color", "not a dimension"]),
    (["--space", "prune.layers=2"], ["prune.layers=2", "leaves no layer"]),
    (["--space", "quantize.mode"], ["KEY=VALUE"]),
    (["--workers", "2"], ["--workers", "Ray"]),
    (["--objective", "tokens-per-s"], ["tokens-per-s", "text-generation"]),
    (["--time-budget", "soon"], ["soon", "duration"]),
    (["--no-bench"], ["--no-bench", "latency", "--objective size"]),
])
def test_bad_search_options_are_one_sentence(text_ckpt, data_dir, tmp_path, extra, fragments):
    out = tmp_path / "bad"
    assert_user_error(run_cli(*_search_args(text_ckpt, out, data_dir, *extra), expect=2), *fragments)
    assert not out.exists()


def test_search_refuses_a_non_empty_output_and_a_folder_that_is_no_search(text_ckpt, data_dir, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert_user_error(run_cli(*_search_args(text_ckpt, tmp_path / "full", data_dir), expect=2), "not empty")
    args = _search_args(text_ckpt, tmp_path / "full", data_dir)
    args[args.index("-o")] = "--resume"
    assert_user_error(run_cli(*args, expect=2), "no search to resume")
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"


def test_search_output_inside_the_checkpoint_is_refused(text_ckpt, data_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(text_ckpt, ckpt)
    before = tree_digest(ckpt)
    assert_user_error(run_cli(*_search_args(ckpt, ckpt / "out", data_dir), expect=2), "inside")
    assert tree_digest(ckpt) == before


def test_search_without_data_is_refused(text_ckpt, tmp_path):
    result = run_cli("search", text_ckpt, "-o", tmp_path / "x", expect=2)
    assert "--data" in result.output and "Traceback" not in result.output


# ---- decoders: the same search, by decode tokens/s and the perplexity gate --------------------------------


def test_search_on_a_decoder_by_tokens_per_second(tmp_path):
    from tiny_decoders import build, write_eval_text

    ckpt = build("llama", tmp_path / "llama")
    data = write_eval_text(tmp_path / "valid.txt")
    out = tmp_path / "lm-search"
    run_cli("search", ckpt, "-o", out, "--data", data, "--max-length", "24", "--new-tokens", "6", "--threads", "1",
            "--strategy", "grid", "--space", "quantize.bits=4,8", "--space", "quantize.block_size=32",
            "--space", "quantize.lm_head=8", "--space", "quantize.embeddings=4", "--confirm-top", "2")
    report = read_json(out / "search.json")
    assert report["objective"] == "tokens-per-s" and report["passed"]
    trials = _trials(out)
    assert sorted(t["recipe"]["quantize"]["bits"] for t in trials) == [4, 8]
    for t in trials:
        assert t["verify"]["checks"][0]["name"] == "perplexity_increase"
        assert t["metrics"]["tokens_per_s"] > 0 and t["metrics"]["tpot_ratio"] > 0
        assert t["metrics"]["ttft_ratio"] > 0  # what --objective latency ranks decoders by
    assert read_json(out / "best" / "report.json")["passed"]


def test_a_trial_removes_a_layer_and_quantizes_static_in_the_cpu_form(text_ckpt, data_dir, tmp_path):
    out = tmp_path / "deep"
    result = run_cli(*_search_args(text_ckpt, out, data_dir, "--strategy", "grid", "--space", "prune.sparsity=0",
                                   "--space", "prune.layers=1", "--space", "prune.recover_steps=0",
                                   "--space", "quantize.mode=static", "--space", "quantize.calibration_method=minmax",
                                   "--space", "quantize.per_channel=true", "--space", "quantize.optimize=true",
                                   "--max-float-nodes", "0", *UNTIMED), expect=None)
    (trial,) = _trials(out)
    assert trial["state"] in ("passed", "failed"), trial.get("error")
    assert result.exit_code == (0 if trial["state"] == "passed" else 1), result.output
    recipe = trial["recipe"]
    assert recipe["prune"]["layers"] == 1 and recipe["prune"]["sparsity"] is None
    assert recipe["quantize"]["mode"] == "static" and recipe["quantize"]["format"] == "qoperator"
    pruned = json.loads((Path(trial["artifacts"]["pruned"]) / "config.json").read_text())
    assert pruned["num_hidden_layers"] == 1  # one of the two layers is gone
    import onnx

    ops = {n.op_type for n in onnx.load(str(Path(trial["artifacts"]["model"]) / "model.onnx")).graph.node}
    assert "QLinearMatMul" in ops and "QuantizeLinear" in ops


# ---- the pieces, as plain functions ------------------------------------------------------------------------


def test_durations_parse_and_bad_ones_are_named():
    from edgekit.search.config import parse_duration

    assert [parse_duration(x) for x in ("30m", "1h30m", "90s", "900", "0.5h")] == [1800, 5400, 90, 900, 1800]
    for bad in ("soon", "", "0", "30x", "m30"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_space_overrides_join_comma_split_values_and_keep_the_dimensions_types():
    from edgekit.search.space import NONE, build_space, parse_overrides

    over = parse_overrides(["prune.sparsity=0", "0.4", "quantize.lm_head=8", "quantize.per_channel=true"])
    assert over == {"prune.sparsity": (NONE, 0.4), "quantize.lm_head": (8,), "quantize.per_channel": (True,)}
    space = build_space(True, False, {"quantize.lm_head": (8, "float")})
    head = next(d for d in space.dimensions if d.key == "quantize.lm_head")
    assert head.choices == ("8", "float")  # the recipe's strings, not YAML's integer


def test_the_gate_is_the_constraint_and_the_first_check_the_accuracy_objective():
    from edgekit.search.driver import objectives

    checks = [{"name": "accuracy_drop_points", "value": 0.4, "threshold": 1.0, "comparison": "<="},
              {"name": "top1_agreement", "value": 97.0, "threshold": 98.0, "comparison": ">="}]
    (latency, loss), violation = objectives({"metrics": {"latency_ratio": 0.5}, "verify": {"checks": checks}},
                                            "latency")
    assert (latency, loss, violation) == (0.5, 0.4, 1.0)  # agreement 1 point short: infeasible
    checks[1]["value"] = 98.0  # exactly the threshold passes, as in verify
    assert objectives({"metrics": {"size_bytes": 2**20}, "verify": {"checks": checks}}, "size") == ([1.0, 0.4], 0.0)


def test_the_pareto_front_keeps_the_passing_trials_nobody_beats():
    from edgekit.search.report import pareto_numbers

    trials = [{"number": 1, "state": "passed", "objectives": [0.5, 0.2]},
              {"number": 2, "state": "passed", "objectives": [0.4, 0.3]},
              {"number": 3, "state": "passed", "objectives": [0.6, 0.3]},  # beaten by 1 on both
              {"number": 4, "state": "failed", "objectives": [0.1, 5.0]},  # misses the gate
              {"number": 5, "state": "passed", "objectives": [0.4, 0.3]}]  # a tie with 2: neither beats the other
    assert pareto_numbers(trials) == [2, 5, 1]


def test_sparsity_is_a_number_to_the_sampler_and_the_starts_are_in_the_space():
    import optuna

    from edgekit.search.driver import optuna_params, start_points, suggest
    from edgekit.search.space import NONE, build_space

    space = build_space(False, True, {}, max_layers=6)
    starts = start_points(space)
    assert starts[0]["prune.sparsity"] == NONE and starts[0]["quantize.mode"] == "dynamic"
    assert {"prune.sparsity": 0.5} .items() <= starts[2].items()
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    study.enqueue_trial(optuna_params(space, starts[2]))
    first = suggest(study.ask(), space, grid=False)
    assert first["prune.sparsity"] == 0.5
    seen = {suggest(study.ask(), space, grid=False).get("prune.sparsity") for _ in range(40)}
    assert NONE in seen and all(s == NONE or 0.0 < s <= 0.6 for s in seen) and len(seen) > 6
    dist = study.trials[0].distributions["prune.sparsity"]
    assert isinstance(dist, optuna.distributions.FloatDistribution) and dist.step == 0.05
