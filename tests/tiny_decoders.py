"""Tiny decoder LMs (Llama, Qwen2 and GPT-2 architectures) built from a config and trained for seconds on a
learnable task: counting words cyclically from a random start ("four five six ... three"). After training,
every token but the first word of a document is predictable, so perplexity is near 1 and a damaged model
is far from it."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = "one two three four five six seven eight nine ten".split()
DOC_WORDS = 12


def document(rng: random.Random) -> str:
    k = rng.randrange(len(WORDS))
    return " ".join(WORDS[(k + i) % len(WORDS)] for i in range(DOC_WORDS))


def tokenizer():
    """A byte-level BPE tokenizer trained on the task's words (every word becomes one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])


def config(family: str, vocab: int):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **special)
    if family == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=True, **special)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64, **special)
    raise ValueError(family)


def build(family: str, out: Path, steps: int = 120, seed: int = 0) -> Path:
    """Train the family's tiny model on the counting task and save it with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = tokenizer()
    model = AutoModelForCausalLM.from_config(config(family, len(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        # packed as verify scores its stream: BOS, a document's tokens, EOS, BOS, the next document ...
        rows = [sum(([tok.bos_token_id] + tok(document(rng), add_special_tokens=False)["input_ids"] +
                     [tok.eos_token_id] for _ in range(3)), []) for _ in range(16)]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def damaged(src: Path, dst: Path, scale: float = 1.0, seed: int = 0) -> Path:
    """A copy whose transformer-block weights are perturbed: its perplexity must fail the gate."""
    from helpers import damaged_copy

    return damaged_copy(src, dst, scale, seed, "AutoModelForCausalLM", (".layers.", ".h."))


def write_eval_text(path: Path, docs: int = 24, seed: int = 7) -> Path:
    rng = random.Random(seed)
    path.write_text("\n\n".join(document(rng) for _ in range(docs)) + "\n", encoding="utf-8")
    return path
