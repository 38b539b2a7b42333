"""Fitting the fusion head: AdamW, LLM dropout, early stopping, calibration.

The loop minimises cross-entropy (multiclass) or BCE (multilabel) and checks the
validation loss every ``eval_every`` optimiser steps. It stops after ``patience``
checks without improvement and restores the best weights. Temperature and multilabel
thresholds are then fitted on the validation logits of those best weights.

A frozen encoder: one check per epoch, ``train.patience`` and ``train.max_epochs``, as the small
head needs. A fine-tuned encoder (``encoder.fine_tune``) follows ``encoder.fine_tuning``: its own
batch size and epochs, several checks per epoch with patience counted in checks, and a learning
rate that warms up and then decays linearly to 0. The embedding columns are then recomputed from
the texts for every batch (standardised with the scaler fitted on the frozen embeddings).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fusion.calibration import fit_temperature, fit_thresholds, to_proba
from fusion.config import FusionConfig, TrainConfig
from fusion.encoder import TextEncoder
from fusion.model import MLP, FeatureLayout, FeatureScaler

log = logging.getLogger(__name__)


class FusionMLP(nn.Module):
    """Fully connected head: ``hidden_dims`` GELU layers with dropout, then class logits."""

    def __init__(self, in_dim: int, n_classes: int, hidden_dims: list[int], dropout: float):
        super().__init__()
        self.hidden_dims, self.dropout = list(hidden_dims), float(dropout)
        layers: list[nn.Module] = []
        prev = in_dim
        for width in hidden_dims:
            layers += [nn.Linear(prev, width), nn.GELU(), nn.Dropout(dropout)]
            prev = width
        layers.append(nn.Linear(prev, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def inference(self) -> MLP:
        """This MLP for inference, in numpy."""
        state = {k: v.detach().cpu().numpy() for k, v in self.state_dict().items()}
        return MLP.from_state(state, self.hidden_dims, self.dropout)


def drop_llm_blocks(x: torch.Tensor, layout: FeatureLayout, p: float, generator: torch.Generator) -> torch.Tensor:
    """Hide each present LLM block with probability ``p`` (training only): zero it, set its flag."""
    if p <= 0 or layout.n_llms == 0:
        return x
    x = x.clone()
    for j in range(layout.n_llms):
        hide = torch.rand(x.shape[0], generator=generator) < p
        if hide.any():
            x[hide, layout.block(j)] = 0.0
            x[hide, layout.flag(j)] = 1.0
    return x


@dataclass
class HeadFit:
    head: FusionMLP
    temperature: float
    thresholds: np.ndarray | None
    at_least_one: bool
    best_step: int
    steps_per_epoch: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)  # one row per validation check

    def _epochs(self, step: float) -> float | int:
        e = round(step / self.steps_per_epoch, 2)
        return int(e) if e.is_integer() else e

    @property
    def best_epoch(self) -> float | int:
        return self._epochs(self.best_step)

    @property
    def epochs_run(self) -> float | int:
        return self._epochs(self.history[-1]["step"] if self.history else 0)

    def summary(self) -> dict[str, float | int]:
        return {"best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "train_seconds": round(self.seconds, 1)}


def warmup_linear(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor at ``step``: rises from 0 to 1 over ``warmup`` steps, then falls linearly to 0 at ``total``."""
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def holdout_rows(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (kept, held out), each sorted: ``fraction`` held out, stratified by class where every
    class has two rows (multi-class ``y``), at random otherwise. ValueError when ``y`` is too short to split."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    strat = y if y.ndim == 1 and np.bincount(y).min() >= 2 else None
    try:
        kept, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=strat)
    except ValueError:  # stratified, the held-out share is smaller than the number of classes
        kept, held = train_test_split(idx, test_size=fraction, random_state=seed)
    return np.sort(kept), np.sort(held)


def seed_everything(seed: int) -> None:
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Features:
    """Scaled feature rows for the training loop; recomputes embeddings when fine-tuning."""

    def __init__(
        self,
        z: np.ndarray,
        encoder: TextEncoder | None = None,
        texts: list[str] | None = None,
        scaler: FeatureScaler | None = None,
        embed_dim: int = 0,
    ):
        self.z = torch.from_numpy(np.ascontiguousarray(z))
        self.encoder, self.texts, self.embed_dim = encoder, texts, embed_dim
        if encoder is not None:
            assert texts is not None and scaler is not None
            self.mean = torch.from_numpy(scaler.mean[:embed_dim]).to(encoder.device)
            self.std = torch.from_numpy(scaler.std[:embed_dim]).to(encoder.device)

    def rows(self, idx: np.ndarray) -> torch.Tensor:
        if self.encoder is None or self.texts is None:
            return self.z[idx]
        emb = (self.encoder.forward([self.texts[i] for i in idx]) - self.mean) / self.std
        return torch.cat([emb.cpu(), self.z[idx, self.embed_dim :]], dim=1)

    def all_rows(self, batch_size: int) -> torch.Tensor:
        if self.encoder is None:
            return self.z
        idx = np.arange(len(self.z))
        return torch.cat([self.rows(idx[s : s + batch_size]) for s in range(0, len(idx), batch_size)])


