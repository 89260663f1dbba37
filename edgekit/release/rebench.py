"""The gate's latency verdict, measured on one runner: the baseline's shipped model and the current one, timed
interleaved here, now, with the same libraries, threads and inputs.

A p50 recorded by another run says little about the change under test: the same recipe run three times on one
machine gave +35.5%, +19.9% and +19.3% across runs, while a ratio measured within one run was stable (0.695 vs
0.698). So the gate times both models itself with ``edgekit bench`` (one worker process per model, rotating
rounds, ORT spinning off; in two halves of fresh processes, the order swapped: ``halves``), splits the samples
by round, and judges the p50 ratio current/baseline against the noise measured across rounds: the half-width of
a distribution-free confidence interval (at least 90%, from binomial order statistics) of the median per-round
ratio, so one disturbed round (another job taking a core for a moment) widens nothing, where the half range of
the rounds would. A slow-down inside that noise (or
``--latency-noise-floor``) never fails, one above ``--latency-warn`` warns, one above ``--max-latency-regression`` fails, as
github-action-benchmark's alert and fail thresholds. When the noise itself is as large as the fail threshold,
no verdict is given (a skipped check) rather than a pass that could not have seen the regression.

The models are found on disk: a compress run folder (``int8/``, ``onnx/``), a release bundle folder, or a
release tarball (extracted into scratch space after its hashes were checked, and re-checked there).
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from edgekit.metrics import meets
from edgekit.release.bundle import checked_bundle

ROUND_SECONDS = 0.5  # timed time per model per round (the unit the noise is measured in)
TURN_SECONDS = 0.025  # time per model per turn: the two models alternate this often, so drift in the machine's
# speed (a neighbour's job, frequency changes: seconds long on shared runners) hits both alike; with turns of a
# whole round, per-round ratios varied by ±15% on an idle 2-core VM, where the models' p50s differed by 2%
TURN_LIMITS = (2, 50)  # iterations per turn
DEFAULT_P50_MS = 5.0  # when no earlier p50 tells how long one run takes
CONFIDENCE = 0.9  # of the interval of the per-round ratios' median that measures the noise
COMPRESS_FOLDERS = {"int8": "int8", "fp32": "onnx"}  # bundle variant -> folder in a compress run


def shipped_models(kind: str, data: dict, path: Path) -> dict:
    """variant (int8, fp32) -> its model folder (a tarball: the model file's path inside it); {} for a lone
    report.json or manifest.json whose models are not beside it."""
    if path.name.endswith((".tar.gz", ".tgz")):
        return {var: m["path"] for var, m in (data.get("models") or {}).items()
                if isinstance(m, dict) and isinstance(m.get("path"), str)}
    if kind == "compress":
        return {var: path.parent / folder for var, folder in COMPRESS_FOLDERS.items()
                if (path.parent / folder / "model.onnx").is_file()}
    # a bundle folder's files were re-hashed against the manifest by bundle.read_run_json before this
    return {var: (path.parent / m["path"]).parent for var, m in (data.get("models") or {}).items()
            if isinstance(m, dict) and isinstance(m.get("path"), str) and (path.parent / m["path"]).is_file()}


def _folders(fig, variants: list[str], stack: ExitStack) -> list[Path]:
    if fig.tarball:
        root, _ = checked_bundle(Path(fig.tarball), stack, "to time its model",
                                 "download the release again, or pass --no-rebench")
        return [(root / fig.models[v]).parent for v in variants]
    return [Path(fig.models[v]) for v in variants]


def _bench_settings(cur) -> dict:
    """Threads and inputs of the current run's own benchmark where it recorded them (the same inputs for both
    models in any case: bench feeds every variant the same batches)."""
    b = cur.bench[0] if cur.bench else {}
    inputs, env = b.get("inputs") or {}, b.get("environment") or {}
    out = {"threads": env.get("threads"), "batch_size": inputs.get("batch_size") or 1}
    data = inputs.get("data")
    if isinstance(data, str) and Path(data).is_file():
        out["data"] = data
        out["text_column"] = (b.get("config") or {}).get("text_column")
    elif inputs.get("seq_len"):
        out["seq_len"] = inputs["seq_len"]
    return out


def _turn_and_round(cur) -> tuple[int, int]:
    """(iterations per turn, iterations per round, a whole number of turns), sized from an earlier p50 of the
    shipped model (only to size them)."""
    p50 = DEFAULT_P50_MS
    for b in cur.bench or []:
        for v in b.get("variants") or []:
            if "INT8" in v.get("name", "") and (v.get("latency") or {}).get("p50_ms"):
                p50 = v["latency"]["p50_ms"]
    lo, hi = TURN_LIMITS
    turn = int(min(hi, max(lo, math.ceil(TURN_SECONDS * 1000 / p50))))
    return turn, turn * max(1, round(ROUND_SECONDS * 1000 / (turn * p50)))


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(low, high, coverage): the narrowest order-statistic interval [x(k), x(n+1-k)] that covers the median of
    the distribution the values come from with at least ``confidence`` (or the full range when n is too small).
    Distribution-free (the count of values below the median is Binomial(n, 1/2)), written out because it is
    three lines; scipy has no such function for the median."""
    from math import comb

    x, n = sorted(values), len(values)
    k, coverage = 1, 1 - 2 * 0.5 ** n
    while k + 1 <= n // 2:  # widen k while the coverage of [x(k+1), x(n-k)] stays >= confidence
        below = sum(comb(n, i) for i in range(k + 1)) / 2 ** n  # P(B <= k)
        if 1 - 2 * below < confidence:
            break
        k, coverage = k + 1, 1 - 2 * below
    return x[k - 1], x[n - k], coverage


