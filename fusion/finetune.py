"""Two-stage fine-tuning (``encoder.fine_tune: two-stage``): the encoder as a classifier, then the fusion head.

Stage 1 fine-tunes a copy of the encoder with a linear classification layer (:func:`fine_tune_classifier`);
the encoder then gives that layer's class logits (:class:`Classifier`). Stage 2 trains the
fusion head on ``[logits | LLM scores | missing flags]``.

The trap this avoids: an encoder fine-tuned on the training rows is over-confident on exactly those
rows, so a head trained on the same rows learns that the LLMs add nothing. :func:`two_stage` therefore
gives the head logits of rows the encoder did not train on (``encoder.fine_tuning.features``):

* ``crossfit``: ``folds`` encoders, each fine-tuned without one fold, give that fold's logits
  (out-of-fold); one more encoder, fine-tuned on every row, is the one the model keeps.
  ``folds + 1`` fine-tunes; the kept encoder sees all the rows.
* ``holdout``: one encoder fine-tuned without ``holdout_fraction`` of the rows, which the head
  then trains on. One fine-tune, but neither stage sees every row.

Without LLMs there is nothing to weigh against the encoder: one fine-tune on every row, and the head
(calibrated on the validation rows) trains on its in-sample logits.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fusion.config import Config, FusionConfig
from fusion.encoder import TextEncoder
from fusion.errors import ConfigError, DataError
from fusion.model import FeatureLayout, FeatureScaler
from fusion.train import HeadFit, fit_head, holdout_rows

log = logging.getLogger(__name__)


class Classifier(torch.nn.Module):
    """A classification layer over pooled embeddings: standardise with ``mean``/``std``, then linear. An
    encoder fine-tuned as a classifier carries it (``classifier.safetensors``, these four tensors)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clone())
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    @property
    def n_classes(self) -> int:
        return int(self.linear.out_features)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear((pooled - self.mean) / self.std)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std, "weight": self.linear.weight, "bias": self.linear.bias}


def tuning_copy(encoder: TextEncoder, config: Config) -> TextEncoder:
    """A copy of ``encoder`` to fine-tune with ``config``'s fine-tuning settings (``encoder.fine_tuning``,
    ``encoder.fine_tune_lr``): an encoder the caller passed in brings its weights, not how to train them.
    ``encoder`` is not changed. An ONNX encoder is loaded again in PyTorch, from the weights it was exported
    from."""
    update = {"fine_tuning": config.encoder.fine_tuning, "fine_tune_lr": config.encoder.fine_tune_lr}
    if encoder.model is None:
        return TextEncoder(
            encoder.config.model_copy(update={**update, "backend": "torch"}), model_dir=encoder.model_dir
        )
    out = copy.deepcopy(encoder)
    out.config = out.config.model_copy(update=update)
    return out


def fine_tune_classifier(
    base: TextEncoder,
    texts_tr: list[str],
    emb_tr: np.ndarray,
    y_tr: np.ndarray,
    texts_va: list[str],
    emb_va: np.ndarray,
    y_va: np.ndarray,
    config: Config,
    n_classes: int,
    multilabel: bool,
    *,
    w_tr: np.ndarray | None = None,
    progress: bool = False,
) -> tuple[TextEncoder, HeadFit]:
    """A copy of ``base`` fine-tuned with a linear layer on ``(texts_tr, y_tr)``, stopped on the validation
    rows and given that layer (its ``embed`` then returns logits). ``emb_*`` are ``base``'s embeddings,
    for the standardisation the layer starts from. ``base`` is not changed."""
    if base.classifier is not None:
        raise ConfigError(
            "this encoder was already fine-tuned as a classifier; two-stage starts from a stock encoder "
            "(pass encoder=None, or the encoder the model was first trained from)"
        )
    encoder = tuning_copy(base, config)
    layout = FeatureLayout(encoder.hidden_size, n_classes)
    scaler = FeatureScaler.fit(emb_tr, layout)
    fit = fit_head(
        scaler.transform(emb_tr),
        y_tr,
        scaler.transform(emb_va),
        y_va,
        layout,
        FusionConfig(hidden_dims=[], dropout=0.0, llm_dropout=0.0),
        config.train.model_copy(update={"calibrate": False}),
        multilabel,
        encoder=encoder,
        texts_train=texts_tr,
        texts_val=texts_va,
        scaler=scaler,
        w_train=w_tr,
        progress=progress,
    )
    linear = fit.head.net[-1]
    assert isinstance(linear, torch.nn.Linear)
    encoder.attach(Classifier(torch.from_numpy(scaler.mean), torch.from_numpy(scaler.std), linear.weight, linear.bias))
    return encoder, fit


