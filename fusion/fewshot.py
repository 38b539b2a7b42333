"""The few-shot example pool: labelled training texts and their embeddings, saved in the bundle.

With ``few_shot: k`` on an LLM, each prompt shows the ``k`` pool texts nearest the text being
scored (cosine similarity of the encoder embeddings), nearest last. The LLM panel holds the
pool (:class:`fusion.llm.LLMPanel`), so the Serve LLM deployment and the backfill's predictors
load it without the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fusion.llm.prompts import Example


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class ExamplePool:
    texts: list[str]
    labels: list[tuple[str, ...]]
    embeddings: np.ndarray  # (len(texts), embed_dim)

    @classmethod
    def from_training(
        cls, texts: Sequence[str], labels: Sequence[str | Sequence[str]], emb: np.ndarray, max_words: int
    ) -> ExamplePool:
        """The training rows as a pool, each text cut to ``max_words`` words (as a prompt would show it)."""
        return cls(
            [" ".join(t.split()[:max_words]) for t in texts],
            [(lab,) if isinstance(lab, str) else tuple(lab) for lab in labels],
            np.ascontiguousarray(emb, dtype=np.float32),
        )

    def neighbours(self, emb: np.ndarray, k: int, exclude: np.ndarray | None = None) -> list[list[Example]]:
        """The ``k`` nearest examples per row of ``emb``, nearest last. ``exclude``: the pool row each text
        is, when the texts come from the pool itself (training): a text is never its own example."""
        from fusion.llm.prompts import Example

        sims = _unit(np.asarray(emb, dtype=np.float32)) @ _unit(self.embeddings).T
        if exclude is not None:
            sims[np.arange(len(exclude)), exclude] = -np.inf  # sorted last, and left out below
        k = min(k, sims.shape[1] - (exclude is not None))  # a pool of k or fewer: every other text
        idx = np.argsort(-sims, axis=1)[:, : max(k, 0)]
        return [[Example(self.texts[j], self.labels[j]) for j in row[::-1]] for row in idx]

    # -- persistence ----------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {"texts": self.texts, "labels": self.labels}

    def tensors(self) -> dict[str, np.ndarray]:
        return {"fewshot.embeddings": self.embeddings}

    @classmethod
    def from_bundle(cls, m: dict[str, Any] | None, tensors: dict[str, np.ndarray]) -> ExamplePool | None:
        if not m:
            return None
        return cls(m["texts"], [tuple(x) for x in m["labels"]], np.array(tensors["fewshot.embeddings"]))
