"""``POST /v1/completions`` for a text-generation model: OpenAI's request and response shapes, greedy decoding.

Decoding is greedy, the decoding ``edgekit verify`` checked against the original (``--min-generation-match``):
a request asking for sampling (``temperature`` above 0) or several choices (``n`` > 1) is refused rather than
answered with something else than it asked for. A completion runs on its own (no batching across prompts);
with ``stream`` its text is sent as server-sent events as each token is decoded.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass


class _Stopped(Exception):
    """Raised from the token callback when the client has gone: ends the generation."""


@dataclass
class Prompt:
    ids: list
    max_tokens: int
    stop: list
    tokens: int  # prompt tokens, for the request's token limit


def prepare(served, req, cfg, problem) -> Prompt:
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise problem(400, "give one prompt per request (a list of several prompts is not served)",
                          reason="bad_request")
        text = req.prompt[0]
    else:
        text = req.prompt
    if req.n != 1:
        raise problem(400, "n must be 1: the server decodes one greedy continuation", reason="bad_request")
    if req.temperature not in (None, 0, 0.0):
        raise problem(400, "only greedy decoding is served (the decoding edgekit verify checked): send temperature "
                           "0 or leave it out", reason="bad_request")
    if req.max_tokens > cfg.max_new_tokens:
        raise problem(413, f"max_tokens {req.max_tokens} is over this server's limit of {cfg.max_new_tokens}",
                      reason="too_large")
    if not text.strip():
        raise problem(400, "the prompt is empty", reason="bad_request")
    tok = served.tokenizer
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) > cfg.max_tokens:
        raise problem(413, f"the prompt is {len(ids)} tokens, over the limit of {cfg.max_tokens} per request",
                      reason="too_large")
    context = served.session.max_positions
    if context and len(ids) + req.max_tokens > context:
        raise problem(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) is longer than the "
                           f"model's context of {context}", reason="bad_request")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return Prompt(ids, req.max_tokens, [s for s in stop if s], len(ids))


def complete(served, prompt: Prompt, job) -> dict:
    """Greedy continuation (runs in the batcher's worker thread); pieces go to ``job.on_event`` as they come."""
    from edgekit.runtimes.decoder import greedy

    tok, out, sent = served.tokenizer, [], [""]
    finish = ["length"]

    def on_token(t: int) -> None:
        if job is not None and job.cancelled:
            raise _Stopped
        out.append(t)
        text = tok.decode(out, skip_special_tokens=True)  # whole continuation: byte-level pieces join correctly
        cut = min((text.find(s) for s in prompt.stop if s in text), default=-1)
        if cut >= 0:
            text, finish[0] = text[:cut], "stop"
        piece, sent[0] = text[len(sent[0]):], text
        if piece and job is not None and job.on_event is not None:
            job.on_event(piece)
        if cut >= 0:
            raise _Stopped

    eos = tok.eos_token_id
    try:
        with served.lock:
            greedy(served.session, prompt.ids, prompt.max_tokens, eos=eos, on_token=on_token)
    except _Stopped:
        pass
    if finish[0] == "length" and out and eos is not None and out[-1] == eos:
        finish[0] = "stop"
    return {"text": sent[0], "completion_tokens": len(out), "finish_reason": finish[0]}


def response(served, prompt: Prompt, result: dict) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": served.name,
            "choices": [{"text": result["text"], "index": 0, "logprobs": None, "finish_reason": result["finish_reason"]}],
            "usage": {"prompt_tokens": prompt.tokens, "completion_tokens": result["completion_tokens"],
                      "total_tokens": prompt.tokens + result["completion_tokens"]}}


def chunk(cid: str, served, text: str, finish_reason) -> str:
    body = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": served.name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(body)}\n\n"
