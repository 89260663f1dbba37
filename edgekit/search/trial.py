"""One trial of a search: a recipe taken through the real stages, in a worker process.

prune -> export -> quantize -> verify -> (culprits -> quantize with the worst per channel or in float -> verify)* -> bench

Each stage is the public stage function (``prune``, ``export``, ``quantize``, ``verify``, ``bench``) writing
its usual artifact; artifacts are kept in the search's cache folder under a key made of everything that
decides them (the checkpoint's hash, the upstream stage's key, the stage's own recipe section), so trials
that share a stage reuse its artifact: one export serves every quantization trial of the same pruned model.
A per-key file lock lets trials in parallel workers (Ray) wait for one another instead of building the same
artifact twice. Runs in a worker (a local process or a Ray actor): everything it returns is plain data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import traceback
from pathlib import Path

STAGE_FILE = "stage.json"  # written last into a cached stage folder's staging: its presence means complete


def stage_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(cache: Path, name: str):
    import fcntl

    locks = cache / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Stages:
    """The cache of one search, seen from one trial: which stages it reused, how long the others took."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.log: list[dict] = []

    def folder(self, kind: str, key: str, build) -> Path:
        """The stage folder ``kind-key``, built by ``build(path)`` (a stage function writing through
        staged_output, so the folder exists only when complete) unless a trial built it before."""
        path = self.cache / f"{kind}-{key}"
        with _locked(self.cache, path.name):
            if path.is_dir():
                self.log.append({"stage": kind, "key": key, "reused": True, "seconds": 0.0})
                return path
            t = time.perf_counter()
            build(path)
            self.log.append({"stage": kind, "key": key, "reused": False, "seconds": round(time.perf_counter() - t, 3)})
        return path

    def record(self, kind: str, key: str, build) -> dict:
        """A JSON record ``kind-key.json`` (a verify report, a culprit ranking), computed once."""
        from edgekit.artifacts import write_text_atomic

        path = self.cache / f"{kind}-{key}.json"
        with _locked(self.cache, path.name):
            if path.is_file():
                self.log.append({"stage": kind, "key": key, "reused": True, "seconds": 0.0})
                return json.loads(path.read_text(encoding="utf-8"))
            t = time.perf_counter()
            d = build()
            write_text_atomic(path, json.dumps(d, indent=1))
            self.log.append({"stage": kind, "key": key, "reused": False, "seconds": round(time.perf_counter() - t, 3)})
        return d


def _pin(cores) -> list[int]:
    """Pin this worker (and the benchmark processes it spawns, which inherit it) to ``cores``."""
    if cores:
        os.sched_setaffinity(0, set(cores))
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return []


def _verify_summary(v: dict) -> dict:
    keep = ("passed", "checks", "original_metrics", "candidate_metrics", "agreement", "n_examples", "task")
    return {k: v.get(k) for k in keep}


def run_trial(job: dict) -> dict:
    """Run one trial; never raises for a failure of the trial itself (it is returned as ``state: crashed``)."""
    t0 = time.perf_counter()
    cores = _pin(job.get("cores"))
    worker = {"pid": os.getpid(), "host": socket.gethostname(), "cores": cores}
    stages = Stages(Path(job["cache"]))
    try:
        out = _run(job, stages)
    except BaseException as e:  # noqa: BLE001 - a trial's failure is a result, the search goes on
        if isinstance(e, KeyboardInterrupt):
            raise
        from edgekit.errors import EdgekitError

        reason = f"{e.message}" if isinstance(e, EdgekitError) else f"{type(e).__name__}: {e}"
        out = {"state": "crashed", "error": reason[:2000],
               "traceback": None if isinstance(e, EdgekitError) else traceback.format_exc(limit=8)[-4000:]}
    from edgekit.benchmarks.environment import environment

    out.update(seconds=round(time.perf_counter() - t0, 3), stages=stages.log, worker=worker,
               environment=environment(job["threads"]))
    return out


