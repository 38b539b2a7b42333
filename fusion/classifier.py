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
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin

from fusion import bundle as bundle_io
from fusion.calibration import decide, to_proba
from fusion.config import Config, LLMMode, load_config, parse_config
from fusion.datasets import texts_and_labels
from fusion.encoder import TextEncoder
from fusion.errors import ConfigError, DataError, NotFittedError
from fusion.fewshot import ExamplePool
from fusion.gating import call_rate_table, choose_threshold, confidence
from fusion.head import FusionHead, Labels, Prediction, Scores
from fusion.labels import LabelSpace, normalize_labels
from fusion.metrics import SUMMARY_KEYS, evaluate, headline_key
from fusion.model import FeatureLayout, FeatureScaler, build_features
from fusion.texts import PROBE_TEXT, check_texts

if TYPE_CHECKING:
    from sklearn.utils import Tags

    from fusion.llm import Ledger, LLMPanel, ScoreBatch

log = logging.getLogger(__name__)

__all__ = ["AutoFusionClassifier", "Prediction"]

# texts: a DataFrame (columns named by config.data), a Series, an array or a list of strings
TextInput: TypeAlias = "pd.DataFrame | pd.Series | np.ndarray | Sequence[str]"


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


def _check_weights(weights: Any, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float32)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise DataError(f"sample_weight must be {n} finite weights >= 0, not all zero")
    return w


