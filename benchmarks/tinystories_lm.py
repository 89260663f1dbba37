"""Decoder accuracy on real text: a ~10M-parameter Llama-architecture model trained here on TinyStories, then
exported, quantized and verified by edgekit against itself (perplexity on held-out text, next-token agreement,
greedy generation), beside Optimum's dynamic INT8 (ORTQuantizer, the preset for this CPU) on the same export.

The model: byte-level BPE (8192 tokens, trained with `tokenizers` on ../shared/data/tinystories/train.txt), 6
layers, hidden 320, 5 heads; trained for ``--minutes`` (default 20) on 2 cores with AdamW and a cosine schedule,
cached under $EDGEKIT_CACHE/tinystories-llama (delete it to train again). Every figure comes from `edgekit
verify` (`edgekit.api.verify`) on ../shared/data/tinystories/valid.txt.

    python benchmarks/tinystories_lm.py [--minutes 20] [--max-length 256] [--stride 128] [--seed 0] [--work DIR]
Writes benchmarks/results/tinystories_lm.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _common import add_common_args, edgekit_int4_on_genai, genai_builder_int4, optimum_export  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data" / "tinystories"
CONFIG = {"vocab_size": 8192, "hidden_size": 320, "intermediate_size": 864, "num_hidden_layers": 6,
          "num_attention_heads": 5, "num_key_value_heads": 5, "max_position_embeddings": 512,
          "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
SEQ, BATCH = 256, 16


def tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CONFIG["vocab_size"], special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(DATA / "train.txt")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(out)
    return fast


def train(out: Path, minutes: float, threads: int, seed: int = 0) -> Path:
    """Train and save the checkpoint (atomically: a .partial folder renamed at the end)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(HERE.parent))
    from edgekit import lm_eval

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = tokenizer(tmp)
    docs, _ = lm_eval.read_documents(DATA / "train.txt", None, None)
    ids = torch.tensor(lm_eval.token_stream(tok, docs))
    n_seq = (len(ids) - 1) // SEQ
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    budget, t0, step, est_steps = minutes * 60, time.perf_counter(), 0, None
    model.train()
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget:
            break
        if step == 5:  # the schedule's length, from the speed of the first steps
            est_steps = int(budget / (elapsed / 5))
        frac = min(step / est_steps, 1.0) if est_steps else 0.0
        for g in opt.param_groups:  # 20 warm-up steps, then cosine to 10%
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        starts = torch.randint(0, n_seq, (BATCH,)) * SEQ
        x = torch.stack([ids[s:s + SEQ] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.3f} ({elapsed:.0f} s)", flush=True)
        step += 1
    model.eval()
    model.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps({"steps": step, "seconds": time.perf_counter() - t0, "seed": seed,
                                                   "tokens": len(ids), "final_loss": loss.item(),
                                                   "parameters": sum(p.numel() for p in model.parameters())}))
    tmp.rename(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="the training's seed (another seed: another model, its "
                                                         "results in tinystories_lm_seed<N>.json)")
    add_common_args(ap, "tinystories-llama")
    args = ap.parse_args(argv)
    if args.seed and args.work == ap.get_default("work"):  # another seed's model is cached beside the first
        args.work = args.work.with_name(f"{args.work.name}-seed{args.seed}")
    sys.path.insert(0, str(HERE.parent))
    from decoder_speed import optimum_int8
    from edgekit import api
    from edgekit.benchmarks.environment import environment

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "model"
    if not (ckpt / "config.json").is_file():
        train(ckpt, args.minutes, args.threads, args.seed)
    training = json.loads((ckpt / "training.json").read_text())
    env = environment(args.threads)
    vnni = bool(set(env["isa_flags"]) & {"avx512_vnni", "avx_vnni"})
    onnx_dir = work / "onnx"
    if not (onnx_dir / "model.onnx").is_file():
        api.export(ckpt, onnx_dir, api.ExportConfig(atol=1e-3))
    variants = {"ORT FP32": onnx_dir}
    for name, sub, cfg in (("edgekit INT8 (dynamic)", "int8", api.QuantizeConfig()),
                           ("edgekit INT4 (RTN, block 32)", "int4", api.QuantizeConfig(bits=4)),
                           ("edgekit INT4 (RTN, block 32, embeddings float)", "int4-float-embeddings",
                            api.QuantizeConfig(bits=4, embeddings="float")),
                           ("edgekit INT4 (AWQ + scale estimation, NNCF, 64 training texts)", "int4-awq",
                            api.QuantizeConfig(bits=4, method="awq", calibration_data=str(DATA / "train.txt"),
                                               calibration_samples=64))):
        folder = work / sub
        if not (folder / "model.onnx").is_file():
            api.quantize(onnx_dir, folder, cfg)
        variants[name] = folder
    variants[f"Optimum INT8 ({'avx512_vnni' if vnni else 'avx2'} preset, on Optimum's export; peer)"] = optimum_int8(
        optimum_export(ckpt, work / "optimum-onnx"), work / "optimum-int8", vnni)
    builder = genai_builder_int4(ckpt, work / "genai-int4", work / "builder.log")
    if builder:
        variants["onnxruntime-genai 0.11.4 builder INT4 (peer)"] = builder
        variants["edgekit INT4 (RTN) on `export --exporter genai`"] = edgekit_int4_on_genai(api, ckpt, work)
        variants["edgekit INT4 (RTN, `--symmetric --lm-head 4`: the builder's format) on `export --exporter genai`"] = \
            edgekit_int4_on_genai(api, ckpt, work, "int4-genai-sym-head4", symmetric=True, lm_head="4")
        # larger blocks: fewer bytes of scales per weight (5 bits a weight at 32, 4.25 at 128), what decode reads
        for block in (64, 128):
            variants[f"edgekit INT4 (RTN, the builder's format, block {block}) on `export --exporter genai`"] = \
                edgekit_int4_on_genai(api, ckpt, work, f"int4-genai-sym-head4-b{block}", symmetric=True, lm_head="4",
                                      block_size=block)
        variants["edgekit INT4 (AWQ + scale estimation, the builder's format, block 128) on `export --exporter "
                 "genai`"] = edgekit_int4_on_genai(
            api, ckpt, work, "int4-genai-sym-head4-b128-awq", symmetric=True, lm_head="4", block_size=128,
            method="awq", calibration_data=str(DATA / "train.txt"), calibration_samples=64)
        # the builder's format exactly: it keeps the token embeddings in float (edgekit's rows above quantize them)
        variants["edgekit INT4 (RTN, the builder's format exactly: `--embeddings float`) on `export --exporter "
                 "genai`"] = edgekit_int4_on_genai(api, ckpt, work, "int4-genai-exact", symmetric=True, lm_head="4",
                                                   embeddings="float")
        for block in (32, 64, 128):
            variants[f"edgekit INT4 (`--method imatrix`, the builder's format exactly, block {block}) on `export "
                     f"--exporter genai`"] = edgekit_int4_on_genai(
                api, ckpt, work, f"int4-genai-exact-imatrix-b{block}", symmetric=True, lm_head="4", embeddings="float",
                block_size=block, method="imatrix", calibration_data=str(DATA / "train.txt"), calibration_samples=64)
    rows = []
    for name, folder in variants.items():
        vcfg = api.VerifyConfig(data=str(DATA / "valid.txt"), max_length=args.max_length, stride=args.stride,
                                new_tokens=args.new_tokens, threads=args.threads)
        r = api.verify(ckpt, folder, vcfg, api.GateConfig()).to_dict()
        size = sum(f.stat().st_size for f in Path(folder).glob("*.onnx*"))  # the graph and its external data
        rows.append({"variant": name, "perplexity": r["candidate_metrics"]["perplexity"],
                     "original_perplexity": r["original_metrics"]["perplexity"],
                     "increase": r["agreement"]["perplexity_increase"], "top1_agreement": r["agreement"]["top1_agreement"],
                     "generation_match": r["agreement"]["generation_match"], "passed": r["passed"], "size_bytes": size,
                     "scored_tokens": r["data"]["scored_tokens"]})
    result = {"training": training, "environment": env, "args": vars(args) | {"work": str(args.work)}, "rows": rows}
    out = HERE / "results" / ("tinystories_lm.json" if not args.seed else f"tinystories_lm_seed{args.seed}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"Llama-architecture model, {training['parameters'] / 1e6:.1f}M parameters, trained {training['steps']} steps "
          f"in {training['seconds'] / 60:.1f} min on {training['tokens']} TinyStories tokens; {env['cpu_model']}, "
          f"{args.threads} threads. Perplexity on valid.txt ({rows[0]['scored_tokens']} tokens, windows of "
          f"{args.max_length}, stride {args.stride}); torch FP32 perplexity {rows[0]['original_perplexity']:.3f}\n")
    print("| variant | perplexity | increase vs torch FP32 | next-token agreement | greedy match (32 tokens) | size MiB | gate (+5%) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['perplexity']:.3f} | {100 * r['increase']:+.2f}% | {r['top1_agreement']:.2f}% | "
              f"{r['generation_match']:.1f}% | {r['size_bytes'] / 2**20:.1f} | {'pass' if r['passed'] else 'FAIL'} |")


if __name__ == "__main__":
    main()
