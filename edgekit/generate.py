"""``edgekit generate``: a compressed decoder's greedy continuation of a prompt, streamed as it is written, and
with ``compare`` the original's beside it, so that a person can see the model still writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgekit.errors import EdgekitError


@dataclass
class Generation:
    model: str
    runtime: str
    prompt_tokens: int
    tokens: list
    text: str
    ttft_s: float
    decode_tokens_per_s: float | None
    original: dict | None = None  # with compare: the original's tokens and text, and the first difference
    notes: list = field(default_factory=list)


def _tokenizer_of(model) -> object:
    from edgekit.checkpoint import Checkpoint, load_tokenizer

    if isinstance(model, Checkpoint):
        return model.tokenizer
    return load_tokenizer(Path(model))


def generate(model, prompt: str, new_tokens: int = 32, compare=None, threads: int | None = None,
             stop_at_eos: bool = True, trust_remote_code: bool = False, on_token=None) -> Generation:
    """Greedy continuation of ``prompt`` by ``model`` (ONNX folder or checkpoint); ``on_token(text)`` streams it."""
    from edgekit.runtimes.decoder import greedy, open_decoder

    if not prompt.strip():
        raise EdgekitError("the prompt is empty", "give the text to continue")
    if new_tokens < 1:
        raise EdgekitError(f"--new-tokens {new_tokens} generates nothing", "ask for at least 1 new token")
    session, opened = open_decoder(model, threads, trust_remote_code=trust_remote_code)
    tok = _tokenizer_of(opened)
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + \
        tok(prompt, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id if stop_at_eos else None
    streamed = []

    def emit(t):
        if on_token is not None:  # decode the whole continuation each time: byte-level BPE pieces join correctly
            before = tok.decode(streamed, skip_special_tokens=True)
            streamed.append(t)
            on_token(tok.decode(streamed, skip_special_tokens=True)[len(before):])

    out = greedy(session, ids, new_tokens, eos=eos, on_token=emit)
    steps = out["step_s"]
    result = Generation(str(Path(model).resolve()), session.name, len(ids), out["tokens"],
                        tok.decode(out["tokens"], skip_special_tokens=True), out["ttft_s"],
                        len(steps) / sum(steps) if steps and sum(steps) > 0 else None)
    if compare is not None:
        ref = greedy(open_decoder(compare, threads, trust_remote_code=trust_remote_code)[0], ids, new_tokens,
                     eos=eos)["tokens"]
        same = next((i for i, (a, b) in enumerate(zip(ref, out["tokens"])) if a != b), min(len(ref), len(out["tokens"])))
        result.original = {"model": str(Path(compare).resolve()), "tokens": ref,
                           "text": tok.decode(ref, skip_special_tokens=True), "identical_prefix": same}
    return result
