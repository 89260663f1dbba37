"""Decoder speed on this CPU: the SmolLM2-135M and Qwen2.5-0.5B architectures (their published config.json,
random weights, as optimum-benchmark's no-weights mode does: dense kernels do not depend on weight values), exported
and quantized by edgekit, against Optimum's dynamic INT8 (ORTQuantizer, the preset for this CPU) on the same export.

Every variant goes through ``edgekit bench`` (``edgekit.api.bench_decoders``): batch 1, the same synthetic
prompt, greedy, no stop at EOS, one process per variant, same threads, interleaved one generation at a time.
Beside each variant: the physical ceiling of this machine, its memory bandwidth (measured by the script: numpy
reading a buffer far larger than the caches, in as many threads as the variants get) over the bytes one decode
step must read (the weights the graph's matrix products read, plus the KV cache at the mean length).

    python benchmarks/decoder_speed.py [--arch smollm2-135m|qwen2.5-0.5b|all] [--prompt-len 128]
        [--new-tokens 128] [--generations 5] [--work DIR]
Writes benchmarks/results/decoder_speed.json (SmolLM2-135M) or decoder_speed_<arch>.json and prints a Markdown
table per architecture (accuracy: benchmarks/tinystories_lm.py). With onnxruntime-genai installed (0.11.4), its
builder's INT4 joins as a second peer, its graph run by the same decode loop as every other variant.
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
DATA = HERE.parent.parent / "shared" / "data" / "tinystories"
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _common import add_common_args, edgekit_int4_on_genai, genai_builder_int4, optimum_export  # noqa: E402

# huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json (the fields that shape the compute)
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0, "attention_bias": False, "mlp_bias": False,
}


# huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json (the fields that shape the compute; Qwen2 has QKV biases)
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151643, "sliding_window": 32768,
    "max_window_layers": 24, "use_sliding_window": False,
}
ARCHS = {"smollm2-135m": ("SmolLM2-135M", SMOLLM2_135M), "qwen2.5-0.5b": ("Qwen2.5-0.5B", QWEN25_05B)}


def checkpoint(work: Path, arch: str) -> Path:
    out = work / f"{arch}-random"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny_decoders import tokenizer

    published = ARCHS[arch][1]
    torch.manual_seed(0)
    config = AutoConfig.for_model(published["model_type"],
                                  **{k: v for k, v in published.items() if k not in ("architectures", "model_type")})
    model = AutoModelForCausalLM.from_config(config)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer().save_pretrained(tmp)  # only loaded, never used: the prompt is synthetic token ids
    tmp.rename(out)
    return out


def memory_bandwidth(threads: int, size: int = 512 * 2**20, repeats: int = 5) -> dict:
    """This machine's memory bandwidth in GB/s: numpy reading (an OR-reduction of 64-bit words: the least compute
    per byte of numpy's reductions, so the memory is what limits it; a float sum measured 15% slower here) and
    copying (read + write) a buffer far larger than the caches, split over ``threads`` threads (numpy releases
    the GIL inside its loops), best of ``repeats``. The pages are written once first, so no page fault is timed.
    What numpy reaches is a lower bound of what the memory can stream: a kernel that streams better can pass
    the ceiling derived from it."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    src = np.ones(size // 8, np.uint64)
    dst = np.zeros_like(src)
    cuts = [(i * len(src) // threads, (i + 1) * len(src) // threads) for i in range(threads)]

    def best(fn) -> float:
        with ThreadPoolExecutor(threads) as pool:
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                list(pool.map(fn, cuts))
                times.append(time.perf_counter() - t)
        return min(times)

    read = best(lambda c: np.bitwise_or.reduce(src[c[0]:c[1]]))
    copy = best(lambda c: np.copyto(dst[c[0]:c[1]], src[c[0]:c[1]]))
    return {"read_gb_s": size / read / 1e9, "copy_gb_s": 2 * size / copy / 1e9, "buffer_bytes": size,
            "threads": threads, "method": f"numpy OR-reduce / copyto over {size / 2**20:.0f} MiB in {threads} "
                                          f"threads, best of {repeats}"}


def weight_bytes_per_token(folder: Path) -> int:
    """Bytes of weights one decode step reads: every initializer the graph consumes, except the tables it only
    gathers rows from (the token embeddings: one row per token). A tied table that a Transpose also feeds to the
    lm_head is read whole, once."""
    import numpy as np
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    nibbles = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    size = {i.name: (int(np.prod(i.dims)) + 1) // 2 if i.data_type in nibbles else
            int(np.prod(i.dims)) * onnx.helper.tensor_dtype_to_np_dtype(i.data_type).itemsize for i in graph.initializer}
    gathered = {"Gather": (0,), "GatherBlockQuantized": (0, 1, 2)}  # data (and its scales, zero points)
    read = {name for node in graph.node for k, name in enumerate(node.input)
            if name in size and k not in gathered.get(node.op_type, ())}
    return sum(size[n] for n in read)


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


def variants(api, arch: str, work: Path, vnni: bool) -> tuple[list, list]:
    """(folders, names) of the variants for one architecture, exported and quantized once (cached in ``work``)."""
    ckpt = checkpoint(work, arch)
    onnx_dir, int8, int4 = work / "onnx", work / "int8", work / "int4"
    if not (onnx_dir / "model.onnx").is_file():
        api.export(ckpt, onnx_dir, api.ExportConfig(atol=1e-3))
    if not (int8 / "model.onnx").is_file():
        api.quantize(onnx_dir, int8, api.QuantizeConfig())
    if not (int4 / "model.onnx").is_file():
        api.quantize(onnx_dir, int4, api.QuantizeConfig(bits=4))
    peer = optimum_int8(optimum_export(ckpt, work / "optimum-onnx"), work / "optimum-int8", vnni)
    models = [onnx_dir, int8, int4, peer]
    names = ["ORT FP32 (edgekit export)", "edgekit INT8 (dynamic)", "edgekit INT4 (MatMulNBits, acc. level 4)",
             f"Optimum INT8 ({'avx512_vnni' if vnni else 'avx2'} preset, on Optimum's export; peer)"]
    builder = genai_builder_int4(ckpt, work / "genai-int4", work / "builder.log")
    if builder:  # edgekit's INT4 on the builder's FP32 graph: `export --exporter genai`, then `quantize --bits 4`
        models += [builder, edgekit_int4_on_genai(api, ckpt, work),
                   edgekit_int4_on_genai(api, ckpt, work, "int4-genai-sym-head4", symmetric=True, lm_head="4"),
                   edgekit_int4_on_genai(api, ckpt, work, "int4-genai-sym-head4-b128", symmetric=True, lm_head="4",
                                         block_size=128)]
        names += ["onnxruntime-genai 0.11.4 builder INT4 (-p int4 -e cpu, acc. level 4; peer)",
                  "edgekit INT4 on `export --exporter genai` (acc. level 4)",
                  "edgekit INT4 on `export --exporter genai`, `--symmetric --lm-head 4` (the builder's format, "
                  "4-bit embeddings)",
                  "edgekit INT4, the same, `--block-size 128`"]
        # the builder's format exactly (it keeps the embeddings in float) with --method imatrix, the rows
        # benchmarks/tinystories_lm.py measures the accuracy of (calibrated on TinyStories text: the search's values
        # mean nothing on random weights, but the graph, its layout and its bytes are the ones timed)
        for block in (32, 128):
            models.append(edgekit_int4_on_genai(
                api, ckpt, work, f"int4-genai-exact-imatrix-b{block}", symmetric=True, lm_head="4", embeddings="float",
                block_size=block, method="imatrix", calibration_data=str(DATA / "train.txt"), calibration_samples=64))
            names.append(f"edgekit INT4, the builder's format exactly (`--embeddings float`), `--method imatrix`, "
                         f"`--block-size {block}`")
    return models, names


def bench_arch(api, arch: str, args, env: dict, bandwidth: dict) -> dict:
    from edgekit.runtimes.decoder import cache_layout

    t0 = time.perf_counter()
    vnni = bool(set(env["isa_flags"]) & {"avx512_vnni", "avx_vnni"})
    models, names = variants(api, arch, args.work / arch, vnni)
    cfg = api.BenchConfig(prompt_len=args.prompt_len, new_tokens=args.new_tokens, generations=args.generations,
                          threads=args.threads)
    d = api.bench_decoders(models, cfg).to_dict()
    mean_length = args.prompt_len + (args.new_tokens - 1) / 2  # the cache a decode step reads, on average
    for v, name, folder in zip(d["variants"], names, models):
        layout = cache_layout(folder)
        v["name"] = name
        v["bytes_read_per_token"] = {"weights": weight_bytes_per_token(folder),
                                     "kv_cache": round(layout.bytes_at(1) * mean_length) if layout else 0}
        v["ceiling_tokens_per_s"] = bandwidth["read_gb_s"] * 1e9 / sum(v["bytes_read_per_token"].values())
    d["seconds_total"] = time.perf_counter() - t0
    d["model"] = f"{ARCHS[arch][0]} architecture, random weights"
    d["memory_bandwidth"] = bandwidth
    out = HERE / "results" / ("decoder_speed.json" if arch == "smollm2-135m" else f"decoder_speed_{arch}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(d, indent=2))
    return d


def print_table(d: dict, args, env: dict) -> None:
    bw = d["memory_bandwidth"]
    vs = d["variants"]
    peer_v = vs[3]  # Optimum INT8; the builder's INT4 (when installed) is the other peer
    builder = vs[4] if len(vs) > 4 else None
    print(f"\n{d['model']}; {env['cpu_model']} ({', '.join(env['isa_flags'])}); {args.threads} threads; batch 1, "
          f"{args.prompt_len}-token prompt, {args.new_tokens} new tokens, {args.generations} generations per variant")
    print(f"Memory bandwidth measured here: {bw['read_gb_s']:.1f} GB/s read, {bw['copy_gb_s']:.1f} GB/s copy "
          f"({bw['method']}); ceiling = read bandwidth / (weights read + KV cache read per decoded token)\n")
    print("| variant | TTFT p50 ms | decode tok/s p50 | tok/s vs Optimum INT8 | tok/s vs builder INT4 | TTFT vs Optimum "
          "INT8 | peak RSS MiB | RSS vs ORT FP32 | size MiB | MB read per token | ceiling tok/s | of ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v in vs:
        tps = v["decode_tokens_per_s_p50"]
        vs_builder = f"{tps / builder['decode_tokens_per_s_p50']:.2f}x" if builder else "-"
        print(f"| {v['name']} | {v['ttft_p50_ms']:.0f} | {tps:.1f} | {tps / peer_v['decode_tokens_per_s_p50']:.2f}x | "
              f"{vs_builder} | {v['ttft_p50_ms'] / peer_v['ttft_p50_ms']:.2f}x | {v['peak_rss_bytes'] / 2**20:.0f} | "
              f"{v['peak_rss_bytes'] / vs[0]['peak_rss_bytes']:.2f} | {v['size_bytes'] / 2**20:.0f} | "
              f"{sum(v['bytes_read_per_token'].values()) / 1e6:.0f} | {v['ceiling_tokens_per_s']:.1f} | "
              f"{100 * tps / v['ceiling_tokens_per_s']:.0f}% |")
    print(f"\nTargets: edgekit INT4 decode >= 1.0x the builder's, TTFT <= Optimum INT8's, peak RSS <= 0.35x ORT FP32's; "
          f"{d['seconds_total']:.0f} s in all")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=[*ARCHS, "all"], default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--generations", type=int, default=5)
    add_common_args(ap, "decoder-speed")
    args = ap.parse_args(argv)
    from edgekit import api
    from edgekit.benchmarks.environment import environment

    args.work.mkdir(parents=True, exist_ok=True)
    env = environment(args.threads)
    bandwidth = memory_bandwidth(args.threads)  # before any model is loaded: nothing else reads memory then
    for arch in ARCHS if args.arch == "all" else [args.arch]:
        print_table(bench_arch(api, arch, args, env, bandwidth), args, env)


if __name__ == "__main__":
    main()
