"""Encoder throughput: fusion.encoder vs a plain transformers loop, side by side in one run.

Same texts (bbc-news articles), same model, batch size, max_length and torch threads. The plain loop
pads each batch in input order; fusion.encoder sorts by token length first (dynamic padding). Rounds
alternate A/B so machine noise hits both; the ratio of medians is printed.

    python bench/encoder_throughput.py [--texts 512] [--batch-size 32] [--max-length 256] [--threads 2] [--rounds 3]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from fusion.config import EncoderConfig
from fusion.datasets import load_builtin
from fusion.encoder import TextEncoder


def plain_loop(tokenizer, model, texts, batch_size, max_length):
    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            b = tokenizer(
                texts[s : s + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    df = load_builtin("bbc-news").sample(n=args.texts, random_state=0)
    texts = df["text"].tolist()
    enc = TextEncoder(EncoderConfig(max_length=args.max_length, batch_size=args.batch_size, num_threads=args.threads))
    print(
        f"{len(texts)} bbc-news texts, batch {args.batch_size}, max_length {args.max_length}, "
        f"{torch.get_num_threads()} torch threads, device {enc.device}"
    )

    ref = plain_loop(enc.tokenizer, enc.model, texts[:64], args.batch_size, args.max_length)
    assert np.allclose(ref, enc.embed(texts[:64]), atol=1e-4), "the two paths must compute the same embeddings"

    times = {"plain transformers loop": [], "fusion.encoder": []}
    for _ in range(args.rounds):
        t = time.perf_counter()
        plain_loop(enc.tokenizer, enc.model, texts, args.batch_size, args.max_length)
        times["plain transformers loop"].append(time.perf_counter() - t)
        t = time.perf_counter()
        enc.embed(texts)
        times["fusion.encoder"].append(time.perf_counter() - t)

    for name, ts in times.items():
        print(
            f"{name:<26} {len(texts) / statistics.median(ts):7.1f} texts/s  (rounds: {', '.join(f'{x:.1f}s' for x in ts)})"
        )
    ratio = statistics.median(times["plain transformers loop"]) / statistics.median(times["fusion.encoder"])
    print(f"ratio fusion.encoder / plain loop: {ratio:.2f}x texts/s")


if __name__ == "__main__":
    main()
