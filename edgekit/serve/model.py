"""The model a server answers with: a release bundle re-hashed against its manifest before it is loaded (or a
model folder, served as unverified), its session from the one runtime interface (``runtimes.base.load``: the
runtime ``verify`` and ``bench`` measured), and the task's pre- and post-processing.

Pre-processing (``encode``) runs when a request arrives, so that its token count is known before it is queued;
``run_batch`` pads a batch's encodings to its longest with the tokenizer's own ``pad`` and runs them in one
session call, as ``verify`` runs its batches; the post-processing splits the outputs back per text.
"""

from __future__ import annotations

import json
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.errors import CheckFailed, EdgekitError

ENCODER_ENDPOINTS = {"text-classification": "/v1/classify", "token-classification": "/v1/classify",
                     "feature-extraction": "/v1/embeddings", "text-generation": "/v1/completions"}


@dataclass
class Encoded:
    """One text, tokenized: what is queued."""

    features: dict  # input_ids, attention_mask (token_type_ids) as lists
    tokens: int  # after truncation
    truncated: bool
    text: str
    offsets: list | None = None  # token-classification: (start, end) per token
    word_ids: list | None = None


@dataclass
class ServedModel:
    name: str
    task: str
    folder: Path  # the model's folder (a bundle's variant folder)
    session: object  # runtimes.base.Session, or a runtimes.decoder.DecoderSession for text-generation
    tokenizer: object
    max_length: int
    config: dict
    manifest: dict | None = None  # None: a model folder, not a bundle
    files_checked: int = 0
    signature: dict | None = None
    variant: str = "int8"
    _stack: ExitStack | None = None  # holds an extracted tarball's scratch folder
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def verified(self) -> bool:
        return self.manifest is not None

    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): v for k, v in (self.config.get("id2label") or {}).items()}

    @property
    def regression(self) -> bool:
        from edgekit.tasks import is_regression

        return self.task == "text-classification" and is_regression(self.config)

    @property
    def decoder(self) -> bool:
        return self.task == "text-generation"

    # ---- summary for /v1/models and /metrics ---------------------------------------------------------------

    def summary(self) -> dict:
        m = self.manifest
        if m is None:
            return {"verified": False, "task": self.task, "model_folder": str(self.folder)}
        model = m["models"].get(self.variant, {})
        return {"verified": True, "task": self.task, "bundle": m.get("name"), "variant": self.variant,
                "precision": model.get("precision"), "sha256": model.get("sha256"), "size_bytes": model.get("size_bytes"),
                "files_checked": self.files_checked, "signature": (self.signature or {}).get("status"),
                "edgekit_version": m.get("edgekit_version"), "source_sha256": (m.get("source") or {}).get("sha256"),
                "accuracy_gate": {"passed": (m.get("gates") or {}).get("passed"),
                                  "checks": (m.get("gates") or {}).get("checks", [])},
                "bench": [{"device": b.get("device"), "environment": {k: (b.get("environment") or {}).get(k)
                                                                       for k in ("cpu_model", "threads")},
                           "latency_ms": _shipped_latency(b, self.variant)} for b in m.get("bench") or []]}

    def bench_latency_s(self) -> dict | None:
        """p50/p99 (seconds) of the shipped variant in the manifest's first bench entry: the figure the example
        alert compares the served latency with."""
        for b in (self.manifest or {}).get("bench") or []:
            lat = _shipped_latency(b, self.variant)
            if lat:
                return {q: lat[k] / 1000 for q, k in (("0.5", "p50_ms"), ("0.99", "p99_ms")) if lat.get(k) is not None}
        return None

    def close(self) -> None:
        close = getattr(self.session, "close", None)
        if close:
            close()
        if self._stack is not None:
            self._stack.close()

    # ---- encoders ------------------------------------------------------------------------------------------

    def encode(self, texts: list[str]) -> list[Encoded]:
        """Tokenize each text on its own, truncated to the model's maximum length (as verify truncates). One
        tokenizer call for all texts; only those longer than the maximum are tokenized again, truncated."""
        words = self.task == "token-classification"
        kw = {"return_offsets_mapping": words, "return_length": True}
        enc = self.tokenizer(texts, truncation=False, verbose=False, **kw)
        long = [i for i, n in enumerate(enc["length"]) if n > self.max_length]
        cut = self.tokenizer([texts[i] for i in long], truncation=True, max_length=self.max_length, **kw) if long else None
        where = {i: (cut, k) for k, i in enumerate(long)}
        out = []
        for i, text in enumerate(texts):
            e, j = where.get(i, (enc, i))
            feats = {k: e[k][j] for k in self.session.input_names if k in e}
            out.append(Encoded(feats, int(e["length"][j]), i in where, text,
                               offsets=e["offset_mapping"][j] if words else None,
                               word_ids=e.word_ids(j) if words else None))
        return out

    def pad(self, items: list[Encoded]) -> tuple[dict, np.ndarray]:
        """The batch's int64 arrays, padded to its longest item on the tokenizer's padding side with its pad id
        (attention mask and token types 0), and the mask of real tokens (for pooling, whatever the model takes).
        By hand, in numpy: ``tokenizer.pad`` on per-text encodings is a Python loop over every token
        (transformers warns about it), measured as a visible part of a request."""
        n, longest = len(items), max(it.tokens for it in items)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        spans = [slice(longest - it.tokens, longest) if left else slice(0, it.tokens) for it in items]
        arrays = {}
        for name in items[0].features:
            a = np.full((n, longest), pad_id if name == "input_ids" else 0, dtype=np.int64)
            for r, (it, span) in enumerate(zip(items, spans)):
                a[r, span] = it.features[name]
            arrays[name] = a
        mask = np.zeros((n, longest), dtype=np.int64)
        for r, span in enumerate(spans):
            mask[r, span] = 1
        return arrays, mask

    def run_batch(self, items: list[Encoded]) -> list:
        """The batch's answers, one per item, in order: the items sorted by length and cut into as few session
        calls as keep the padding under PAD_WASTE of the real tokens, each call padded to its own longest.

        Measured on 2 cores (all-MiniLM-L6-v2 INT8): a token costs 0.12-0.14 ms in calls of up to ~100 tokens and
        0.06-0.07 ms from ~200 on, where onnxruntime's kernels start using both threads; but real queries vary
        from 5 to 60 tokens, and padding 16 of them to the longest doubled the work, which took most of the
        gain. Cutting the sorted batch only where the padding would exceed PAD_WASTE, and never below
        MIN_CALL_TOKENS real tokens, keeps the large calls and drops most of the padding."""
        order = sorted(range(len(items)), key=lambda i: items[i].tokens)
        answers = [None] * len(items)
        for call in _cut(order, [it.tokens for it in items]):
            for i, a in zip(call, self._run_call([items[i] for i in call])):
                answers[i] = a
        return answers

    def _run_call(self, items: list[Encoded]) -> list:
        arrays, mask = self.pad(items)
        with self.lock:  # a session is not shared by two threads at once
            y = np.asarray(self.session.run(arrays), dtype=np.float32)
        return [self._answer(y[i], mask[i], it) for i, it in enumerate(items)]

    def _answer(self, row: np.ndarray, mask: np.ndarray, it: Encoded):
        if self.task == "feature-extraction":
            from edgekit.metrics import mean_pool

            v = mean_pool(row[None], mask[None])[0]  # the pooling verify compares
            return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)
        if self.task == "text-classification":
            if self.regression:
                return {"value": float(row[0]), "truncated": it.truncated}
            return {**_labels(row, self.id2label), "truncated": it.truncated}
        return {"entities": self._words(row, it), "truncated": it.truncated}

    def _words(self, logits: np.ndarray, it: Encoded) -> list[dict]:
        """One prediction per word, from its first sub-token (as verify scores token classifiers)."""
        from edgekit.data import first_subtokens

        wids = it.word_ids
        firsts = first_subtokens(wids)
        out = []
        for t in firsts:
            w = wids[t]
            ends = [it.offsets[j][1] for j, x in enumerate(wids) if x == w]
            start, end = it.offsets[t][0], max(ends)
            out.append({"word": it.text[start:end], "start": int(start), "end": int(end),
                        **_labels(logits[t], self.id2label, top=1)})
        return out


