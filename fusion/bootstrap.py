"""Start from class names alone: the LLM labels a chosen few texts, the fusion model learns from its answers.

:func:`bootstrap` is what ``labelfuse bootstrap`` and ``python -m data_jobs.bootstrap`` run:

1. **Cover the space.** Embed every text; ask the LLMs about the text nearest each centre of a
   k-means clustering into ``coverage_share × ask`` clusters, so the first answers span the corpus.
2. **Then the unsure.** Train a provisional encoder-only model on those answers and ask about the
   remaining budget's worth of texts it is least sure about.
3. **Learn from soft labels.** Train the fusion model on every answer: the panel's mean per-class
   probabilities are the targets, each weighted by its confidence (top probability, or for
   multilabel the mean of ``|2p - 1|``), so unsure answers count less. The LLM scores are the
   LLM block of the features, as at prediction time.
4. **Calibrate on gold when there is some.** With a small gold set, calibration and the gate are
   fitted on it (its texts are scored by the LLMs too) and the report gives the model's and the
   LLMs' agreement with it; without one, on held-out LLM-labelled texts, and the report says so.

The budget is ``ask`` texts and, in dollars, ``llm_limits.budget_usd`` (the ledger refuses calls past it;
those texts stay unlabelled). Every answer can be kept in a label store for the loop (:mod:`fusion.loop`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from fusion.config import Config
from fusion.errors import ConfigError, DataError
from fusion.labels import LabelSpace
from fusion.labelstore import LabelStore, human_label, llm_labels
from fusion.llm.prompts import PROMPT_VERSION
from fusion.loop import llm_confidence

if TYPE_CHECKING:
    from fusion.llm import Ledger

log = logging.getLogger(__name__)


def coverage(emb: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of up to ``n`` texts spread over the embedding space: the nearest text to each k-means centre."""
    from sklearn.cluster import KMeans

    n = min(n, len(emb))
    if n <= 0:
        return np.zeros(0, dtype=int)
    km = KMeans(n_clusters=n, n_init=1, random_state=seed).fit(emb)
    dist = ((emb[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1) if len(emb) * n <= 4_000_000 else None
    picked: list[int] = []
    for c in range(n):
        members = np.flatnonzero(km.labels_ == c)
        d = dist[members, c] if dist is not None else ((emb[members] - km.cluster_centers_[c]) ** 2).sum(-1)
        picked.append(int(members[np.argmin(d)]))
    return np.unique(np.array(picked, dtype=int))


def least_certain(proba: np.ndarray, n: int, candidates: np.ndarray, multilabel: bool) -> np.ndarray:
    """The ``n`` candidates whose predicted probabilities are least certain (lowest confidence first)."""
    from fusion.gating import confidence

    conf = confidence(proba[candidates], multilabel)
    return candidates[np.argsort(conf, kind="stable")[:n]]


def _teacher(batches: dict[str, Any], multilabel: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(the panel's mean answer per text, NaN where no LLM answered; {name: scores})."""
    scores = {name: b.scores for name, b in batches.items()}
    stack = np.stack(list(scores.values()))
    with np.errstate(all="ignore"):
        mean = np.nanmean(stack, axis=0) if len(stack) > 1 else stack[0]
    if not multilabel:
        mean = mean / mean.sum(axis=1, keepdims=True)
    return mean.astype(np.float32), scores


def bootstrap(
    texts: list[str],
    config: Config,
    *,
    ask: int,
    gold_texts: list[str] | None = None,
    gold_labels: Any = None,
    store: LabelStore | None = None,
    coverage_share: float = 0.5,
    embeddings: np.ndarray | None = None,
    ledger: Ledger | None = None,
    progress: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """A model trained on the LLMs' answers about ``ask`` chosen texts; returns (classifier, report).

    ``config`` needs ``labels.classes`` (``labels.descriptions`` are told to the LLMs) and ``llms``.
    ``embeddings``: the texts' embeddings by ``config.encoder``, when computed elsewhere (the Ray job);
    ``ledger``: a shared budget ledger instead of this process's own."""
    from fusion.classifier import AutoFusionClassifier
    from fusion.llm import LLMPanel
    from fusion.texts import check_texts

    start = time.perf_counter()
    if not config.labels.classes or len(config.labels.classes) < 2:
        raise ConfigError("bootstrap needs the class names: labels.classes with at least two classes")
    if not config.llms:
        raise ConfigError("bootstrap needs an LLM to learn from: give --llm or config llms")
    if ask < 2:
        raise ConfigError(f"ask must be at least 2 texts, got {ask}")
    texts = check_texts(texts)
    if len(texts) < 2:
        raise DataError("bootstrap needs at least two unlabelled texts")
    if not 0 < coverage_share <= 1:
        raise ConfigError(f"coverage_share must be in (0, 1], got {coverage_share}")
    space = LabelSpace(config.labels.classes, config.labels.mode == "multilabel")
    ask = min(ask, len(texts))
    panel = LLMPanel(
        config.llms,
        space.classes,
        space.multilabel,
        config.llm_limits,
        ledger=ledger,
        descriptions=config.labels.descriptions,
    )
    clf = AutoFusionClassifier(config, ledger=panel.ledger)  # one budget for the texts asked and the gold set
    encoder = clf.encoder
    emb = clf._embed(texts, embeddings, progress)
    usage: dict[str, Counter] = {}

    def ask_llms(idx: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        batches = panel.score([texts[i] for i in idx], progress=progress)
        for name, b in batches.items():
            usage.setdefault(name, Counter()).update(
                {k: v for k, v in b.stats.to_dict().items() if isinstance(v, (int, float)) and "latency" not in k}
            )
        if store is not None:
            for name, b in batches.items():
                store.append(
                    llm_labels(
                        [texts[i] for i in idx],
                        b.scores,
                        space.classes,
                        space.multilabel,
                        llm=name,
                        prompt_version=PROMPT_VERSION,
                        origin="bootstrap",
                    )
                )
        return _teacher(batches, space.multilabel)

    # 1. cover the space
    first = coverage(emb, max(2, math.ceil(coverage_share * ask)), config.train.seed)
    teacher, scores = ask_llms(first)
    asked = first
    # 2. the texts a provisional encoder-only model is least sure about
    rest = np.setdiff1d(np.arange(len(texts)), asked)
    n_more = ask - len(asked)
    if n_more > 0 and len(rest):
        ok = np.isfinite(teacher).all(axis=1)
        if ok.sum() >= 2:
            provisional = AutoFusionClassifier(config.model_copy(update={"llms": []}), encoder=encoder)
            provisional.fit(
                [texts[i] for i in asked[ok]],
                soft_labels=teacher[ok],
                sample_weight=llm_confidence(teacher[ok], space.multilabel),
                embeddings=emb[asked[ok]],
            )
            head = provisional._require_fitted()
            proba = np.full((len(texts), space.n_classes), np.nan, np.float32)
            proba[rest] = head.proba(head.features(emb[rest]))
            more = least_certain(proba, n_more, rest, space.multilabel)
        else:  # the LLMs answered almost nothing: more coverage instead
            more = rest[coverage(emb[rest], n_more, config.train.seed + 1)]
        t2, s2 = ask_llms(more)
        asked = np.concatenate([asked, more])
        teacher = np.concatenate([teacher, t2])
        scores = {k: np.concatenate([scores[k], s2[k]]) for k in scores}
    # 3. learn from every answer
    ok = np.isfinite(teacher).all(axis=1)
    if ok.sum() < 4:
        raise DataError(
            f"the LLMs answered only {int(ok.sum())} of {len(asked)} texts asked (budget, errors): too few to learn from"
        )
    idx = asked[ok]
    gold = gold_texts is not None and gold_labels is not None
    clf.fit(
        [texts[i] for i in idx],
        soft_labels=teacher[ok],
        sample_weight=llm_confidence(teacher[ok], space.multilabel),
        llm_scores={k: v[ok] for k, v in scores.items()},
        embeddings=emb[idx],
        validation=gold_texts if gold else None,
        validation_labels=gold_labels if gold else None,
        progress=progress,
    )
    if gold and store is not None:
        norm = clf._encode_labels(gold_labels, len(gold_texts or []), space)[0]
        store.append(
            human_label(t, lab, origin="gold") for t, lab in zip(gold_texts or [], space.decode(norm), strict=True)
        )

    decided = space.decode((teacher[ok] >= 0.5) if space.multilabel else teacher[ok].argmax(axis=1))
    mix = Counter(lab for row in decided for lab in ([row] if isinstance(row, str) else row))
    val = clf.metrics.get("validation", {})
    report: dict[str, Any] = {
        "texts": len(texts),
        "asked": len(asked),
        "answered": int(ok.sum()),
        "rounds": {"coverage": len(first), "least_certain": len(asked) - len(first)},
        "llm_calls": sum(int(u["llm_calls"]) for u in usage.values()),
        "cache_hits": sum(int(u["cache_hits"]) for u in usage.values()),
        "spent_usd": round(sum(float(u["spent_usd"]) for u in usage.values()), 6),
        "llm_usage": {k: dict(v) for k, v in usage.items()},
        "label_mix": {c: mix.get(c, 0) for c in space.classes},
        "validation": (
            f"gold labels ({len(gold_texts or [])} texts; the LLMs scored them too)"
            if gold
            else f"held-out LLM-labelled texts ({clf.training.get('n_val')} of those asked)"
        ),
        "validation_metrics": {k: val[k] for k in ("accuracy", "subset_accuracy", "macro_f1", "ece") if k in val},
        "gate_threshold": clf.head.gate_threshold if clf.head is not None else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    for stats in clf.llm_usage.get("validation", {}).values():  # the gold texts' scores
        report["llm_calls"] += int(stats["llm_calls"])
        report["spent_usd"] = round(report["spent_usd"] + float(stats["spent_usd"]), 6)
    if gold:
        report["agreement_with_gold"] = {
            **report["validation_metrics"],
            "note": "the gold set is also the calibration set: an optimistic estimate",
        }
    return clf, report
