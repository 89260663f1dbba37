"""Decoder benchmark: time to first token (the prefill) and decode speed (time per output token), per variant.

Each variant runs in its own spawned process (so its peak RSS is its own, and no torch/onnxruntime state is
shared), with the same threads and the same prompts; variants are interleaved one generation at a time, the
order rotating each round. A generation is greedy, batch 1, ``new_tokens`` tokens past any end-of-sequence
token (every run does the same work). Only the runtime's calls are timed: the prefill, then each decode step.

Off this CPU (onnxruntime's CUDA or TensorRT provider) the decode loop keeps the KV cache on the GPU
(runtimes/decoder.OrtDecoder); each variant then carries a ``device`` block as the encoder bench's GPU variants
do: H2D / compute / D2H of the steps and of the prefills, NVML memory, the nodes onnxruntime left to the CPU, and
``verified_on_hardware`` (benchmarks/gpu.hardware_label).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.progress import Progress
from edgekit.reports import RenderedReport, SCHEMA_VERSION, Section, fmt_fixed, fmt_mib

DEFAULT_PROMPT_LEN = 128
PROMPTS_FROM_DATA = 8
DEVICES = ("cpu", "cuda", "tensorrt")
GPU_METHOD = ("on the GPU each call is timed on the host around synchronous onnxruntime calls (IOBinding; onnxruntime "
              "gives Python no CUDA events), the KV cache kept in device memory between steps and only the logits "
              "copied back (the next token is chosen on the host); GPU memory per process from NVML where the driver "
              "exposes it")
TRT_PROFILE_NOTE = ("one TensorRT profile from a one-token prefill to the longest prompt on the longest cache, opt at a "
                    "decode step half way (runtimes/decoder.tensorrt_profile), engine cached")


def is_decoder_artifact(path) -> bool:
    """A text-generation checkpoint, adapter, or an export/quantization of one (read from its metadata)."""
    import json

    from edgekit.adapters import is_adapter
    from edgekit.runtimes.base import read_artifact_meta
    from edgekit.tasks import DECODER_TASK, TASKS

    p = Path(path)
    if not p.is_dir():
        return False
    if is_adapter(p):
        return True
    meta = read_artifact_meta(p) if any(p.glob("*.onnx")) else {}
    if meta.get("task"):
        return meta["task"] == DECODER_TASK
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        archs = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
    except ValueError:
        return False
    return any(TASKS[DECODER_TASK].has_head(a) for a in archs)


def decoder_models(models: list) -> bool:
    """Whether the models are decoder language models; a mix of decoders and encoders is refused."""
    kinds = [is_decoder_artifact(m) for m in models]
    if any(kinds) and not all(kinds):
        raise EdgekitError("the models mix decoder language models with encoders", "benchmark each kind on its own")
    return bool(kinds) and all(kinds)


def is_decode_report(d) -> bool:
    """A bench report dict written by bench_decoders (its inputs carry new_tokens)."""
    return isinstance(d, dict) and "new_tokens" in (d.get("inputs") or {})


@dataclass
class DecodeVariant:
    name: str
    path: str
    runtime: str
    size_bytes: int
    load_seconds: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    tpot_p50_ms: float  # time per output token (one decode step)
    tpot_p90_ms: float
    decode_tokens_per_s_p50: float  # 1000 / tpot_p50
    decode_tokens_per_s_p90: float  # 1000 / tpot_p90: the slow end
    e2e_p50_ms: float
    generations: int
    peak_rss_bytes: int
    kv_cache_bytes: int | None  # at the longest length timed (prompt + new tokens), batch 1
    tpot_per_generation_ms: list = field(default_factory=list)  # median step time of each timed generation
    device: dict | None = None  # off this CPU: GPU phases, memory, placement, verified_on_hardware; Jetson figures


@dataclass
class DecodeBenchReport(RenderedReport):
    variants: list
    inputs: dict
    environment: dict
    method: str
    seconds: float = 0.0
    schema_version: int = SCHEMA_VERSION

    @staticmethod
    def sections_of(d: dict, wide: bool = False) -> list[Section]:
        base = (d.get("variants") or [{}])[0]
        rows = []
        for v in d.get("variants") or []:
            speedup = (v["decode_tokens_per_s_p50"] / base["decode_tokens_per_s_p50"]
                       if base.get("decode_tokens_per_s_p50") else None)
            rows.append([v["name"], fmt_fixed(v["ttft_p50_ms"]), fmt_fixed(v["ttft_p90_ms"]),
                         fmt_fixed(v["decode_tokens_per_s_p50"]), fmt_fixed(v["decode_tokens_per_s_p90"]),
                         "-" if speedup is None else f"{speedup:.2f}x", fmt_fixed(v["e2e_p50_ms"]),
                         fmt_mib(v["peak_rss_bytes"]), fmt_mib(v["size_bytes"]),
                         "-" if v.get("kv_cache_bytes") is None else fmt_mib(v["kv_cache_bytes"])])
        i = d.get("inputs") or {}
        title = (f"Decode benchmark: batch 1, {i.get('prompt_tokens')}-token prompt, {i.get('new_tokens')} new tokens, "
                 f"{i.get('generations')} generations per variant")
        unverified = sorted({b["hardware_note"] for v in d.get("variants") or [] for b in _labelled(v)
                             if not b.get("verified_on_hardware", True)})
        out = [Section(title, ["variant", "TTFT p50 (ms)", "TTFT p90 (ms)", "decode tok/s p50", "tok/s p90",
                               "vs first", "end-to-end p50 (ms)", "peak RSS (MiB)", "size (MiB)", "KV cache (MiB)"],
                       rows, align="lrrrrrrrrr", key="latency",
                       notes=[f"UNVERIFIED ON HARDWARE: {n}." for n in unverified] + [d.get("method", "")])]
        # the encoder bench's device table (GPU phases of the decode steps, memory, Jetson board), per token
        from dataclasses import replace

        from edgekit.benchmarks.bench import BenchReport

        for s in BenchReport.sections_of({"variants": d.get("variants") or []}):
            if s.key == "device":
                out.append(replace(s, title="Device (the decode steps)",
                                   headers=tuple(str(h).replace("/inference", "/token") for h in s.headers)))
        return out


def _labelled(v: dict) -> list:
    """The blocks of a variant that say whether their path has run on hardware (GPU, Jetson)."""
    dev = v.get("device") or {}
    return [b for b in (dev, dev.get("jetson") or {}) if "hardware_note" in b]


def serve(conn, path: str, threads: int, prompts: list, new_tokens: int, device: str = "cpu") -> None:
    """Worker: load one variant, then run ("gen", i) -> (ttft_s, [step_s], GPU phases) until ("stop",) -> its
    peak RSS (and, off the CPU, the session's device figures). Errors go back as bench's worker sends them."""
    import signal

    from edgekit.benchmarks.worker import peak_rss_bytes
    from edgekit.runtimes.decoder import greedy, open_decoder

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops workers (issue 14's rule for bench)
    try:
        longest = max(len(p) for p in prompts) + new_tokens
        t0 = time.perf_counter()
        session = open_decoder(path, threads, device, lengths=(max(len(p) for p in prompts), longest))[0]
        load_s = time.perf_counter() - t0
        kv = session.kv_bytes(longest) if hasattr(session, "kv_bytes") else None
        take = getattr(session, "take_phases", list)  # GPU sessions: H2D / compute / D2H of each call
        conn.send(("ready", {"name": session.name, "load_seconds": load_s, "kv_cache_bytes": kv}))
        while True:
            msg = conn.recv()
            if msg[0] == "gen":
                out = greedy(session, prompts[msg[1] % len(prompts)], new_tokens, eos=None)
                conn.send(("done", out["ttft_s"], out["step_s"], take()))
            else:
                end = {"rss_peak": peak_rss_bytes()}  # VmHWM: this process's own peak (not the parent's)
                if device != "cpu":
                    from edgekit.benchmarks.gpu import session_device_report

                    end.update(session_device_report(session, "decoder"))
                conn.send(("stopped", end))
                return
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent is gone
    except BaseException as e:  # report, never hang the parent
        conn.send(("error", str(e) if isinstance(e, EdgekitError) else f"{type(e).__name__}: {e}",
                   isinstance(e, EdgekitError)))


def _prompts(cfg, vocab: int, tokenizer, max_positions: int | None) -> tuple[list, str]:
    limit = (max_positions - cfg.new_tokens) if max_positions else None
    if limit is not None and limit < 1:
        raise EdgekitError(f"--new-tokens {cfg.new_tokens} leaves no room for a prompt in the model's context of "
                           f"{max_positions}", "lower --new-tokens")
    if cfg.data:
        from edgekit import lm_eval

        docs, _ = lm_eval.read_documents(cfg.data, cfg.text_column, PROMPTS_FROM_DATA, flag="--data")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        longest = min(x for x in (cfg.prompt_len, limit) if x) if (cfg.prompt_len or limit) else None
        out = [(bos + tokenizer(d, add_special_tokens=False)["input_ids"])[:longest] for d in docs]
        return out, f"{len(out)} real prompts from {Path(cfg.data).name}"
    n = cfg.prompt_len or DEFAULT_PROMPT_LEN
    if limit is not None and n > limit:
        raise EdgekitError(f"--prompt-len {n} plus --new-tokens {cfg.new_tokens} is longer than the model's context "
                           f"of {max_positions}", "lower --prompt-len or --new-tokens")
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, size=n).tolist()], f"a synthetic {n}-token prompt"


def _pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def bench_decoders(models: list, cfg, progress: Progress | None = None) -> DecodeBenchReport:
    """``edgekit bench`` for decoders (checkpoints on torch, exports on onnxruntime), interleaved.

    ``cfg.device``: cpu, or cuda / tensorrt (onnxruntime's providers, exports only; a Jetson and SSH go through
    benchmarks/targets.bench_on_target, which comes here for each run)."""
    import json
    import multiprocessing as mp

    from edgekit.artifacts import folder_size, model_size
    from edgekit.benchmarks.bench import _call, _receive
    from edgekit.benchmarks.environment import environment, usable_cores
    from edgekit.checkpoint import load_tokenizer
    from edgekit.tasks import max_positions
    from edgekit.runtimes.base import onnx_file

    progress = progress or Progress()
    device = cfg.device
    if device not in DEVICES:
        raise EdgekitError(f"decoder benchmarks run on {', '.join(DEVICES)} here, not on '{device}'",
                           "for a Jetson, a device profile or --host use edgekit bench --device (bench_on_target)")
    if device != "cpu":  # refused here rather than in a worker that imported torch first
        from edgekit.adapters import is_adapter
        from edgekit.runtimes.base import artifact_kind
        from edgekit.runtimes.decoder import torch_only

        for m in models:
            if is_adapter(Path(m)) or artifact_kind(Path(m)) == "checkpoint":
                raise torch_only(m, device)
    if device == "tensorrt":  # carries --fp16 to the worker; the profile is sized there from the prompt lengths
        from edgekit.runtimes.ort_gpu import TensorrtDevice

        device = TensorrtDevice(fp16=cfg.fp16)
    threads = cfg.threads or usable_cores()
    t0 = time.perf_counter()
    first = Path(models[0])
    config = json.loads((first / "config.json").read_text()) if (first / "config.json").is_file() else {}
    tok_dir = next((Path(m) for m in models if any(Path(m).glob("tokenizer*"))), first)
    tokenizer = load_tokenizer(tok_dir)
    vocab = int(config.get("vocab_size") or len(tokenizer))
    prompts, described = _prompts(cfg, vocab, tokenizer, max_positions(config))
    ctx = mp.get_context("spawn")
    workers = []
    try:
        for m in models:
            with progress.step(f"Loading {Path(m).name} in its own process"):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=serve, args=(child, str(m), threads, prompts, cfg.new_tokens, device),
                                   daemon=True)
                proc.start()
                workers.append({"path": Path(m), "conn": parent, "proc": proc, "ttft": [], "steps": [], "e2e": [],
                                "tpot": [], "prefill_phases": [], "step_phases": []})
                workers[-1]["info"] = _receive(parent, proc)[1]
        with progress.step("Warming up (one generation per variant)"):
            for w in workers:
                _call(w["conn"], ("gen", 0), w["proc"])
        with progress.step(f"Timing {len(workers)} variant(s), interleaved", total=cfg.generations) as step:
            for r in range(cfg.generations):
                order = workers[r % len(workers):] + workers[:r % len(workers)]
                for w in order:
                    _, ttft, steps, phases = _call(w["conn"], ("gen", r), w["proc"])
                    w["ttft"].append(ttft)
                    w["steps"] += steps
                    w["tpot"].append(float(np.median(steps)) * 1000 if steps else None)
                    w["e2e"].append(ttft + sum(steps))
                    w["prefill_phases"] += phases[:1]
                    w["step_phases"] += phases[1:]
                step.advance()
        variants = []
        for w in workers:
            end = _call(w["conn"], ("stop",), w["proc"])[1]
            tp50, tp90 = _pct(w["steps"], 50), _pct(w["steps"], 90)
            graph = onnx_file(w["path"]) if any(w["path"].glob("*.onnx")) else None
            size = model_size(graph) if graph else folder_size(w["path"])  # the graph and its external weights
            names = [v.name for v in variants]
            name = w["path"].name if w["path"].name not in names else str(w["path"])
            variants.append(DecodeVariant(
                f"{name} ({w['info']['name']})", str(w["path"]), w["info"]["name"], size, w["info"]["load_seconds"],
                _pct(w["ttft"], 50), _pct(w["ttft"], 90), tp50, tp90, 1000 / tp50, 1000 / tp90, _pct(w["e2e"], 50),
                cfg.generations, end["rss_peak"], w["info"]["kv_cache_bytes"], w["tpot"],
                device=_device_block(w, end) if device != "cpu" else None))
    finally:
        for w in workers:
            w["conn"].close()
        for w in workers:
            w["proc"].join(timeout=5)
            if w["proc"].is_alive():
                w["proc"].kill()
    inputs = {"prompts": described, "prompt_tokens": max(len(p) for p in prompts), "new_tokens": cfg.new_tokens,
              "generations": cfg.generations, "batch_size": 1}
    method = (f"one process per variant, {threads} threads each, interleaved one generation at a time (order rotating); "
              "greedy, no stop at EOS; only the runtime's calls timed; peak RSS of each variant's own process")
    env = environment(threads)
    if device != "cpu":
        from edgekit.benchmarks.gpu import add_device_environment

        add_device_environment(env, str(device))
        method += f"; {GPU_METHOD}"
        if device == "tensorrt":
            method += f"; onnxruntime TensorRT provider with FP16 {'on' if device.fp16 else 'off'}, {TRT_PROFILE_NOTE}"
    return DecodeBenchReport([v.__dict__ for v in variants], inputs, env, method, time.perf_counter() - t0)


def _device_block(w: dict, end: dict) -> dict:
    """The variant's GPU figures: phases of the decode steps (and of the prefills apart), device memory, where
    onnxruntime placed the nodes, and whether this path has run on hardware."""
    from edgekit.benchmarks.gpu import device_metrics, phase_stats

    block = device_metrics(w["step_phases"], end)
    block["prefill_phases"] = phase_stats(w["prefill_phases"])
    return block