PAD_WASTE = 0.25  # a call's padding may add this fraction to its real tokens
MIN_CALL_TOKENS = 192  # below this many real tokens a call is not cut (small calls run on one thread)


def _cut(order: list[int], lengths: list[int]) -> list[list[int]]:
    """Cut indices sorted by length into calls (see ServedModel.run_batch)."""
    calls, call, real = [], [], 0
    for i in order:
        n = lengths[i]
        padded = n * (len(call) + 1)  # sorted: the newcomer is the longest
        if call and real >= MIN_CALL_TOKENS and padded > (1 + PAD_WASTE) * (real + n):
            calls.append(call)
            call, real = [], 0
        call.append(i)
        real += n
    if call:
        calls.append(call)
    return calls


def _labels(logits: np.ndarray, id2label: dict, top: int | None = None) -> dict:
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    order = np.argsort(-p, kind="stable")
    name = lambda i: id2label.get(int(i), str(int(i)))  # noqa: E731
    best = int(order[0])
    out = {"label": name(best), "score": float(p[best])}
    if top is None:
        out["scores"] = [{"label": name(i), "score": float(p[i])} for i in order]
    return out


def _shipped_latency(b: dict, variant: str) -> dict | None:
    """The latency the manifest's bench entry gives the served variant (bench names variants for people:
    "onnxruntime INT8 (dynamic)", "onnxruntime FP32"); decode entries give no per-request latency."""
    for v in b.get("variants") or []:
        name = v.get("name") or ""
        quantized = "INT8" in name or "INT4" in name
        if v.get("latency") and name.startswith("onnxruntime") and quantized == (variant == "int8"):
            return {k: v["latency"].get(k) for k in ("p50_ms", "p90_ms", "p99_ms")}
    return None