def _run(job: dict, stages: Stages) -> dict:
    from edgekit.pipeline import CompressConfig

    recipe = CompressConfig.model_validate(job["recipe"])
    ckpt, ckpt_key = job["checkpoint"], job["checkpoint_key"]
    source, upstream, artifacts = ckpt, ckpt_key, {}
    if recipe.prune is not None:
        from edgekit.compress.prune import prune

        pcfg = recipe.prune
        calibration = pcfg.calibration_data or recipe.quantize.calibration_data
        text_column = recipe.verify.text_column or recipe.quantize.text_column
        upstream = stage_key("prune", ckpt_key, pcfg.to_section(), job["calibration_key"])
        source = stages.folder("pruned", upstream, lambda out: prune(
            ckpt, out, pcfg, calibration, text_column, recipe.verify.label_column))
        artifacts["pruned"] = str(source)
    onnx, onnx_key = _export(job, stages, recipe, source, upstream)
    artifacts["onnx"] = str(onnx)
    result = _quantize_and_verify(job, stages, recipe, onnx, onnx_key, artifacts)
    if job.get("bench") is not None:
        # the baseline every trial is timed against: the original's own FP32 export (shared with the unpruned
        # trials, built by whichever trial needs it first)
        reference, _ = _export(job, stages, recipe, ckpt, ckpt_key) if recipe.prune is not None else (onnx, None)
        result["metrics"].update(_bench(job, reference, Path(result["artifacts"]["model"])))
        result["artifacts"]["reference"] = str(reference)
    return result


def _export(job, stages: Stages, recipe, source, upstream: str) -> tuple[Path, str]:
    from edgekit.runtimes.export import export

    original = source == job["checkpoint"]
    ecfg = recipe.export.replace(task=recipe.task, base=recipe.base if original else None,
                                 trust_remote_code=job.get("trust_remote_code", False) and original)
    key = stage_key("onnx", upstream, recipe.export.to_section())
    return stages.folder("onnx", key, lambda out: export(source, out, ecfg)), key


def _quantize(stages: Stages, onnx: Path, onnx_key: str, qcfg) -> Path:
    from edgekit.pipeline import quantize

    key = stage_key("model", onnx_key, qcfg.to_section())
    return stages.folder("model", key, lambda out: quantize(onnx, out, qcfg))


def _verify(job, stages: Stages, recipe, model: Path) -> dict:
    from edgekit.verify import verify

    key = stage_key("verify", model.name, recipe.verify.to_section(), recipe.gate.to_section(), job["data_key"])
    vcfg = recipe.verify.replace(trust_remote_code=job.get("trust_remote_code", False), base=recipe.base)
    return stages.record("verify", key, lambda: _verify_summary(
        verify(job["checkpoint"], model, vcfg, recipe.gate).to_dict()))


def _quantize_and_verify(job, stages: Stages, recipe, onnx: Path, onnx_key: str, artifacts: dict) -> dict:
    """Quantize and verify; when the gate fails, rank the quantized nodes and retry with the worst mended
    (:func:`_repairs`) until the gate passes or ``culprits.max_float`` nodes are reached."""
    qcfg = recipe.quantize
    model = _quantize(stages, onnx, onnx_key, qcfg)
    v = _verify(job, stages, recipe, model)
    attempts = [_attempt(qcfg, v)]
    culprits = None
    limit = (job.get("culprits") or {}).get("max_float", 0)
    if not v["passed"] and limit:
        culprits = _culprits(job, stages, recipe, onnx, onnx_key)
        ranked = [n["name"] for n in culprits.get("nodes", []) if n["name"] not in qcfg.exclude_nodes]
        if ranked and culprits.get("diagnosis") == "quantization":
            for q in _repairs(recipe.quantize, ranked, limit):
                model = _quantize(stages, onnx, onnx_key, q)
                v = _verify(job, stages, recipe, model)
                attempts.append(_attempt(q, v))
                qcfg = q
                if v["passed"]:
                    break
        culprits["kept_in_float"] = [n for n in qcfg.exclude_nodes if n not in recipe.quantize.exclude_nodes]
        culprits["per_channel"] = [n for n in qcfg.per_channel_nodes if n not in recipe.quantize.per_channel_nodes]
    from edgekit.artifacts import folder_size, model_size
    from edgekit.runtimes.base import onnx_file

    artifacts["model"] = str(model)
    final = recipe.to_recipe()
    final["quantize"] = {**final["quantize"], "exclude_nodes": list(qcfg.exclude_nodes),
                         "per_channel_nodes": list(qcfg.per_channel_nodes)}
    return {"state": "passed" if v["passed"] else "failed", "verify": v, "attempts": attempts, "culprits": culprits,
            "recipe": final, "artifacts": artifacts,
            "metrics": {"size_bytes": model_size(onnx_file(model)), "folder_bytes": folder_size(model)}}


