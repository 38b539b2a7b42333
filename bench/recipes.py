"""Which recipe wins: a frozen or a fine-tuned encoder, each alone and fused with an LLM, at growing training sizes.

Every recipe trains on the same stratified share of the training split (same seed), stops and calibrates on
the same validation split, and is scored on the whole test split. The LLM answers every text once (zero-shot,
cached in ``--llm-cache``) and the fused recipes get those scores, so they differ only in how they are trained:

* ``frozen``: the stock encoder's embeddings and the fusion head, no LLM.
* ``fine-tuned``: the encoder fine-tuned as a classifier (``encoder.fine_tune: two-stage`` without LLMs).
* ``frozen+LLM``: embeddings and LLM scores, the fusion head (the product default with an LLM).
* ``two-stage+LLM``: the fine-tuned classifier's out-of-fold logits and LLM scores (``two-stage``, crossfit).
* ``holdout+LLM`` and ``joint+LLM`` (with ``--recipes``): the other ways to train the same parts.

Columns: accuracy (subset accuracy for multilabel), macro-F1, ECE (calibrated), training seconds (``fit``;
frozen recipes get their embeddings from one pass made beforehand, whose time is printed once) and LLM calls
per test row. The last lines compare two-stage+LLM with the rest at each size and end with
``ratio: X``: its error over the frozen encoder's at the smallest size (the target is 0.8 or less).

    make models-qwen && python bench/recipes.py --dataset bbc-news --fractions 0.05,0.1,0.2,0.5,1.0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fusion.classifier import AutoFusionClassifier
from fusion.compare import _subsample
from fusion.config import LLMLimitsConfig, LLMScorerConfig, parse_config
from fusion.datasets import BUILTIN, builtin_split
from fusion.encoder import TextEncoder
from fusion.labels import LabelSpace, normalize_labels
from fusion.llm import LLMPanel
from fusion.metrics import headline_key

RECIPES = {
    "frozen": {"fine_tune": "off", "llm": False},
    "fine-tuned": {"fine_tune": "two-stage", "llm": False},
    "frozen+LLM": {"fine_tune": "off", "llm": True},
    "two-stage+LLM": {"fine_tune": "two-stage", "llm": True},
    "holdout+LLM": {"fine_tune": "two-stage", "llm": True, "features": "holdout"},
    "joint+LLM": {"fine_tune": "joint", "llm": True},
}
DEFAULT_RECIPES = "frozen,fine-tuned,frozen+LLM,two-stage+LLM"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="bbc-news", choices=sorted(BUILTIN))
    ap.add_argument("--fractions", default="0.05,0.1,0.2,0.5,1.0", help="shares of the training split")
    ap.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated, from {', '.join(RECIPES)}")
    ap.add_argument("--llm", default="qwen2.5-coder-0.5b", help="bundled local LLM (see `labelfuse llm-models`)")
    ap.add_argument("--max-length", type=int, default=128, help="encoder tokens per text, every recipe")
    ap.add_argument("--llm-cache", help="LLM answer cache (SQLite); default: the product's cache")
    ap.add_argument("--out", help="write <out>.json and <out>.png (a plot of the headline metric)")
    args = ap.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        ap.error(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}")
    fractions = sorted(float(f) for f in args.fractions.split(","))

    multilabel = BUILTIN[args.dataset] == "multilabel"
    parts = {p: builtin_split(args.dataset, p) for p in ("train", "val", "test")}
    key = headline_key(multilabel)
    base = {
        "labels": {"mode": "multilabel" if multilabel else "multiclass"},
        "encoder": {"max_length": args.max_length},
    }
    classes = LabelSpace.infer(normalize_labels(parts["train"]["label"], multilabel), multilabel).classes
    base["labels"]["classes"] = classes
    llm_cfg = LLMScorerConfig(name=args.llm, provider="local", model=args.llm)
    limits = LLMLimitsConfig(**({"cache_path": args.llm_cache} if args.llm_cache else {}))

    labels = parts["train"]["label"].tolist()
    subsets = {frac: _subsample(labels, frac, seed=42) for frac in fractions}
    started = time.perf_counter()
    panel = LLMPanel([llm_cfg], classes, multilabel, limits)
    scores = {}
    for p, df in parts.items():  # training rows that no subset uses are not scored
        rows = np.unique(np.concatenate(list(subsets.values()))) if p == "train" else np.arange(len(df))
        scores[p] = np.full((len(df), len(classes)), np.nan, np.float32)
        scores[p][rows] = panel.score(df["text"].iloc[rows].tolist(), progress=True)[args.llm].scores
    print(f"LLM scores in {time.perf_counter() - started:.0f}s")
    started = time.perf_counter()
    stock = TextEncoder(parse_config(base).encoder)
    emb = {p: stock.embed(df["text"].tolist()) for p, df in parts.items()}
    print(f"frozen embeddings of every split in {time.perf_counter() - started:.0f}s (max_length {args.max_length})")

    rows: list[dict[str, Any]] = []
    for frac, idx in subsets.items():
        train = parts["train"].iloc[idx]
        for name in recipes:
            r = RECIPES[name]
            cfg = json.loads(json.dumps(base))
            cfg["encoder"]["fine_tune"] = r["fine_tune"]
            if "features" in r:
                cfg["encoder"]["fine_tuning"] = {"features": r["features"]}
            if r["llm"]:
                cfg["llms"] = [llm_cfg.model_dump()]
                cfg["llm_limits"] = limits.model_dump()
            frozen = r["fine_tune"] == "off"
            llm_kw = (
                {"llm_scores": {args.llm: scores["train"][idx]}, "validation_llm_scores": {args.llm: scores["val"]}}
                if r["llm"]
                else {}
            )
            emb_kw = {"embeddings": emb["train"][idx], "validation_embeddings": emb["val"]} if frozen else {}
            clf = AutoFusionClassifier(parse_config(cfg), encoder=stock if frozen else None)
            t0 = time.perf_counter()
            clf.fit(train, validation=parts["val"], **llm_kw, **emb_kw)
            took = time.perf_counter() - t0
            m = clf.evaluate(
                parts["test"],
                embeddings=emb["test"] if frozen else None,
                llm_scores={args.llm: scores["test"]} if r["llm"] else None,
            )
            row = {
                "fraction": frac,
                "n_train": len(idx),
                "recipe": name,
                key: round(m[key], 4),
                "macro_f1": round(m["macro_f1"], 4),
                "ece": round(m["ece"], 4),
                "train_s": round(took, 1),
                "llm_calls_per_row": 1.0 if r["llm"] else 0.0,
            }
            rows.append(row)
            print(
                f"{frac:>5.0%} {len(idx):>5} {name:<14} {key} {row[key]:.4f}  macro-F1 {row['macro_f1']:.4f}  "
                f"ECE {row['ece']:.4f}  train {took:6.1f}s",
                flush=True,
            )

    print(
        f"\n| share | rows | recipe | {key} | macro-F1 | ECE | train s | LLM calls/row |\n|---|---|---|---|---|---|---|---|"
    )
    for row in rows:
        print(
            f"| {row['fraction']:.0%} | {row['n_train']} | {row['recipe']} | {row[key]:.3f} | {row['macro_f1']:.3f} "
            f"| {row['ece']:.3f} | {row['train_s']} | {row['llm_calls_per_row']:g} |"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"dataset": args.dataset, "llm": args.llm, "max_length": args.max_length}
        Path(f"{args.out}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
        plot(rows, recipes, key, Path(f"{args.out}.png"), f"{args.dataset}, LLM {args.llm}")
    summarize(rows, key, fractions)


def summarize(rows: list[dict[str, Any]], key: str, fractions: list[float]) -> None:
    best = "two-stage+LLM"
    if not any(r["recipe"] == best for r in rows) or not any(r["recipe"] == "frozen" for r in rows):
        return
    cuts = []
    for frac in fractions:
        at = {r["recipe"]: r[key] for r in rows if r["fraction"] == frac}
        others = max(v for k, v in at.items() if k != best)
        cut = 1 - (1 - at[best]) / max(1e-9, 1 - at["frozen"])
        cuts.append(cut)
        print(f"{frac:.0%}: {best} {at[best]:.3f} vs best other {others:.3f}; error cut vs frozen {cut:+.0%}")
    print(f"ratio: {1 - cuts[0]:.2f}")


def plot(rows: list[dict[str, Any]], recipes: list[str], key: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in recipes:
        pts = [(r["n_train"], r[key]) for r in rows if r["recipe"] == name]
        ax.plot(*zip(*pts, strict=True), "o-", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training rows")
    ax.set_ylabel(f"test {key}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
