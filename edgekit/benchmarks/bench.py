"""``edgekit bench``: latency and memory of one or more variants, measured honestly.

Warm-up, then at least ``iterations`` AND at least ``min_seconds`` per variant; first-call time kept apart;
one process per variant (peak RSS is that variant's own); variants interleaved in short rounds; the same
inputs in the same order for every variant; ``threads`` applied to every runtime alike.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from edgekit.artifacts import folder_size, model_size
from edgekit.errors import EdgekitError
from edgekit.options import StageConfig, option, task_option, threads_option, trust_remote_code_option
from edgekit.progress import Progress
from edgekit.reports import RenderedReport, SCHEMA_VERSION, Section, drop_empty_columns, fmt_fixed, fmt_mib, fmt_ratio


class BenchConfig(StageConfig):
    # One default for every command that benchmarks (bench, compress, demo).
    iterations: int = option(100, "At least this many timed runs per variant.", ge=1)
    min_seconds: float = option(3.0, "And at least this many seconds of timed runs per variant.", ge=0)
    warmup: int = option(10, "Warm-up runs per variant (after one run of every input shape).", ge=0)
    round_size: int = option(10, "Iterations per variant per interleaved round.", ge=1)
    batch_size: int = option(1, "Examples per run.", ge=1)
    seq_len: Optional[int] = option(None, "Fixed synthetic sequence length (default 128 without --data).", ge=1)
    data: Optional[str] = option(None, "Real lengths: tokenize examples from this file (compress: the evaluation "
                                 "data).", path=True)
    text_column: Optional[str] = option(None, "Text column of the benchmark data.")
    samples: int = option(200, "Examples taken from the benchmark data.", ge=1)
    threads: Optional[int] = threads_option()
    device: str = option("cpu", "cpu, cuda, tensorrt (onnxruntime's provider), jetson, or a device profile "
                         "(edgekit devices).")
    # bench --fp16 (TargetConfig.engine.fp16) reaches onnxruntime's TensorRT provider through this
    fp16: bool = option(False, "FP16 on --device tensorrt (onnxruntime's trt_fp16_enable).", cli=False,
                       recipe=False)
    task: Optional[str] = task_option()
    trust_remote_code: bool = trust_remote_code_option()
    # Decoders (text-generation): edgekit.benchmarks.decode
    prompt_len: Optional[int] = option(None, "text-generation: prompt tokens (default 128; with --data: real prompts "
                                       "cut to this length).", ge=1)
    new_tokens: int = option(64, "text-generation: tokens generated per timed generation.", ge=1)
    generations: int = option(5, "text-generation: timed generations per variant.", ge=1)


@dataclass
class LatencyStats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    rsd_percent: float  # relative standard deviation, 100 * std / mean: the spread beside every figure
    min_ms: float
    max_ms: float
    iterations: int
    seconds: float

    @classmethod
    def from_ns(cls, ns: list[int]) -> "LatencyStats":
        ms = np.asarray(ns, dtype=np.float64) / 1e6
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        mean, std = float(ms.mean()), float(ms.std())
        return cls(p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=mean, std_ms=std,
                   rsd_percent=100.0 * std / mean if mean else 0.0, min_ms=float(ms.min()), max_ms=float(ms.max()),
                   iterations=len(ms), seconds=float(ms.sum() / 1e3))


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
    rss_peak_bytes: int  # the whole run (load, first call, warm-up, timed loop)
    rss_load_peak_bytes: int | None = None  # peak after loading the model and its first call
    rss_run_peak_bytes: int | None = None  # peak INCREASE during the timed loop (steady-state inference)
    samples_ms: list = field(repr=False, default_factory=list)
    device: dict | None = None  # GPU phases and device memory (benchmarks/gpu.py); None on the CPU
    warmup_runs: int = 0  # untimed runs after the first call: one per distinct input shape, then --warmup

    @property
    def rss_model_bytes(self) -> int:
        return self.rss_peak_bytes - self.rss_baseline_bytes


@dataclass
class BenchReport(RenderedReport):
    variants: list[VariantResult]
    environment: dict
    inputs: dict
    method: str
    config: dict
    schema_version: int = SCHEMA_VERSION

    @staticmethod
    def sections_of(d: dict, wide: bool = False) -> list[Section]:
        """The latency table (``wide``: every column; otherwise the ones that fit 80 columns), the GPU and
        Jetson figures when there are any, and the machine."""
        variants = d.get("variants") or []
        base = variants[0] if variants else {}
        columns = [c for c in BENCH_COLUMNS if wide or c[2]]
        headers, rows = drop_empty_columns([c[0] for c in columns], [[c[1](v, base) for c in columns] for v in variants])
        inputs = (d.get("inputs") or {}).get("description", "?")
        out = [Section("Benchmark", headers, rows, notes=[f"Inputs: {inputs}. Method: {d.get('method')}."],
                       key="latency")]
        devices = [v for v in variants if v.get("device")]
        if devices:
            headers, rows = drop_empty_columns([c[0] for c in DEVICE_COLUMNS],
                                               [[v["name"]] + [c[1](v["device"]) for c in DEVICE_COLUMNS[1:]] for v in devices])
            notes = sorted({v["device"]["gpu_memory_note"] for v in devices if v["device"].get("gpu_memory_note")})
            out.append(Section("Device", headers, rows, notes=notes, level=3, key="device"))
        if d.get("environment"):
            out.append(Section(notes=[machine_line(d["environment"])], key="machine"))
        return out


def _lat(v: dict, key: str):
    return (v.get("latency") or {}).get(key)


def _rsd(v: dict) -> str:
    lat = v.get("latency") or {}
    rsd = lat.get("rsd_percent")
    if rsd is None and lat.get("std_ms") is not None and lat.get("mean_ms"):
        rsd = 100 * lat["std_ms"] / lat["mean_ms"]
    return "-" if rsd is None else f"{rsd:.1f}"


# (header, cell of variant v given the first variant b, shown in the default 80-column table). Units live in
# the headers so that the cells stay short; a column no variant has a value for is left out.
BENCH_COLUMNS = [
    ("variant", lambda v, b: v.get("name"), True),
    ("first call (ms)", lambda v, b: fmt_fixed(v.get("first_call_ms")), False),
    ("p50 (ms)", lambda v, b: fmt_fixed(_lat(v, "p50_ms")), True),
    ("p90 (ms)", lambda v, b: fmt_fixed(_lat(v, "p90_ms")), True),
    ("p99 (ms)", lambda v, b: fmt_fixed(_lat(v, "p99_ms")), True),
    ("mean (ms)", lambda v, b: fmt_fixed(_lat(v, "mean_ms")), False),
    ("std (ms)", lambda v, b: fmt_fixed(_lat(v, "std_ms")), False),
    ("RSD (%)", lambda v, b: _rsd(v), True),
    ("samples/s", lambda v, b: fmt_fixed(v.get("throughput_samples_s")), False),
    ("load RSS (MiB)", lambda v, b: fmt_mib(v.get("rss_load_peak_bytes")), False),
    ("steady RSS growth (MiB)", lambda v, b: fmt_mib(v.get("rss_run_peak_bytes")), False),
    ("peak RSS (MiB)", lambda v, b: fmt_mib(v.get("rss_peak_bytes")), True),
    ("size (MiB)", lambda v, b: fmt_mib(v.get("size_bytes")), True),
    ("p50 vs first", lambda v, b: fmt_ratio(_lat(v, "p50_ms"), _lat(b, "p50_ms")), True),
    ("size vs first", lambda v, b: fmt_ratio(v.get("size_bytes"), b.get("size_bytes")), False),
]


def _phase(name: str):
    return lambda dev: fmt_fixed(((dev.get("phases") or {}).get(name) or {}).get("p50"))


def _tegra(name: str):
    return lambda dev: fmt_fixed(((dev.get("jetson") or {}).get("tegrastats") or {}).get(name))


# (header, cell of a variant's ``device`` block): GPU phases and memory, Jetson board figures.
DEVICE_COLUMNS = [
    ("variant", None),
    ("H2D p50 (ms)", _phase("h2d_ms")),
    ("compute p50 (ms)", _phase("compute_ms")),
    ("D2H p50 (ms)", _phase("d2h_ms")),
    ("GPU mem (MiB)", lambda dev: fmt_mib(dev.get("gpu_memory_bytes"))),
    ("TRT activations (MiB)", lambda dev: fmt_mib(dev.get("activation_bytes"))),
    # onnxruntime's GPU providers: nodes it ran on the CPU instead, of all it ran (ort_gpu.node_placement)
    ("CPU nodes", lambda dev: f"{dev['cpu_nodes']}/{dev['nodes']}" if dev.get("nodes") else "-"),
    ("RAM peak (MB)", _tegra("ram_peak_mb")),
    ("GR3D (%)", _tegra("gr3d_mean_load_pct")),
    ("module power (mW)", _tegra("module_power_mean_mw")),
    ("energy (mJ/inference)", _tegra("energy_per_inference_mj")),
    ("NvMap model (MB)", lambda dev: fmt_fixed((dev.get("jetson") or {}).get("nvmap_model_mb"))),
]


def machine_line(env: dict) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in (env.get("libraries") or {}).items() if v)
    return (f"Machine: {env.get('cpu_model', '?')} ({', '.join(env.get('isa_flags') or [])}), "
            f"{env.get('logical_cores')} logical cores, {env.get('threads')} threads; {libs}")


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
        import json

        from edgekit.data import max_tokens

        # truncated where verify truncates: the model's own positions, its tokenizer's limit, 128
        longest = max_tokens(json.loads((folder / "config.json").read_text()), tok, 128)
        batches = [encode(tok, ex.texts[i : i + cfg.batch_size], longest)[0] for i in range(0, len(ex), cfg.batch_size)]
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


PROGRESS_UNITS = 1000  # the timed loop's bar: the fraction of the stop rule met, in thousandths


def _warmup_plan(batches: list[dict], warmup: int) -> list[int]:
    """Batch indices to run before timing: the first batch of every distinct input shape (with --data each
    length is a shape onnxruntime/torch plan anew), then ``warmup`` more, in the timed loop's order."""
    first: dict = {}
    for i, b in enumerate(batches):
        first.setdefault(tuple(sorted((k, tuple(v.shape)) for k, v in b.items())), i)
    return sorted(first.values()) + [1 + i for i in range(max(warmup, 0))]


