"""``edgekit bench``: latency and memory of one or more variants, measured honestly.

Warm-up, then at least ``iterations`` AND at least ``min_seconds`` per variant; first-call time kept apart;
one process per variant (peak RSS is that variant's own); variants interleaved in short rounds; the same
inputs in the same order for every variant; ``threads`` applied to every runtime alike.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.artifacts import folder_size
from edgekit.errors import EdgekitError
from edgekit.progress import Progress
from edgekit.reports import SCHEMA_VERSION, Report, fmt_bytes, md_table


@dataclass
class BenchConfig:
    iterations: int = 100
    min_seconds: float = 5.0
    warmup: int = 10
    round_size: int = 10  # iterations per variant per interleaved round
    batch_size: int = 1
    seq_len: int | None = None  # fixed synthetic length; default 128 without --data
    data: str | None = None  # real lengths from this file
    text_column: str | None = None
    samples: int = 200  # examples taken from --data
    threads: int | None = None
    device: str = "cpu"
    task: str | None = None


@dataclass
class LatencyStats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    iterations: int
    seconds: float

    @classmethod
    def from_ns(cls, ns: list[int]) -> "LatencyStats":
        ms = np.asarray(ns, dtype=np.float64) / 1e6
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(ms.mean()), float(ms.std()), float(ms.min()),
                   float(ms.max()), len(ms), float(ms.sum() / 1e3))


@dataclass
class VariantResult:
    name: str
    path: str
    runtime: str
    size_bytes: int
    load_seconds: float
    first_call_ms: float
    latency: LatencyStats
    throughput_samples_s: float
    rss_baseline_bytes: int
    rss_peak_bytes: int
    samples_ms: list = field(repr=False, default_factory=list)
    device: dict | None = None  # GPU phases and device memory (benchmarks/gpu.py); None on the CPU

    @property
    def rss_model_bytes(self) -> int:
        return self.rss_peak_bytes - self.rss_baseline_bytes


@dataclass
class BenchReport(Report):
    variants: list[VariantResult]
    environment: dict
    inputs: dict
    method: str
    config: dict
    schema_version: int = SCHEMA_VERSION

    def rows(self) -> list[list]:
        base = self.variants[0]
        rows = []
        for v in self.variants:
            rows.append([v.name, v.latency.p50_ms, v.latency.p90_ms, v.latency.p99_ms, v.latency.mean_ms,
                         v.throughput_samples_s, v.first_call_ms, fmt_bytes(v.rss_peak_bytes), fmt_bytes(v.size_bytes),
                         f"{v.latency.p50_ms / base.latency.p50_ms:.2f}x", f"{v.size_bytes / max(base.size_bytes, 1):.2f}x"])
        return rows

    HEADERS = ["variant", "p50 ms", "p90 ms", "p99 ms", "mean ms", "samples/s", "first call ms", "peak RSS", "size",
               "p50 vs first", "size vs first"]

    def to_markdown(self) -> str:
        env = self.environment
        return "\n\n".join([
            "## Benchmark",
            md_table(self.HEADERS, self.rows()),
            f"Inputs: {self.inputs['description']}. Method: {self.method}.",
            f"Machine: {env['cpu_model']} ({', '.join(env['isa_flags'])}), {env['logical_cores']} logical cores, "
            f"{env['threads']} threads; " + ", ".join(f"{k} {v}" for k, v in env["libraries"].items() if v),
        ])


def _inputs(paths: list[Path], cfg: BenchConfig):
    """Tokenized batches for every variant, from real data or a fixed synthetic shape."""
    from edgekit.checkpoint import load_tokenizer
    from edgekit.data import encode, load_examples, synthetic_inputs
    from edgekit.tasks import TASKS

    folder = next((p if p.is_dir() else p.parent for p in paths if (p if p.is_dir() else p.parent).joinpath("config.json").is_file()), None)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    if cfg.data:
        if cfg.seq_len:
            raise EdgekitError("--data and --seq-len both set the sequence length", "pass only one of them")
        if folder is None:
            raise EdgekitError("real lengths need a tokenizer, and no variant folder has one", "bench an edgekit export or a checkpoint")
        tok = load_tokenizer(folder)
        ex = load_examples(cfg.data, TASKS[cfg.task or "text-classification"], cfg.text_column, limit=cfg.samples,
                           use_labels=False)
        batches = [encode(tok, ex.texts[i : i + cfg.batch_size])[0] for i in range(0, len(ex), cfg.batch_size)]
        lengths = [b["input_ids"].shape[1] for b in batches]
        desc = (f"{len(ex)} real examples from {Path(cfg.data).name} at batch {cfg.batch_size}, "
                f"token lengths median {int(np.median(lengths))} (min {min(lengths)}, max {max(lengths)})")
        return batches, {"description": desc, "batch_size": cfg.batch_size, "lengths": lengths, "data": cfg.data}
    vocab, max_positions = 1000, None
    if folder is not None:
        import json

        model_config = json.loads((folder / "config.json").read_text())
        vocab, max_positions = model_config.get("vocab_size", vocab), model_config.get("max_position_embeddings")
    seq = cfg.seq_len or min(128, max_positions or 128)
    if max_positions and seq > max_positions:
        raise EdgekitError(f"--seq-len {seq} is longer than the model's {max_positions} positions",
                           f"use --seq-len {max_positions} or less")
    batches = [synthetic_inputs(names, vocab, cfg.batch_size, seq, seed=i) for i in range(8)]
    return batches, {"description": f"synthetic token ids, batch {cfg.batch_size} x sequence {seq}",
                     "batch_size": cfg.batch_size, "seq_len": seq}


def _variant_name(path: Path, runtime: str, taken: set) -> str:
    label = path.name if path.is_dir() else f"{path.parent.name}/{path.name}"
    name = f"{label} ({runtime})"
    k = 2
    while name in taken:
        name, k = f"{label} ({runtime}) #{k}", k + 1
    taken.add(name)
    return name


def _call(conn, msg, proc):
    conn.send(msg)
    return _receive(conn, proc)


def _receive(conn, proc):
    while not conn.poll(1.0):
        if not proc.is_alive():
            raise RuntimeError("a benchmark worker died (out of memory?)")
    reply = conn.recv()
    if reply[0] == "error":
        if reply[2]:
            raise EdgekitError(reply[1])
        raise RuntimeError(f"benchmark worker failed: {reply[1]}")
    return reply


def bench(models: list, config: BenchConfig | None = None, progress: Progress | None = None) -> BenchReport:
    from edgekit.benchmarks import worker
    from edgekit.benchmarks.environment import environment
    from edgekit.checkpoint import require_path
    from edgekit.runtimes.base import artifact_kind, onnx_file

    cfg = config or BenchConfig()
    progress = progress or Progress()
    if not models:
        raise EdgekitError("bench needs at least one model", "pass one or more checkpoint or ONNX folders")
    if cfg.iterations < 1 or cfg.batch_size < 1 or cfg.min_seconds < 0:
        raise EdgekitError("--iterations and --batch-size must be at least 1 and --min-seconds not negative", "fix the option")
    paths = [require_path(m, "model") for m in models]
    kinds = [artifact_kind(p) for p in paths]
    batches, inputs_info = _inputs(paths, cfg)
    ctx = mp.get_context("spawn")  # a fresh interpreter: no torch/ORT state inherited from the parent
    workers, taken = [], set()
    try:
        for p, kind in zip(paths, kinds):
            with progress.step(f"Loading {p.name} in its own process"):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=worker.serve, args=(child, str(p), None, cfg.threads, cfg.task, cfg.device),
                                   daemon=True)
                proc.start()
                info = _receive(parent, proc)[1]
                _call(parent, ("inputs", [{k: v for k, v in b.items() if k in info["input_names"]} for b in batches]), proc)
                size = folder_size(onnx_file(p)) if kind == "onnx" else folder_size(p)
                workers.append({"path": p, "conn": parent, "proc": proc, "info": info, "size": size,
                                "name": _variant_name(p, info["name"], taken), "times": [], "first": None,
                                "phases": []})
        for w in workers:  # first call: includes lazy initialisation (ORT arena, torch kernels)
            w["first"] = _call(w["conn"], ("run", 0, 1), w["proc"])[1][0] / 1e6
        with progress.step("Warming up", total=cfg.warmup * len(workers)) as step:
            for _ in range(max(cfg.warmup, 0)):
                for w in workers:
                    _call(w["conn"], ("run", 1, 1), w["proc"])
                    step.advance()
        with progress.step(f"Timing {len(workers)} variant(s), interleaved", total=cfg.iterations) as step:
            k = 0
            while True:
                done = min(len(w["times"]) for w in workers)
                spent = min(sum(w["times"]) / 1e9 for w in workers)
                if done >= cfg.iterations and spent >= cfg.min_seconds:
                    break
                for w in workers:
                    reply = _call(w["conn"], ("run", k, cfg.round_size), w["proc"])
                    w["times"] += reply[1]
                    w["phases"] += reply[2]
                k += cfg.round_size
                step.advance(min(cfg.round_size, max(cfg.iterations - done, 0)))
        results = []
        for w in workers:
            end = _call(w["conn"], ("stop",), w["proc"])[1]
            lat = LatencyStats.from_ns(w["times"])
            n_samples = sum(len(batches[i % len(batches)]["input_ids"]) for i in range(len(w["times"])))
            results.append(VariantResult(
                w["name"], str(w["path"]), w["info"]["name"], w["size"], w["info"]["load_seconds"], w["first"], lat,
                n_samples / lat.seconds if lat.seconds else 0.0, w["info"]["rss_baseline"], end["rss_peak"],
                [t / 1e6 for t in w["times"]]))
            if cfg.device != "cpu":
                from edgekit.benchmarks.gpu import device_metrics

                results[-1].device = device_metrics(w["phases"], end)
    finally:
        for w in workers:
            w["proc"].join(timeout=5)
            if w["proc"].is_alive():
                w["proc"].kill()
    method = (f"one process per variant, interleaved in rounds of {cfg.round_size} iterations "
              f"(parent blocks on a pipe; onnxruntime intra-op spinning off), {cfg.warmup} warm-up iterations, "
              f"at least {cfg.iterations} iterations and {cfg.min_seconds:g} s per variant, perf_counter_ns")
    env = environment(cfg.threads)
    if cfg.device != "cpu":
        from edgekit.benchmarks.gpu import GPU_METHOD, add_device_environment

        add_device_environment(env, cfg.device)
        method += f"; {GPU_METHOD}"
    return BenchReport(results, env, {k: v for k, v in inputs_info.items() if k != "lengths"},
                       method, dict(cfg.__dict__))