def halves(rounds: int) -> list[tuple[int, bool]]:
    """The rebench in two halves, each in fresh worker processes, the second with the order swapped: (rounds,
    current first?). A worker process can run a model a few percent slower for its whole life (where its buffers
    happen to land: two copies of one model differed by up to 8% on the 2-core VM), which no number of rounds
    inside that process averages out; one such pair of processes once failed the gate of a model against its
    own copy. Across two pairs the bias shows as spread between the halves' rounds, which the verdict's noise
    band measures, instead of as a slow-down."""
    first = (rounds + 1) // 2
    return [(first, False)] + ([(rounds - first, True)] if rounds > first else [])


HALVES_METHOD = "in two halves of fresh worker processes, the second in the swapped order"


def _ordered(pairs: list, swapped: bool) -> list:
    return [m for b, c in pairs for m in ((c, b) if swapped else (b, c))]


def _in_halves(cur, base, variants: list[str], rounds: int, run) -> list:
    """``run(models, rounds)`` once per half (fresh workers each time): [(report, swapped)]."""
    with ExitStack() as stack:
        pairs = list(zip(_folders(base, variants, stack), _folders(cur, variants, stack)))
        return [(run(_ordered(pairs, swapped), n), swapped) for n, swapped in halves(rounds)]


def _sides(runs: list, i: int):
    """(baseline, current) results of variant ``i`` in each half."""
    for report, swapped in runs:
        yield report.variants[2 * i + swapped], report.variants[2 * i + 1 - swapped]


def _rebench_decoders(cur, base, variants: list[str], rounds: int, progress=None) -> dict:
    """Decoders: both models generate interleaved one generation at a time (``rounds`` generations each, in two
    halves of fresh processes); the ratio is of the time per output token (decode): per generation, and of the
    median over every generation's median step."""
    from edgekit.benchmarks.bench import BenchConfig
    from edgekit.benchmarks.decode import bench_decoders

    inputs = ((cur.bench[0] if cur.bench else {}).get("inputs") or {})
    env = ((cur.bench[0] if cur.bench else {}).get("environment") or {})

    def run(models, n):
        return bench_decoders(models, BenchConfig(generations=n, threads=env.get("threads"), task=cur.task,
                                                  prompt_len=inputs.get("prompt_tokens"),
                                                  new_tokens=inputs.get("new_tokens") or 32), progress)

    runs = _in_halves(cur, base, variants, rounds, run)
    out = []
    for i, var in enumerate(variants):
        base_tpot, cur_tpot, per_round = [], [], []
        for b, c in _sides(runs, i):
            base_tpot += b["tpot_per_generation_ms"]
            cur_tpot += c["tpot_per_generation_ms"]
            per_round += [x / y for x, y in zip(c["tpot_per_generation_ms"], b["tpot_per_generation_ms"]) if x and y]
        b50, c50 = (float(np.median([t for t in ts if t])) for ts in (base_tpot, cur_tpot))
        lo, hi, coverage = median_interval(per_round)
        out.append({"variant": var, "baseline_p50_ms": b50, "current_p50_ms": c50, "ratio": c50 / b50,
                    "round_ratios": per_round, "spread": (hi - lo) / 2, "spread_coverage": coverage,
                    "measure": "time per output token"})
    report = runs[0][0]
    return {"rounds": rounds, "round_size": 1, "turn_size": 1, "variants": out, "inputs": report.inputs,
            "method": f"rebenched on this runner: the baseline's and the current model, {report.method}; "
                      f"{HALVES_METHOD}",
            "environment": report.environment}


