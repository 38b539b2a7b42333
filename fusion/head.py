"""The fusion head: what is learned on top of the encoder and the LLMs, and the three inference steps.

A :class:`FusionHead` holds the label space, the feature layout, the feature scaler, the MLP (in
numpy: this module imports no torch), the calibration temperature, the multilabel thresholds and the
cost gate's threshold. It needs neither the encoder nor an LLM, so the Serve Fusion deployment and the
backfill's predictor actors load only this part of a bundle (:meth:`fusion.bundle.Bundle.head`).

- :meth:`FusionHead.ask` is the cost gate: which texts the LLMs should be asked about.
- :meth:`FusionHead.fuse` turns embeddings and the LLM answers into a :class:`Prediction`.
- :meth:`FusionHead.decide` turns probabilities into labels.

:class:`Prediction` is what every caller gets back, and :meth:`Prediction.results` is the one
place where a prediction becomes per-text results (the HTTP answer, the Kafka result, the
backfill's rows and ``labelfuse predict``'s table all come from it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fusion.calibration import decide, to_proba
from fusion.config import LLM_MODES, LLMMode
from fusion.gating import confidence
from fusion.labels import LabelSpace
from fusion.model import MLP, FeatureLayout, FeatureScaler, build_features

if TYPE_CHECKING:
    from fusion.llm import LLMPanel, ScoreBatch

Scores = Mapping[str, np.ndarray]
Labels = list[str] | list[list[str]]


@dataclass
class Prediction:
    """What :meth:`FusionHead.fuse` (and ``AutoFusionClassifier.predict_details``) returns."""

    proba: np.ndarray  # (n, n_classes) calibrated probabilities, in the order of `classes`
    labels: Labels  # a label (multiclass) or a list of labels (multilabel) per text
    llm_used: np.ndarray  # (n, n_llms) bool: that LLM's scores went into the answer
    llm_cost_usd: np.ndarray  # (n,) list-price cost of the LLM answers used (cache hits included)
    gated_out: np.ndarray  # (n,) bool: the encoder was confident enough, no LLM was asked
    classes: list[str]
    multilabel: bool
    llm_errors: dict[str, list[str | None]] = field(default_factory=dict)  # per LLM, per text
    usage: dict[str, dict[str, Any]] = field(default_factory=dict)  # per LLM: calls, cache hits, tokens, $, latency

    def results(self) -> list[dict[str, Any]]:
        """One result per text: ``label`` (or ``labels``), ``probabilities``, ``llm_used``, ``gated_out``,
        ``llm_cost_usd``, ``llm_error``; or ``{"error": reason}`` (the reason completes "text ...") for a
        text the model gave no finite probabilities."""
        finite = np.isfinite(self.proba).all(axis=1)
        key = "labels" if self.multilabel else "label"
        out: list[dict[str, Any]] = []
        for i in range(len(self.proba)):
            if not finite[i]:
                out.append({"error": "got no finite probabilities from the model"})
                continue
            errors = [f"{name}: {e[i]}" for name, e in self.llm_errors.items() if e[i]]
            out.append(
                {
                    key: self.labels[i],
                    "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, self.proba[i], strict=True)},
                    "llm_used": bool(self.llm_used[i].any()),
                    "gated_out": bool(self.gated_out[i]),
                    "llm_cost_usd": float(self.llm_cost_usd[i]),
                    "llm_error": "; ".join(errors) or None,
                }
            )
        return out


@dataclass
class FusionHead:
    """Feature layout + scaler + MLP + temperature + thresholds + gate threshold."""

    label_space: LabelSpace
    layout: FeatureLayout
    scaler: FeatureScaler
    mlp: MLP
    temperature: float = 1.0
    thresholds: np.ndarray | None = None  # multilabel: one decision threshold per class
    at_least_one: bool = False  # multilabel: the top class when no class passes its threshold
    gate_threshold: float | None = None  # encoder-only confidence below which the LLMs are asked

    @property
    def classes(self) -> list[str]:
        return self.label_space.classes

    @property
    def multilabel(self) -> bool:
        return self.label_space.multilabel

    # -- the steps ------------------------------------------------------------------------------------------
    def features(self, emb: np.ndarray, scores: Scores | None = None) -> np.ndarray:
        """Scaled features; an LLM absent from ``scores``, or a NaN row, is marked missing."""
        return self.scaler.transform(build_features(emb, scores, self.layout))

    def logits(self, z: np.ndarray) -> np.ndarray:
        return self.mlp(z)

    def proba(self, z: np.ndarray, calibrated: bool = True) -> np.ndarray:
        return to_proba(self.logits(z), self.temperature if calibrated else 1.0, self.multilabel)

    def encoder_only(self, z: np.ndarray) -> np.ndarray:
        """Scaled features with every LLM block marked missing."""
        z = z.copy()
        for j in range(self.layout.n_llms):
            z[:, self.layout.block(j)] = 0.0
            z[:, self.layout.flag(j)] = 1.0
        return z

    def ask(self, emb: np.ndarray, llm: LLMMode = "auto") -> np.ndarray:
        """The cost gate: a bool per text, True where the LLMs should be asked (all False without LLMs).

        ``auto`` asks about the texts whose encoder-only confidence (calibrated, as the threshold was learned
        on) is below the gate threshold, or every text when the model was trained without gating; ``off``
        none; ``all`` every text."""
        if llm not in LLM_MODES:
            raise ValueError(f"llm must be one of {LLM_MODES}, got {llm!r}")
        n = len(emb)
        if not self.layout.n_llms or llm == "off":
            return np.zeros(n, dtype=bool)
        if llm == "all" or self.gate_threshold is None:
            return np.ones(n, dtype=bool)
        enc = self.proba(self.features(emb))
        return confidence(enc, self.multilabel) < self.gate_threshold

    def fuse(
        self,
        emb: np.ndarray,
        ask: np.ndarray,
        scores: Scores,
        batches: Mapping[str, ScoreBatch] | None = None,
        *,
        calibrated: bool = True,
    ) -> Prediction:
        """Fuse embeddings with the LLM scores of the texts in ``ask`` (score rows in ``ask`` order).

        ``batches`` ({name: ScoreBatch} from the LLM panel) supply cost, errors and usage. An LLM
        without scores, or a NaN row, is marked missing: the encoder-only path answers that text.
        """
        n, m, k = len(emb), self.layout.n_llms, self.label_space.n_classes
        idx = np.flatnonzero(ask)
        # unknown names go through too: build_features rejects them with a clear message
        full = {name: np.full((n, k), np.nan, dtype=np.float32) for name in {*self.layout.llm_names, *scores}}
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
        proba = self.proba(self.scaler.transform(x), calibrated)
        usage = {name: b.stats.to_dict() for name, b in (batches or {}).items()}
        gated_out = ~np.asarray(ask, dtype=bool) if m else np.zeros(n, dtype=bool)
        return Prediction(
            proba, self.decide(proba), used, cost, gated_out, self.classes, self.multilabel, errors, usage
        )

    def predict(
        self,
        texts: list[str],
        emb: np.ndarray,
        panel: LLMPanel | None,
        llm: LLMMode = "auto",
        *,
        given: Scores | None = None,
        calibrated: bool = True,
        progress: bool = False,
    ) -> Prediction:
        """ask → the panel scores the texts asked (``given`` scores are used as they are) → fuse."""
        ask = self.ask(emb, llm)  # the same texts whichever probabilities are asked for
        idx = np.flatnonzero(ask)
        asked = {k: np.asarray(v)[idx] for k, v in (given or {}).items()}
        batches: dict[str, ScoreBatch] = {}
        if panel is not None:
            asked, batches = panel.score_missing([texts[i] for i in idx], emb[idx], asked, progress=progress)
        return self.fuse(emb, ask, asked, batches, calibrated=calibrated)

    def decide(self, proba: np.ndarray) -> Labels:
        """Labels from calibrated probabilities: argmax, or per-class thresholds (+ at-least-one fallback).

        A row without finite probabilities gets None."""
        finite = np.isfinite(proba).all(axis=1)
        labels = self.label_space.decode(
            decide(np.nan_to_num(proba), self.multilabel, self.thresholds, self.at_least_one)
        )
        return [lab if ok else None for lab, ok in zip(labels, finite, strict=True)]  # type: ignore[return-value]

    # -- persistence ----------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {
            "label_space": self.label_space.to_dict(),
            "layout": self.layout.to_dict(),
            "head": {"hidden_dims": self.mlp.hidden_dims, "dropout": self.mlp.dropout},
            "temperature": self.temperature,
            "thresholds": None if self.thresholds is None else self.thresholds.tolist(),
            "at_least_one": self.at_least_one,
            "gate_threshold": self.gate_threshold,
        }

    def tensors(self) -> dict[str, np.ndarray]:
        out = {f"head.{k}": v for k, v in self.mlp.state().items()}
        out["scaler.mean"], out["scaler.std"] = self.scaler.mean, self.scaler.std
        return out

    @classmethod
    def from_bundle(cls, m: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> FusionHead:
        """The head from a bundle's manifest and tensors (KeyError/ValueError when they disagree)."""
        layout = FeatureLayout.from_dict(m["layout"])
        state = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
        mlp = MLP.from_state(state, m["head"]["hidden_dims"], m["head"]["dropout"])
        if mlp.weights[0].shape[1] != layout.dim or mlp.weights[-1].shape[0] != layout.n_classes:
            raise ValueError(
                f"the head's tensors do not fit its layout ({layout.dim} features, {layout.n_classes} classes)"
            )
        return cls(
            label_space=LabelSpace.from_dict(m["label_space"]),
            layout=layout,
            scaler=FeatureScaler(np.array(tensors["scaler.mean"]), np.array(tensors["scaler.std"])),
            mlp=mlp,
            temperature=float(m["temperature"]),
            thresholds=None if m["thresholds"] is None else np.asarray(m["thresholds"], np.float32),
            at_least_one=bool(m["at_least_one"]),
            gate_threshold=m.get("gate_threshold"),
        )