def _attempt(q, v: dict) -> dict:
    return {"exclude_nodes": list(q.exclude_nodes), "per_channel_nodes": list(q.per_channel_nodes),
            "passed": v["passed"], "checks": v["checks"]}


def _repairs(q, ranked: list, limit: int):
    """The culprit retries, cheapest first at each size: the worst k nodes with per-channel weight scales (a
    dynamic per-tensor trial only: almost free at run time), then the same k kept in float; k = 1, 2, 4, ...
    up to ``limit``. Measured on the SST-2 search's winner (README): its one culprit per channel instead of in
    float gave the same accuracy within 0.1 pt and 5% less latency."""
    finer = q.dynamic_int8 and not q.per_channel
    k = 1
    while True:
        worst = ranked[: min(k, limit)]
        finer_now = [n for n in worst if n not in q.per_channel_nodes]
        if finer and finer_now:
            yield q.replace(per_channel_nodes=list(q.per_channel_nodes) + finer_now)
        yield q.replace(exclude_nodes=list(q.exclude_nodes) + worst,
                        per_channel_nodes=[n for n in q.per_channel_nodes if n not in worst])
        if len(worst) >= min(limit, len(ranked)):
            return
        k *= 2


def _culprits(job, stages: Stages, recipe, onnx: Path, onnx_key: str) -> dict:
    """Why the gate failed: when the FP32 export of a pruned model already misses it, the pruning is to blame
    and no node kept in float can help; otherwise the quantized nodes ranked by their isolated damage."""
    if recipe.prune is not None:
        fp32 = _verify(job, stages, recipe, onnx)
        if not fp32["passed"]:
            return {"diagnosis": "pruning", "nodes": [], "note": "the pruned model misses the gate before "
                    "quantization: keeping nodes in float cannot recover it"}
    from edgekit.compress.culprits import rank_culprits

    c = job["culprits"]
    key = stage_key("culprits", onnx_key, recipe.quantize.replace(exclude_nodes=[]).to_section(), c["data_key"],
                    c["samples"])
    ranking = stages.record("culprits", key, lambda: rank_culprits(
        onnx, recipe.quantize, c["data"], task=recipe.task, text_column=c.get("text_column"),
        samples=c["samples"]).to_dict())
    return {"diagnosis": "quantization", **{k: ranking.get(k) for k in ("distance", "samples", "seconds")},
            "data": c["data"], "nodes": [{k: n.get(k) for k in ("name", "op_type", "layer", "error", "top1_flips")}
                                         for n in ranking.get("nodes", [])]}


def _bench(job: dict, ref: Path, model: Path) -> dict:
    """The candidate timed interleaved with the reference (the original's FP32 export) in one run, in this
    worker, on its cores: the ratio is what trials are compared by (absolute figures drift on a shared
    machine; a ratio measured in one interleaved run does not)."""
    from edgekit.benchmarks.bench import BenchConfig

    cfg = BenchConfig.model_validate(job["bench"])
    if job.get("decoder"):
        from edgekit.benchmarks.decode import bench_decoders

        r = bench_decoders([ref, model], cfg).to_dict()
        base, cand = r["variants"]
        return {"tokens_per_s": cand["decode_tokens_per_s_p50"], "reference_tokens_per_s": base["decode_tokens_per_s_p50"],
                "tpot_ratio": base["decode_tokens_per_s_p50"] / cand["decode_tokens_per_s_p50"],
                "ttft_ms": cand["ttft_p50_ms"], "reference_ttft_ms": base["ttft_p50_ms"],
                "ttft_ratio": cand["ttft_p50_ms"] / base["ttft_p50_ms"], "rss_peak_bytes": cand["peak_rss_bytes"],
                "reference_rss_peak_bytes": base["peak_rss_bytes"]}
    from edgekit.benchmarks.bench import bench

    r = bench([ref, model], cfg).to_dict()
    base, cand = r["variants"]
    return {"p50_ms": cand["latency"]["p50_ms"], "p90_ms": cand["latency"]["p90_ms"],
            "reference_p50_ms": base["latency"]["p50_ms"],
            "latency_ratio": cand["latency"]["p50_ms"] / base["latency"]["p50_ms"],
            "rss_peak_bytes": cand["rss_peak_bytes"], "reference_rss_peak_bytes": base["rss_peak_bytes"]}
