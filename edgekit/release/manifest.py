"""The release manifest: everything a deployer or a CI gate needs to know about a bundle, as one JSON object.

Built from the compress run's ``report.json`` (which stays out of the bundle: its timings and paths are not
reproducible); the ``files`` table is added last by ``edgekit.release``.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.version import __version__
from edgekit.errors import EdgekitError
from edgekit.reports import fmt_bytes

# What was measured here (tests/test_release.py checks the first two on every run of the suite).
MANIFEST_SCHEMA = 1



def check_schema(manifest: dict, where) -> None:
    """Refuse a manifest this edgekit cannot read: no whole-number schema_version, or one from a newer edgekit."""
    v = manifest.get("schema_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise EdgekitError(f"{where} has no valid manifest schema_version (found {v!r})",
                           "use a manifest.json written by `edgekit release build`")
    if v > MANIFEST_SCHEMA:
        raise EdgekitError(f"{where} has manifest schema_version {v}, newer than edgekit {__version__} reads "
                           f"(up to {MANIFEST_SCHEMA})", "upgrade edgekit to read it: pip install --upgrade edgekit-transformers")


REPRODUCIBILITY = {
    "byte_identical": [
        "int8/model.onnx and fp32/model.onnx: two compress runs of the same checkpoint and recipe write the same "
        "bytes (same torch, onnx, onnxruntime and optimum versions, CPU export)",
        "config.json and tokenizer files: copied from the source checkpoint",
        "edgekit.json: rewritten without the run's absolute paths",
        "the .tar.gz of a given bundle: sorted entries, mtime 0, uid/gid 0, gzip header without name or time",
    ],
    "not_byte_identical": [
        "manifest.json and MODEL_CARD.md across runs: they carry measured latency and memory (different on every "
        "run), library versions and the run's absolute paths; for the same run folder they are identical",
        "compress's report.json, report.md and */export_report.json, */quantize_report.json: timings and "
        "paths; left out of the bundle",
        "the models themselves across library versions or export devices: a different torch/onnx/onnxruntime "
        "may write a different graph",
    ],
}


DECODE_FIGURES = ("ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms", "decode_tokens_per_s_p50",
                  "decode_tokens_per_s_p90", "e2e_p50_ms", "generations", "peak_rss_bytes", "kv_cache_bytes")


def _bench_entry(b: dict) -> dict:
    from edgekit.benchmarks.decode import is_decode_report

    env = b.get("environment") or {}
    if is_decode_report(b):  # decoders: time to first token and decode speed
        return {"device": env.get("device", "cpu"), "environment": env, "inputs": b.get("inputs"),
                "method": b.get("method"), "kind": "decode",
                "variants": [{"name": v["name"], "runtime": v.get("runtime"), "size_bytes": v.get("size_bytes"),
                              **{k: v.get(k) for k in DECODE_FIGURES}} for v in b.get("variants", [])]}
    return {
        "device": env.get("device", "cpu"),
        "environment": env,
        "inputs": b.get("inputs"),
        "method": b.get("method"),
        "variants": [{
            "name": v["name"], "runtime": v.get("runtime"), "size_bytes": v.get("size_bytes"),
            "latency": {k: v["latency"].get(k) for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "iterations")},
            "throughput_samples_s": v.get("throughput_samples_s"), "first_call_ms": v.get("first_call_ms"),
            "rss_peak_bytes": v.get("rss_peak_bytes"),
        } for v in b.get("variants", [])],
    }


def _extra_bench(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgekitError(f"the benchmark report {path} could not be read ({e})", "pass a file written by `edgekit bench --json`") from None
    if not isinstance(data, dict) or data.get("kind") != "BenchReport" or "environment" not in data:
        raise EdgekitError(f"{path} is not an edgekit benchmark report", "pass a file written by `edgekit bench --json PATH`")
    return _bench_entry(data)


def _data_info(data: dict) -> dict:
    from edgekit.artifacts import sha256_file

    out = dict(data)
    p = Path(data.get("path") or "")
    out["sha256"] = sha256_file(p) if p.is_file() else None
    return out


def _pruning(report: dict, source: Path) -> dict | None:
    """The pruning summary, one row per ORIGINAL layer (``layer``: its index; ``removed``: the whole layer is
    gone, so it keeps no heads or neurons rather than zero of them)."""
    from edgekit.checkpoint import PRUNING_FILE

    if report.get("prune"):  # compress --prune: the prune report, without its paths and timings
        p = report["prune"]
        return {k: p.get(k) for k in ("criterion", "calibration_samples", "seq_len", "flops_before", "flops_after",
                                      "flops_reduction", "params_before", "params_after", "config")} | {
            "layers": [{"layer": layer.get("layer", i), "removed": bool(layer.get("removed"))}
                       | {k: layer[k] for k in ("heads_kept", "heads_total", "neurons_kept", "neurons_total")}
                       for i, layer in enumerate(p.get("layers", []))]}
    f = source / PRUNING_FILE
    if not f.is_file():
        return None
    spec = json.loads(f.read_text(encoding="utf-8"))
    prov = spec.get("provenance") or {}
    # the spec lists the layers kept, with their original index in kept_layers (schema 2; schema 1 kept all)
    kept = spec.get("kept_layers") or list(range(len(spec.get("layers", []))))
    by_index = dict(zip(kept, spec.get("layers", [])))
    total = int((spec.get("original") or {}).get("layers") or len(kept))
    rows = []
    for i in range(max(total, len(kept))):
        layer = by_index.get(i)
        rows.append({"layer": i, "removed": True, "heads_kept": 0, "neurons_kept": 0} if layer is None else
                    {"layer": i, "removed": False, "heads_kept": len(layer.get("heads_kept", [])),
                     "neurons_kept": layer.get("neurons_kept")})
    return {
        "original": spec.get("original"), "criterion": prov.get("criterion"),
        "flops_before": prov.get("flops_before"), "flops_after": prov.get("flops_after"), "config": prov.get("config"),
        "layers": rows,
    }


def _devices(names: list[str], model_bytes: int) -> list[dict]:
    from edgekit.devices.profiles import check_fits

    out = []
    for name in names:
        try:
            est = check_fits(name, model_bytes)
            out.append({"name": name, "fits": None if est is None else True,
                        "detail": "memory known only at run time" if est is None else
                        f"needs about {fmt_bytes(est.needed_bytes)} of {fmt_bytes(est.usable_bytes)} usable"})
        except EdgekitError as e:
            out.append({"name": name, "fits": False, "detail": e.message})
    return out


def _adapter_record(run: Path) -> dict | None:
    """The LoRA merge record of a run whose checkpoint was an adapter (its export's edgekit.json)."""
    f = run / "onnx" / "edgekit.json"
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("adapter") if f.is_file() else None
    except ValueError:
        return None


def _search(report: dict) -> dict | None:
    """For a run `edgekit search` wrote: its trial, the culprit ranking (worst first) and the nodes kept in float
    or given per-channel scales."""
    rec = report.get("search")
    if not rec:
        return None
    c = rec.get("culprits") or {}
    return {"trial": rec.get("trial"), "recipe_key": rec.get("key"), "diagnosis": c.get("diagnosis"),
            "kept_in_float": c.get("kept_in_float") or [], "per_channel": c.get("per_channel") or [],
            "culprits": [{k: n.get(k) for k in ("name", "op_type", "layer", "error")} for n in (c.get("nodes") or [])]}


def build_manifest(report: dict, run: Path, source: Path, name: str, variants: list[str], files: dict, cfg) -> dict:
    from edgekit.benchmarks.environment import library_versions
    from edgekit.recipe import recipe_from_report
    from edgekit.artifacts import TREE_HASH_METHOD, WEIGHTS_SUFFIXES, tree_sha256

    q, v, e = report["quantize"], report.get("verify"), report["export"]
    models = {}
    for var in variants:
        rel = f"{var}/model.onnx"
        # the weights beside the graph (INT4 writes model.onnx_data): named, hashed and counted in the size
        data = next((f"{rel}{s}" for s in WEIGHTS_SUFFIXES if f"{rel}{s}" in files), None)
        models[var] = {"path": rel, "format": "onnx", "precision": var, "sha256": files[rel]["sha256"],
                       "size_bytes": files[rel]["size"] + (files[data]["size"] if data else 0)}
        if data:
            models[var]["weights"] = {"path": data, "sha256": files[data]["sha256"], "size_bytes": files[data]["size"]}
    models["int8"]["quantization"] = q["mode"]
    if q.get("weight_bits"):  # --bits 4: the variant keeps its folder name, int8/, but says what it holds
        models["int8"]["precision"] = "int4 weight-only"
    src_hash, n_files = tree_sha256(source)
    recipe = recipe_from_report(report)
    accuracy = None
    if v:
        accuracy = {k: v.get(k) for k in ("task", "n_examples", "original_metrics", "candidate_metrics", "agreement",
                                          "runtimes")}
        accuracy["data"] = _data_info(v.get("data") or {})
    bench = ([_bench_entry(report["bench"])] if report.get("bench") else []) + [_extra_bench(p) for p in cfg.bench_reports]
    return {
        "kind": "ReleaseManifest",
        "schema_version": MANIFEST_SCHEMA,
        "name": name,
        "task": (v or {}).get("task") or report["config"].get("task"),
        "passed": bool(report.get("passed")),
        "edgekit_version": __version__,
        "libraries": library_versions(),
        "models": models,
        "source": {"checkpoint": str(source.resolve()), "sha256": src_hash, "files": n_files,
                   "hash_method": TREE_HASH_METHOD, "run": str(run.resolve()),
                   **({"adapter": adapter} if (adapter := _adapter_record(run)) else {})},
        "recipe": recipe.to_dict() if recipe else None,
        "export": {"opset": e.get("opset"), "max_abs_diff": e.get("max_abs_diff"), "atol": e.get("atol")},
        "accuracy": accuracy,
        "gates": {"passed": bool(report.get("passed")), "verified": v is not None, "checks": (v or {}).get("checks", []),
                  "config": (report.get("config") or {}).get("gate")},
        "quantization": {"mode": q["mode"], "quantized_nodes": q.get("quantized_nodes"), "fused": q.get("fused"),
                         "weight_bits": q.get("weight_bits"),
                         "nodes_in_float": q.get("nodes_in_float", []), "float_op_counts": q.get("float_op_counts"),
                         "size_before": q.get("size_before"), "size_after": q.get("size_after")},
        "bench": bench,
        "pruning": _pruning(report, source),
        "search": _search(report),
        "devices": _devices(recipe.devices if recipe else [], models["int8"]["size_bytes"]),
        "reproducibility": REPRODUCIBILITY,
    }
