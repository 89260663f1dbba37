import json
import multiprocessing as mp
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

from edgekit.progress import Progress


def test_bench_two_variants_interleaved(text_ckpt, tmp_path, data_dir):
    run_cli("export", text_ckpt, "-o", tmp_path / "onnx")
    r = run_cli("bench", text_ckpt, tmp_path / "onnx", "--iterations", "30", "--min-seconds", "0.2", "--warmup", "2",
                "--data", data_dir / "eval.tsv", "--samples", "40", "--threads", "1", "--json")
    rep = json.loads(r.stdout)
    torch_v, ort_v = rep["variants"]
    assert torch_v["runtime"] == "torch-fp32" and ort_v["runtime"] == "onnxruntime"
    for v in rep["variants"]:
        lat = v["latency"]
        assert lat["iterations"] >= 30 and lat["seconds"] >= 0.2
        assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert len(v["samples_ms"]) == lat["iterations"]
        assert v["first_call_ms"] > 0 and v["throughput_samples_s"] > 0
        assert v["rss_peak_bytes"] >= v["rss_baseline_bytes"] > 0
        # load (+ first call) and the steady state apart: the model lives in the load peak, not the run's increase
        assert v["rss_peak_bytes"] >= v["rss_load_peak_bytes"] > v["rss_baseline_bytes"]
        assert 0 <= v["rss_run_peak_bytes"] < v["rss_load_peak_bytes"] - v["rss_baseline_bytes"]
        assert lat["rsd_percent"] == pytest.approx(100 * lat["std_ms"] / lat["mean_ms"])
        # real lengths: more than one shape, each warmed up before timing, then the 2 configured runs
        assert v["warmup_runs"] == rep["inputs"]["distinct_shapes"] + 2 and rep["inputs"]["distinct_shapes"] > 1
    # each variant in its own process: the ONNX one never imported torch, so its peak is far below torch's
    assert ort_v["rss_peak_bytes"] < torch_v["rss_peak_bytes"] / 2
    env = rep["environment"]
    assert env["threads"] == 1 and env["logical_cores"] >= 1 and env["libraries"]["onnxruntime"]
    # the method states what was configured, not a fixed sentence
    assert "rounds of 10 iterations" in rep["method"] and "then 2 iterations" in rep["method"]
    assert "at least 30 iterations and 0.2 s per variant" in rep["method"]
    assert "40 real examples" in rep["inputs"]["description"]


def test_interleaved_rounds_rotate_which_variant_runs_first():
    from edgekit.benchmarks.bench import _round_order

    for n in (1, 2, 3):
        rounds = [_round_order(n, r) for r in range(n)]
        assert all(sorted(order) == list(range(n)) for order in rounds)  # every variant in every round
        assert sorted(order[0] for order in rounds) == list(range(n))  # each leads once in n rounds


def test_bench_table_and_ratios(text_ckpt, tmp_path):
    from edgekit.reports import fmt_ratio

    run_cli("export", text_ckpt, "-o", tmp_path / "onnx")
    r = run_cli("bench", text_ckpt, tmp_path / "onnx", "--iterations", "10", "--min-seconds", "0",
                "--seq-len", "16", "--batch-size", "2", "--json", tmp_path / "b.json")
    first, second = json.loads((tmp_path / "b.json").read_text())["variants"]
    assert "p50 vs first" in r.output
    # the second row's ratios are its own figures against the first row's (torch vs onnxruntime differ)
    row = next(line for line in r.output.splitlines() if second["name"] in line)
    p50 = fmt_ratio(second["latency"]["p50_ms"], first["latency"]["p50_ms"])
    assert p50 != "1.00x" and p50 in row
    assert "synthetic token ids, batch 2 x sequence 16" in r.output


def test_latency_stats():
    from edgekit.benchmarks.bench import LatencyStats

    s = LatencyStats.from_ns([1_000_000 * i for i in range(1, 101)])
    assert s.p50_ms == 50.5 and s.min_ms == 1 and s.max_ms == 100 and s.iterations == 100


def test_latency_stats_carry_their_spread():
    from edgekit.benchmarks.bench import LatencyStats

    ns = [1_000_000, 2_000_000, 3_000_000, 6_000_000]
    s = LatencyStats.from_ns(ns)
    ms = np.asarray(ns) / 1e6
    assert s.rsd_percent == pytest.approx(100 * ms.std() / ms.mean()) and s.std_ms == pytest.approx(ms.std())
    assert LatencyStats.from_ns([5_000_000] * 10).rsd_percent == 0.0


# ---- the worker, driven over a real pipe in a thread (same process), with stand-in sessions ----------------


