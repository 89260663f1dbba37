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


def regression_agreement(orig: np.ndarray, cand: np.ndarray) -> dict:
    """How far a regression head's outputs moved from the original's, absolutely and relative to the spread of
    the original's outputs (RMSE of the difference / std of the original: 0 identical; about 1.4 for an
    unrelated model of similar spread). A constant original (std 0) counts any difference as unbounded."""
    d = cand.astype(np.float64) - orig.astype(np.float64)
    std = float(orig.std())
    rmse = float(np.sqrt(np.mean(d ** 2)))
    relative = rmse / std if std > 0 else (0.0 if rmse == 0 else float(np.finfo(np.float64).max))
    return {"max_abs_diff": float(np.abs(d).max()), "mean_abs_diff": float(np.abs(d).mean()), "rmse": rmse,
            "relative_rmse": relative, "original_std": std}


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


# Thresholds are met up to float noise, relative to the figures compared: 8 then 5 correct of 300 is a drop of
# exactly 1 point, computed as 2.666666666666667 - 1.6666666666666667 = 1.0000000000000002, which must pass
# --max-drop 1.0 (39 of the 298 such drops at n=300 come out above 1.0). A real difference between two
# evaluations is at least one example in the total (1e-6 relative at a million examples), far above this.
THRESHOLD_RTOL = 1e-9


def meets(value: float, comparison: str, threshold: float) -> bool:
    """``value <= threshold`` (or ``>=``), equal within THRESHOLD_RTOL counting as met: the one comparison of
    every gate (verify's checks and the regression gate's)."""
    import math

    if comparison not in ("<=", ">="):
        raise ValueError(f"unknown comparison {comparison!r}")
    if math.isnan(value) or math.isnan(threshold):
        return False
    close = math.isclose(value, threshold, rel_tol=THRESHOLD_RTOL, abs_tol=0.0)
    return close or (value <= threshold if comparison == "<=" else value >= threshold)