def rebench(cur, base, variants: list[str], rounds: int, progress=None) -> dict:
    """Time ``variants`` of the baseline and the current run interleaved here; per variant the p50 of each side,
    their ratio and the ratio of every round (decoders: of the time per output token)."""
    from edgekit.benchmarks.bench import BenchConfig, LatencyStats, bench
    from edgekit.tasks import is_decoder

    if (cur.task or base.task) and is_decoder(cur.task or base.task):
        return _rebench_decoders(cur, base, variants, rounds, progress)

    turn, round_size = _turn_and_round(cur)
    settings = _bench_settings(cur)

    def run(models, n):
        return bench(models, BenchConfig(iterations=n * round_size, min_seconds=0, round_size=turn,
                                         warmup=max(10, round_size // 5), task=cur.task or base.task, **settings),
                     progress)

    runs = _in_halves(cur, base, variants, rounds, run)
    out = []
    for i, var in enumerate(variants):
        base_ms, cur_ms, per_round = [], [], []
        for b, c in _sides(runs, i):
            per_round += [float(np.median(c.samples_ms[k:k + round_size]) / np.median(b.samples_ms[k:k + round_size]))
                          for k in range(0, min(len(b.samples_ms), len(c.samples_ms)), round_size)]
            base_ms += b.samples_ms
            cur_ms += c.samples_ms
        b_lat, c_lat = (LatencyStats.from_ns([t * 1e6 for t in ms]) for ms in (base_ms, cur_ms))
        lo, hi, coverage = median_interval(per_round)
        out.append({"variant": var, "baseline_p50_ms": b_lat.p50_ms, "current_p50_ms": c_lat.p50_ms,
                    "ratio": c_lat.p50_ms / b_lat.p50_ms, "round_ratios": per_round,
                    "spread": (hi - lo) / 2, "spread_coverage": coverage, "baseline_rsd_percent": b_lat.rsd_percent,
                    "current_rsd_percent": c_lat.rsd_percent})
    report = runs[0][0]
    return {"rounds": rounds, "round_size": round_size, "turn_size": turn, "variants": out, "inputs": report.inputs,
            "method": f"rebenched on this runner: the baseline's and the current model, {report.method}; "
                      f"{HALVES_METHOD}",
            "environment": report.environment}


def judge(v: dict, fail_at: float, warn_at: float, floor: float) -> tuple[bool | None, str, str | None]:
    """(verdict: True pass, False fail, None no verdict; threshold text; a warning or the reason for no verdict)."""
    growth, band = v["ratio"] - 1, max(floor, v["spread"])
    threshold = f"<= +{100 * fail_at:g}% (warn +{100 * warn_at:g}%, noise ±{100 * band:.1f}%)"
    if not meets(growth, "<=", fail_at) and growth > band:
        return False, threshold, (f"the {v['variant']} model is {100 * growth:+.1f}% slower than the baseline's, "
                                  f"measured here interleaved (rounds: {_ratios(v)})")
    if meets(band, ">=", fail_at):
        return None, threshold, (f"p50 latency of {v['variant']} not judged: the spread across rebench rounds "
                                 f"(±{100 * band:.1f}%; rounds: {_ratios(v)}) is as large as the fail threshold "
                                 f"(+{100 * fail_at:g}%); rerun on a quieter runner or with more --rebench-rounds")
    if not meets(growth, "<=", warn_at) and growth > band:
        return True, threshold, (f"p50 latency of {v['variant']} is {100 * growth:+.1f}% against the baseline "
                                 f"(rebenched here), above the warn threshold +{100 * warn_at:g}%")
    return True, threshold, None


def _ratios(v: dict) -> str:
    return ", ".join(f"{r:.3f}" for r in v["round_ratios"])
