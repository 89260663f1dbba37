"""Decoder speed on this CPU: the SmolLM2-135M architecture (its published config.json, random weights, as
optimum-benchmark's no-weights mode does: dense kernels do not depend on weight values), exported and quantized
by edgekit, against Optimum's dynamic INT8 (ORTQuantizer, the preset for this CPU) on the same export.

Every variant goes through ``edgekit bench`` (``edgekit.api.bench_decoders``): batch 1, the same synthetic
prompt, greedy, no stop at EOS, one process per variant, same threads, interleaved one generation at a time.

    python benchmarks/decoder_speed.py [--prompt-len 128] [--new-tokens 128] [--generations 5] [--work DIR]
Writes benchmarks/results/decoder_speed.json and prints a Markdown table (accuracy: benchmarks/tinystories_lm.py).
With onnxruntime-genai installed (0.11.4), its builder's INT4 joins as a second
peer, its graph run by the same decode loop as every other variant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _common import add_common_args, edgekit_int4_on_genai, genai_builder_int4  # noqa: E402

# huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json (the fields that shape the compute)
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0, "attention_bias": False, "mlp_bias": False,
}


def checkpoint(work: Path) -> Path:
    out = work / "smollm2-135m-random"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_decoders import tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in SMOLLM2_135M.items() if k != "architectures"}))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer().save_pretrained(tmp)  # only loaded, never used: the prompt is synthetic token ids
    tmp.rename(out)
    return out


def optimum_int8(onnx_dir: Path, out: Path, vnni: bool) -> Path:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    if (out / "config.json").is_file():
        return out
    preset = AutoQuantizationConfig.avx512_vnni if vnni else AutoQuantizationConfig.avx2
    q = ORTQuantizer.from_pretrained(onnx_dir, file_name="model.onnx")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    q.quantize(save_dir=tmp, quantization_config=preset(is_static=False, per_channel=False))
    (tmp / "model_quantized.onnx").rename(tmp / "model.onnx")  # the name edgekit and ORTModel look for first
    for f in onnx_dir.iterdir():  # config and tokenizer beside the model, as edgekit's folders have them
        if f.suffix == ".json" and f.name not in ("edgekit.json", "export_report.json") or f.name.startswith("tokenizer"):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--generations", type=int, default=5)
    add_common_args(ap, "decoder-speed")
    args = ap.parse_args(argv)
    from edgekit import api
    from edgekit.benchmarks.environment import environment

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = checkpoint(work)
    onnx_dir, int8, int4 = work / "onnx", work / "int8", work / "int4"
    if not (onnx_dir / "model.onnx").is_file():
        api.export(ckpt, onnx_dir, api.ExportConfig(atol=1e-3))
    if not (int8 / "model.onnx").is_file():
        api.quantize(onnx_dir, int8, api.QuantizeConfig())
    if not (int4 / "model.onnx").is_file():
        api.quantize(onnx_dir, int4, api.QuantizeConfig(bits=4))
    env = environment(args.threads)
    vnni = bool(set(env["isa_flags"]) & {"avx512_vnni", "avx_vnni"})
    peer = optimum_int8(onnx_dir, work / "optimum-int8", vnni)
    cfg = api.BenchConfig(prompt_len=args.prompt_len, new_tokens=args.new_tokens, generations=args.generations,
                          threads=args.threads)
    builder = genai_builder_int4(ckpt, work / "genai-int4", work / "builder.log")
    extra, extra_names = [], []
    if builder:  # edgekit's INT4 on the builder's FP32 graph: `export --exporter genai`, then `quantize --bits 4`
        extra, extra_names = [builder, edgekit_int4_on_genai(api, ckpt, work)], [
            "onnxruntime-genai 0.11.4 builder INT4 (-p int4 -e cpu, acc. level 4; peer)",
            "edgekit INT4 on `export --exporter genai` (acc. level 4)"]
    models = [onnx_dir, int8, int4, peer] + extra
    report = api.bench_decoders(models, cfg)
    d = report.to_dict()
    names = ["ORT FP32 (edgekit export)", "edgekit INT8 (dynamic)", "edgekit INT4 (MatMulNBits, acc. level 4)",
             f"Optimum INT8 ({'avx512_vnni' if vnni else 'avx2'} preset, peer)"] + extra_names
    for v, n in zip(d["variants"], names):
        v["name"] = n
    d["seconds_total"] = time.perf_counter() - t0
    d["model"] = "SmolLM2-135M architecture, random weights"
    out = HERE / "results" / "decoder_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(d, indent=2))
    peer_v = d["variants"][3]  # ratios against Optimum INT8; the builder's row says how it compares too
    print(f"{d['model']}; {env['cpu_model']} ({', '.join(env['isa_flags'])}); {args.threads} threads; batch 1, "
          f"{args.prompt_len}-token prompt, {args.new_tokens} new tokens, {args.generations} generations per variant\n")
    print("| variant | TTFT p50 ms | decode tok/s p50 | tok/s vs peer | TTFT vs peer | peak RSS MiB | size MiB |")
    print("|---|---|---|---|---|---|---|")
    for v in d["variants"]:
        print(f"| {v['name']} | {v['ttft_p50_ms']:.0f} | {v['decode_tokens_per_s_p50']:.1f} | "
              f"{v['decode_tokens_per_s_p50'] / peer_v['decode_tokens_per_s_p50']:.2f}x | "
              f"{v['ttft_p50_ms'] / peer_v['ttft_p50_ms']:.2f}x | {v['peak_rss_bytes'] / 2**20:.0f} | "
              f"{v['size_bytes'] / 2**20:.0f} |")
    fp32 = d["variants"][0]
    print(f"\nINT4 peak RSS / ORT FP32 peak RSS: {d['variants'][2]['peak_rss_bytes'] / fp32['peak_rss_bytes']:.2f} "
          f"(target <= 0.35); {d['seconds_total']:.0f} s in all")


if __name__ == "__main__":
    main()
