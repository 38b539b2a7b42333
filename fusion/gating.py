"""Cost gating: call the LLMs only for texts the encoder-only path is unsure about.

The encoder-only path is the fusion head with every LLM block marked missing (it is
trained for that with LLM dropout), so gating needs no second model. Confidence is the
top probability (multiclass) or, for multilabel, the least certain class's
``max(p, 1 - p)``. A text gets LLM calls when its confidence is below the threshold; the
threshold is the ``target_call_rate`` quantile of validation confidences, or, with
``target_accuracy``, the threshold of the lowest tabulated call rate reaching it (when none does,
the lowest within a point of the best accuracy); never below the ``min_call_rate`` quantile.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fusion.calibration import decide
from fusion.labels import LabelSpace
from fusion.metrics import evaluate, headline_key

log = logging.getLogger(__name__)

RATES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
UNREACHABLE_SLACK = 0.01  # a target no rate reaches: the lowest rate within this of the best accuracy


def confidence(proba: np.ndarray, multilabel: bool) -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    return np.maximum(p, 1.0 - p).min(axis=1) if multilabel else p.max(axis=1)


def threshold_for_rate(conf: np.ndarray, rate: float) -> float:
    """Threshold below which a ``rate`` share of ``conf`` falls (rate 1 calls every text)."""
    if rate >= 1.0:
        return float(np.nextafter(1.0, 2.0))  # confidences are <= 1: every text is called
    if rate <= 0.0:
        return 0.0
    return float(np.quantile(conf, rate, method="higher"))


def gated_proba(enc_proba: np.ndarray, fused_proba: np.ndarray, call: np.ndarray) -> np.ndarray:
    return np.where(call[:, None], fused_proba, enc_proba)


def call_rate_table(
    enc_proba: np.ndarray,
    fused_proba: np.ndarray,
    y: np.ndarray,
    space: LabelSpace,
    thresholds: np.ndarray | None = None,
    at_least_one: bool = False,
    rates: tuple[float, ...] = RATES,
) -> list[dict[str, Any]]:
    """Accuracy (or subset accuracy) and macro-F1 at each target LLM-call rate."""
    conf = confidence(enc_proba, space.multilabel)
    rows = []
    for rate in rates:
        thr = threshold_for_rate(conf, rate)
        call = conf < thr
        proba = gated_proba(enc_proba, fused_proba, call)
        m = evaluate(y, decide(proba, space.multilabel, thresholds, at_least_one), proba, space)
        key = headline_key(space.multilabel)
        rows.append(
            {
                "target_rate": rate,
                "threshold": thr,
                "call_rate": float(call.mean()),
                key: m[key],
                "macro_f1": m["macro_f1"],
            }
        )
    return rows


def choose_threshold(conf: np.ndarray, table: list[dict[str, Any]], gating: Any, multilabel: bool) -> float:
    """The gate threshold for a ``GatingConfig`` from validation confidences and :func:`call_rate_table`,
    asking about at least ``gating.min_call_rate`` of the texts."""
    return max(_target_threshold(conf, table, gating, multilabel), threshold_for_rate(conf, gating.min_call_rate))


def _target_threshold(conf: np.ndarray, table: list[dict[str, Any]], gating: Any, multilabel: bool) -> float:
    if gating.target_accuracy is None:
        return threshold_for_rate(conf, gating.target_call_rate)
    key = headline_key(multilabel)
    for row in table:  # ascending call rate
        if row[key] >= gating.target_accuracy:
            return float(row["threshold"])
    best = max(r[key] for r in table)
    row = next(r for r in table if r[key] >= best - UNREACHABLE_SLACK)  # the LLMs only where they still help
    log.warning(
        "no LLM-call rate reaches validation %s %.4f (best %.4f): the gate asks about %.0f%% of the texts, the "
        "lowest call rate within %.0f point of the best",
        key,
        gating.target_accuracy,
        best,
        100 * row["target_rate"],
        100 * UNREACHABLE_SLACK,
    )
    return float(row["threshold"])
