"""Decoder language models with a KV cache, behind one small interface for the ONNX graph and the original.

``DecoderSession.forward(ids, mask, past) -> (logits, past)`` is the one call: a prefill is a forward with an
empty cache, a decode step a forward of one token with the cache it returned. Export's validation, verify
(perplexity, next-token agreement, greedy generation), ``edgekit generate`` and the decoder benchmark all go
through it, so what is verified is how the model runs when it ships.

The ONNX side is the graph optimum-onnx writes for ``text-generation-with-past``: inputs ``input_ids``,
``attention_mask``, (``position_ids``,) ``past_key_values.N.key/value`` of shape [batch, kv_heads, past, head_dim];
outputs ``logits`` and ``present.N.key/value``. Written here rather than through Optimum's
``ORTModelForCausalLM`` because that class runs generation through torch tensors and transformers'
``generate``, so a benchmark could not time the runtime's call alone; the tests load the same folders with
``ORTModelForCausalLM`` to show that a client no one here wrote reads them.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.runtimes.base import ONNX_NAME, onnx_file

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."


def position_ids(mask: np.ndarray, new: int) -> np.ndarray:
    """Positions of the last ``new`` tokens under ``mask`` (left padding counts no position), as transformers'
    generate computes them."""
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    return pos[:, -new:].astype(np.int64)


class DecoderSession(abc.ABC):
    """What every decoder runtime provides (OrtDecoder, TorchDecoder)."""

    name: str
    vocab_size: int
    max_positions: int | None

    @abc.abstractmethod
    def forward(self, ids: np.ndarray, mask: np.ndarray, past):
        """(logits [batch, new tokens, vocab], the cache to pass to the next call)."""

    def empty_past(self, batch: int):
        return None


@dataclass
class OrtDecoder(DecoderSession):
    """An exported decoder-with-past on onnxruntime (CPU here; the providers of ort_runtime elsewhere)."""

    path: Path
    threads: int | None = None
    device: str = "cpu"
    name: str = "onnxruntime"
    max_positions: int | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        from edgekit.runtimes.ort_runtime import load_onnxruntime

        f = onnx_file(Path(self.path))
        # the one session factory (providers, threads, spinning off, load errors told apart)
        self.session = load_onnxruntime(f, self.device, self.threads, task="text-generation").info["session"]
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs or not any(n.startswith(PAST_PREFIX) for n in inputs):
            raise EdgekitError(f"{f} is not a decoder with a KV cache (no past_key_values inputs)",
                               "export the checkpoint with edgekit export (text-generation models get a cache)")
        self.input_names = list(inputs)
        self.past_names = [n for n in inputs if n.startswith(PAST_PREFIX)]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_dtype = np.float16 if inputs[self.past_names[0]].type == "tensor(float16)" else np.float32
        shape = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        if not (isinstance(shape[1], int) and isinstance(shape[3], int)):
            raise EdgekitError(f"{f}: the cache inputs have no fixed head count and size ({shape})",
                               "export the checkpoint again with edgekit export")
        self.kv_heads, self.head_dim = shape[1], shape[3]
        self.vocab_size = self.session.get_outputs()[0].shape[-1]

    def empty_past(self, batch: int) -> dict:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), self.past_dtype) for n in self.past_names}

    def feed(self, ids: np.ndarray, mask: np.ndarray, past: dict) -> dict:
        """Everything the graph takes, as arrays (the part a benchmark does not time)."""
        f = {"input_ids": np.ascontiguousarray(ids, np.int64), "attention_mask": np.ascontiguousarray(mask, np.int64)}
        if "position_ids" in self.input_names:
            f["position_ids"] = position_ids(mask, ids.shape[1])
        f.update(past)
        return f

    def run_feed(self, feed: dict):
        """Only the runtime's call: (logits, the cache for the next step)."""
        outs = self.session.run(None, feed)
        present = {PAST_PREFIX + n[len(PRESENT_PREFIX):]: v for n, v in zip(self.output_names, outs)
                   if n.startswith(PRESENT_PREFIX)}
        return outs[0], present

    def forward(self, ids, mask, past):
        return self.run_feed(self.feed(ids, mask, past if past is not None else self.empty_past(len(ids))))

    def kv_bytes(self, length: int, batch: int = 1) -> int:
        """Bytes of the cache at ``length`` tokens."""
        return len(self.past_names) * batch * self.kv_heads * length * self.head_dim * np.dtype(self.past_dtype).itemsize