# ---- opening ------------------------------------------------------------------------------------------------


def open_served(path, variant: str = "int8", threads: int | None = None, public_key=None) -> ServedModel:
    """A bundle folder or release tarball (re-hashed first: a mismatch is refused), or a model folder."""
    from edgekit.release.bundle import MANIFEST, checked_bundle

    p = Path(path)
    if not p.exists():
        raise EdgekitError(f"{p} does not exist", "point at a release bundle (folder or .tar.gz) or a model folder")
    stack = ExitStack()
    try:
        tarball = p.is_file() and p.name.endswith((".tar.gz", ".tgz"))
        if tarball or (p / MANIFEST).is_file():
            p, check = checked_bundle(p, stack, "to serve it", public_key=public_key)
            manifest = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
            models = manifest.get("models") or {}
            if variant not in models:
                raise EdgekitError(f"bundle {p.name} has no '{variant}' model", f"use --variant {' or '.join(models)}")
            folder = (p / models[variant]["path"]).parent
            served = _load(folder, manifest.get("task"), threads, variant)
            served.manifest, served.files_checked, served.signature = manifest, check.files_checked, check.signature
            served.name = manifest.get("name") or p.name
        elif public_key is not None:
            raise EdgekitError(f"{p} is not a release bundle, so it has no signature to check",
                               "serve a bundle written by `edgekit release build --sign`, or leave out --public-key")
        else:
            served = _load(p if p.is_dir() else p.parent, None, threads, variant)
        served._stack = stack
        return served
    except CheckFailed as e:  # files that do not match the manifest: refused, as a bad input (exit 2)
        stack.close()
        raise EdgekitError(f"refusing to serve {path}: {e.message}", e.hint) from None
    except BaseException:
        stack.close()
        raise


def _load(folder: Path, task: str | None, threads: int | None, variant: str) -> ServedModel:
    from edgekit.checkpoint import load_tokenizer, read_config
    from edgekit.data import max_tokens
    from edgekit.runtimes.base import artifact_kind, load, read_artifact_meta
    from edgekit.tasks import detect_task, get_task, is_decoder

    kind = artifact_kind(folder)
    if kind == "engine":
        raise EdgekitError(f"{folder} holds a TensorRT engine, which edgekit serve does not run",
                           "serve the bundle's ONNX model (onnxruntime)")
    config = read_config(folder) if (folder / "config.json").is_file() else {}
    task = task or read_artifact_meta(folder).get("task") or (detect_task(config).name if config else None)
    if task is None:
        raise EdgekitError(f"the task of {folder} is unknown (no edgekit.json or config.json)",
                           "serve an edgekit export, quantize output or release bundle")
    get_task(task)
    if kind == "checkpoint":
        from edgekit.checkpoint import open_checkpoint

        open_checkpoint(folder, task)  # the checkpoint rules: no remote code, a known family, readable weights
    tokenizer = load_tokenizer(folder)
    if is_decoder(task):
        from edgekit.runtimes.decoder import open_decoder

        session, _ = open_decoder(folder, threads)
        limit = session.max_positions or 2048
    else:
        session = load(folder, threads=threads, task=task)
        limit = max_tokens(config, tokenizer, 512)
    return ServedModel(folder.name, task, folder, session, tokenizer, limit, config, variant=variant)
