"""The learning loop: retrain a challenger on the label store, compare it with the champion, promote or refuse.

:func:`retrain` is what ``labelfuse retrain`` and ``python -m data_jobs.retrain`` run:

1. **Labels.** :meth:`LabelStore.labels`: one label per text, a person's over an LLM's.
   A person's label is a one-hot target with weight ``human_weight``; an LLM's answer is a
   soft target (its per-class probabilities) weighted by its confidence (the top probability,
   or for multilabel the mean of ``|2p - 1|``), so unsure answers count less. An LLM's stored
   scores are also the LLM block of that text's features: retraining makes no LLM calls.
2. **Held out.** A fixed slice of texts, chosen by a hash of the text id (``holdout_fraction``),
   is never trained on, so every retrain is judged on the same kind of texts. Champion and
   challenger are compared on the people's labels in it; with fewer than ``min_human_holdout``
   there, on their agreement with the LLM's answers through the encoder-only path (the fused path
   would copy the LLM's own scores). The report says which.
3. **The gate follows the model.** The challenger's gate threshold is fitted again on its
   validation rows for the configured target accuracy (or call rate): as the encoder learns,
   fewer texts fall below it, and fewer are sent to the LLM.
4. **Only new texts are embedded.** The encoder's vectors of the store's texts are kept in the registry
   (:mod:`fusion.embcache`, up to ``embedding_cache_rows``), so a retrain embeds what arrived since the
   last one, not the whole store again.
5. **Promote** when the challenger is not worse than the champion (``min_delta``); otherwise
   the refusal and its report are recorded. Either way the challenger is kept in the registry.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fusion.embcache import EmbeddingCache
from fusion.errors import ConfigError, DataError
from fusion.labels import LabelSpace
from fusion.labelstore import LabelStore
from fusion.metrics import evaluate, headline_key
from fusion.registry import Registry

if TYPE_CHECKING:  # fusion.head imports torch: the CLI builds its parser from LoopSettings without it
    from fusion.head import FusionHead

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    human_weight: float = 3.0  # a person's label counts this many times a fully confident LLM answer
    holdout_fraction: float = 0.2  # texts (by text-id hash) never trained on: the comparison's slice
    min_delta: float = 0.0  # promote when challenger >= champion - min_delta (headline metric)
    min_new_labels: int = 0  # retrain only when the store has at least this many records since the last retrain
    min_human_holdout: int = 20  # fewer people's labels held out: compare on agreement with the LLM instead
    embedding_cache_rows: int = 200_000  # texts' vectors kept in the registry for the next retrain (0: none)


def in_holdout(text_ids: pd.Series, fraction: float) -> np.ndarray:
    """The held-out texts: a fixed share by the hash in their id, the same at every retrain."""
    return np.array([int(t[:8], 16) % 10_000 < fraction * 10_000 for t in text_ids], dtype=bool)


def llm_confidence(p: np.ndarray, multilabel: bool) -> np.ndarray:
    return np.abs(2 * p - 1).mean(axis=1) if multilabel else p.max(axis=1)


@dataclass
class Examples:
    """The labelled texts as model inputs: soft targets, weights, the stored LLM scores as features."""

    texts: list[str]
    text_ids: list[str]
    targets: np.ndarray  # (n, k)
    weights: np.ndarray  # (n,)
    human: np.ndarray  # (n,) bool
    scores: dict[str, np.ndarray]  # {llm name: (n, k)} NaN rows where that LLM gave no stored answer
    skipped: int  # labels outside the label space

    def take(self, idx: np.ndarray) -> Examples:
        return Examples(
            [self.texts[i] for i in idx],
            [self.text_ids[i] for i in idx],
            self.targets[idx],
            self.weights[idx],
            self.human[idx],
            {k: v[idx] for k, v in self.scores.items()},
            0,
        )

    def hard(self, multilabel: bool) -> np.ndarray:
        return (self.targets >= 0.5).astype(np.float32) if multilabel else self.targets.argmax(axis=1)


def examples(labels: pd.DataFrame, space: LabelSpace, llm_names: tuple[str, ...], human_weight: float) -> Examples:
    """Model inputs from :meth:`LabelStore.labels` rows; rows naming classes the model lacks are skipped."""
    k, index = space.n_classes, {c: i for i, c in enumerate(space.classes)}
    keep, targets, weights, human = [], [], [], []
    scores = {name: [] for name in llm_names}  # type: dict[str, list[np.ndarray]]
    nan_row = np.full(k, np.nan, np.float32)
    for i, row in enumerate(labels.itertuples(index=False)):
        answer = None
        if isinstance(row.llm_scores, dict) and set(row.llm_scores) == set(space.classes):
            answer = np.array([row.llm_scores[c] for c in space.classes], np.float32)
        if row.source == "human":
            if any(lab not in index for lab in row.labels) or (not space.multilabel and len(row.labels) != 1):
                continue
            t = np.zeros(k, np.float32)
            t[[index[lab] for lab in row.labels]] = 1.0
            w = human_weight
        else:
            if answer is None:
                continue
            t = answer if space.multilabel else answer / max(float(answer.sum()), 1e-9)
            w = float(llm_confidence(t[None], space.multilabel)[0])
        keep.append(i)
        targets.append(t)
        weights.append(w)
        human.append(row.source == "human")
        for name in llm_names:
            scores[name].append(answer if answer is not None and row.llm == name else nan_row)
    rows = labels.iloc[keep]
    return Examples(
        rows["text"].tolist(),
        rows["text_id"].tolist(),
        np.array(targets, np.float32).reshape(-1, k),
        np.array(weights, np.float32),
        np.array(human, bool),
        {name: np.array(v, np.float32).reshape(-1, k) for name, v in scores.items()},
        len(labels) - len(keep),
    )


def judge(head: FusionHead, emb: np.ndarray, ex: Examples, by_people: bool) -> dict[str, Any]:
    """The headline metric of ``head`` on held-out examples, and its gate's LLM-call rate there.

    People's labels: the gated answer, LLM scores from the store where the gate asks (no new calls).
    LLM answers only: agreement of the encoder-only path with the LLM's decided labels."""
    ml = head.multilabel
    key = headline_key(ml)
    y = ex.hard(ml)
    if by_people:
        given = {k: v for k, v in ex.scores.items() if k in head.layout.llm_names}
        ask = head.ask(emb, "auto")
        pred = head.fuse(emb, ask, {k: v[ask] for k, v in given.items()})
        call_rate = float(ask.mean()) if head.layout.n_llms else 0.0
    else:
        pred = head.fuse(emb, np.zeros(len(emb), bool), {})
        call_rate = float(head.ask(emb, "auto").mean()) if head.layout.n_llms else 0.0
    m = evaluate(y, head.label_space.encode(pred.labels), pred.proba, head.label_space)
    return {key: float(m[key]), "macro_f1": float(m["macro_f1"]), "llm_call_rate": call_rate}