def _sample_rows(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of about ``fraction`` of the rows: per class for multiclass labels (at least one each)."""
    n = len(y)
    if fraction >= 1.0:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if y.ndim == 1 else [np.arange(n)]
    picked = [rng.choice(g, size=max(1, round(fraction * len(g))), replace=False) for g in groups]
    return np.sort(np.concatenate(picked))


if TYPE_CHECKING:  # scikit-learn ships no type information: mypy checks the class as if it had no base
    _Estimator = object
else:

    class _Estimator(ClassifierMixin, BaseEstimator):
        pass


class AutoFusionClassifier(_Estimator):
    """Encoder embedding + per-LLM class scores -> fusion head -> calibrated probabilities.

    The model is three parts, each saved in the bundle and loadable alone
    (:class:`fusion.bundle.Bundle`): the encoder (:attr:`encoder`), the fusion head
    (:attr:`head`: layout, scaler, MLP, temperature, thresholds, gate) and the few-shot
    example pool (:attr:`pool`); the LLM panel (:attr:`llm_panel`) is built from the config.
    It is a scikit-learn estimator: ``clone``, ``cross_val_score``, ``GridSearchCV`` over
    ``config`` and ``Pipeline`` work, and fitted classes are in :attr:`classes_`.
    """

    def __init__(
        self,
        config: Config | Mapping[str, Any] | str | Path | None = None,
        *,
        encoder: TextEncoder | None = None,
        ledger: Ledger | None = None,
    ):
        """``encoder``: use this encoder instead of the configured one (e.g. one shared by many models; a saved
        bundle records its settings, so loading it builds the same encoder); it is never changed: fine-tuning
        trains a copy, with this config's ``encoder.fine_tuning`` and ``encoder.fine_tune_lr``. ``ledger``
        replaces the in-process LLM budget/rate ledger (e.g. a shared Ray actor)."""
        self.config = _coerce_config(config)
        self._encoder_param, self._ledger = encoder, ledger
        self._encoder = encoder
        self._encoder_changed = False  # _encoder is a fine-tuned one (from fit or load), not the stock encoder
        self._panel: LLMPanel | None = None
        self.head: FusionHead | None = None
        self.pool: ExamplePool | None = None  # few-shot examples (configs with few_shot > 0)
        self.metrics: dict[str, Any] = {}
        self.training: dict[str, Any] = {}
        self.llm_usage: dict[str, dict[str, Any]] = {}
        self.version: str | None = None  # content id of the bundle saved or loaded (see fusion.bundle.version_of)

    # -- scikit-learn -----------------------------------------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"config": self.config, "encoder": self._encoder_param, "ledger": self._ledger}

    def set_params(self, **params: Any) -> AutoFusionClassifier:
        unknown = sorted(set(params) - {"config", "encoder", "ledger"})
        if unknown:
            raise ValueError(f"invalid parameter(s) {unknown} for AutoFusionClassifier: config, encoder, ledger")
        if "config" in params:
            self.config = _coerce_config(params["config"])
        if "encoder" in params:
            self._encoder_param = self._encoder = params["encoder"]
            self._encoder_changed = False
        if "ledger" in params:
            self._ledger = params["ledger"]
        self._panel = None
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return self.head is not None

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()  # type: ignore[misc]
        tags.input_tags.two_d_array = False  # X is texts (a list, a Series or a DataFrame)
        tags.input_tags.string = True
        return tags

    def score(self, X: TextInput, y: Any = None, sample_weight: Any = None) -> float:
        """Accuracy (multiclass) or subset accuracy (multilabel) on ``X``, like :meth:`evaluate`'s headline."""
        if sample_weight is not None:
            raise ValueError("AutoFusionClassifier.score does not take sample_weight")
        return float(self.evaluate(X, y)[headline_key(self.multilabel)])

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = TextEncoder(self.config.encoder)
        return self._encoder

    @property
    def classes_(self) -> list[str]:
        return self._require_fitted().classes

    @property
    def classes(self) -> list[str]:
        """The class names (same as :attr:`classes_`)."""
        return self.classes_

    @property
    def multilabel(self) -> bool:
        return self.config.labels.mode == "multilabel"

    def _require_fitted(self) -> FusionHead:
        if self.head is None:
            raise NotFittedError("this classifier is not fitted yet: call fit() or AutoFusionClassifier.load()")
        return self.head

    # -- input handling ---------------------------------------------------------------------------------------
    def _texts_labels(self, X: TextInput, y: Any, require_labels: bool) -> tuple[list[str], Any]:
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

    def _soft_targets(self, soft: Any, n: int) -> tuple[LabelSpace, np.ndarray]:
        """The label space (config.labels.classes) and checked soft targets; multiclass rows sum to 1."""
        if not self.config.labels.classes:
            raise ConfigError("soft_labels need labels.classes in the config: the order of their columns")
        space = LabelSpace(self.config.labels.classes, self.multilabel)
        t = np.asarray(soft, dtype=np.float32)
        if t.shape != (n, space.n_classes):
            raise DataError(f"soft_labels have shape {t.shape}; expected ({n}, {space.n_classes}) for {space.classes}")
        if not np.isfinite(t).all() or (t < 0).any() or (t > 1).any():
            raise DataError("soft_labels must be probabilities in [0, 1], with no NaN")
        if not space.multilabel:
            sums = t.sum(axis=1, keepdims=True)
            if (sums <= 0).any():
                raise DataError("every soft_labels row needs a positive probability (multiclass)")
            t = t / sums
        return space, t

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
    def llm_panel(self) -> LLMPanel:
        """The configured LLM scorers with the few-shot pool (built on first use; needs the label space)."""
        if self._panel is None:
            self._panel = self._build_panel(self._require_fitted().label_space)
        return self._panel

    def _build_panel(self, space: LabelSpace) -> LLMPanel:
        from fusion.llm import LLMPanel

        cfg = self.config
        return LLMPanel(
            cfg.llms,
            space.classes,
            space.multilabel,
            cfg.llm_limits,
            ledger=self._ledger,
            pool=self.pool,
            descriptions=cfg.labels.descriptions,
        )

    def _score_sample(
        self, texts: list[str], emb: np.ndarray, y: np.ndarray, given: Scores | None, pool: bool, progress: bool
    ) -> tuple[dict[str, np.ndarray], dict[str, ScoreBatch]]:
        """LLM scores for ``train.llm_fraction`` of the rows (stratified); the other rows are NaN (missing)."""
        assert self._panel is not None
        idx = _sample_rows(y, self.config.train.llm_fraction, self.config.train.seed)
        scores, batches = self._panel.score_missing(
            [texts[i] for i in idx], emb[idx], _subset(given, idx), exclude=idx if pool else None, progress=progress
        )
        if len(idx) == len(texts):
            return scores, batches
        out = {k: np.asarray(v, dtype=np.float32) for k, v in (given or {}).items()}
        for name in batches:
            out[name] = np.full((len(texts), scores[name].shape[1]), np.nan, dtype=np.float32)
            out[name][idx] = scores[name]
        return out, batches

    @staticmethod
    def _usage(batches: Mapping[str, ScoreBatch]) -> dict[str, dict[str, Any]]:
        return {name: b.stats.to_dict() for name, b in batches.items()}

    # -- training ---------------------------------------------------------------------------------------------
    def fit(
        self,
        X: TextInput,
        y: Any = None,
        *,
        validation: TextInput | None = None,
        validation_labels: Any = None,
        llm_scores: Scores | None = None,
        validation_llm_scores: Scores | None = None,
        embeddings: np.ndarray | None = None,
        validation_embeddings: np.ndarray | None = None,
        soft_labels: np.ndarray | None = None,
        sample_weight: Any = None,
        progress: bool = False,
    ) -> AutoFusionClassifier:
        """Fit on texts and labels; hold out ``train.val_fraction`` for validation unless ``validation`` is given.

        ``soft_labels`` instead of ``y``: an (n, k) matrix of target probabilities in the order of
        ``config.labels.classes`` (e.g. an LLM's answers; a one-hot row is a hard label). The held-out rows,
        calibration and the gate use their decided labels (argmax, or p >= 0.5 for multilabel).
        ``sample_weight``: a weight per training row (e.g. people's labels above an LLM's)."""
        from fusion.finetune import tuning_copy, two_stage  # PyTorch: loaded to train, not to predict
        from fusion.train import fit_head, holdout_rows

        cfg = self.config
        texts, raw = self._texts_labels(X, y, require_labels=soft_labels is None)
        if not texts:
            raise DataError("no training rows")
        if validation is not None:  # checked before anything is embedded
            v_texts, v_raw = self._texts_labels(validation, validation_labels, require_labels=True)
            if not v_texts:
                raise DataError("no validation rows: the validation data is empty")
        precomputed = embeddings is not None or validation_embeddings is not None
        fine_tune = _fine_tune_mode(cfg, len(texts), precomputed)
        if fine_tune != "off" and precomputed:
            raise ConfigError("encoder.fine_tune needs texts, not precomputed embeddings")
        if fine_tune == "two-stage" and _few_shot(cfg):
            raise ConfigError(
                "few_shot examples are not supported with encoder.fine_tune 'two-stage' yet: "
                "use fine_tune 'off' or 'joint', or few_shot 0"
            )
        if cfg.llms:  # a missing API key or URL is refused now, not after the corpus is embedded
            from fusion.llm.providers import resolve_endpoint

            for llm in cfg.llms:
                resolve_endpoint(llm)
        if self._encoder_changed:  # a previous fit (or load) fine-tuned it: start again from the stock encoder
            self._encoder, self._encoder_changed = self._encoder_param, False
        if soft_labels is None:
            y_all, space = self._encode_labels(raw, len(texts), None)
            targets = y_all
        else:
            space, targets = self._soft_targets(soft_labels, len(texts))
            y_all = (targets >= 0.5).astype(np.float32) if space.multilabel else targets.argmax(axis=1)
        weights = _check_weights(sample_weight, len(texts))
        emb = self._embed(texts, embeddings, progress)
        layout = FeatureLayout(emb.shape[1], space.n_classes, self._llm_names(llm_scores))
        self.head, self.pool, self.llm_usage = None, None, {}
        if _few_shot(cfg):
            max_words = max(c.max_words for c in cfg.llms)
            self.pool = ExamplePool.from_training(texts, space.decode(y_all), emb, max_words)
        self._panel = self._build_panel(space)
        if cfg.llms:
            llm_scores, batches = self._score_sample(texts, emb, y_all, llm_scores, pool=True, progress=progress)
            self.llm_usage["train"] = self._usage(batches)
        raw_x = build_features(emb, llm_scores, layout)

        if validation is None:
            try:
                tr, va = holdout_rows(y_all, cfg.train.val_fraction, cfg.train.seed)
            except ValueError as err:
                raise DataError(f"cannot hold out a validation split from {len(texts)} rows: {err}") from None
            x_tr, x_va, y_tr, y_va = raw_x[tr], raw_x[va], targets[tr], y_all[va]
            t_tr, t_va = [texts[i] for i in tr], [texts[i] for i in va]
            va_scores = _subset(llm_scores, va)
        else:
            y_va, _ = self._encode_labels(v_raw, len(v_texts), space)
            v_emb = self._embed(v_texts, validation_embeddings, progress)
            tr = np.arange(len(texts))
            x_tr, y_tr, t_tr, t_va = raw_x, targets, texts, v_texts
            va_scores, batches = self._score_sample(
                v_texts, v_emb, y_va, validation_llm_scores, pool=False, progress=progress
            )
            if batches:
                self.llm_usage["validation"] = self._usage(batches)
            x_va = build_features(v_emb, va_scores, layout)

        w_tr = None if weights is None else weights[tr]
        stage1 = None
        if fine_tune == "two-stage":
            d = layout.embed_dim
            stage1 = two_stage(
                self.encoder,
                t_tr,
                x_tr[:, :d],
                y_tr,
                y_all[tr],
                t_va,
                x_va[:, :d],
                y_va,
                cfg,
                space.n_classes,
                space.multilabel,
                with_llms=bool(layout.n_llms),
                w_tr=w_tr,
                progress=progress,
            )
            rows = stage1.rows
            layout = FeatureLayout(space.n_classes, space.n_classes, layout.llm_names)
            x_tr = np.concatenate([stage1.logits_tr, x_tr[rows, d:]], axis=1)
            x_va = np.concatenate([stage1.logits_va, x_va[:, d:]], axis=1)
            y_tr, w_tr = y_tr[rows], None if w_tr is None else w_tr[rows]
            self._encoder, self._encoder_changed = stage1.encoder, True
        elif fine_tune == "joint":
            self._encoder, self._encoder_changed = tuning_copy(self.encoder, cfg), True  # never the caller's encoder
        joint = fine_tune == "joint"
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
            encoder=self.encoder if joint else None,
            texts_train=t_tr if joint else None,
            texts_val=t_va if joint else None,
            scaler=scaler,
            w_train=w_tr,
            progress=progress,
        )
        head = FusionHead(
            space, layout, scaler, fit.head.inference(), fit.temperature, fit.thresholds, fit.at_least_one
        )
        _warn_thin(y_all[tr], len(y_va), space)
        self.training = {
            "n_train": len(y_tr),
            "n_val": len(y_va),
            "label_share": _label_share(y_all[tr], space),  # what serving compares its label mix with (drift)
            **fit.summary(),
            "fine_tuned_encoder": fine_tune,
        }
        if stage1 is not None:
            self.training["two_stage"] = {"features": cfg.encoder.fine_tuning.features, **stage1.summary()}
        # a jointly fine-tuned encoder changed under training: re-embed validation texts with the final weights
        z_va = head.features(self.encoder.embed(t_va), va_scores) if joint else scaler.transform(x_va)
        self.metrics = {"validation": _metrics(head, head.logits(z_va), y_va)}
        if layout.n_llms:
            enc_va = head.proba(head.encoder_only(z_va))
            self.metrics["gating"] = call_rate_table(
                enc_va, head.proba(z_va), y_va, space, head.thresholds, head.at_least_one
            )
            if cfg.gating.enabled:
                conf = confidence(enc_va, space.multilabel)
                head.gate_threshold = choose_threshold(conf, self.metrics["gating"], cfg.gating, space.multilabel)
        self.head = head
        return self

    # -- inference --------------------------------------------------------------------------------------------
    def predict_details(
        self,
        X: TextInput,
        *,
        llm_scores: Scores | None = None,
        embeddings: np.ndarray | None = None,
        llm: LLMMode = "auto",
        calibrated: bool = True,
        progress: bool = False,
        gate: bool | None = None,
    ) -> Prediction:
        """Probabilities, labels and, per text, which LLMs were used and what they cost.

        ``llm``: ``auto`` asks the LLMs only about texts whose encoder-only confidence is below the
        gate threshold learned at training (every text when the model has no gate), ``off`` never,
        ``all`` always. LLM scores missing from ``llm_scores`` are fetched from the configured LLMs.
        :meth:`Prediction.results` gives one result per text. ``gate`` is the old spelling
        (``gate=False`` is ``llm="all"``) and will be removed.
        """
        if gate is not None:
            warnings.warn(
                "predict_details(gate=...) is deprecated: use llm='auto' (gate=True) or llm='all' (gate=False)",
                DeprecationWarning,
                stacklevel=2,
            )
            llm = "auto" if gate else "all"
        head = self._require_fitted()
        texts, _ = self._texts_labels(X, None, require_labels=False)
        emb = self._embed(texts, embeddings, progress)
        return head.predict(texts, emb, self.llm_panel, llm, given=llm_scores, calibrated=calibrated, progress=progress)

    def predict_proba(
        self,
        X: TextInput,
        *,
        llm_scores: Scores | None = None,
        embeddings: np.ndarray | None = None,
        llm: LLMMode = "auto",
        calibrated: bool = True,
        progress: bool = False,
    ) -> np.ndarray:
        """Class probabilities ``(n, n_classes)`` in the order of :attr:`classes_`."""
        return self.predict_details(
            X, llm_scores=llm_scores, embeddings=embeddings, llm=llm, calibrated=calibrated, progress=progress
        ).proba

    def predict(self, X: TextInput, **kwargs: Any) -> Labels:
        """A label per text (multiclass) or a list of labels per text (multilabel)."""
        return self.predict_details(X, **kwargs).labels

    def decide(self, proba: np.ndarray) -> Labels:
        """Labels from calibrated probabilities: argmax, or per-class thresholds (+ at-least-one fallback)."""
        return self._require_fitted().decide(proba)

    def embed(self, X: TextInput, *, progress: bool = False) -> np.ndarray:
        """Encoder embeddings of ``X`` (reuse them via ``embeddings=`` to avoid encoding twice)."""
        texts, _ = self._texts_labels(X, None, require_labels=False)
        return self.encoder.embed(texts, progress=progress)

    def evaluate(
        self,
        X: TextInput,
        y: Any = None,
        *,
        llm_scores: Scores | None = None,
        embeddings: np.ndarray | None = None,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Metrics (see :mod:`fusion.metrics`) with calibrated probabilities, plus the uncalibrated ECE/NLL.

        Every text is scored by every LLM (no gate)."""
        head = self._require_fitted()
        texts, y_enc = self._labelled(X, y)
        emb = self._embed(texts, embeddings, progress)
        scores, batches = self.llm_panel.score_missing(texts, emb, llm_scores, progress=progress)
        out = _metrics(head, head.logits(head.features(emb, scores)), y_enc)
        if batches:
            out["llm_usage"] = self._usage(batches)
        return out

    def targets(self, X: TextInput, y: Any = None) -> np.ndarray:
        """True labels of ``X`` encoded like the model's outputs (indices, or a 0/1 matrix for multilabel)."""
        return self._labelled(X, y)[1]

    def _labelled(self, X: TextInput, y: Any) -> tuple[list[str], np.ndarray]:
        space = self._require_fitted().label_space
        texts, raw = self._texts_labels(X, y, require_labels=True)
        if not texts:
            raise DataError("no rows to evaluate: the data is empty")
        return texts, self._encode_labels(raw, len(texts), space)[0]

    # -- persistence ------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the model as a bundle directory (see :mod:`fusion.bundle`); returns its path."""
        head = self._require_fitted()
        fine_tuned = self._encoder_changed
        probe = self.encoder.embed([PROBE_TEXT])[0, : bundle_io.PROBE_DIMS]
        tensors = head.tensors() | (self.pool.tensors() if self.pool is not None else {})
        manifest = {
            **head.manifest(),
            "encoder": {**self.encoder.reference(), "embedded": fine_tuned, "probe": probe.tolist()},
            "fewshot": None if self.pool is None else self.pool.manifest(),
            "config": self._saved_config(),
            "metrics": self.metrics,
            "training": self.training,
        }
        out = bundle_io.write_bundle(path, manifest, tensors, self.encoder.save if fine_tuned else None)
        self.version = bundle_io.version_of(json.loads((out / bundle_io.MANIFEST).read_text(encoding="utf-8")))
        return out

    def _saved_config(self) -> dict[str, Any]:
        """The config a bundle keeps. Loading builds the encoder from it, so an encoder given to the constructor
        is described by its own settings (those of its :meth:`TextEncoder.reference`), not the config's."""
        config = self.config.model_dump()
        if self._encoder_param is not None:
            ref = self._encoder_param.reference()
            config["encoder"] |= {k: v for k, v in ref.items() if k in config["encoder"]}
        return config

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | None = None,
        encoder: TextEncoder | None = None,
        ledger: Ledger | None = None,
    ) -> AutoFusionClassifier:
        """Load a bundle written by :meth:`save`; ``device`` overrides ``encoder.device``, ``encoder`` and
        ``ledger`` as in the constructor. To load one part alone, use :class:`fusion.bundle.Bundle`."""
        b = bundle_io.Bundle.open(path)
        config = b.config
        if device is not None:
            config.encoder = config.encoder.on(device)
        clf = cls(config, encoder=encoder, ledger=ledger)
        clf.head, clf.pool = b.head(), b.pool()
        clf.metrics, clf.training = b.manifest.get("metrics", {}), b.manifest.get("training", {})
        clf.version = b.version
        clf._encoder, clf._encoder_changed = b.encoder(device, encoder), b.fine_tuned
        return clf


