"""Verify for decoder language models: the compressed model against the original on held-out text.

Three measurements, each against the original PyTorch model on the same tokens:
- **perplexity**, sliding window (``max_length`` tokens per window, advancing by ``stride``; every token is
  scored once, with up to ``max_length - stride`` tokens of context before it, as transformers' perplexity
  guide computes it), and its relative increase: the gate ``max_ppl_increase``;
- **next-token top-1 agreement** over the scored tokens: ``min_agreement`` (%);
- **greedy generation** from prompts: the fraction of the first ``new_tokens`` new tokens that are identical
  to the original's before the first difference (``min_generation_match``, %), and the position of that
  first difference.
Written here because no maintained library compares two runtimes' logits token by token this way
(lm-eval-harness scores one model; optimum's evaluators are for encoders).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError

PROMPTS_FROM_DATA = 8  # prompts taken from the data when --prompts is not given
PROMPT_TOKENS = 16  # tokens of each document that make a prompt taken from the data


def read_documents(path, text_column: str | None, limit: int | None, tsv_quoting: bool = False,
                   flag: str = "--data") -> tuple[list[str], str]:
    """Documents of plain text (``.txt``: paragraphs separated by blank lines) or of a text column of a table."""
    from edgekit.data import load_examples
    from edgekit.tasks import TASKS

    p = Path(path)
    if not p.is_file():
        raise EdgekitError(f"the {flag} file {p} does not exist", "check the spelling, or give an absolute path")
    if p.suffix.lower() in (".txt", ".text", ".md"):
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise EdgekitError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})", "save it as UTF-8") from None
        docs = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n") if d.strip()]
        column = "(plain text)"
    else:
        ex = load_examples(p, TASKS["feature-extraction"], text_column, limit=limit, tsv_quoting=tsv_quoting,
                           use_labels=False, flag=flag)
        docs, column = [t for t in ex.texts if str(t).strip()], ex.text_column
    if not docs:
        raise EdgekitError(f"{p} holds no text", f"give {flag} a file with text in it")
    return docs[:limit] if limit else docs, column


def token_stream(tokenizer, docs: list[str]) -> list[int]:
    """The documents as one token stream, each opened by BOS where the tokenizer has one and closed by EOS."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids += ([bos] if bos is not None else []) + tokenizer(d, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
    return ids


def windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window: every position 1..n-1 is scored exactly once."""
    out, prev_end = [], 0
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + max_length, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def log_softmax(x) -> np.ndarray:
    """Log-probabilities over the last axis, in float64 (perplexity here, culprit ranking's distances)."""
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare_perplexity(original, candidate, ids: list[int], max_length: int, stride: int, step=None) -> dict:
    """Perplexity of both models on ``ids`` and the next-token top-1 agreement over the same scored tokens."""
    from edgekit.runtimes.decoder import window_logits

    nll = {"original": 0.0, "candidate": 0.0}
    agree = scored = 0
    for begin, end, first in windows(len(ids), max_length, stride):
        targets = np.asarray(ids[first:end])
        rows = np.arange(first - 1, end - 1) - begin  # logits at position t predict token t + 1
        tops = []
        for name, session in (("original", original), ("candidate", candidate)):
            logits = window_logits(session, ids[begin:end])[rows]
            lp = log_softmax(logits)
            nll[name] -= float(lp[np.arange(len(targets)), targets].sum())
            tops.append(np.argmax(logits, axis=-1))
        agree += int((tops[0] == tops[1]).sum())
        scored += len(targets)
        if step is not None:
            step.advance()
    if not scored:
        raise EdgekitError("the evaluation text is shorter than two tokens", "give --data more text")
    ppl = {k: math.exp(v / scored) for k, v in nll.items()}
    return {"perplexity": ppl, "scored_tokens": scored, "top1_agreement": 100.0 * agree / scored}


def prompts_for(path, docs: list[str], tokenizer, flag: str = "--prompts") -> list[list[int]]:
    """Token ids of each prompt: the lines of ``path``, or the first PROMPT_TOKENS tokens of the first documents."""
    bos = tokenizer.bos_token_id
    head = [bos] if bos is not None else []
    if path:
        p = Path(path)
        if not p.is_file():
            raise EdgekitError(f"the {flag} file {p} does not exist", "check the spelling, or give an absolute path")
        lines = [line.strip() for line in p.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if not lines:
            raise EdgekitError(f"{p} holds no prompts", "write one prompt per line")
        return [head + tokenizer(line, add_special_tokens=False)["input_ids"] for line in lines]
    out = []
    for d in docs[:PROMPTS_FROM_DATA]:
        ids = tokenizer(d, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
        if ids:
            out.append(head + ids)
    return out


def compare_generation(original, candidate, prompts: list[list[int]], new_tokens: int, step=None) -> dict:
    """Greedy continuations of both models: the share of new tokens identical before the first difference."""
    from edgekit.runtimes.decoder import greedy

    matched, first_diff, samples = [], [], []
    for p in prompts:
        a = greedy(original, p, new_tokens)["tokens"]
        b = greedy(candidate, p, new_tokens)["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        matched.append(same / max(len(a), 1))
        first_diff.append(same if same < len(a) else None)
        samples.append({"prompt_tokens": len(p), "identical_prefix": same, "original": a, "candidate": b})
        if step is not None:
            step.advance()
    return {"generation_match": 100.0 * float(np.mean(matched)), "prompts": len(prompts), "new_tokens": new_tokens,
            "first_difference": first_diff, "samples": samples}