def _round_order(n: int, round_index: int) -> list[int]:
    """Round k starts with variant k mod n: no variant always runs first after the parent's own work."""
    return [(round_index + i) % n for i in range(n)]


def _rule_fraction(done: int, spent: float, iterations: int, min_seconds: float) -> float:
    """How much of the stop rule (at least ``iterations`` runs AND ``min_seconds`` s) is met, 0..1."""
    by_count = done / iterations if iterations > 0 else 1.0
    by_time = spent / min_seconds if min_seconds > 0 else 1.0
    return max(0.0, min(1.0, by_count, by_time))


def bench(models: list, config: BenchConfig | None = None, progress: Progress | None = None) -> BenchReport:
    from edgekit.benchmarks import worker
    from edgekit.benchmarks.environment import environment
    from edgekit.checkpoint import open_checkpoint, require_path
    from edgekit.runtimes.base import artifact_kind, onnx_file

    cfg = config or BenchConfig()
    progress = progress or Progress()
    if not models:
        raise EdgekitError("bench needs at least one model", "pass one or more checkpoint or ONNX folders")
    if cfg.iterations < 1 or cfg.batch_size < 1 or cfg.min_seconds < 0:
        raise EdgekitError("--iterations and --batch-size must be at least 1 and --min-seconds not negative", "fix the option")
    paths = [require_path(m, "model") for m in models]
    kinds = [artifact_kind(p) for p in paths]
    # Checkpoints are opened here, before any worker starts: one that ships its own code is refused at once
    # without --trust-remote-code, and the worker gets the opened value (with the user's consent) as it is.
    artifacts = [open_checkpoint(p, cfg.task, cfg.trust_remote_code) if kind == "checkpoint" else str(p)
                 for p, kind in zip(paths, kinds)]
    batches, inputs_info = _inputs(paths, cfg)
    device = cfg.device
    if device == "tensorrt":  # one TensorRT profile covering every batch, so no engine is built while timed
        from edgekit.runtimes.ort_gpu import tensorrt_device_for

        device = tensorrt_device_for(batches, fp16=cfg.fp16)
    ctx = mp.get_context("spawn")  # a fresh interpreter: no torch/ORT state inherited from the parent
    workers, taken = [], set()
    started = []  # (process, parent end of its pipe) from the moment it starts: stopped in `finally`
    try:
        for p, kind, artifact in zip(paths, kinds, artifacts):
            with progress.step(f"Loading {p.name} in its own process"):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=worker.serve, args=(child, artifact, None, cfg.threads, cfg.task, device),
                                   daemon=True)
                proc.start()
                started.append((proc, parent))
                info = _receive(parent, proc)[1]
                _call(parent, ("inputs", [{k: v for k, v in b.items() if k in info["input_names"]} for b in batches]), proc)
                size = model_size(onnx_file(p)) if kind == "onnx" else folder_size(p)
                workers.append({"path": p, "conn": parent, "proc": proc, "info": info, "size": size,
                                "name": _variant_name(p, info["name"], taken), "times": [], "first": None,
                                "phases": []})
        for w in workers:  # first call: includes lazy initialisation (ORT arena, torch kernels)
            w["first"] = _call(w["conn"], ("warm", [0]), w["proc"])[1][0] / 1e6
        plan = _warmup_plan(batches, cfg.warmup)
        with progress.step(f"Warming up ({len(plan) - max(cfg.warmup, 0)} input shape(s), then {cfg.warmup} runs)",
                           total=len(plan) * len(workers)) as step:
            for r, at in enumerate(range(0, len(plan), cfg.round_size)):
                chunk = plan[at : at + cfg.round_size]
                for i in _round_order(len(workers), r):
                    _call(workers[i]["conn"], ("warm", chunk), workers[i]["proc"])
                    step.advance(len(chunk))
        timing = f"Timing {len(workers)} variant(s), interleaved"  # benchmarks/jetson.py finds the loop by this
        with progress.step(timing, total=PROGRESS_UNITS) as step:
            k = r = 0
            while True:
                done = min(len(w["times"]) for w in workers)
                spent = min(sum(w["times"]) / 1e9 for w in workers)
                step.update(completed=PROGRESS_UNITS * _rule_fraction(done, spent, cfg.iterations, cfg.min_seconds))
                if done >= cfg.iterations and spent >= cfg.min_seconds:
                    break
                for i in _round_order(len(workers), r):
                    w = workers[i]
                    step.update(description=f"{timing}: {w['name']}")
                    reply = _call(w["conn"], ("run", k, cfg.round_size), w["proc"])
                    w["times"] += reply[1]
                    w["phases"] += reply[2]
                k, r = k + cfg.round_size, r + 1
            step.update(description=timing)
        results = []
        for w in workers:
            end = _call(w["conn"], ("stop",), w["proc"])[1]
            if end.get("cold_runs"):  # _warmup_plan covers every shape: a bug if not
                raise RuntimeError(f"{w['name']}: {end['cold_runs']} timed runs on an input shape never warmed up")
            lat = LatencyStats.from_ns(w["times"])
            n_samples = sum(len(batches[i % len(batches)]["input_ids"]) for i in range(len(w["times"])))
            results.append(VariantResult(
                w["name"], str(w["path"]), w["info"]["name"], w["size"], w["info"]["load_seconds"], w["first"], lat,
                n_samples / lat.seconds if lat.seconds else 0.0, w["info"]["rss_baseline"], end["rss_peak"],
                rss_load_peak_bytes=end.get("rss_load_peak"), rss_run_peak_bytes=end.get("rss_run_peak"),
                samples_ms=[t / 1e6 for t in w["times"]], warmup_runs=len(plan)))
            if cfg.device != "cpu":
                from edgekit.benchmarks.gpu import device_metrics

                results[-1].device = device_metrics(w["phases"], end)
    finally:
        # Closing the pipe ends a worker waiting for its next message at once (after a finished run it has
        # already returned; after an error or a KeyboardInterrupt here it would otherwise wait forever).
        for proc, conn in started:
            conn.close()
        for proc, _ in started:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=1)
    inputs_info["distinct_shapes"] = len(plan) - max(cfg.warmup, 0)
    method = (f"one process per variant, interleaved in rounds of {cfg.round_size} iterations, the order rotating "
              f"each round (parent blocks on a pipe; onnxruntime intra-op spinning off), warm-up on every distinct "
              f"input shape then {cfg.warmup} iterations, at least {cfg.iterations} iterations and "
              f"{cfg.min_seconds:g} s per variant; inputs prepared before the clock starts, perf_counter_ns around the "
              f"runtime's call only; peak RSS after load + first call and its increase during the timed loop apart")
    env = environment(cfg.threads)
    if cfg.device != "cpu":
        from edgekit.benchmarks.gpu import GPU_METHOD, add_device_environment

        add_device_environment(env, cfg.device)
        method += f"; {GPU_METHOD}"
    if device == "tensorrt":
        env["tensorrt_provider"] = device.settings()
        method += f"; {device.method_note()}"
    return BenchReport(results, env, {k: v for k, v in inputs_info.items() if k != "lengths"},
                       method, cfg.to_dict())
