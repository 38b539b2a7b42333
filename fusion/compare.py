"""Side-by-side comparison of encoder-only, LLM-only, fusion and gated fusion, and learning curves.

Every method is scored on the same rows with one set of LLM answers, so the LLM cost
columns are comparable: ``llm_texts`` is how many texts needed LLM answers under that
method and ``usd`` their cost at list price (cached answers are priced as if called).

* encoder path: the fusion head with every LLM block marked missing (the path gating
  and over-budget texts take). Learning curves instead train a separate encoder-only
  head at each size ("encoder-only"), the baseline a user would otherwise deploy.
* LLM-only: each LLM's own scores, renormalised (multiclass) or thresholded at 0.5
  (multilabel); texts the LLM failed on count with a uniform score.
* fusion: every text gets LLM scores. gated fusion: only texts below the gate threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fusion.calibration import decide
from fusion.config import Config
from fusion.errors import DataError
from fusion.gating import call_rate_table, confidence, gated_proba, threshold_for_rate
from fusion.labels import LabelSpace
from fusion.metrics import evaluate, headline_key

if TYPE_CHECKING:
    from fusion.classifier import AutoFusionClassifier
    from fusion.llm import ScoreBatch

TABLE_KEYS = ("accuracy", "subset_accuracy", "macro_f1", "micro_f1", "ece")


def _row(method: str, m: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"method": method, **{k: m[k] for k in TABLE_KEYS if k in m}, **extra}


def llm_only_proba(scores: np.ndarray, multilabel: bool) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    k = s.shape[1]
    missing = np.asarray(np.isnan(s).any(axis=1))
    s = np.where(missing[:, None], 0.5 if multilabel else 1.0 / k, s)
    if not multilabel:
        s = s / np.maximum(s.sum(axis=1, keepdims=True), 1e-12)
    return np.clip(s, 1e-6, 1 - 1e-6)


def compare_methods(
    clf: AutoFusionClassifier, df: pd.DataFrame, y: np.ndarray, emb: np.ndarray, batches: dict[str, ScoreBatch]
) -> dict[str, Any]:
    """Metrics of every method on ``df``, from one set of LLM answers (``{name: ScoreBatch}``
    for every LLM of the model, as :meth:`fusion.llm.LLMPanel.score_missing` returns them)."""
    head = clf._require_fitted()
    space: LabelSpace = head.label_space
    ml = space.multilabel
    scores = {name: b.scores for name, b in batches.items()}
    enc = clf.predict_proba(df, embeddings=emb, llm="off")
    fused = clf.predict_proba(df, embeddings=emb, llm_scores=scores, llm="all")
    cost = sum((np.where(b.used, b.cost_usd, 0.0) for b in batches.values()), np.zeros(len(y)))

    def metrics(proba: np.ndarray, thresholds: Any = head.thresholds) -> dict[str, Any]:
        return evaluate(y, decide(proba, ml, thresholds, head.at_least_one), proba, space)

    rows = [_row("encoder path (LLM missing)", metrics(enc), llm_texts=0, usd=0.0)]
    for name, b in batches.items():
        rows.append(
            _row(
                f"LLM-only: {name}",
                metrics(llm_only_proba(b.scores, ml), None),
                llm_texts=int(b.used.sum()),
                usd=float(b.cost_usd[b.used].sum()),
                coverage=float(b.used.mean()),
            )
        )
    used_any = np.any([b.used for b in batches.values()], axis=0)
    rows.append(_row("fusion", metrics(fused), llm_texts=int(used_any.sum()), usd=float(cost.sum())))
    thr, note = head.gate_threshold, "trained threshold"
    if thr is None:
        target = clf.config.gating.target_call_rate
        thr, note = threshold_for_rate(confidence(enc, ml), target), f"threshold for {target:.0%} calls on these rows"
    call = confidence(enc, ml) < thr
    rows.append(
        _row(
            "gated fusion",
            metrics(gated_proba(enc, fused, call)),
            llm_texts=int(call.sum()),
            usd=float(cost[call].sum()),
            call_rate=float(call.mean()),
            note=note,
        )
    )
    table = call_rate_table(enc, fused, y, space, head.thresholds, head.at_least_one)
    return {"methods": rows, "call_rates": table}


def _subsample(labels: Sequence[Any], fraction: float, seed: int, min_per_class: int = 2) -> np.ndarray:
    """Stratified row indices for ``fraction`` of the rows (at least ``min_per_class`` per label key)."""
    keys = np.asarray(["|".join(v) if isinstance(v, (list, tuple)) else str(v) for v in labels])
    rng = np.random.default_rng(seed)
    picked = []
    for key in np.unique(keys):
        idx = np.flatnonzero(keys == key)
        take = min(len(idx), max(min_per_class, round(fraction * len(idx))))
        picked.append(rng.choice(idx, size=take, replace=False))
    return np.sort(np.concatenate(picked))


def learning_curves(
    config: Config,
    train: pd.DataFrame,
    val: pd.DataFrame,
    test: pd.DataFrame,
    fractions: Sequence[float],
    *,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train encoder-only and fusion heads on growing stratified shares of ``train`` (same
    validation and test rows, same seed) and score each, plus the LLM-only baseline."""
    from fusion.classifier import AutoFusionClassifier

    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise DataError(f"train fractions must be in (0, 1], got {list(fractions)}")
    from fusion.llm import LLMPanel

    parts = {"train": train, "val": val, "test": test}
    enc_cfg = config.model_copy(update={"llms": []}, deep=True)
    enc_cfg.gating.enabled = False
    encoder = AutoFusionClassifier(enc_cfg).encoder
    emb = {k: encoder.embed(list(v[config.data.text_column]), progress=progress) for k, v in parts.items()}
    probe = AutoFusionClassifier(enc_cfg, encoder=encoder).fit(
        train, validation=val, embeddings=emb["train"], validation_embeddings=emb["val"]
    )
    space: LabelSpace = probe._require_fitted().label_space
    ys = {k: probe.targets(v) for k, v in parts.items()}
    scores: dict[str, dict[str, np.ndarray]] = {}
    if config.llms:  # zero-shot LLM scores, once per text (few-shot examples would depend on the subset)
        panel = LLMPanel(
            config.llms, space.classes, space.multilabel, config.llm_limits, descriptions=config.labels.descriptions
        )
        for k, v in parts.items():
            batches = panel.score(list(v[config.data.text_column]), progress=progress)
            scores[k] = {name: b.scores for name, b in batches.items()}
    if not config.data.label_column:
        raise DataError("learning curves need data.label_column (one label or label list per row)")
    label_col = train[config.data.label_column]

    llm_only = {}
    for name, s in scores.get("test", {}).items():
        p = llm_only_proba(s, space.multilabel)
        llm_only[name] = evaluate(ys["test"], decide(p, space.multilabel, None, False), p, space)
    key = headline_key(space.multilabel)
    rows = []
    for frac in fractions:
        idx = _subsample(list(label_col), frac, config.train.seed)
        sub = train.iloc[idx]
        row: dict[str, Any] = {"fraction": frac, "n_train": len(idx)}
        enc = AutoFusionClassifier(enc_cfg, encoder=encoder).fit(
            sub, validation=val, embeddings=emb["train"][idx], validation_embeddings=emb["val"]
        )
        m = enc.evaluate(test, embeddings=emb["test"])
        row["encoder-only"], row["encoder-only macro_f1"] = m[key], m["macro_f1"]
        for name, lm in llm_only.items():
            row[f"LLM-only: {name}"] = lm[key]
        if config.llms:
            fus = AutoFusionClassifier(config, encoder=encoder).fit(
                sub,
                validation=val,
                embeddings=emb["train"][idx],
                validation_embeddings=emb["val"],
                llm_scores={k: v[idx] for k, v in scores["train"].items()},
                validation_llm_scores=scores["val"],
            )
            m = fus.evaluate(test, embeddings=emb["test"], llm_scores=scores["test"])
            row["fusion"], row["fusion macro_f1"] = m[key], m["macro_f1"]
        rows.append(row)
    return rows


def plot_learning_curves(rows: list[dict[str, Any]], path: str | Path, metric: str) -> Path:
    import matplotlib.pyplot as plt

    methods = [k for k in rows[0] if k not in ("fraction", "n_train") and "macro_f1" not in k]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["n_train"] for r in rows]
    for m in methods:
        ax.plot(x, [r[m] for r in rows], "o-", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("training rows")
    ax.set_ylabel(f"test {metric}")
    ax.set_title("Learning curves")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