def _serve(monkeypatch, session):
    import edgekit.runtimes.base as base
    from edgekit.benchmarks import worker

    monkeypatch.setattr(base, "load", lambda *a, **k: session() if callable(session) else session)
    parent, child = mp.Pipe()
    t = threading.Thread(target=worker.serve, args=(child, "unused", None, 1, None, "cpu"), daemon=True)
    t.start()
    assert parent.recv()[0] == "ready"

    def call(*msg):
        parent.send(msg)
        reply = parent.recv()
        assert reply[0] != "error", reply
        return reply

    return call, t


def _stand_in(base_cls, **methods):
    """A Session subclass named like a runtime, on a 'path' that is never opened."""
    cls = type("StandIn", (base_cls,), methods)
    return cls("stand-in", Path("unused"), "text-classification", ["input_ids"], "logits")


def test_timed_region_is_only_the_backend_call(monkeypatch):
    from edgekit.runtimes.base import Session

    sleep = 0.05
    calls = {"prepare": 0, "backend": []}

    def prepare(self, inputs):
        calls["prepare"] += 1
        time.sleep(sleep)  # stands for dtype conversion, copies, tensor creation: must stay off the clock
        return {"prepared": Session.prepare(self, inputs)}

    def _run(self, inputs):
        calls["backend"].append(inputs)
        return np.zeros((1, 2), np.float32)

    session = _stand_in(Session, prepare=prepare, _run=_run)
    call, t = _serve(monkeypatch, session)
    batches = [{"input_ids": np.ones((1, n), np.int64), "token_type_ids": np.zeros((1, n), np.int64)} for n in (4, 6)]
    call("inputs", batches)
    assert calls["prepare"] == 2  # once per batch, when the inputs arrive
    first = call("warm", [0, 1])[1]
    times = call("run", 0, 6)[1]
    call("stop")
    t.join(timeout=5)
    assert len(times) == 6 and max(first + times) < sleep * 1e9 / 2
    assert calls["prepare"] == 2  # never again inside the loop
    # the backend saw prepared inputs: the model's own names only, as prepare left them
    assert all(set(b) == {"prepared"} and set(b["prepared"]) == {"input_ids"} for b in calls["backend"])
    # verify's path is unchanged: run = prepare + run_prepared
    assert session.run(batches[0]).shape == (1, 2) and calls["prepare"] == 3


def test_session_prepare_converts_before_the_call():
    from edgekit.runtimes.base import Session

    seen = []
    session = _stand_in(Session, _run=lambda self, inputs: seen.append(inputs))
    session.info["dtypes"] = {"input_ids": np.dtype(np.int32)}
    strided = np.arange(20, dtype=np.int64).reshape(2, 10)[:, ::2]
    prepared = session.prepare({"input_ids": strided, "unused": strided})
    assert list(prepared) == ["input_ids"] and prepared["input_ids"].dtype == np.int32
    assert prepared["input_ids"].flags.c_contiguous and (prepared["input_ids"] == strided).all()


def test_torch_session_prepares_tensors():
    import torch

    from edgekit.runtimes.torch_runtime import TorchSession

    session = _stand_in(TorchSession)
    prepared = session.prepare({"input_ids": np.ones((1, 3), np.int64), "labels": np.ones(1, np.int64)})
    assert list(prepared) == ["input_ids"] and isinstance(prepared["input_ids"], torch.Tensor)


def test_warmup_plan_covers_every_shape():
    from edgekit.benchmarks.bench import _warmup_plan

    lengths = [5, 7, 5, 9, 7, 5]
    batches = [{"input_ids": np.ones((1, n)), "attention_mask": np.ones((1, n))} for n in lengths]
    plan = _warmup_plan(batches, 3)
    assert len(plan) == 3 + 3 and {lengths[i % len(lengths)] for i in plan[:3]} == {5, 7, 9}
    assert _warmup_plan(batches[:1] * 4, 0) == [0]  # one synthetic shape: one run, then --warmup 0


