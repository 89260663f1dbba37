"""MODEL_CARD.md, generated from the release manifest alone (so it says nothing the manifest does not)."""

from __future__ import annotations

from edgekit.reports import fmt_bytes, md_table


def _metrics(acc: dict) -> str:
    rows = [[k, acc["original_metrics"][k], acc["candidate_metrics"].get(k),
             (acc["candidate_metrics"].get(k) or 0) - acc["original_metrics"][k]] for k in acc.get("original_metrics") or {}]
    rows += [[k, None, val, None] for k, val in (acc.get("agreement") or {}).items()]
    return md_table(["metric", "original", "this model", "delta"], rows)


def _bench(entry: dict) -> str:
    env = entry.get("environment") or {}
    libs = ", ".join(f"{k} {v}" for k, v in (env.get("libraries") or {}).items() if v)
    inputs = entry.get("inputs") or {}
    if entry.get("kind") == "decode":
        table = md_table(["variant", "TTFT p50 ms", "TTFT p90 ms", "decode tokens/s p50", "tokens/s p90", "peak RSS",
                          "size", "KV cache"],
                         [[v["name"], v["ttft_p50_ms"], v["ttft_p90_ms"], v["decode_tokens_per_s_p50"],
                           v["decode_tokens_per_s_p90"], fmt_bytes(v["peak_rss_bytes"]), fmt_bytes(v["size_bytes"]),
                           fmt_bytes(v["kv_cache_bytes"]) if v.get("kv_cache_bytes") else "-"] for v in entry["variants"]])
        described = (f"batch 1, {inputs.get('prompts')} ({inputs.get('prompt_tokens')} tokens), "
                     f"{inputs.get('new_tokens')} new tokens, {inputs.get('generations')} generations per variant")
    else:
        table = md_table(["variant", "p50 ms", "p90 ms", "p99 ms", "samples/s", "peak RSS", "size"],
                         [[v["name"], v["latency"]["p50_ms"], v["latency"]["p90_ms"], v["latency"]["p99_ms"],
                           v["throughput_samples_s"], fmt_bytes(v["rss_peak_bytes"]), fmt_bytes(v["size_bytes"])]
                          for v in entry["variants"]])
        described = inputs.get("description", "?")
    return "\n\n".join([
        f"### {entry['device']}: {env.get('cpu_model', '?')}",
        table,
        f"Inputs: {described}. Method: {entry.get('method')}.",
        f"Machine: {env.get('logical_cores')} logical cores, {env.get('threads')} threads, "
        f"ISA {', '.join(env.get('isa_flags') or [])}; {libs}.",
    ])


def pruning_section(p: dict) -> list[str]:
    """The card's pruning section: a row per original layer, a removed layer said to be removed."""
    return ["## Pruning", f"Criterion {p.get('criterion')}; FLOPs {p.get('flops_before')} -> {p.get('flops_after')}.",
            md_table(["layer", "heads kept", "FFN neurons kept"],
                     [[x.get("layer", i), *(["removed"] * 2 if x.get("removed") else [x["heads_kept"], x["neurons_kept"]])]
                      for i, x in enumerate(p.get("layers") or [])])]


def model_card(m: dict) -> str:
    import yaml

    acc, gates, q = m.get("accuracy"), m["gates"], m["quantization"]
    status = "PASSED" if m["passed"] else "FAILED (released with --allow-failed)"
    parts = [
        f"# {m['name']}",
        f"{m['task']} model compressed by edgekit {m['edgekit_version']}: "
        f"{'INT8 (' + q['mode'] + ')' if not q.get('weight_bits') else q['mode'].replace('int4', 'INT4')} ONNX for "
        "onnxruntime. "
        f"Accuracy gate: **{status}**.",
        "## Files",
        md_table(["model", "path", "size", "sha256"],
                 [[k, x["path"], fmt_bytes(x["size_bytes"]), f"`{x['sha256']}`"] for k, x in m["models"].items()]),
        "`manifest.json` lists the sha256 and size of every file of this bundle. Check them with "
        f"`edgekit release verify {m['name']}` (or `{m['name']}.tar.gz`), or load with `edgekit.release.load_bundle`, "
        "which checks them first. The hashes guard against damage, not against someone who can also edit the "
        "manifest: publish the tarball's sha256 beside it, or sign the manifest (`edgekit release build --sign KEY`, "
        "checked by `edgekit release verify --public-key PUB.pem`) for that.",
        "## Source",
        f"Checkpoint `{m['source']['checkpoint']}`, content hash `{m['source']['sha256']}` over {m['source']['files']} "
        f"files ({m['source']['hash_method']}). Exported at opset {m['export']['opset']} "
        f"(max |ONNX - PyTorch| {m['export']['max_abs_diff']:.3g}, tolerance {m['export']['atol']:g}).",
        "## Accuracy against the original",
    ]
    if acc:
        data = acc.get("data") or {}
        parts += [f"{acc['n_examples']} examples from `{data.get('path')}` (sha256 `{data.get('sha256')}`), "
                  f"original on {acc['runtimes']['original']}, this model on {acc['runtimes']['candidate']}.",
                  _metrics(acc),
                  md_table(["gate check", "value", "threshold", "result"],
                           [[c["name"], c["value"], f"{c['comparison']} {c['threshold']}",
                             "pass" if c["passed"] else "**FAIL**"] for c in gates["checks"]])]
    else:
        parts.append("**Not verified**: the run had no evaluation data (compress without --data).")
    parts.append("## Quantization")
    # quantize reports each node kept in float as {"name", "op_type"} (static mode lists some; dynamic usually none)
    floats = ", ".join(f"`{n['name']}` ({n['op_type']})" if isinstance(n, dict) else f"`{n}`"
                       for n in q["nodes_in_float"] or []) or "none"
    if q.get("weight_bits"):
        parts.append("Weight matrices: " + ", ".join(f"{len(v)} at {k} bits" if k != "float" else f"{len(v)} in float"
                                                     for k, v in q["weight_bits"].items() if v) + ".")
    parts.append(f"{q['quantized_nodes']} nodes quantized; compute nodes kept in float: {floats}. "
                 f"Fused first: {', '.join(f'{k} x{v}' for k, v in (q.get('fused') or {}).items()) or 'nothing'}. "
                 f"Size {fmt_bytes(q['size_before'])} -> {fmt_bytes(q['size_after'])}.")
    if m.get("pruning"):
        parts += pruning_section(m["pruning"])
    parts.append("## Speed")
    parts += [_bench(b) for b in m["bench"]] or ["Not benchmarked (compress ran with --no-bench)."]
    if m.get("devices"):
        parts += ["## Target devices", md_table(["device", "fits", "detail"],
                                                [[d["name"], {True: "yes", False: "**no**", None: "?"}[d["fits"]], d["detail"]]
                                                 for d in m["devices"]])]
    repro = m["reproducibility"]
    parts += ["## Reproducibility", "Byte-identical when rebuilt from the same checkpoint and recipe:",
              "\n".join(f"- {x}" for x in repro["byte_identical"]), "Not byte-identical, and why:",
              "\n".join(f"- {x}" for x in repro["not_byte_identical"])]
    if m.get("recipe"):
        parts += ["## Recipe", "Run it again with `edgekit compress --recipe edgekit.yaml -o run`:",
                  "```yaml\n" + yaml.safe_dump(m["recipe"], sort_keys=False, default_flow_style=False) + "```"]
    parts.append(f"Libraries at release: {', '.join(f'{k} {v}' for k, v in m['libraries'].items() if v)}.")
    return "\n\n".join(parts) + "\n"
