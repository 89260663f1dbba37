"""Task metrics and agreement measures, on numpy arrays of model outputs."""

from __future__ import annotations

import numpy as np


def classification_metrics(logits: np.ndarray, labels: list[int]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    pred = logits.argmax(-1)
    return {"accuracy": 100.0 * accuracy_score(labels, pred),
            "macro_f1": 100.0 * f1_score(labels, pred, average="macro", zero_division=0)}


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """IOB2 chunks as (type, start, end). Written here (a dozen lines) rather than pulling in seqeval,
    which is unmaintained; an I- tag without a matching B- opens a chunk, as in seqeval's default mode."""
    out, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, t = tag.partition("-")
        if kind is not None and (prefix in ("O", "B") or t != kind):
            out.add((kind, start, i))
            kind = None
        if prefix == "B" or (prefix == "I" and kind is None):
            start, kind = i, t
    return out


def entity_f1(pred_tags: list[list[str]], true_tags: list[list[str]]) -> dict:
    tp = n_pred = n_true = 0
    for p, t in zip(pred_tags, true_tags):
        pe, te = entities(p), entities(t)
        tp += len(pe & te)
        n_pred += len(pe)
        n_true += len(te)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_f1": 100.0 * f1, "entity_precision": 100.0 * precision, "entity_recall": 100.0 * recall}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(hidden.dtype)
    return (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)
    b = b / np.clip(np.linalg.norm(b, axis=1, keepdims=True), 1e-12, None)
    return (a * b).sum(1)


def retrieval_agreement(orig: np.ndarray, cand: np.ndarray) -> float:
    """Share of examples whose nearest other example (cosine) is the same under both models, in %."""
    if len(orig) < 3:
        return 100.0

    def nearest(x):
        x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)

    return 100.0 * float((nearest(orig) == nearest(cand)).mean())