def test_worker_counts_timed_runs_on_unwarmed_shapes(monkeypatch):
    from edgekit.benchmarks.bench import _warmup_plan
    from edgekit.runtimes.base import Session

    batches = [{"input_ids": np.ones((1, n), np.int64)} for n in (3, 4, 3, 5)]
    for plan, cold in ((_warmup_plan(batches, 1), 0), ([0], 8 - 4)):  # [0] warms only length 3: 4 of 8 runs cold
        call, t = _serve(monkeypatch, lambda: _stand_in(Session, _run=lambda self, inputs: None))
        call("inputs", batches)
        call("warm", plan)
        call("run", 0, 8)
        end = call("stop")[1]
        t.join(timeout=5)
        assert end["cold_runs"] == cold


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's clear_refs to reset VmHWM")
def test_worker_splits_load_and_run_peaks(monkeypatch):
    from edgekit.runtimes.base import Session

    mib = 2**20

    def touched(n):  # pages really resident, as a model's weights or activations are
        return np.ones(n // 8, dtype=np.float64)

    def make():
        weights = touched(160 * mib)  # a load-time peak, freed before the timed loop
        del weights
        return _stand_in(Session, _run=lambda self, inputs: touched(40 * mib).sum())  # per-call activations

    call, t = _serve(monkeypatch, make)
    call("inputs", [{"input_ids": np.ones((1, 4), np.int64)}])
    call("warm", [0])
    call("run", 0, 3)
    end = call("stop")[1]
    t.join(timeout=5)
    assert end["rss_run_method"] == "VmHWM reset before the timed loop"
    assert end["rss_peak"] >= end["rss_load_peak"] >= 150 * mib  # the load peak kept its 160 MiB
    assert 30 * mib <= end["rss_run_peak"] < 100 * mib  # the steady state: the activations, not the load


def test_round_order_rotates():
    from edgekit.benchmarks.bench import _round_order

    rounds = [_round_order(3, r) for r in range(6)]
    assert [r[0] for r in rounds] == [0, 1, 2, 0, 1, 2]
    assert all(sorted(r) == [0, 1, 2] for r in rounds)
    for position in range(3):  # over n rounds every variant takes every place once
        assert sorted(r[position] for r in rounds[:3]) == [0, 1, 2]
    assert _round_order(1, 7) == [0]


def test_progress_fraction_follows_the_stop_rule():
    from edgekit.benchmarks.bench import _rule_fraction

    assert _rule_fraction(100, 1.0, 100, 3.0) == pytest.approx(1 / 3)  # iterations met, seconds not: not done
    assert _rule_fraction(50, 9.0, 100, 3.0) == pytest.approx(0.5)  # seconds met, iterations not
    assert _rule_fraction(99, 2.99, 100, 3.0) < 1.0
    assert _rule_fraction(100, 3.0, 100, 3.0) == 1.0 and _rule_fraction(500, 30.0, 100, 3.0) == 1.0
    assert _rule_fraction(10, 0.0, 10, 0.0) == 1.0 and _rule_fraction(0, 0.0, 10, 0.0) == 0.0  # --min-seconds 0


class _RecordingProgress(Progress):
    """A Progress that keeps every step, update and advance (what the CLI's rich bar would draw)."""

    def __init__(self):
        self.events = []

    def step(self, description, total=None):
        import contextlib

        events = self.events

        class _Step:
            def advance(self, n=1):
                events.append(("advance", description, n))

            def update(self, completed=None, description=None):
                events.append(("update", completed, description))

        @contextlib.contextmanager
        def cm():
            events.append(("step", description, total))
            yield _Step()

        return cm()


def test_bench_progress_rotation_and_warmup_through_the_api(text_onnx, data_dir):
    from edgekit import api
    from edgekit.benchmarks.bench import PROGRESS_UNITS

    progress = _RecordingProgress()
    rep = api.bench([text_onnx, text_onnx], api.BenchConfig(iterations=20, min_seconds=0.3, warmup=1, round_size=5,
                                                            data=str(data_dir / "eval.tsv"), samples=12, threads=1),
                    progress)
    steps = [e for e in progress.events if e[0] == "step"]
    timing = next(s for s in steps if s[1].startswith("Timing"))
    assert timing[2] == PROGRESS_UNITS
    after = progress.events[progress.events.index(timing) + 1:]
    completed = [e[1] for e in after if e[0] == "update" and e[1] is not None]
    assert completed == sorted(completed) and completed[-1] == PROGRESS_UNITS
    assert all(c < PROGRESS_UNITS for c in completed[:-1])  # full only once both halves of the rule are met
    lat = rep.variants[0].latency
    assert lat.iterations >= 20 and lat.seconds >= 0.3
    # the description names the variant being timed, and the first of each round rotates
    names = [e[2].split(": ", 1)[1] for e in after if e[0] == "update" and e[2] and ": " in e[2]]
    a, b = (v.name for v in rep.variants)
    assert names[:6] == [a, b, b, a, a, b]
    warm = next(s for s in steps if s[1].startswith("Warming up"))
    assert warm[2] == 2 * rep.variants[0].warmup_runs == 2 * (rep.inputs["distinct_shapes"] + 1)
    assert all(v.rss_run_peak_bytes is not None and v.rss_load_peak_bytes for v in rep.variants)