def new_records(store: LabelStore, registry: Registry) -> int:
    """Records written to the store since the last retrain's challenger, promoted or refused, was trained (all of
    them before the first): a refused challenger is not trained again on the same labels."""
    from fusion.bundle import MANIFEST

    trained = [e["version"] for e in registry.state()["history"] if e["event"] in ("promote", "refuse")]
    watermark = None
    if trained:
        manifest = json.loads((registry.bundle_path(trained[-1]) / MANIFEST).read_text(encoding="utf-8"))
        watermark = manifest.get("training", {}).get("label_store_part")
    return store.count_after(watermark)


def retrain(
    store: LabelStore,
    registry: Registry,
    settings: LoopSettings = LoopSettings(),
    *,
    config: Any = None,
    overrides: Sequence[str] = (),
    embed: Callable[[list[str]], np.ndarray] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a challenger on ``store``, compare it with ``registry``'s champion, promote it or not.

    ``config`` (default: the champion's) sets the encoder, the LLMs, the gate and training; ``overrides``
    (``section.field=value``) change it, e.g. only the gate's target, keeping the rest. ``embed``: the
    texts' embeddings by that encoder from elsewhere, instead of the registry's embedding cache. Returns the
    promotion report (also saved in the registry); ``report["decision"]`` is promote, refuse or skip, and
    ``report["embeddings"]`` counts the texts the cache had and those it embedded."""
    from fusion.classifier import AutoFusionClassifier
    from fusion.config import Config, apply_overrides

    start = time.perf_counter()
    champion_v = registry.champion()
    champion = None if champion_v is None else AutoFusionClassifier.load(registry.bundle_path(champion_v))
    if config is None:
        if champion is None and not overrides:
            raise DataError(f"registry {registry.root} has no champion: give a config for the first model")
        config = Config() if champion is None else champion.config
    config = config if isinstance(config, Config) else Config.model_validate(config)
    if overrides:
        config = apply_overrides(config, list(overrides))
    stats = store.stats()
    report: dict[str, Any] = {"at": time.time(), "store": store.uri, "store_stats": stats, "champion": champion_v}
    fresh = new_records(store, registry)
    if fresh < settings.min_new_labels:
        report.update(
            decision="skip",
            reason=f"{fresh} new label(s) since the last retrain; retraining needs {settings.min_new_labels}",
        )
        log.info("%s", report["reason"])
        return report
    if champion is not None:
        space = champion._require_fitted().label_space
        if config.labels.classes and list(config.labels.classes) != list(space.classes):
            raise ConfigError(
                f"labels.classes {config.labels.classes} differ from the champion's {space.classes}: a retrain keeps "
                "the champion's classes; other classes need a first model in a new registry"
            )
    elif config.labels.classes:
        space = LabelSpace(config.labels.classes, config.labels.mode == "multilabel")
    else:
        raise DataError("the first model needs labels.classes in its config")
    config = config.model_copy(deep=True)
    config.labels.classes = list(space.classes)
    llm_names = tuple(c.name for c in config.llms)
    ex = examples(store.labels(), space, llm_names, settings.human_weight)
    if not len(ex.texts):
        raise DataError(f"label store {store.uri} has no labels this model can learn from")
    if ex.skipped:
        log.warning("%d label(s) name classes outside %s: left out of this retrain", ex.skipped, space.classes)
    held = in_holdout(pd.Series(ex.text_ids), settings.holdout_fraction)
    train, hold = ex.take(np.flatnonzero(~held)), ex.take(np.flatnonzero(held))
    n_people = int(hold.human.sum())
    # people's labels when there are enough of them, or when there is nothing else to compare on
    by_people = n_people >= max(settings.min_human_holdout, 1) or 0 < n_people == len(hold.texts)
    hold = hold.take(np.flatnonzero(hold.human if by_people else ~hold.human))
    log.info(
        "training a challenger on %d labels (%d people's), %d held out",
        len(train.texts),
        train.human.sum(),
        len(hold.texts),
    )

    runtime = {"device", "batch_size", "num_threads"}  # how an encoder runs, not what it computes
    same_encoder = champion is not None and (
        champion.config.encoder.model_dump(exclude=runtime) == config.encoder.model_dump(exclude=runtime)
    )
    encoder = champion.encoder if champion is not None and same_encoder and not config.encoder.fine_tuned else None
    challenger = AutoFusionClassifier(config, encoder=encoder)
    cache = None
    if embed is None and settings.embedding_cache_rows and not config.encoder.fine_tuned:
        cache = EmbeddingCache(registry.root / "embeddings", challenger.encoder, settings.embedding_cache_rows)
        embed = partial(cache, progress=progress)
    elif embed is None or config.encoder.fine_tuned:
        embed = lambda texts: challenger.encoder.embed(texts, progress=progress)  # noqa: E731
    emb = None if config.encoder.fine_tuned else embed(train.texts)  # a fine-tuned encoder trains on the texts
    challenger.fit(
        train.texts,
        soft_labels=train.targets,
        sample_weight=train.weights,
        llm_scores=train.scores or None,
        embeddings=emb,
        progress=progress,
    )
    challenger.training["label_store_part"] = stats["newest_part"]
    challenger.training["labels"] = {"human": int(train.human.sum()), "llm": int((~train.human).sum())}
    registry.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".challenger-", dir=registry.root) as tmp:
        version = registry.register(challenger.save(Path(tmp) / "bundle"))

    key = headline_key(space.multilabel)
    report.update(
        challenger=version,
        trained_on={"labels": len(train.texts), "human": int(train.human.sum()), "skipped": ex.skipped},
        holdout={
            "kind": "human labels"
            if by_people
            else f"agreement with the LLM ({n_people} human labels held out, fewer than {settings.min_human_holdout})",
            "rows": len(hold.texts),
        },
        metric=key,
        gate_threshold=challenger.head.gate_threshold if challenger.head else None,
        training=challenger.training,
    )
    if len(hold.texts):
        hold_emb = embed(hold.texts)
        assert challenger.head is not None
        report["challenger_scores"] = judge(challenger.head, hold_emb, hold, by_people)
        if champion is not None and champion.head is not None:
            champ_emb = hold_emb if encoder is not None else champion.encoder.embed(hold.texts)
            report["champion_scores"] = judge(champion.head, champ_emb, hold, by_people)
    if cache is not None:
        report["embeddings"] = cache.stats
    c_score = report.get("challenger_scores", {}).get(key)
    h_score = report.get("champion_scores", {}).get(key)
    if champion is None:
        decision, reason = "promote", "no champion yet"
    elif c_score is None or h_score is None:
        decision, reason = "refuse", "no held-out labels to compare on"
    elif c_score >= h_score - settings.min_delta:
        decision, reason = "promote", f"{key} {c_score:.4f} vs the champion's {h_score:.4f}"
    else:
        decision, reason = "refuse", f"{key} {c_score:.4f} is below the champion's {h_score:.4f}"
    report.update(decision=decision, reason=reason, seconds=round(time.perf_counter() - start, 2))
    if decision == "promote":
        registry.promote(version, report)
    else:
        registry.refuse(version, report)
    log.info("%s challenger %s: %s", decision, version, reason)
    return report


def worth_asking(
    store: LabelStore, champion: Any, n: int, *, max_per_day: int | None = None, candidates: int = 5000
) -> pd.DataFrame:
    """The texts a person's label would help most, at most ``n`` (and ``max_per_day`` a day), logged as exported.

    Candidates are the newest ``candidates`` texts the LLMs answered and no person labelled or was sent yet.
    Each is scored by what the champion's encoder-only path says about it: 2 when it disagrees with the
    LLM, plus the lack of margin between its top two classes (0 to 1), plus how rare its predicted class is
    among the candidates (0 to 1). Columns: text_id, text, llm_labels, model_labels, margin, reason."""
    exported = store.exported()
    if max_per_day is not None:
        today = time.strftime("%Y-%m-%d", time.gmtime())
        n = min(n, max_per_day - sum(day == today for day in exported.values()))
    labels = store.labels()
    cand = labels[(labels["source"] == "llm") & ~labels["text_id"].isin(list(exported))].tail(candidates)
    columns = ["text_id", "text", "llm_labels", "model_labels", "margin", "reason"]
    if n <= 0 or cand.empty:
        return pd.DataFrame(columns=columns)
    head = champion._require_fitted()
    proba = head.proba(head.features(champion.encoder.embed(cand["text"].tolist())))  # every LLM missing
    model_labels = head.decide(proba)
    as_list = [m if isinstance(m, list) else [m] for m in model_labels]
    disagree = np.array([sorted(m) != sorted(lab) for m, lab in zip(as_list, cand["labels"], strict=True)])
    if head.multilabel:
        margin = np.abs(2 * proba - 1).min(axis=1)
    else:
        top = np.sort(proba, axis=1)
        margin = top[:, -1] - top[:, -2]
    first = [m[0] if m else "" for m in as_list]
    counts = pd.Series(first).map(pd.Series(first).value_counts()).to_numpy()
    rarity = 1.0 - (counts - 1) / max(len(first) - 1, 1)
    score = 2.0 * disagree + (1.0 - margin) + rarity
    pick = np.argsort(-score, kind="stable")[:n]
    reasons = [
        "; ".join(
            r
            for r, on in (
                ("the encoder and the LLM disagree", disagree[i]),
                (f"low margin {margin[i]:.2f}", margin[i] < 0.2),
                (f"rare predicted class {first[i]!r}", rarity[i] > 0.9),
            )
            if on
        )
        or "least sure"
        for i in pick
    ]
    out = pd.DataFrame(
        {
            "text_id": cand["text_id"].to_numpy()[pick],
            "text": cand["text"].to_numpy()[pick],
            "llm_labels": [list(cand["labels"].iloc[i]) for i in pick],
            "model_labels": [as_list[i] for i in pick],
            "margin": np.round(margin[pick], 4),
            "reason": reasons,
        }
    )
    store.log_export(out["text_id"].tolist())
    return out
