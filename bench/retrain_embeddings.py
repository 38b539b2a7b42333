"""A retrain after new labels, with the registry's embedding cache and without it, side by side.

A label store gets ``--labels`` LLM answers on bbc-news texts and a first retrain (which embeds them all and
fills the cache); then people label ``--new`` other texts. The second retrain runs twice, in alternating
order over ``--rounds``, each time from a copy of the registry as the first retrain left it: with its
embeddings (``embedding_cache_rows`` at its default) and without them (0). It prints each run's seconds and the
texts it embedded.

The last line is ``ratio: X``: the median seconds of the cached retrain over the uncached one (lower is better;
it falls as the store grows, since the uncached retrain embeds every text again).

    python bench/retrain_embeddings.py [--labels 600] [--new 60] [--max-length 128] [--rounds 2]
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from fusion.datasets import load_builtin, split
from fusion.labelstore import LabelStore, human_label, llm_labels
from fusion.loop import LoopSettings, retrain
from fusion.registry import Registry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=int, default=600, help="LLM answers in the store before the first retrain")
    ap.add_argument("--new", type=int, default=60, help="people's labels on other texts before the second")
    ap.add_argument("--max-length", type=int, default=128, help="encoder tokens per text")
    ap.add_argument("--rounds", type=int, default=2, help="second retrains of each kind, alternating")
    args = ap.parse_args()

    rows = split(load_builtin("bbc-news"))["train"].sample(args.labels + args.new, random_state=0)
    classes = sorted(rows["label"].unique())
    old, new = rows.iloc[: args.labels], rows.iloc[args.labels :]
    y = np.array([classes.index(c) for c in old["label"]])
    answers = np.full((len(y), len(classes)), 0.1)
    answers[np.arange(len(y)), y] = 0.6
    work = tempfile.mkdtemp(prefix="retrain-embeddings-")
    store = LabelStore(f"{work}/labels")
    store.append(llm_labels(old["text"].tolist(), answers, classes, False, llm="teacher"))
    config = {"encoder": {"max_length": args.max_length}, "labels": {"classes": classes}}
    t = time.perf_counter()
    first = retrain(store, Registry(f"{work}/first"), config=config)
    print(f"first retrain: {time.perf_counter() - t:.1f} s, {first['embeddings']}")
    people = zip(new["text"], new["label"], strict=True)
    store.append(human_label(text, lab, label_id=f"p{i}") for i, (text, lab) in enumerate(people))

    seconds: dict[str, list[float]] = {"cached": [], "uncached": []}
    for r in range(args.rounds):
        for kind in ("cached", "uncached") if r % 2 == 0 else ("uncached", "cached"):
            reg = f"{work}/{kind}-{r}"
            shutil.copytree(f"{work}/first", reg)
            t = time.perf_counter()
            report = retrain(
                store, Registry(reg), LoopSettings(embedding_cache_rows=200_000 if kind == "cached" else 0)
            )
            seconds[kind].append(time.perf_counter() - t)
            print(
                f"second retrain, {kind}: {seconds[kind][-1]:.1f} s, {report.get('embeddings', 'every text embedded')}"
            )
    shutil.rmtree(work, ignore_errors=True)
    print(f"ratio: {statistics.median(seconds['cached']) / statistics.median(seconds['uncached']):.2f}")


if __name__ == "__main__":
    main()