def _few_shot(cfg: Config) -> bool:
    return bool(cfg.llms) and max(c.few_shot for c in cfg.llms) > 0


def _fine_tune_mode(cfg: Config, n_rows: int, precomputed: bool) -> str:
    """``encoder.fine_tune`` for this fit: 'auto' is 'off' below ``auto_min_rows`` training rows, for
    precomputed embeddings and for few-shot prompts."""
    few_rows = n_rows < cfg.encoder.fine_tuning.auto_min_rows
    if cfg.encoder.fine_tune == "auto" and (few_rows or precomputed or _few_shot(cfg)):
        return "off"
    return cfg.encoder.resolved_fine_tune()


MIN_VALIDATION_ROWS = 30


def _class_counts(y: np.ndarray, space: Any) -> np.ndarray:
    return y.sum(axis=0) if space.multilabel else np.bincount(y.astype(int), minlength=space.n_classes)


def _warn_thin(y_train: np.ndarray, n_val: int, space: Any) -> None:
    """Say when the data is too thin for what is fitted on it: a class never seen in training cannot be
    learned, and a few validation rows make the temperature (and the gate) fit noise."""
    unseen = [c for c, n in zip(space.classes, _class_counts(y_train, space), strict=True) if n == 0]
    if unseen:
        log.warning("class(es) %s have no training rows: the model cannot learn them; label some", unseen)
    if n_val < MIN_VALIDATION_ROWS:
        log.warning(
            "only %d validation rows: calibration (the temperature) and the LLM gate are fitted on them and may be "
            "over- or under-confident; give at least %d (a --val file, or a larger train.val_fraction)",
            n_val,
            MIN_VALIDATION_ROWS,
        )


def _label_share(y: np.ndarray, space: Any) -> dict[str, float]:
    """Each class's share of the training labels (multi-label: of all the labels given)."""
    counts = _class_counts(y, space)
    total = float(counts.sum()) or 1.0
    return {c: round(float(n) / total, 6) for c, n in zip(space.classes, counts, strict=True)}


def _metrics(head: FusionHead, logits: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Calibrated metrics of ``logits`` against ``y``, with the uncalibrated summary and the temperature."""
    space, ml = head.label_space, head.multilabel
    proba = to_proba(logits, head.temperature, ml)
    out = evaluate(y, decide(proba, ml, head.thresholds, head.at_least_one), proba, space)
    raw = to_proba(logits, 1.0, ml)
    unc = evaluate(y, decide(raw, ml, None, head.at_least_one), raw, space)
    out["uncalibrated"] = {k: unc[k] for k in SUMMARY_KEYS if k in unc}
    out["temperature"] = head.temperature
    return out
