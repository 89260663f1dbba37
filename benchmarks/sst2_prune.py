"""Prune benchmark: all-MiniLM-L6-v2 fine-tuned on SST-2, pruned at several sparsities, then INT8; batch 1.

For each ``--sparsity`` (default 0.3 0.4 0.5): ``edgekit prune`` (Fisher importance from 256 labeled training
sentences, mask search, least-squares re-fit; timed) -> export -> dynamic INT8. Accuracy on the whole SST-2
dev set through ``edgekit verify`` against the ORIGINAL FP32 checkpoint, at batch 1 (as the latency is
measured) and at verify's default batch of 32. Latency is ``edgekit bench`` itself (``edgekit.api.bench``):
one process per variant, same threads, interleaved in rotating rounds, every dev sentence at its real length,
at least ``--passes`` passes over the 872 dev sentences AND ``--min-seconds``, for the peer (Optimum's
ORTQuantizer dynamic INT8, the preset for this CPU, on the unpruned export, an ONNX folder like the others),
edgekit INT8 unpruned, and every pruned+INT8 variant.

    python benchmarks/sst2_prune.py [--threads 2] [--passes 3] [--min-seconds 10] [--sparsity 0.3 0.4 0.5]
Writes benchmarks/results/sst2_prune.json and sst2_prune.png (accuracy vs p50 latency), prints a Markdown table.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from sst2_int8 import (arg_parser, bench_variants, latency_summary, optimum_peer, optimum_preset,  # noqa: E402
                       verify_accuracy)
from sst2_model import SST2, ensure_model, read_sst2  # noqa: E402


def calibration_file(out: Path, n: int, seed: int = 0) -> Path:
    """``n`` random labeled sentences of the TRAINING split (never dev, which is the evaluation set)."""
    with open(SST2 / "train.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = random.Random(seed).sample(rows, n)
    # written as read: GLUE TSV has no quoting and no tabs inside a sentence
    with open(out, "w", encoding="utf-8", newline="") as f:
        f.write("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    fp32 = result["fp32_accuracy"]
    for name, v in result["variants"].items():
        marker = "s" if "peer" in name else ("o" if "pruned" in name else "D")
        ax.scatter(v["p50_ms"], v["accuracy"], marker=marker, s=50)
        ax.annotate(name, (v["p50_ms"], v["accuracy"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.margins(x=0.25, y=0.15)  # room for the labels
    ax.axhline(fp32, color="grey", lw=0.8, ls="--")
    ax.axhline(fp32 - 1.0, color="red", lw=0.8, ls=":")
    ax.text(ax.get_xlim()[0], fp32, " FP32", va="bottom", fontsize=8, color="grey")
    ax.text(ax.get_xlim()[0], fp32 - 1.0, " FP32 - 1 pt", va="bottom", fontsize=8, color="red")
    env = result["environment"]
    ax.set_xlabel(f"p50 latency, ms (batch 1, real lengths, {result['threads']} threads)")
    ax.set_ylabel("SST-2 dev accuracy, %")
    ax.set_title(f"MiniLM-L6 SST-2: pruned + INT8 vs Optimum INT8\n{env['cpu_model']}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> None:
    ap = arg_parser(__doc__, "bench-sst2-prune")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    ap.add_argument("--calibration-samples", type=int, default=256)
    ap.add_argument("--plot-only", action="store_true", help="Redraw the PNG from the last results JSON.")
    args = ap.parse_args(argv)
    if args.plot_only:
        out = HERE / "results" / "sst2_prune.json"
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return

    import torch

    torch.set_num_threads(args.threads)
    from edgekit.api import PruneConfig, export, prune, quantize

    ckpt = ensure_model()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    dev = str(SST2 / "dev.tsv")
    calib = calibration_file(work / "calibration.tsv", args.calibration_samples)

    export(ckpt, work / "onnx", overwrite=True)
    quantize(work / "onnx", work / "int8", overwrite=True)
    paths = {"Optimum INT8 (peer)": optimum_peer(work / "onnx", work / "optimum-int8"), "edgekit INT8": work / "int8"}
    prune_info = {}
    for s in args.sparsity:
        name = f"edgekit pruned {s:.0%} + INT8"
        d = work / f"pruned-{s}"
        t = time.perf_counter()
        rep = prune(ckpt, d / "checkpoint", PruneConfig(sparsity=s, calibration_samples=args.calibration_samples),
                    calibration_data=calib, overwrite=True)
        seconds = time.perf_counter() - t
        export(d / "checkpoint", d / "onnx", overwrite=True)
        quantize(d / "onnx", d / "int8", overwrite=True)
        paths[name] = d / "int8"
        prune_info[name] = {"sparsity": s, "prune_seconds": seconds, "flops_reduction": rep.flops_reduction,
                            "params_before": rep.params_before, "params_after": rep.params_after,
                            "heads_kept": [lr.heads_kept for lr in rep.layers],
                            "neurons_kept": [lr.neurons_kept for lr in rep.layers]}
        print(f"pruned {s:.0%}: {seconds:.1f} s, FLOPs -{rep.flops_reduction:.1%}, heads "
              f"{[lr.heads_kept for lr in rep.layers]}, neurons {[lr.neurons_kept for lr in rep.layers]}", file=sys.stderr)

    acc = verify_accuracy(ckpt, paths, dev, args.threads)  # against the ORIGINAL, at batch 1 and 32
    fp32, fp32_batched = acc["FP32"][1], acc["FP32"][32]
    report, timed = bench_variants(paths, dev, args.threads, args.passes, args.min_seconds)

    peer_p50 = timed["Optimum INT8 (peer)"].latency.p50_ms
    result = {"environment": report.environment, "optimum_preset": optimum_preset(), "threads": args.threads,
              "passes": args.passes, "min_seconds": args.min_seconds,
              "examples": len(read_sst2("dev")[0]), "fp32_accuracy": fp32, "fp32_accuracy_verify_batch32": fp32_batched,
              "calibration_samples": args.calibration_samples,
              "bench": {"inputs": report.inputs, "method": report.method, "config": report.config},
              "variants": {}}
    rows = []
    for name in paths:
        info = prune_info.get(name, {})
        b1, b32 = acc[name][1], acc[name][32]
        v = result["variants"][name] = {"accuracy": b1, "drop_vs_fp32": fp32 - b1, "accuracy_verify_batch32": b32,
                                        **latency_summary(timed[name], args.passes, peer_p50), **info}
        prune_s = f"{info['prune_seconds']:.0f} s" if info else "-"
        flops = f"-{info['flops_reduction']:.0%}" if info else "-"
        rows.append(f"| {name} | {flops} | {b1:.2f} | {b1 - fp32:+.2f} | {b32:.2f} | {v['p50_ms']:.3f} | "
                    f"{v['p90_ms']:.3f} | {v['rsd_percent']:.0f} | {v['p50_vs_peer']:.2f}x | "
                    f"{v['size_bytes'] / 2**20:.1f} MiB | {prune_s} |")
    ok = {n: v for n, v in result["variants"].items() if "pruned" in n}
    result["targets"] = {n: {"p50_vs_peer<=0.5": v["p50_vs_peer"] <= 0.5, "drop<=1.0": v["drop_vs_fp32"] <= 1.0,
                             "prune<=120s": v["prune_seconds"] <= 120} for n, v in ok.items()}
    out = HERE / "results" / "sst2_prune.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    plot(result, out.with_suffix(".png"))
    env = result["environment"]
    print(f"SST-2 dev: {report.inputs['description']}; {args.threads} threads; edgekit bench: {report.method}; "
          f"{env['cpu_model']} ({', '.join(env['isa_flags'])}); FP32 (torch) accuracy {fp32:.2f} at batch 1, "
          f"{fp32_batched:.2f} in batches of 32\n")
    print("| variant | encoder FLOPs | accuracy % (verify, batch 1) | vs FP32 | accuracy % (verify, batch 32) | p50 ms "
          "| p90 ms | rsd % | p50 vs peer | ONNX size | prune time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for n, t in result["targets"].items():
        print(f"{n}: p50 <= 0.5x peer {'met' if t['p50_vs_peer<=0.5'] else 'NOT met'}; drop <= 1.0 pt "
              f"{'met' if t['drop<=1.0'] else 'NOT met'}; prune <= 2 min {'met' if t['prune<=120s'] else 'NOT met'}")
    print(f"\nplot: {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
