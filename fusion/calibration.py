"""Turning logits into calibrated probabilities and decisions.

* Temperature scaling: one scalar ``T`` fitted on validation logits by minimising
  the negative log-likelihood (softmax for multiclass, sigmoid per class for multilabel).
* Multilabel thresholds: per class, the cut-off on calibrated probabilities that
  maximises validation F1 (0.5 when the class has no validation positives).
* At-least-one fallback (multilabel): when every training row had a label, a row
  with no class above its threshold gets its most probable class.
"""

from __future__ import annotations

import numpy as np

_T_GRID = np.exp(np.linspace(np.log(0.05), np.log(20.0), 481))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, y: np.ndarray, multilabel: bool, temperature: float = 1.0) -> float:
    z = np.asarray(logits, dtype=np.float64) / temperature
    if multilabel:
        # log(1 + exp(-|z|)) + max(z, 0) - y*z  == BCE with logits, numerically stable
        loss = np.logaddexp(0.0, z) - y * z
        return float(loss.mean())
    return float(-_log_softmax(z)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    """The temperature in [0.05, 20] (log grid, ~1.3% steps) with the lowest validation NLL."""
    if len(y) == 0:
        return 1.0
    losses = [nll(logits, y, multilabel, t) for t in _T_GRID]
    return float(_T_GRID[int(np.argmin(losses))])


def to_proba(logits: np.ndarray, temperature: float, multilabel: bool) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    if multilabel:
        p = 1.0 / (1.0 + np.exp(-z))
    else:
        p = np.exp(_log_softmax(z))
    return p.astype(np.float32)


def fit_thresholds(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-class F1-maximising thresholds on a 0.05..0.95 grid; ties go to the one nearest 0.5."""
    grid = np.round(np.arange(0.05, 0.951, 0.01), 2)
    out = np.full(proba.shape[1], 0.5, dtype=np.float32)
    for j in range(proba.shape[1]):
        pos = y[:, j] > 0.5
        if not pos.any():
            continue
        pred = proba[:, j][None, :] >= grid[:, None]
        tp = (pred & pos).sum(1)
        fp = (pred & ~pos).sum(1)
        fn = (~pred & pos).sum(1)
        f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
        best = np.flatnonzero(f1 >= f1.max() - 1e-12)
        out[j] = grid[best[np.argmin(np.abs(grid[best] - 0.5))]]
    return out


def decide(proba: np.ndarray, multilabel: bool, thresholds: np.ndarray | None, at_least_one: bool) -> np.ndarray:
    """Class indices (multiclass) or a 0/1 matrix (multilabel)."""
    if not multilabel:
        return proba.argmax(axis=1)
    t = thresholds if thresholds is not None else np.full(proba.shape[1], 0.5, dtype=np.float32)
    y = (proba >= t).astype(np.int64)
    if at_least_one:
        empty = y.sum(axis=1) == 0
        y[empty, proba[empty].argmax(axis=1)] = 1
    return y
