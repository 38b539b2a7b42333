"""The learning loop on a stream: from zero labels, with a local LLM as the only teacher, does it pay the LLM less
every window and end near supervised accuracy?

bbc-news is shuffled into a stream; a prefix of it (``--texts``) is replayed in windows. Three ways to tag
each window, measured side by side in one run:

- **loop**: with no model yet, every text goes to the LLM. Every LLM answer is kept in a label store; after
  each window a simulated person labels ``--person`` of the window's texts (the texts ``labelfuse labels
  export`` picks: where the champion's encoder and the LLM disagree, low margin, rare classes) and
  ``fusion.loop.retrain`` trains a challenger and promotes it when it is not worse. The champion's gate
  sends to the LLM only the texts its encoder is unsure about.
- **always-LLM**: every text to the same LLM; its answer is the label.
- **supervised**: an encoder-only model trained on the gold labels of every bbc-news text outside the
  replayed prefix (the supervised ceiling; it never sees the stream's texts).

LLM calls are answered once per text (temperature 0) and reused for the loop's asked texts, so the run
costs one LLM pass over the prefix. Dollars price each call's measured tokens at ``--price-model``'s list
price (a hosted small model). The last three lines:
``calls ratio`` (the loop's LLM calls per 1,000 texts in the last window over always-LLM's),
``accuracy gain over llm`` and ``accuracy gap to supervised`` (the last window's accuracy minus theirs,
in points).

    make models-qwen15 && python bench/stream_learning.py [--texts 600] [--window 100] [--plot loop.png]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from fusion.classifier import AutoFusionClassifier
from fusion.config import EncoderConfig, parse_config
from fusion.datasets import load_builtin
from fusion.encoder import TextEncoder
from fusion.labelstore import LabelStore, human_label, llm_labels
from fusion.llm import LLMPanel
from fusion.llm.prompts import PROMPT_VERSION
from fusion.llm.providers import PRICES
from fusion.loop import LoopSettings, retrain, worth_asking
from fusion.registry import Registry

TEACHER = "teacher"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=600, help="the stream's prefix to replay")
    ap.add_argument("--window", type=int, default=100, help="texts per window; the loop retrains after each")
    ap.add_argument("--llm", default="qwen2.5-coder-1.5b", help="the bundled local LLM that teaches")
    ap.add_argument("--person", type=float, default=0.01, help="share of texts a simulated person labels")
    ap.add_argument("--target-accuracy", type=float, default=0.9, help="the gate's target (gating.target_accuracy)")
    ap.add_argument(
        "--min-call-rate", type=float, default=0.1, help="the gate asks at least this share (gating.min_call_rate)"
    )
    ap.add_argument("--max-length", type=int, default=128, help="encoder tokens per text")
    ap.add_argument("--price-model", default="gpt-4o-mini", help="price each call as this hosted model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", help="write accuracy and LLM calls per 1,000 texts by window to this PNG")
    ap.add_argument("--json", help="write the table as JSON here")
    ap.add_argument("--llm-cache", help="the LLM score cache to use (default: a new, cold one)")
    args = ap.parse_args()
    start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="stream-learning-")

    corpus = load_builtin("bbc-news").sample(frac=1.0, random_state=args.seed).reset_index(drop=True)
    classes = sorted(corpus["label"].unique())
    stream, rest = corpus.iloc[: args.texts], corpus.iloc[args.texts :]
    gold = np.array([classes.index(c) for c in stream["label"]])
    encoder = TextEncoder(EncoderConfig(max_length=args.max_length))
    emb_all = encoder.embed(corpus["text"].tolist(), progress=True)
    cache = dict(zip(corpus["text"], emb_all, strict=True))
    emb = emb_all[: args.texts]

    def embed(texts: list[str]) -> np.ndarray:
        return np.stack([cache[t] for t in texts]) if texts else np.zeros((0, encoder.dim), np.float32)

    price_in, price_out = PRICES[args.price_model]
    config = parse_config(
        {
            "labels": {"classes": classes},
            "encoder": {"max_length": args.max_length},
            # priced as the hosted model, for the tokens the local one counts (cached answers keep their tokens)
            "llms": [
                {
                    "name": TEACHER,
                    "provider": "local",
                    "model": args.llm,
                    "price_input": price_in,
                    "price_output": price_out,
                }
            ],
            "gating": {"enabled": True, "target_accuracy": args.target_accuracy, "min_call_rate": args.min_call_rate},
            "llm_limits": {"cache_path": args.llm_cache or f"{work}/llm_cache.sqlite"},  # cold unless given
        }
    )

    # always-LLM: every text, once; the loop's asked texts reuse these answers
    panel = LLMPanel(config.llms, classes, False, config.llm_limits)
    answers = np.full((args.texts, len(classes)), np.nan, np.float32)
    usd = np.zeros(args.texts)
    llm_seconds = 0.0
    for s in range(0, args.texts, args.window):
        t0 = time.perf_counter()
        b = panel.score(stream["text"].iloc[s : s + args.window].tolist(), progress=True)[TEACHER]
        llm_seconds += time.perf_counter() - t0
        answers[s : s + args.window] = b.scores
        usd[s : s + args.window] = b.cost_usd
    llm_pred = np.where(np.isfinite(answers).all(axis=1), np.nan_to_num(answers).argmax(axis=1), -1)

    supervised = AutoFusionClassifier({"encoder": {"max_length": args.max_length}}, encoder=encoder)
    supervised.fit(rest, embeddings=embed(rest["text"].tolist()))
    sup_pred = np.array([classes.index(c) for c in supervised.predict(stream["text"], embeddings=emb, llm="off")])

    store, registry = LabelStore(f"{work}/labels"), Registry(f"{work}/registry")
    settings = LoopSettings(min_human_holdout=20)
    champion = None
    rows = []
    rng = np.random.default_rng(args.seed)
    for w, s in enumerate(range(0, args.texts, args.window)):
        idx = np.arange(s, min(s + args.window, args.texts))
        texts = stream["text"].iloc[idx].tolist()
        if champion is None:
            ask = np.ones(len(idx), bool)
            pred = llm_pred[idx]
        else:
            head = champion._require_fitted()
            ask = head.ask(emb[idx], "auto")
            fused = head.fuse(emb[idx], ask, {TEACHER: answers[idx][ask]})
            pred = np.array([classes.index(c) if c else -1 for c in fused.labels])
        asked = idx[ask]
        store.append(
            llm_labels(
                [stream["text"].iloc[i] for i in asked],
                answers[asked],
                classes,
                False,
                llm=TEACHER,
                prompt_version=PROMPT_VERSION,
                origin="stream",
            )
        )
        n_person = max(1, round(args.person * len(idx)))
        if champion is not None:
            picked = worth_asking(store, champion, n_person)["text"].tolist()
        else:
            picked = [texts[i] for i in rng.choice(len(idx), n_person, replace=False)]
        label_of = dict(zip(stream["text"], stream["label"], strict=True))
        store.append(human_label(t, label_of[t], label_id=f"person:{w}:{j}") for j, t in enumerate(picked))
        report = retrain(store, registry, settings, config=config if champion is None else None, embed=embed)
        if report["decision"] == "promote":
            champion = AutoFusionClassifier.load(registry.bundle_path(report["challenger"]), encoder=encoder)
        n = len(idx)
        rows.append(
            {
                "window": w + 1,
                "texts": f"{s + 1}-{s + n}",
                "loop_acc": float((pred == gold[idx]).mean()),
                "loop_calls_per_1k": 1000 * float(ask.mean()),
                "loop_usd_per_1k": 1000 * float(usd[idx][ask].sum()) / n,
                "llm_acc": float((llm_pred[idx] == gold[idx]).mean()),
                "llm_calls_per_1k": 1000.0,
                "llm_usd_per_1k": 1000 * float(usd[idx].sum()) / n,
                "supervised_acc": float((sup_pred[idx] == gold[idx]).mean()),
                "retrain": report["decision"],
                "human_labels": int(store.stats()["human"]),
            }
        )
        r = rows[-1]
        print(
            f"window {r['window']:>2} ({r['texts']:>9}): loop acc {r['loop_acc']:.3f}, {r['loop_calls_per_1k']:6.1f} "
            f"calls/1k, ${r['loop_usd_per_1k']:.4f}/1k | LLM acc {r['llm_acc']:.3f}, ${r['llm_usd_per_1k']:.4f}/1k | "
            f"supervised {r['supervised_acc']:.3f} | retrain: {r['retrain']}, human labels {r['human_labels']}",
            flush=True,
        )
    last = rows[-1]
    print(
        f"\n{args.texts} texts of bbc-news (shuffled, seed {args.seed}) in windows of {args.window}; teacher {args.llm} "
        f"({llm_seconds / 60:.1f} min of LLM time, {'given' if args.llm_cache else 'cold'} cache); "
        f"person {args.person:.0%}; supervised on {len(rest)} gold labels; {(time.perf_counter() - start) / 60:.1f} min"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
    print(f"calls ratio: {last['loop_calls_per_1k'] / last['llm_calls_per_1k']:.2f}")
    print(f"accuracy gain over llm: {100 * (last['loop_acc'] - last['llm_acc']):+.1f}")
    print(f"accuracy gap to supervised: {100 * (last['loop_acc'] - last['supervised_acc']):+.1f}")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["window"] for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    a.plot(x, [r["loop_acc"] for r in rows], "o-", label="loop")
    a.plot(x, [r["llm_acc"] for r in rows], "s--", label="always-LLM")
    a.plot(x, [r["supervised_acc"] for r in rows], "^:", label="supervised")
    a.set_ylabel("accuracy")
    a.legend()
    b.bar(x, [r["loop_calls_per_1k"] for r in rows], label="loop")
    b.axhline(1000, color="gray", linestyle="--", label="always-LLM")
    b.set_ylabel("LLM calls per 1,000 texts")
    b.set_xlabel("window")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