@dataclass
class TwoStage:
    """What stage 1 gives stage 2: the kept encoder, the training rows the head uses, and logits."""

    encoder: TextEncoder
    rows: np.ndarray  # indices into the training rows the head trains on
    logits_tr: np.ndarray  # (len(rows), k): logits of those rows from encoders that did not train on them
    logits_va: np.ndarray  # (n_val, k): the kept encoder's logits of the validation rows
    fits: list[dict[str, Any]] = field(default_factory=list)  # one summary per fine-tune
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"head_rows": len(self.rows), "fine_tunes": self.fits, "seconds": round(self.seconds, 1)}


def _folds(y: np.ndarray, n_splits: int, seed: int) -> list[np.ndarray]:
    """Held-out indices of each fold: stratified by class for multiclass labels where every class allows it."""
    from sklearn.model_selection import KFold, StratifiedKFold

    n = len(y)
    if y.ndim == 1 and np.bincount(y).max() >= n_splits:
        try:
            skf = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
            return [va for _, va in skf.split(np.zeros(n), y)]
        except ValueError:
            pass
    return [va for _, va in KFold(n_splits, shuffle=True, random_state=seed).split(np.zeros(n))]


def two_stage(
    base: TextEncoder,
    texts_tr: list[str],
    emb_tr: np.ndarray,
    targets_tr: np.ndarray,
    labels_tr: np.ndarray,
    texts_va: list[str],
    emb_va: np.ndarray,
    y_va: np.ndarray,
    config: Config,
    n_classes: int,
    multilabel: bool,
    *,
    with_llms: bool,
    w_tr: np.ndarray | None = None,
    progress: bool = False,
) -> TwoStage:
    """Stage 1 (see the module docstring). ``targets_tr``: what the encoder learns (labels or soft targets);
    ``labels_tr``: decided labels, for stratified folds; ``y_va``: validation labels."""
    started = time.perf_counter()
    tune = config.encoder.fine_tuning
    need = 2 if tune.features == "holdout" else tune.folds
    if with_llms and len(texts_tr) < need:
        raise DataError(
            f"two-stage fine-tuning ({tune.features}) needs at least {need} training rows besides the validation "
            f"rows; got {len(texts_tr)}"
        )
    seed = config.train.seed
    fits: list[dict[str, Any]] = []

    def tune_on(idx: np.ndarray, what: str) -> TextEncoder:
        log.info("fine-tuning the encoder (%s): %d rows", what, len(idx))
        enc, fit = fine_tune_classifier(
            base,
            [texts_tr[i] for i in idx],
            emb_tr[idx],
            targets_tr[idx],
            texts_va,
            emb_va,
            y_va,
            config,
            n_classes,
            multilabel,
            w_tr=None if w_tr is None else w_tr[idx],
            progress=progress,
        )
        fits.append({"on": what, "rows": len(idx), **fit.summary()})
        return enc

    every = np.arange(len(texts_tr))
    if not with_llms:
        final = tune_on(every, "all rows")
        rows, logits_tr = every, final.embed(texts_tr)
    elif tune.features == "holdout":
        kept, rows = holdout_rows(labels_tr, tune.holdout_fraction, seed)
        final = tune_on(kept, f"all but the head's {len(rows)} rows")
        logits_tr = final.embed([texts_tr[i] for i in rows])
    else:
        folds = _folds(labels_tr, tune.folds, seed)
        logits_tr = np.zeros((len(texts_tr), n_classes), np.float32)
        for f, held in enumerate(folds, 1):
            enc = tune_on(np.setdiff1d(every, held), f"fold {f} of {len(folds)}")
            logits_tr[held] = enc.embed([texts_tr[i] for i in held])
            del enc
        rows = every
        final = tune_on(every, "all rows, the encoder kept")
    return TwoStage(final, rows, logits_tr, final.embed(texts_va), fits, time.perf_counter() - started)
