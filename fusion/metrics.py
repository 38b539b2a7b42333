"""Evaluation metrics, with one definition for every model compared.

* accuracy (multiclass): share of rows whose predicted class is the true class.
* subset accuracy (multilabel): share of rows whose predicted label set equals the true set.
* Hamming loss (multilabel): share of wrong (row, class) decisions.
* per-class precision/recall/F1 over all classes of the label space (a class with no
  predictions or no support scores 0, never skipped); macro-F1 is their unweighted mean,
  micro-F1 pools all (row, class) decisions.
* ECE: 15 equal-width bins over [0, 1]; sum over bins of (bin share) x |accuracy - confidence|.
  Multiclass uses the top-label confidence; multilabel uses every (row, class) probability
  against its 0/1 outcome.
* NLL: mean negative log-likelihood of the true labels under the predicted probabilities.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fusion.labels import LabelSpace

N_BINS = 15
SUMMARY_KEYS = ("accuracy", "subset_accuracy", "hamming_loss", "macro_f1", "micro_f1", "ece", "nll")


def headline_key(multilabel: bool) -> str:
    """The accuracy reported first: subset accuracy for multilabel, accuracy for multiclass."""
    return "subset_accuracy" if multilabel else "accuracy"


def _confidence_outcome(proba: np.ndarray, y: np.ndarray, multilabel: bool) -> tuple[np.ndarray, np.ndarray]:
    if multilabel:
        return proba.ravel(), (y.ravel() > 0.5).astype(np.float64)
    return proba.max(axis=1), (proba.argmax(axis=1) == y).astype(np.float64)


def reliability(proba: np.ndarray, y: np.ndarray, multilabel: bool, n_bins: int = N_BINS) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count (the data behind a reliability diagram)."""
    conf, outcome = _confidence_outcome(np.asarray(proba, np.float64), np.asarray(y), multilabel)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=n_bins) / counts
        acc = np.bincount(which, weights=outcome, minlength=n_bins) / counts
    return {
        "edges": edges.tolist(),
        "confidence": np.nan_to_num(mean_conf).tolist(),
        "accuracy": np.nan_to_num(acc).tolist(),
        "count": counts.astype(int).tolist(),
    }


def ece(proba: np.ndarray, y: np.ndarray, multilabel: bool, n_bins: int = N_BINS) -> float:
    r = reliability(proba, y, multilabel, n_bins)
    counts = np.asarray(r["count"], np.float64)
    if counts.sum() == 0:
        return 0.0
    gap = np.abs(np.asarray(r["accuracy"]) - np.asarray(r["confidence"]))
    return float((counts / counts.sum() * gap).sum())


def nll(proba: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    p = np.clip(np.asarray(proba, np.float64), 1e-12, 1 - 1e-12)
    if multilabel:
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    return float(-np.log(p[np.arange(len(y)), y]).mean())


def evaluate(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray, space: LabelSpace) -> dict[str, Any]:
    """All metrics for encoded targets/predictions (see ``LabelSpace.encode``)."""
    # here, not at the top: scikit-learn (and SciPy) take ~1.5 s to import, which every Serve replica and
    # backfill actor would pay at start only to serve a model
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    k = space.n_classes
    ml = space.multilabel
    labels = list(range(k))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    _, _, micro_f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="micro", zero_division=0)
    out: dict[str, Any] = {"n": len(y_true)}
    if ml:
        out["subset_accuracy"] = float((y_true == y_pred).all(axis=1).mean()) if len(y_true) else 0.0
        out["hamming_loss"] = float((y_true != y_pred).mean()) if len(y_true) else 0.0
    else:
        out["accuracy"] = float((y_true == y_pred).mean()) if len(y_true) else 0.0
    out["macro_f1"] = float(np.mean(f))
    out["micro_f1"] = float(micro_f1)
    out["ece"] = ece(proba, y_true, ml)
    out["nll"] = nll(proba, y_true, ml)
    out["per_class"] = {
        c: {"precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j]), "support": int(s[j])}
        for j, c in enumerate(space.classes)
    }
    if not ml:
        out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out
