"""The fusion model at inference: feature layout, feature scaler and :class:`MLP`, in numpy (a Serve replica
or a backfill actor that applies the head imports no torch; the MLP trains in PyTorch, :mod:`fusion.train`).

Features for one text are ``[embedding | LLM_1 scores | ... | LLM_m scores | missing_1 .. missing_m]``
where each score block has one column per class and ``missing_j`` is 1 when LLM j gave
no scores for that text (skipped by cost gating, failed, over budget). Missing blocks
are zero after standardisation, i.e. they sit at the training mean, and the flag
tells the MLP to ignore them. With no LLMs the features are just the embedding and
the model is the plain encoder+MLP baseline.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fusion.errors import DataError


@dataclass(frozen=True)
class FeatureLayout:
    embed_dim: int
    n_classes: int
    llm_names: tuple[str, ...] = ()

    @property
    def n_llms(self) -> int:
        return len(self.llm_names)

    @property
    def dim(self) -> int:
        return self.embed_dim + self.n_llms * (self.n_classes + 1)

    def block(self, j: int) -> slice:
        start = self.embed_dim + j * self.n_classes
        return slice(start, start + self.n_classes)

    def flag(self, j: int) -> int:
        return self.embed_dim + self.n_llms * self.n_classes + j

    def to_dict(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "n_classes": self.n_classes, "llm_names": list(self.llm_names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureLayout:
        return cls(int(d["embed_dim"]), int(d["n_classes"]), tuple(d["llm_names"]))


def build_features(
    embeddings: np.ndarray, llm_scores: Mapping[str, np.ndarray] | None, layout: FeatureLayout
) -> np.ndarray:
    """Raw (unscaled) feature matrix; a missing LLM block is NaN and its flag is 1.

    ``llm_scores`` maps LLM name to an ``(n, n_classes)`` array; a row with any NaN,
    or an LLM absent from the mapping, counts as missing for that text.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] != layout.embed_dim:
        raise DataError(f"embeddings have shape {emb.shape}; this model expects (rows, {layout.embed_dim})")
    n = emb.shape[0]
    scores = dict(llm_scores or {})
    extra = sorted(set(scores) - set(layout.llm_names))
    if extra:
        raise DataError(f"scores given for unknown LLM(s) {extra}; this model fuses {list(layout.llm_names)}")
    x = np.zeros((n, layout.dim), dtype=np.float32)
    x[:, : layout.embed_dim] = emb
    for j, name in enumerate(layout.llm_names):
        if name not in scores:
            x[:, layout.block(j)] = np.nan
            x[:, layout.flag(j)] = 1.0
            continue
        s = np.asarray(scores[name], dtype=np.float32)
        if s.shape != (n, layout.n_classes):
            raise DataError(f"scores for LLM {name!r} have shape {s.shape}; expected ({n}, {layout.n_classes})")
        if np.isinf(s).any():
            raise DataError(f"scores for LLM {name!r} contain inf; use NaN to mark a missing row")
        missing = np.isnan(s).any(axis=1)
        s = s.copy()
        s[missing] = np.nan
        x[:, layout.block(j)] = s
        x[:, layout.flag(j)] = missing.astype(np.float32)
    return x


class FeatureScaler:
    """Per-column standardisation fitted on training rows (LLM blocks on rows where present)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    @classmethod
    def fit(cls, raw: np.ndarray, layout: FeatureLayout) -> FeatureScaler:
        mean = np.zeros(layout.dim, dtype=np.float32)
        std = np.ones(layout.dim, dtype=np.float32)
        n_scaled = layout.embed_dim + layout.n_llms * layout.n_classes
        with warnings.catch_warnings():  # an LLM that never answered leaves all-NaN columns: keep 0 / 1 there
            warnings.simplefilter("ignore", RuntimeWarning)
            m = np.nanmean(raw[:, :n_scaled], axis=0)
            s = np.nanstd(raw[:, :n_scaled], axis=0)
        mean[:n_scaled] = np.nan_to_num(m, nan=0.0)
        std[:n_scaled] = np.where(np.nan_to_num(s, nan=0.0) > 1e-6, s, 1.0)
        return cls(mean, std)

    def transform(self, raw: np.ndarray) -> np.ndarray:
        z = (raw - self.mean) / self.std
        return np.nan_to_num(z, nan=0.0).astype(np.float32, copy=False)


@dataclass
class MLP:
    """The trained FusionMLP (:class:`fusion.train.FusionMLP`) for inference: ``hidden_dims`` GELU layers,
    then class logits, from the same tensors (``net.<i>.weight`` / ``net.<i>.bias``, torch's names)."""

    weights: list[np.ndarray]  # (out, in) per linear layer
    biases: list[np.ndarray]
    hidden_dims: list[int]
    dropout: float

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], hidden_dims: list[int], dropout: float) -> MLP:
        """From a FusionMLP's state dict (numpy arrays); a linear layer every 3 modules (Linear, GELU, Dropout)."""
        idx = [3 * i for i in range(len(hidden_dims) + 1)]
        weights = [np.asarray(state[f"net.{i}.weight"], np.float32) for i in idx]
        biases = [np.asarray(state[f"net.{i}.bias"], np.float32) for i in idx]
        if len(state) != 2 * len(idx):
            raise KeyError(f"an MLP with hidden layers {hidden_dims} has {2 * len(idx)} tensors, not {len(state)}")
        return cls(weights, biases, list(hidden_dims), float(dropout))

    def state(self) -> dict[str, np.ndarray]:
        out = {}
        for j, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            out[f"net.{3 * j}.weight"], out[f"net.{3 * j}.bias"] = w, b
        return out

    def __call__(self, z: np.ndarray) -> np.ndarray:
        from scipy.special import erf

        x = np.ascontiguousarray(z, dtype=np.float32)
        for j, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = x @ w.T + b
            if j < len(self.hidden_dims):
                x = 0.5 * x * (1.0 + erf(x / np.float32(np.sqrt(2.0))))  # exact GELU, as torch's nn.GELU()
        return x
