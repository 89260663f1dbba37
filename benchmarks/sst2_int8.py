"""Foundation benchmark: all-MiniLM-L6-v2 fine-tuned on SST-2, batch 1, real lengths, on this CPU.

Variants: torch FP32, ORT FP32 (edgekit export), edgekit INT8 (fusion + dynamic per-channel), and the peer:
Optimum's ORTQuantizer dynamic INT8 with the preset for this CPU (avx512_vnni, avx512 or avx2), quantizing the
same export into an ONNX folder of its own, which edgekit benchmarks like any other.

Latency is ``edgekit bench`` itself (``edgekit.api.bench``), so the figures are the ones a user gets: one
process per variant, same threads, interleaved in rounds whose order rotates, every dev sentence at its real
length (batch 1), warm-up on every length, at least ``--passes`` passes over the 872 dev sentences AND at
least ``--min-seconds``, only the runtime's call timed. Accuracy on the whole dev set comes from
``edgekit verify`` (``edgekit.api.verify``) twice: at batch 1, as the latency is measured (dynamic INT8
computes activation scales per call, so a padded batch and a single sentence can give different answers),
and at verify's default batch of 32.

    python benchmarks/sst2_int8.py [--threads 2] [--passes 3] [--min-seconds 10]
Writes benchmarks/results/sst2_int8.json and prints a Markdown table.
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
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from sst2_model import SST2, ensure_model, read_sst2  # noqa: E402


def optimum_preset() -> str:
    """The AutoQuantizationConfig preset an Optimum user picks for this CPU (its docs: match the ISA)."""
    from edgekit.benchmarks.environment import environment

    flags = set(environment(1)["isa_flags"])
    return "avx512_vnni" if "avx512_vnni" in flags else ("avx512" if "avx512f" in flags else "avx2")


def optimum_peer(onnx_dir: Path, out: Path) -> Path:
    from optimum.onnxruntime import AutoQuantizationConfig, ORTQuantizer

    shutil.rmtree(out, ignore_errors=True)  # always from this export: a stale peer would compare another model
    quantizer = ORTQuantizer.from_pretrained(onnx_dir, file_name="model.onnx")
    # file_suffix=None: model.onnx, so the peer's folder is an ONNX folder like any edgekit output
    quantizer.quantize(getattr(AutoQuantizationConfig, optimum_preset())(is_static=False), save_dir=out,
                       file_suffix=None)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (onnx_dir / f).is_file() and not (out / f).is_file():
            shutil.copy(onnx_dir / f, out / f)
    (out / "edgekit.json").write_text(json.dumps({"task": "text-classification", "stage": "optimum-peer"}))
    return out


def bench_variants(paths: dict, dev: str, threads: int, passes: int, min_seconds: float):
    """``edgekit bench`` on every variant: batch 1, every dev sentence at its real length.

    Returns the BenchReport and {display name: VariantResult} (bench keeps the order of its models).
    """
    from edgekit import api

    n = len(read_sst2("dev")[0])
    cfg = api.BenchConfig(data=dev, samples=n, batch_size=1, iterations=passes * n, min_seconds=min_seconds,
                          threads=threads, task="text-classification")
    report = api.bench(list(paths.values()), cfg)
    return report, dict(zip(paths, report.variants))


def verify_accuracy(ckpt: Path, paths: dict, dev: str, threads: int) -> dict:
    """{name: {1: accuracy at batch 1, 32: in batches of 32 (verify's default)}}, and "FP32" for the original
    checkpoint: each candidate verified against the ORIGINAL checkpoint by ``edgekit verify``."""
    from edgekit import api

    out: dict = {}
    for name, path in paths.items():
        out[name] = {}
        for bs in (1, 32):
            rep = api.verify(ckpt, path, api.VerifyConfig(data=dev, threads=threads, batch_size=bs))
            out[name][bs] = rep.candidate_metrics["accuracy"]
            out.setdefault("FP32", {})[bs] = rep.original_metrics["accuracy"]
    return out


def latency_summary(v, passes: int, peer_p50: float) -> dict:
    """One variant's figures from edgekit bench: percentiles with their spread, each pass's median (how steady
    the machine was), memory at load and in the steady state, the ratio to the peer, the model size."""
    lat = v.latency
    return {"p50_ms": lat.p50_ms, "p90_ms": lat.p90_ms, "p99_ms": lat.p99_ms, "mean_ms": lat.mean_ms,
            "std_ms": lat.std_ms, "rsd_percent": lat.rsd_percent, "iterations": lat.iterations,
            "timed_seconds": lat.seconds, "first_call_ms": v.first_call_ms,
            "p50_per_pass_ms": [float(np.median(x)) for x in np.array_split(np.asarray(v.samples_ms), passes)],
            "p50_vs_peer": lat.p50_ms / peer_p50, "size_bytes": v.size_bytes, "rss_peak_bytes": v.rss_peak_bytes,
            "rss_load_peak_bytes": v.rss_load_peak_bytes, "rss_run_peak_bytes": v.rss_run_peak_bytes,
            "runtime": v.runtime, "bench_name": v.name}


def arg_parser(doc: str, work_name: str) -> argparse.ArgumentParser:
    """The options both SST-2 scripts share: threads, and edgekit bench's stop rule."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--passes", type=int, default=3, help="At least this many passes over the dev sentences per "
                    "variant (edgekit bench --iterations = passes x sentences).")
    ap.add_argument("--min-seconds", type=float, default=10.0, help="And at least this many timed seconds per variant.")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit")) / work_name)
    return ap


def main(argv=None) -> None:
    args = arg_parser(__doc__, "bench-sst2").parse_args(argv)

    from edgekit.api import export, quantize

    ckpt = ensure_model()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    dev = str(SST2 / "dev.tsv")
    t0 = time.perf_counter()
    export(ckpt, work / "onnx", overwrite=True)
    quantize(work / "onnx", work / "int8", overwrite=True)
    edgekit_seconds = time.perf_counter() - t0
    peer = optimum_peer(work / "onnx", work / "optimum-int8")

    paths = {"torch FP32": ckpt, "ORT FP32": work / "onnx", "edgekit INT8": work / "int8", "Optimum INT8 (peer)": peer}
    acc = verify_accuracy(ckpt, paths, dev, args.threads)
    report, timed = bench_variants(paths, dev, args.threads, args.passes, args.min_seconds)

    peer_p50 = timed["Optimum INT8 (peer)"].latency.p50_ms
    rows, result = [], {"environment": report.environment, "optimum_preset": optimum_preset(),
                        "threads": args.threads, "passes": args.passes, "min_seconds": args.min_seconds,
                        "examples": len(read_sst2("dev")[0]),
                        "bench": {"inputs": report.inputs, "method": report.method, "config": report.config},
                        "variants": {}}
    for name in paths:
        b1, b32 = acc[name][1], acc[name][32]
        v = result["variants"][name] = {"accuracy": b1, "accuracy_verify_batch32": b32,
                                        **latency_summary(timed[name], args.passes, peer_p50)}
        rows.append(f"| {name} | {b1:.2f} | {b1 - acc['torch FP32'][1]:+.2f} | {b32:.2f} | {v['p50_ms']:.3f} | "
                    f"{v['p90_ms']:.3f} | {v['rsd_percent']:.0f} | {v['p50_vs_peer']:.2f}x | "
                    f"{v['size_bytes'] / 2**20:.1f} MiB |")
    ours = result["variants"]["edgekit INT8"]
    drop = acc["torch FP32"][1] - ours["accuracy"]
    result["targets"] = {"p50_vs_peer<=0.9": ours["p50_vs_peer"] <= 0.9, "accuracy_drop<=0.5": drop <= 0.5}
    result["edgekit_export_quantize_seconds"] = edgekit_seconds
    out = HERE / "results" / "sst2_int8.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    env = result["environment"]
    print(f"SST-2 dev: {report.inputs['description']}; {args.threads} threads; edgekit bench: {report.method}; "
          f"{env['cpu_model']} ({', '.join(env['isa_flags'])}); peer preset "
          f"AutoQuantizationConfig.{result['optimum_preset']}\n")
    print("| variant | accuracy % (verify, batch 1) | vs FP32 | accuracy % (verify, batch 32) | p50 ms | p90 ms | rsd % "
          "| p50 vs peer | model size |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nTargets: edgekit INT8 p50 <= 0.9x peer: {ours['p50_vs_peer']:.2f}x -> "
          f"{'met' if result['targets']['p50_vs_peer<=0.9'] else 'NOT met'}; accuracy drop <= 0.5 pt: "
          f"{-drop:+.2f} -> {'met' if result['targets']['accuracy_drop<=0.5'] else 'NOT met'}")


if __name__ == "__main__":
    main()
