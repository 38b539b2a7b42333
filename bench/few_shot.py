"""kNN few-shot prompts against the zero-shot prompt: accuracy, and what each costs in tokens and texts/s.

At one share of the training split, for each ``--shots`` k (0 = zero-shot), the frozen encoder + LLM recipe
is trained the product's way: the LLM scores the training rows with their k nearest *other* training rows as
examples (``few_shot: k``), then the validation and test texts with their k nearest training rows. Printed
per k: the LLM's own test accuracy (argmax of its scores), the fused model's test accuracy, macro-F1 and
ECE, and the cost of scoring the first ``--cost-texts`` test texts with an empty answer cache, before the LLM
server has seen them (llama.cpp answers a prompt it has just seen from RAM): prompt tokens per text and
texts/s, measured one k after the other in this run. Answers are cached in ``--llm-cache``, so a rerun
only times the cost rows. The last line is ``ratio: X``: texts/s of the largest k over zero-shot.

    make models-qwen && python bench/few_shot.py --dataset bbc-news --fraction 0.05 --shots 0,4 --val-texts 100 --test-texts 150
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from fusion.classifier import AutoFusionClassifier
from fusion.compare import _subsample
from fusion.config import LLMLimitsConfig, LLMScorerConfig, parse_config
from fusion.datasets import BUILTIN, builtin_split
from fusion.encoder import TextEncoder
from fusion.llm import LLMPanel
from fusion.metrics import headline_key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="bbc-news", choices=sorted(BUILTIN))
    ap.add_argument("--fraction", type=float, default=0.05, help="share of the training split")
    ap.add_argument("--shots", default="0,4", help="comma-separated k; 0 is the zero-shot prompt")
    ap.add_argument("--llm", default="qwen2.5-coder-0.5b", help="bundled local LLM (see `labelfuse llm-models`)")
    ap.add_argument("--max-length", type=int, default=128, help="encoder tokens per text")
    ap.add_argument("--cost-texts", type=int, default=40, help="test texts scored uncached per k for the cost")
    ap.add_argument("--val-texts", type=int, help="a random sample of this many validation texts (default: all)")
    ap.add_argument("--test-texts", type=int, help="a random sample of this many test texts (default: all)")
    ap.add_argument("--llm-cache", help="LLM answer cache (SQLite); default: the product's cache")
    args = ap.parse_args()
    shots = sorted({int(k) for k in args.shots.split(",")})

    multilabel = BUILTIN[args.dataset] == "multilabel"
    parts = {p: builtin_split(args.dataset, p) for p in ("train", "val", "test")}
    for p, n in (("val", args.val_texts), ("test", args.test_texts)):
        if n is not None and n < len(parts[p]):  # a k-shot prompt costs about k+1 zero-shot ones
            parts[p] = parts[p].sample(n=n, random_state=0).reset_index(drop=True)
    train = parts["train"].iloc[_subsample(parts["train"]["label"].tolist(), args.fraction, seed=42)]
    key = headline_key(multilabel)
    base = {
        "labels": {"mode": "multilabel" if multilabel else "multiclass"},
        "encoder": {"max_length": args.max_length},
    }
    stock = TextEncoder(parse_config(base).encoder)
    emb = {"train": stock.embed(train["text"].tolist())} | {
        p: stock.embed(parts[p]["text"].tolist()) for p in ("val", "test")
    }
    limits = LLMLimitsConfig(**({"cache_path": args.llm_cache} if args.llm_cache else {}))
    print(
        f"{args.dataset}: {len(train)} training rows ({args.fraction:.0%}), {len(parts['val'])} validation and "
        f"{len(parts['test'])} test texts"
    )

    rows = []
    for k in shots:
        llm = LLMScorerConfig(name=args.llm, provider="local", model=args.llm, few_shot=k)
        cfg = parse_config({**base, "llms": [llm.model_dump()], "llm_limits": limits.model_dump()})
        clf = AutoFusionClassifier(cfg, encoder=stock)
        t0 = time.perf_counter()
        clf.fit(train, validation=parts["val"], embeddings=emb["train"], validation_embeddings=emb["val"])
        took = time.perf_counter() - t0
        test = parts["test"]["text"].tolist()
        # the cost, before the test texts are scored below: the LLM server must not have seen them (llama.cpp keeps
        # recent prompts in RAM), and the answer cache is empty (a fresh panel; one text first to warm up)
        with tempfile.TemporaryDirectory() as tmp:
            cold = LLMLimitsConfig(cache_path=f"{tmp}/cache.sqlite")
            panel = LLMPanel([llm], clf.classes, multilabel, cold, pool=clf.pool)
            n = min(args.cost_texts, len(test) - 1)
            panel.score_missing(test[-1:], emb["test"][-1:])
            t0 = time.perf_counter()
            _, batches = panel.score_missing(test[:n], emb["test"][:n])
            secs = time.perf_counter() - t0
        scores, _ = clf.llm_panel.score_missing(test, emb["test"])
        m = clf.evaluate(parts["test"], embeddings=emb["test"], llm_scores=scores)
        y = clf.targets(parts["test"])
        s = scores[args.llm]
        alone = (
            np.mean(((s >= 0.5) == (y > 0.5)).all(axis=1)).item()
            if multilabel
            else np.mean(s.argmax(axis=1) == y).item()
        )

        st = batches[args.llm].stats
        row = {
            "k": k,
            "llm_alone": alone,
            key: m[key],
            "macro_f1": m["macro_f1"],
            "ece": m["ece"],
            "tokens_per_text": st.prompt_tokens / max(st.calls, 1),
            "texts_per_s": n / secs,
            "train_s": took,
        }
        rows.append(row)
        print(
            f"k={k}: LLM alone {alone:.3f}  fused {key} {m[key]:.3f}  macro-F1 {m['macro_f1']:.3f}  ECE {m['ece']:.3f}  "
            f"{row['tokens_per_text']:.0f} prompt tokens/text  {row['texts_per_s']:.2f} texts/s  fit {took:.0f}s",
            flush=True,
        )

    print(
        f"\n| k | LLM alone | fused {key} | macro-F1 | ECE | prompt tokens/text | texts/s |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['k']} | {r['llm_alone']:.3f} | {r[key]:.3f} | {r['macro_f1']:.3f} | {r['ece']:.3f} "
            f"| {r['tokens_per_text']:.0f} | {r['texts_per_s']:.2f} |"
        )
    print(f"ratio: {rows[-1]['texts_per_s'] / rows[0]['texts_per_s']:.2f}")


if __name__ == "__main__":
    main()
