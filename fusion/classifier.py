"""AutoFusionClassifier: the Python API.

```python
clf = AutoFusionClassifier()                  # bundled MiniLM encoder, no LLM: the baseline
clf.fit(train_df, validation=val_df)          # columns from config.data (default: text, label)
clf.predict(["Shares in BP fell 3% ..."])     # -> ["business"]
clf.save("model/"); clf = AutoFusionClassifier.load("model/")
```

Inputs are a DataFrame (columns named by ``config.data``) or a list of texts plus
labels in any shape :mod:`fusion.labels` accepts. With ``config.llms`` set, every
configured LLM scores the texts (see :mod:`fusion.llm`); scores computed elsewhere can
be passed as ``llm_scores={"name": array(n, n_classes)}`` with NaN rows where an LLM
gave no answer. Precomputed embeddings (e.g. from the Ray Data embed job) can be passed
as ``embeddings=`` to skip the encoder. :meth:`AutoFusionClassifier.predict_details`
also says, per text, whether each LLM was used and what its answer cost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from fusion import bundle as bundle_io
from fusion.calibration import decide, to_proba
from fusion.config import Config, load_config, parse_config
from fusion.datasets import texts_and_labels
from fusion.encoder import TextEncoder
from fusion.errors import BundleError, ConfigError, DataError, NotFittedError
from fusion.gating import call_rate_table, choose_threshold, confidence
from fusion.labels import LabelSpace, normalize_labels
from fusion.metrics import SUMMARY_KEYS, evaluate
from fusion.model import FeatureLayout, FeatureScaler, FusionMLP, build_features
from fusion.texts import PROBE_TEXT, check_texts
from fusion.train import fit_head

log = logging.getLogger(__name__)

Scores = Mapping[str, np.ndarray]


def _coerce_config(config: Config | Mapping[str, Any] | str | Path | None) -> Config:
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, Mapping):
        return parse_config(dict(config))
    raise ConfigError(f"config must be a Config, a dict or a file path, got {type(config).__name__}")


def _subset(scores: Scores | None, idx: np.ndarray) -> dict[str, np.ndarray] | None:
    return None if scores is None else {k: np.asarray(v)[idx] for k, v in scores.items()}


def _sample_rows(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of about ``fraction`` of the rows: per class for multiclass labels (at least one each)."""
    n = len(y)
    if fraction >= 1.0:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if y.ndim == 1 else [np.arange(n)]
    picked = [rng.choice(g, size=max(1, round(fraction * len(g))), replace=False) for g in groups]
    return np.sort(np.concatenate(picked))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Prediction:
    """What :meth:`AutoFusionClassifier.predict_details` returns."""

    proba: np.ndarray  # (n, n_classes) calibrated probabilities
    llm_used: np.ndarray  # (n, n_llms) bool: that LLM's scores went into the answer
    llm_cost_usd: np.ndarray  # (n,) list-price cost of the LLM answers used (cache hits included)
    gated_out: np.ndarray  # (n,) bool: the encoder was confident enough, no LLM was asked
    llm_errors: dict[str, list[str | None]] = field(default_factory=dict)
    usage: dict[str, dict[str, Any]] = field(default_factory=dict)  # per LLM: calls, cache hits, tokens, $, latency


