"""Foundation benchmark: all-MiniLM-L6-v2 fine-tuned on SST-2, batch 1, real lengths, on this CPU.

Variants: torch FP32, ORT FP32 (edgekit export), edgekit INT8 (fusion + dynamic per-channel), and the peer:
Optimum's ORTQuantizer dynamic INT8 with the preset for this CPU (avx512_vnni, avx512 or avx2), quantizing the
same export.

Latency is timed in ONE process, same threads, interleaved example by example (each dev sentence runs through
every variant in turn; onnxruntime spinning off so no session steals the CPU from the next), over
``--passes`` passes of the 872 dev sentences. Accuracy is measured on the whole dev set twice: at batch 1
from the timed runs themselves (how the latency is measured), and by ``edgekit verify`` (batches of 32).

    python benchmarks/sst2_int8.py [--threads 2] [--passes 3]
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

from sst2_model import SST2, ensure_model  # noqa: E402


def optimum_preset() -> str:
    """The AutoQuantizationConfig preset an Optimum user picks for this CPU (its docs: match the ISA)."""
    from edgekit.benchmarks.environment import environment

    flags = set(environment(1)["isa_flags"])
    return "avx512_vnni" if "avx512_vnni" in flags else ("avx512" if "avx512f" in flags else "avx2")


def optimum_peer(onnx_dir: Path, out: Path) -> Path:
    from optimum.onnxruntime import AutoQuantizationConfig, ORTQuantizer

    shutil.rmtree(out, ignore_errors=True)  # always from this export: a stale peer would compare another model
    quantizer = ORTQuantizer.from_pretrained(onnx_dir, file_name="model.onnx")
    quantizer.quantize(getattr(AutoQuantizationConfig, optimum_preset())(is_static=False), save_dir=out)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (onnx_dir / f).is_file():
            shutil.copy(onnx_dir / f, out / f)
    (out / "edgekit.json").write_text(json.dumps({"task": "text-classification", "stage": "optimum-peer"}))
    return out / "model_quantized.onnx"


def interleaved_latency(variants: dict, batches: list, passes: int, predictions: dict | None = None) -> dict:
    """Latencies in ms per variant; with ``predictions``, also each variant's batch-1 argmax (first pass)."""
    times = {name: [] for name in variants}
    for p in range(passes):
        for batch in batches:
            for name, session in variants.items():
                t = time.perf_counter_ns()
                out = session.run(batch)
                times[name].append((time.perf_counter_ns() - t) / 1e6)
                if predictions is not None and p == 0:
                    predictions.setdefault(name, []).append(int(np.asarray(out).argmax(-1)[0]))
    return times


def dev_latency(ckpt: Path, paths: dict, dev: str, threads: int, passes: int) -> tuple[list, dict, dict]:
    """Every dev sentence (batch 1, its real length) through every variant in turn, ``passes`` times.

    Returns the batches, the latencies and each variant's accuracy AT BATCH 1 from the same runs: dynamic INT8
    computes activation scales per call, so a padded batch of 32 (verify's default) and a single unpadded
    sentence (how an edge device runs it, and what is timed here) can give different answers.
    """
    from edgekit.checkpoint import load_tokenizer, open_checkpoint
    from edgekit.data import encode, load_examples
    from edgekit.runtimes.base import load
    from edgekit.tasks import TASKS

    sessions = {name: load(path, threads=threads, task="text-classification") for name, path in paths.items()}
    examples = load_examples(dev, TASKS["text-classification"], id2label=open_checkpoint(ckpt).id2label)
    tok = load_tokenizer(ckpt)
    batches = [encode(tok, [t])[0] for t in examples.texts]
    interleaved_latency(sessions, batches[:50], 1)  # warm-up
    preds: dict = {}
    times = interleaved_latency(sessions, batches, passes, preds)
    labels = np.asarray(examples.labels)
    return batches, times, {name: 100.0 * float((np.asarray(p) == labels).mean()) for name, p in preds.items()}


def latency_summary(times_ms: list, passes: int, peer_p50: float, path: Path) -> dict:
    """p50/p90/mean, each pass's median (their spread says how steady the machine was), ratio, file size."""
    t = np.asarray(times_ms)
    p50, p90 = np.percentile(t, [50, 90])
    files = [path] if path.is_file() else [*path.rglob("*.onnx"), *path.rglob("*.safetensors")]
    return {"p50_ms": float(p50), "p90_ms": float(p90), "mean_ms": float(t.mean()),
            "p50_per_pass_ms": [float(np.median(x)) for x in np.array_split(t, passes)],
            "p50_vs_peer": float(p50) / peer_p50, "size_bytes": sum(f.stat().st_size for f in files)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit")) / "bench-sst2")
    args = ap.parse_args()

    from edgekit.api import quantize
    from edgekit.benchmarks.environment import environment
    from edgekit.runtimes.export import export
    from edgekit.verify import VerifyConfig, verify

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
    batched = {}  # edgekit verify's figure: batches of 32, padded
    for name, path in paths.items():
        rep = verify(ckpt, path, VerifyConfig(data=dev, threads=args.threads))
        batched[name] = rep.candidate_metrics["accuracy"]
    batches, times, accuracy = dev_latency(ckpt, paths, dev, args.threads, args.passes)

    peer_p50 = float(np.percentile(times["Optimum INT8 (peer)"], 50))
    rows, result = [], {"environment": environment(args.threads), "optimum_preset": optimum_preset(),
                        "threads": args.threads, "passes": args.passes,
                        "examples": len(batches), "variants": {}}
    for name, path in paths.items():
        v = result["variants"][name] = {"accuracy": accuracy[name], "accuracy_verify_batch32": batched[name],
                                        **latency_summary(times[name], args.passes, peer_p50, path)}
        rows.append(f"| {name} | {accuracy[name]:.2f} | {accuracy[name] - accuracy['torch FP32']:+.2f} | "
                    f"{batched[name]:.2f} | {v['p50_ms']:.3f} | {v['p90_ms']:.3f} | {v['p50_vs_peer']:.2f}x | "
                    f"{v['size_bytes'] / 2**20:.1f} MiB |")
    lengths = [b["input_ids"].shape[1] for b in batches]
    ours = result["variants"]["edgekit INT8"]
    result["targets"] = {"p50_vs_peer<=0.9": ours["p50_vs_peer"] <= 0.9,
                         "accuracy_drop<=0.5": accuracy["torch FP32"] - ours["accuracy"] <= 0.5}
    result["edgekit_export_quantize_seconds"] = edgekit_seconds
    out = HERE / "results" / "sst2_int8.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    env = result["environment"]
    print(f"SST-2 dev ({len(batches)} sentences, batch 1, tokens median {int(np.median(lengths))}, max {max(lengths)}), "
          f"{args.threads} threads, {args.passes} interleaved passes in one process; {env['cpu_model']} "
          f"({', '.join(env['isa_flags'])}); peer preset AutoQuantizationConfig.{result['optimum_preset']}\n")
    print("| variant | accuracy % (batch 1) | vs FP32 | accuracy % (verify, batch 32) | p50 ms | p90 ms | p50 vs peer "
          "| model size |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nTargets: edgekit INT8 p50 <= 0.9x peer: {ours['p50_vs_peer']:.2f}x -> "
          f"{'met' if result['targets']['p50_vs_peer<=0.9'] else 'NOT met'}; accuracy drop <= 0.5 pt: "
          f"{accuracy['torch FP32'] - ours['accuracy']:+.2f} -> {'met' if result['targets']['accuracy_drop<=0.5'] else 'NOT met'}")


if __name__ == "__main__":
    main()
