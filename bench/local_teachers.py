"""The bundled local LLMs as teachers, side by side: LLM-only accuracy and texts/s on a stratified bbc-news sample.

Each model scores the same texts (zero-shot, the product prompt, no cache) in one run; the last lines are
``accuracy gain: X`` (the larger model's accuracy minus the smaller's, in points) and ``ratio: Y`` (its
texts/s over the smaller's).

    make models-qwen models-qwen15 && python bench/local_teachers.py [--per-class 20]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from fusion.config import LLMLimitsConfig, LLMScorerConfig
from fusion.datasets import builtin_split
from fusion.llm import LLMScorer

MODELS = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=20, help="texts per class (5 classes)")
    ap.add_argument("--models", default=",".join(MODELS), help="bundled models, smaller first")
    args = ap.parse_args()
    df = builtin_split("bbc-news", "test").groupby("label").sample(args.per_class, random_state=0)
    classes = sorted(df["label"].unique())
    y = np.array([classes.index(c) for c in df["label"]])
    rows = []
    for model in args.models.split(","):
        cfg = LLMScorerConfig(name=model, provider="local", model=model)
        scorer = LLMScorer(cfg, classes, False, LLMLimitsConfig(cache=False))
        asyncio.run(scorer.score(["warm-up: load the model"]))
        start = time.perf_counter()
        batch = asyncio.run(scorer.score(df["text"].tolist()))
        took = time.perf_counter() - start
        ok = batch.used
        acc = float((batch.scores[ok].argmax(axis=1) == y[ok]).sum() / len(y))
        rows.append((model, acc, len(y) / took, int((~ok).sum())))
        print(f"{model:<22} accuracy {acc:.3f}  {len(y) / took:5.2f} texts/s  errors {int((~ok).sum())}", flush=True)
    (small, a0, r0, _), (large, a1, r1, _) = rows[0], rows[-1]
    print(f"{len(y)} texts ({args.per_class} per class), max_words {cfg.max_words}; {large} vs {small}")
    print(f"accuracy gain: {100 * (a1 - a0):+.1f}")
    print(f"ratio: {r1 / r0:.2f}")


if __name__ == "__main__":
    main()