class AutoFusionClassifier:
    """Encoder embedding + per-LLM class scores -> FusionMLP -> calibrated probabilities."""

    def __init__(
        self,
        config: Config | Mapping[str, Any] | str | Path | None = None,
        *,
        encoder: TextEncoder | None = None,
        ledger: Any = None,
    ):
        """``ledger`` replaces the in-process LLM budget/rate ledger (e.g. a shared Ray actor)."""
        self.config = _coerce_config(config)
        self._encoder = encoder
        self._ledger = ledger
        self._panel: Any = None
        self._pool: tuple[list[str], list[tuple[str, ...]], np.ndarray] | None = None  # few-shot examples
        self.gate_threshold: float | None = None
        self.label_space: LabelSpace | None = None
        self.layout: FeatureLayout | None = None
        self.scaler: FeatureScaler | None = None
        self.head: FusionMLP | None = None
        self.temperature = 1.0
        self.thresholds: np.ndarray | None = None
        self.at_least_one = False
        self.metrics: dict[str, Any] = {}
        self.training: dict[str, Any] = {}
        self.llm_usage: dict[str, dict[str, Any]] = {}
        self.version: str | None = None  # content id of the bundle saved or loaded (see fusion.bundle.version_of)

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = TextEncoder(self.config.encoder)
        return self._encoder

    @property
    def classes(self) -> list[str]:
        return self._require_fitted().classes

    @property
    def multilabel(self) -> bool:
        return self.config.labels.mode == "multilabel"

    def _require_fitted(self) -> LabelSpace:
        if self.label_space is None or self.head is None:
            raise NotFittedError("this classifier is not fitted yet: call fit() or AutoFusionClassifier.load()")
        return self.label_space

    # -- input handling ---------------------------------------------------------------------------------------
    def _texts_labels(self, X: Any, y: Any, require_labels: bool) -> tuple[list[str], Any]:
        if isinstance(X, pd.DataFrame):
            texts, labels = texts_and_labels(X, self.config.data, require_labels=require_labels and y is None)
            return check_texts(texts), (y if y is not None else labels)
        texts = check_texts(X.tolist() if hasattr(X, "tolist") else X)
        if require_labels and y is None:
            raise DataError("labels are required: pass y, or a DataFrame with the label column(s)")
        return texts, y

    def _encode_labels(self, y: Any, n: int, space: LabelSpace | None) -> tuple[np.ndarray, LabelSpace]:
        lab_cfg = self.config.labels
        if isinstance(y, np.ndarray) and y.ndim == 2:
            names = space.classes if space else lab_cfg.classes
            if names is None:
                raise DataError("a 0/1 label matrix needs class names: set labels.classes or pass a DataFrame")
            y = pd.DataFrame(y, columns=names)
        norm = normalize_labels(y, self.multilabel, lab_cfg.label_separator)
        if len(norm) != n:
            raise DataError(f"got {n} texts but {len(norm)} labels")
        if space is None:
            space = (
                LabelSpace(lab_cfg.classes, self.multilabel)
                if lab_cfg.classes
                else LabelSpace.infer(norm, self.multilabel)
            )
        return space.encode(norm), space

    def _embed(self, texts: list[str], embeddings: np.ndarray | None, progress: bool) -> np.ndarray:
        if embeddings is not None:
            emb = np.asarray(embeddings, dtype=np.float32)
            if emb.shape[0] != len(texts):
                raise DataError(f"got {len(texts)} texts but {emb.shape[0]} precomputed embeddings")
            return emb
        return self.encoder.embed(texts, progress=progress)

    def _llm_names(self, llm_scores: Scores | None) -> tuple[str, ...]:
        configured = [s.name for s in self.config.llms]
        if not configured:
            return tuple(sorted(llm_scores or {}))
        unknown = sorted(set(llm_scores or {}) - set(configured))
        if unknown:
            raise ConfigError(f"scores given for LLM(s) {unknown} that config.llms does not list ({configured})")
        return tuple(configured)

    # -- LLM scoring ------------------------------------------------------------------------------------------
    @property
    def llm_panel(self) -> Any:
        """The configured LLM scorers (built on first use; needs the label space)."""
        if self._panel is None:
            from fusion.llm import LLMPanel

            space = self.label_space
            if space is None:
                raise NotFittedError("the LLM scorers need the label space: call fit() or AutoFusionClassifier.load()")
            self._panel = LLMPanel(
                self.config.llms, space.classes, space.multilabel, self.config.llm_limits, ledger=self._ledger
            )
        return self._panel

    def _neighbours(self, emb: np.ndarray, pool_rows: np.ndarray | None) -> list[list[Any]] | None:
        """Few-shot examples per text: the nearest pool texts by embedding, nearest last.

        ``pool_rows``: the pool row each text is, when the texts come from the pool itself
        (training): a text is never its own example."""
        k = max((c.few_shot for c in self.config.llms), default=0)
        if k == 0 or self._pool is None:
            return None
        from fusion.llm.prompts import Example

        texts, labels, pool = self._pool
        sims = _unit(emb) @ _unit(pool).T
        if pool_rows is not None:
            sims[np.arange(len(pool_rows)), pool_rows] = -np.inf
        idx = np.argsort(-sims, axis=1)[:, :k]
        return [[Example(texts[j], labels[j]) for j in row[::-1]] for row in idx]

    async def ascore_llms(
        self,
        texts: list[str],
        emb: np.ndarray,
        given: Scores | None = None,
        *,
        pool_rows: np.ndarray | None = None,
        progress: bool = False,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Scores of every configured LLM not already ``given``: ({name: (n, k) scores}, {name: ScoreBatch})."""
        out = {k: np.asarray(v, dtype=np.float32) for k, v in (given or {}).items()}
        todo = [c.name for c in self.config.llms if c.name not in out]
        if not todo or not texts:
            return out, {}
        neighbours = self._neighbours(emb, pool_rows)
        batches = await self.llm_panel.ascore(texts, neighbours, progress=progress, only=todo)
        for name, b in batches.items():
            out[name] = b.scores
        return out, batches

    def score_llms(
        self,
        texts: list[str],
        emb: np.ndarray,
        given: Scores | None = None,
        *,
        pool_rows: np.ndarray | None = None,
        progress: bool = False,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """:meth:`ascore_llms` for synchronous callers."""
        from fusion.llm.scorer import run_sync

        return run_sync(self.ascore_llms(texts, emb, given, pool_rows=pool_rows, progress=progress))

    def _score_sample(
        self, texts: list[str], emb: np.ndarray, y: np.ndarray, given: Scores | None, pool: bool, progress: bool
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """LLM scores for ``train.llm_fraction`` of the rows (stratified); the other rows are NaN (missing)."""
        idx = _sample_rows(y, self.config.train.llm_fraction, self.config.train.seed)
        scores, batches = self.score_llms(
            [texts[i] for i in idx], emb[idx], _subset(given, idx), pool_rows=idx if pool else None, progress=progress
        )
        if len(idx) == len(texts):
            return scores, batches
        out = {k: np.asarray(v, dtype=np.float32) for k, v in (given or {}).items()}
        for name in batches:
            out[name] = np.full((len(texts), scores[name].shape[1]), np.nan, dtype=np.float32)
            out[name][idx] = scores[name]
        return out, batches

    @staticmethod
    def _usage(batches: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        return {name: b.stats.to_dict() for name, b in batches.items()}

    # -- training ---------------------------------------------------------------------------------------------
    def fit(
        self,
        X: Any,
        y: Any = None,
        *,
        validation: Any = None,
        validation_labels: Any = None,
        llm_scores: Scores | None = None,
        validation_llm_scores: Scores | None = None,
        embeddings: np.ndarray | None = None,
        validation_embeddings: np.ndarray | None = None,
        progress: bool = False,
    ) -> AutoFusionClassifier:
        """Fit on texts and labels; hold out ``train.val_fraction`` for validation unless ``validation`` is given."""
        cfg = self.config
        texts, raw = self._texts_labels(X, y, require_labels=True)
        if not texts:
            raise DataError("no training rows")
        fine_tune = cfg.encoder.fine_tune
        if fine_tune and embeddings is not None:
            raise ConfigError("encoder.fine_tune needs texts, not precomputed embeddings")
        y_all, space = self._encode_labels(raw, len(texts), None)
        emb = self._embed(texts, embeddings, progress)
        layout = FeatureLayout(emb.shape[1], space.n_classes, self._llm_names(llm_scores))
        self.label_space, self._panel, self._pool, self.llm_usage = space, None, None, {}
        if cfg.llms:
            if max(c.few_shot for c in cfg.llms) > 0:
                max_words = max(c.max_words for c in cfg.llms)
                decoded = space.decode(y_all)
                self._pool = (
                    [" ".join(t.split()[:max_words]) for t in texts],
                    [(d,) if isinstance(d, str) else tuple(d) for d in decoded],
                    emb,
                )
            llm_scores, batches = self._score_sample(texts, emb, y_all, llm_scores, pool=True, progress=progress)
            self.llm_usage["train"] = self._usage(batches)
        raw_x = build_features(emb, llm_scores, layout)

        if validation is None:
            idx = np.arange(len(texts))
            strat = None if space.multilabel else y_all
            if strat is not None and np.bincount(strat, minlength=space.n_classes).min() < 2:
                strat = None
            try:
                tr, va = train_test_split(
                    idx, test_size=cfg.train.val_fraction, random_state=cfg.train.seed, stratify=strat
                )
            except ValueError as err:
                raise DataError(f"cannot hold out a validation split from {len(texts)} rows: {err}") from None
            tr, va = np.sort(tr), np.sort(va)
            x_tr, x_va, y_tr, y_va = raw_x[tr], raw_x[va], y_all[tr], y_all[va]
            t_tr, t_va = [texts[i] for i in tr], [texts[i] for i in va]
            va_scores = _subset(llm_scores, va)
        else:
            v_texts, v_raw = self._texts_labels(validation, validation_labels, require_labels=True)
            y_va, _ = self._encode_labels(v_raw, len(v_texts), space)
            v_emb = self._embed(v_texts, validation_embeddings, progress)
            x_tr, y_tr, t_tr, t_va = raw_x, y_all, texts, v_texts
            va_scores, batches = self._score_sample(
                v_texts, v_emb, y_va, validation_llm_scores, pool=False, progress=progress
            )
            if batches:
                self.llm_usage["validation"] = self._usage(batches)
            x_va = build_features(v_emb, va_scores, layout)

        scaler = FeatureScaler.fit(x_tr, layout)
        fit = fit_head(
            scaler.transform(x_tr),
            y_tr,
            scaler.transform(x_va),
            y_va,
            layout,
            cfg.fusion,
            cfg.train,
            space.multilabel,
            encoder=self.encoder if fine_tune else None,
            texts_train=t_tr if fine_tune else None,
            texts_val=t_va if fine_tune else None,
            scaler=scaler,
            progress=progress,
        )
        self.label_space, self.layout, self.scaler, self.head = space, layout, scaler, fit.head
        self.temperature, self.thresholds, self.at_least_one = fit.temperature, fit.thresholds, fit.at_least_one
        self.training = {
            "n_train": len(y_tr),
            "n_val": len(y_va),
            "best_epoch": fit.best_epoch,
            "epochs_run": len(fit.history),
            "fine_tuned_encoder": fine_tune,
        }
        # a fine-tuned encoder changed under training: re-embed validation texts with the final weights
        z_va = self._features(t_va, va_scores, None) if fine_tune else scaler.transform(x_va)
        self.metrics = {"validation": self._metrics(self._logits(z_va), y_va)}
        self.gate_threshold = None
        if layout.n_llms:
            enc_va = self._proba(self._encoder_only(z_va))
            self.metrics["gating"] = call_rate_table(
                enc_va, self._proba(z_va), y_va, space, self.thresholds, self.at_least_one
            )
            if cfg.gating.enabled:
                conf = confidence(enc_va, space.multilabel)
                self.gate_threshold = choose_threshold(conf, self.metrics["gating"], cfg.gating, space.multilabel)
        return self

    # -- inference --------------------------------------------------------------------------------------------
    def _features(
        self, texts: list[str], llm_scores: Scores | None, embeddings: np.ndarray | None, progress: bool = False
    ) -> np.ndarray:
        assert self.layout is not None and self.scaler is not None
        emb = self._embed(texts, embeddings, progress)
        return self.scaler.transform(build_features(emb, llm_scores, self.layout))

    def _logits(self, z: np.ndarray) -> np.ndarray:
        assert self.head is not None
        self.head.eval()
        with torch.no_grad():
            return self.head(torch.from_numpy(z)).numpy()

    def _metrics(self, logits: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        space = self._require_fitted()
        proba = to_proba(logits, self.temperature, space.multilabel)
        out = evaluate(y, decide(proba, space.multilabel, self.thresholds, self.at_least_one), proba, space)
        raw = to_proba(logits, 1.0, space.multilabel)
        unc = evaluate(y, decide(raw, space.multilabel, None, self.at_least_one), raw, space)
        out["uncalibrated"] = {k: unc[k] for k in SUMMARY_KEYS if k in unc}
        out["temperature"] = self.temperature
        return out

    def _encoder_only(self, z: np.ndarray) -> np.ndarray:
        """Scaled features with every LLM block marked missing."""
        assert self.layout is not None
        z = z.copy()
        for j in range(self.layout.n_llms):
            z[:, self.layout.block(j)] = 0.0
            z[:, self.layout.flag(j)] = 1.0
        return z

    def _proba(self, z: np.ndarray, calibrated: bool = True) -> np.ndarray:
        space = self._require_fitted()
        return to_proba(self._logits(z), self.temperature if calibrated else 1.0, space.multilabel)

    def predict_details(
        self,
        X: Any,
        *,
        llm_scores: Scores | None = None,
        embeddings: np.ndarray | None = None,
        gate: bool | None = None,
        calibrated: bool = True,
        progress: bool = False,
    ) -> Prediction:
        """Probabilities plus, per text, which LLMs were used and what they cost.

        With gating on (``gate``, default ``config.gating.enabled``), LLMs are asked only
        about texts whose encoder-only confidence is below the learned threshold. LLM
        scores missing from ``llm_scores`` are fetched from the configured LLMs.

        The three steps are public for callers that run them in different places (the
        Serve graph): :meth:`ask_llms` (the gate), :meth:`ascore_llms` (the LLMs, for the
        texts asked) and :meth:`fuse`.
        """
        texts, _ = self._texts_labels(X, None, require_labels=False)
        emb = self._embed(texts, embeddings, progress)
        ask = self.ask_llms(emb, gate=gate, calibrated=calibrated)
        idx = np.flatnonzero(ask)
        scores, batches = self.score_llms(
            [texts[i] for i in idx], emb[idx], _subset(llm_scores, idx), progress=progress
        )
        return self.fuse(emb, ask, scores, batches, calibrated=calibrated)

    def ask_llms(self, emb: np.ndarray, *, gate: bool | None = None, calibrated: bool = True) -> np.ndarray:
        """The cost gate: a bool per text, True where the LLMs should be asked (all False without LLMs)."""
        space = self._require_fitted()
        assert self.layout is not None and self.scaler is not None
        n = len(emb)
        if not self.layout.n_llms:
            return np.zeros(n, dtype=bool)
        gate = self.config.gating.enabled if gate is None else gate
        if not gate:
            return np.ones(n, dtype=bool)
        if self.gate_threshold is None:
            raise ConfigError("this model has no gating threshold: train it with gating.enabled=true")
        enc = self._proba(self.scaler.transform(build_features(emb, None, self.layout)), calibrated)
        return confidence(enc, space.multilabel) < self.gate_threshold

    def fuse(
        self,
        emb: np.ndarray,
        ask: np.ndarray,
        scores: Scores,
        batches: Mapping[str, Any] | None = None,
        *,
        calibrated: bool = True,
    ) -> Prediction:
        """Fuse embeddings with the LLM scores of the texts in ``ask`` (rows in ``ask`` order).

        ``batches`` ({name: ScoreBatch} from :meth:`ascore_llms`) supply cost, errors and usage.
        An LLM without scores, or a NaN row, is marked missing: the encoder-only path answers.
        """
        space = self._require_fitted()
        assert self.layout is not None
        n, m = len(emb), self.layout.n_llms
        idx = np.flatnonzero(ask)
        # unknown names go through too: build_features rejects them with a clear message
        full = {
            name: np.full((n, space.n_classes), np.nan, dtype=np.float32) for name in {*self.layout.llm_names, *scores}
        }
        for name, s in scores.items():
            full[name][idx] = s
        cost = np.zeros(n)
        errors: dict[str, list[str | None]] = {}
        for name, b in (batches or {}).items():
            cost[idx] += np.where(b.used, b.cost_usd, 0.0)
            errors[name] = [None] * n
            for i, e in zip(idx, b.errors, strict=True):
                errors[name][i] = e
        x = build_features(emb, full, self.layout)
        used = np.stack([x[:, self.layout.flag(j)] == 0 for j in range(m)], axis=1) if m else np.zeros((n, 0), bool)
        # a text the gate kept from the LLMs has missing blocks: the encoder-only path answers
        proba = self._proba(self.scaler.transform(x), calibrated)
        gated_out = ~ask if m else np.zeros(n, dtype=bool)
        return Prediction(proba, used, cost, gated_out, errors, self._usage(batches or {}))

    def predict_proba(
        self,
        X: Any,
        *,
        llm_scores: Scores | None = None,
        embeddings: np.ndarray | None = None,
        calibrated: bool = True,
        progress: bool = False,
    ) -> np.ndarray:
        """Class probabilities ``(n, n_classes)`` in the order of :attr:`classes`."""
        return self.predict_details(
            X, llm_scores=llm_scores, embeddings=embeddings, calibrated=calibrated, progress=progress
        ).proba

    def predict(self, X: Any, **kwargs: Any) -> list[str] | list[list[str]]:
        """A label per text (multiclass) or a list of labels per text (multilabel)."""
        return self.decide(self.predict_proba(X, **kwargs))

    def decide(self, proba: np.ndarray) -> list[str] | list[list[str]]:
        """Labels from calibrated probabilities: argmax, or per-class thresholds (+ at-least-one fallback)."""
        space = self._require_fitted()
        return space.decode(decide(proba, space.multilabel, self.thresholds, self.at_least_one))

    def embed(self, X: Any, *, progress: bool = False) -> np.ndarray:
        """Encoder embeddings of ``X`` (reuse them via ``embeddings=`` to avoid encoding twice)."""
        texts, _ = self._texts_labels(X, None, require_labels=False)
        return self.encoder.embed(texts, progress=progress)

    def evaluate(
        self,
        X: Any,
        y: Any = None,
        *,
        llm_scores: Scores | None = None,
        embeddings: np.ndarray | None = None,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Metrics (see :mod:`fusion.metrics`) with calibrated probabilities, plus the uncalibrated ECE/NLL."""
        texts, y_enc = self._labelled(X, y)
        emb = self._embed(texts, embeddings, progress)
        scores, batches = self.score_llms(texts, emb, llm_scores, progress=progress)
        out = self._metrics(self._logits(self._features(texts, scores, emb)), y_enc)
        if batches:
            out["llm_usage"] = self._usage(batches)
        return out

    def targets(self, X: Any, y: Any = None) -> np.ndarray:
        """True labels of ``X`` encoded like the model's outputs (indices, or a 0/1 matrix for multilabel)."""
        return self._labelled(X, y)[1]

    def _labelled(self, X: Any, y: Any) -> tuple[list[str], np.ndarray]:
        space = self._require_fitted()
        texts, raw = self._texts_labels(X, y, require_labels=True)
        return texts, self._encode_labels(raw, len(texts), space)[0]

    # -- persistence ------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        space = self._require_fitted()
        assert self.layout is not None and self.scaler is not None and self.head is not None
        fine_tuned = self.config.encoder.fine_tune
        probe = self.encoder.embed([PROBE_TEXT])[0, :16]
        tensors = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        tensors["scaler.mean"] = torch.from_numpy(self.scaler.mean)
        tensors["scaler.std"] = torch.from_numpy(self.scaler.std)
        if self._pool is not None:
            tensors["fewshot.embeddings"] = torch.from_numpy(np.ascontiguousarray(self._pool[2], dtype=np.float32))
        manifest = {
            "label_space": space.to_dict(),
            "layout": self.layout.to_dict(),
            "encoder": {**self.encoder.reference(), "embedded": fine_tuned, "probe": probe.tolist()},
            "head": {"hidden_dims": self.config.fusion.hidden_dims, "dropout": self.config.fusion.dropout},
            "temperature": self.temperature,
            "thresholds": None if self.thresholds is None else self.thresholds.tolist(),
            "at_least_one": self.at_least_one,
            "gate_threshold": self.gate_threshold,
            "fewshot": None if self._pool is None else {"texts": self._pool[0], "labels": self._pool[1]},
            "config": self.config.model_dump(),
            "metrics": self.metrics,
            "training": self.training,
        }
        out = bundle_io.write_bundle(path, manifest, tensors, self.encoder.save if fine_tuned else None)
        self.version = bundle_io.version_of(json.loads((out / bundle_io.MANIFEST).read_text(encoding="utf-8")))
        return out

    @classmethod
    def load(
        cls, path: str | Path, *, device: str | None = None, encoder: TextEncoder | None = None, ledger: Any = None
    ) -> AutoFusionClassifier:
        """Load a bundle written by :meth:`save`; ``device`` overrides ``encoder.device``, ``ledger`` as in
        the constructor."""
        contents = bundle_io.read_bundle(path)
        m = contents.manifest
        try:
            config = parse_config(m["config"], source=f"config stored in {path}")
            if device is not None:
                config.encoder.device = device
            clf = cls(config, encoder=encoder, ledger=ledger)
            clf.label_space = LabelSpace.from_dict(m["label_space"])
            clf.layout = FeatureLayout.from_dict(m["layout"])
            t = contents.tensors
            clf.scaler = FeatureScaler(t["scaler.mean"].numpy(), t["scaler.std"].numpy())
            head = FusionMLP(clf.layout.dim, clf.layout.n_classes, m["head"]["hidden_dims"], m["head"]["dropout"])
            head.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("head.")})
            clf.head = head.eval()
            clf.temperature = float(m["temperature"])
            clf.thresholds = None if m["thresholds"] is None else np.asarray(m["thresholds"], np.float32)
            clf.at_least_one = bool(m["at_least_one"])
            clf.gate_threshold = m.get("gate_threshold")
            if m.get("fewshot"):
                fs = m["fewshot"]
                clf._pool = (fs["texts"], [tuple(x) for x in fs["labels"]], t["fewshot.embeddings"].numpy())
            clf.metrics, clf.training = m.get("metrics", {}), m.get("training", {})
            clf.version = bundle_io.version_of(m)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise BundleError(f"{path} has an inconsistent manifest or weights ({type(err).__name__}: {err})") from None
        if encoder is None and contents.encoder_dir is not None:
            clf._encoder = TextEncoder(config.encoder, model_dir=str(contents.encoder_dir))
        ref = m["encoder"]
        if clf.encoder.dim != clf.layout.embed_dim:
            raise BundleError(
                f"encoder {ref['model']!r} gives {clf.encoder.dim}-d embeddings; the model needs {clf.layout.embed_dim}"
            )
        probe = clf.encoder.embed([PROBE_TEXT])[0, :16]
        if not np.allclose(probe, np.asarray(ref["probe"], np.float32), atol=1e-2):
            raise BundleError(
                f"encoder {ref['model']!r} ({clf.encoder.source}) gives different embeddings than the one this model "
                "was trained with; load it with the same encoder"
            )
        return clf