def fit_head(
    z_train: np.ndarray,
    y_train: np.ndarray,
    z_val: np.ndarray,
    y_val: np.ndarray,
    layout: FeatureLayout,
    fusion_cfg: FusionConfig,
    train_cfg: TrainConfig,
    multilabel: bool,
    *,
    encoder: TextEncoder | None = None,
    texts_train: list[str] | None = None,
    texts_val: list[str] | None = None,
    scaler: FeatureScaler | None = None,
    w_train: np.ndarray | None = None,
    progress: bool = False,
) -> HeadFit:
    """Train the fusion head on scaled features; see the module docstring.

    ``y_train``: class indices or, multiclass, an (n, k) matrix of target probabilities (soft labels);
    multilabel targets are (n, k) 0/1 or probabilities. ``w_train``: a weight per training row."""
    seed_everything(train_cfg.seed)
    head = FusionMLP(layout.dim, layout.n_classes, fusion_cfg.hidden_dims, fusion_cfg.dropout)
    train_x = _Features(z_train, encoder, texts_train, scaler, layout.embed_dim)
    val_x = _Features(z_val, encoder, texts_val, scaler, layout.embed_dim)
    yt = torch.from_numpy(y_train)
    yv = torch.from_numpy(y_val)
    wt = torch.from_numpy(np.ones(len(y_train), np.float32) if w_train is None else w_train.astype(np.float32))
    per_row: nn.Module = nn.BCEWithLogitsLoss(reduction="none") if multilabel else nn.CrossEntropyLoss(reduction="none")

    def loss_fn(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        rows = per_row(logits, target)
        rows = rows.mean(dim=1) if rows.ndim == 2 else rows
        return rows.mean() if weight is None else (rows * weight).sum() / weight.sum().clamp_min(1e-12)

    tune = encoder.config.fine_tuning if encoder is not None else None
    batch_size = tune.batch_size if tune else train_cfg.batch_size
    steps_per_epoch = math.ceil(len(yt) / batch_size)
    max_steps = steps_per_epoch * (tune.max_epochs if tune else train_cfg.max_epochs)
    if tune is None:
        eval_every = steps_per_epoch
    else:  # a check embeds the validation rows: never spend more on checks than about a third of the training
        eval_every = tune.eval_every or max(math.ceil(steps_per_epoch / 4), math.ceil(len(yv) / batch_size))
    patience = tune.patience if tune else train_cfg.patience

    groups: list[dict] = [{"params": list(head.parameters()), "lr": train_cfg.learning_rate}]
    modules: list[nn.Module] = [head]
    schedules = [lambda step: 1.0]
    if encoder is not None and tune is not None:
        groups.append({"params": list(encoder.model.parameters()), "lr": encoder.config.fine_tune_lr})
        modules.append(encoder.model)
        warmup = max(1, round(tune.warmup_fraction * max_steps))
        schedules.append(lambda step: warmup_linear(step, warmup, max_steps))
    # the fused kernel: on one CPU core an AdamW step over MiniLM's weights took 20 ms instead of 138 (the default,
    # one tensor at a time, made the optimiser a third of a CPU fine-tune); CPU and CUDA only
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, weight_decay=train_cfg.weight_decay, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedules)
    gen = torch.Generator().manual_seed(train_cfg.seed)

    def snapshot() -> list[dict]:
        return [copy.deepcopy(m.state_dict()) for m in modules]

    def val_logits() -> torch.Tensor:
        for m in modules:
            m.eval()
        with torch.no_grad():
            return head(val_x.all_rows(batch_size))

    def batches() -> Iterator[np.ndarray]:
        for _ in range(max_steps // steps_per_epoch):
            perm = torch.randperm(len(yt), generator=gen).numpy()
            for s in range(0, len(yt), batch_size):
                yield perm[s : s + batch_size]

    started = time.perf_counter()
    best_loss, best_step, best_check, best_state = float("inf"), 0, 0, snapshot()
    history: list[dict[str, float]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, desc="fine-tuning" if tune else "training", unit="step")
    try:
        total, seen = 0.0, 0
        for step, idx in enumerate(batches(), 1):
            for m in modules:
                m.train()
            xb = drop_llm_blocks(train_x.rows(idx), layout, fusion_cfg.llm_dropout, gen)
            loss = loss_fn(head(xb), yt[idx], wt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
            if bar is not None:
                bar.update(1)
            if step % eval_every and step != max_steps:
                continue
            vl = float(loss_fn(val_logits(), yv)) if len(yv) else total / seen
            history.append({"step": step, "train_loss": total / seen, "val_loss": vl})
            total, seen = 0.0, 0
            if vl < best_loss - 1e-4:
                best_loss, best_step, best_check, best_state = vl, step, len(history), snapshot()
            if bar is not None:
                bar.set_postfix(val_loss=f"{vl:.4f}", best_epoch=f"{best_step / steps_per_epoch:.2f}")
            if len(history) - best_check >= patience:
                break
    finally:
        if bar is not None:
            bar.close()
    for m, state in zip(modules, best_state, strict=True):
        m.load_state_dict(state)
    log.info(
        "early stopping: best at step %d of %d (epoch %.2f; val loss %.4f)",
        best_step,
        history[-1]["step"] if history else 0,
        best_step / steps_per_epoch,
        best_loss,
    )

    logits = val_logits().numpy()
    temperature = fit_temperature(logits, y_val, multilabel) if train_cfg.calibrate and len(y_val) else 1.0
    thresholds = None
    if multilabel:
        proba = to_proba(logits, temperature, True)
        thresholds = (
            fit_thresholds(proba, y_val)
            if train_cfg.calibrate and len(y_val)
            else np.full(layout.n_classes, 0.5, np.float32)
        )
    at_least_one = bool(multilabel and (y_train >= 0.5).any(axis=1).all())
    for m in modules:
        m.eval()
    return HeadFit(
        head, temperature, thresholds, at_least_one, best_step, steps_per_epoch, time.perf_counter() - started, history
    )