@dataclass
class TorchDecoder(DecoderSession):
    """The original checkpoint on PyTorch (FP32), with transformers' own cache."""

    model: object
    name: str = "torch-fp32"
    max_positions: int | None = None

    def __post_init__(self):
        self.vocab_size = self.model.config.vocab_size

    def forward(self, ids, mask, past):
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
                             attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
                             position_ids=torch.from_numpy(position_ids(np.asarray(mask), ids.shape[1])),
                             past_key_values=past, use_cache=True)
        return out.logits.float().numpy(), out.past_key_values


def load_decoder(artifact, threads: int | None = None, device: str = "cpu") -> DecoderSession:
    """A decoder session for an exported folder (ONNX) or an opened text-generation checkpoint (torch)."""
    from edgekit.checkpoint import Checkpoint, load_model
    from edgekit.tasks import is_decoder, max_positions

    if isinstance(artifact, Checkpoint):
        if not is_decoder(artifact.task):
            raise EdgekitError(f"{artifact.path} is a {artifact.task.name} model, so it does not generate text",
                               "give a text-generation checkpoint (*ForCausalLM) or its export")
        if threads:
            import torch

            torch.set_num_threads(threads)
        return TorchDecoder(load_model(artifact), max_positions=max_positions(artifact.config))
    folder = Path(artifact)
    cfg = folder / "config.json"
    limit = None
    if cfg.is_file():
        import json

        limit = max_positions(json.loads(cfg.read_text(encoding="utf-8")))
    if not (folder / ONNX_NAME).is_file() and not folder.suffix == ".onnx":
        raise EdgekitError(f"{folder} holds no {ONNX_NAME}", "point at a folder written by edgekit export or quantize")
    return OrtDecoder(folder, threads, device, max_positions=limit)


def open_decoder(path, threads: int | None = None, device: str = "cpu", trust_remote_code: bool = False):
    """(session, what was opened: a Checkpoint or the export's folder) for a folder the user named: a checkpoint
    or adapter (opened with the checkpoint rules, run on torch) or an export (onnxruntime)."""
    from edgekit.adapters import is_adapter
    from edgekit.checkpoint import open_checkpoint
    from edgekit.runtimes.base import artifact_kind

    p = Path(path)
    if not p.is_dir():
        raise EdgekitError(f"{p} is not a folder", "give a decoder checkpoint folder or its edgekit export")
    if is_adapter(p) or artifact_kind(p) == "checkpoint":
        ckpt = open_checkpoint(p, None, trust_remote_code)
        return load_decoder(ckpt, threads=threads), ckpt
    return load_decoder(p, threads=threads, device=device), p


def check_length(session: DecoderSession, n: int, what: str) -> None:
    if session.max_positions and n > session.max_positions:
        raise EdgekitError(f"{what} is {n} tokens, longer than the model's context of {session.max_positions}",
                           "shorten it, or lower --new-tokens / --max-length")


def greedy(session: DecoderSession, prompt: list[int], new_tokens: int, eos: int | None = None,
           on_token=None) -> dict:
    """Greedy continuation of one prompt with the cache: {"tokens", "ttft_s", "step_s": per decode step}."""
    check_length(session, len(prompt) + new_tokens, "the prompt plus --new-tokens")
    ids = np.asarray([prompt], np.int64)
    mask = np.ones_like(ids)
    t0 = time.perf_counter()
    logits, past = session.forward(ids, mask, session.empty_past(1))
    out, steps = [int(np.argmax(logits[0, -1]))], []
    ttft = time.perf_counter() - t0
    if on_token:
        on_token(out[-1])
    while len(out) < new_tokens and (eos is None or out[-1] != eos):
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        t = time.perf_counter()
        logits, past = session.forward(np.asarray([[out[-1]]], np.int64), mask, past)
        steps.append(time.perf_counter() - t)
        out.append(int(np.argmax(logits[0, -1])))
        if on_token:
            on_token(out[-1])
    return {"tokens": out, "ttft_s": ttft, "step_s": steps}


def window_logits(session: DecoderSession, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] of one window in one prefill (no cache carried in)."""
    a = np.asarray([ids], np.int64)
    return session.forward(a, np.ones_like(a), session.empty_past(1))[0][0]
