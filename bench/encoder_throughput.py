"""Encoder throughput and accuracy: a plain transformers loop, fusion.encoder on PyTorch and on int8 ONNX Runtime.

Same texts (bbc-news articles), same model, batch size, max_length and threads. The plain loop pads each
batch in input order; fusion.encoder sorts by token length first (dynamic padding), on either backend
(``encoder.backend: torch`` or ``onnx-int8``). Rounds alternate the three so machine noise hits all alike;
medians are compared. Then both backends embed the whole bbc-news corpus and the fusion head (no LLM) is
trained on each: train/val/test splits as `labelfuse train --data bbc-news`, accuracy on the test split.

The last line is ``ratio: X``: int8 texts/s over PyTorch's (the target is 1.8 or more, with accuracy
within 0.5 points).

    pip install 'labelfuse[onnx]' && python bench/encoder_throughput.py [--texts 512] [--batch-size 32]
        [--max-length 256] [--threads 2] [--rounds 3] [--no-accuracy]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from fusion.classifier import AutoFusionClassifier
from fusion.config import EncoderConfig
from fusion.datasets import builtin_split, load_builtin
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


def accuracy(enc: TextEncoder, splits) -> float:
    clf = AutoFusionClassifier({"encoder": enc.config.model_dump(), "llms": []}, encoder=enc)
    emb = {name: enc.embed(df["text"].tolist()) for name, df in splits.items()}
    clf.fit(
        splits["train"],
        embeddings=emb["train"],
        validation=splits["val"],
        validation_embeddings=emb["val"],
    )
    return clf.evaluate(splits["test"], embeddings=emb["test"])["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-accuracy", action="store_true", help="throughput only (skips about two minutes)")
    args = ap.parse_args()

    texts = load_builtin("bbc-news").sample(n=args.texts, random_state=0)["text"].tolist()
    common = dict(max_length=args.max_length, batch_size=args.batch_size, num_threads=args.threads)
    encoders = {
        "fusion.encoder torch": TextEncoder(EncoderConfig(**common)),
        "fusion.encoder onnx-int8": TextEncoder(EncoderConfig(**common, backend="onnx-int8")),
    }
    torch_enc = encoders["fusion.encoder torch"]
    print(
        f"{len(texts)} bbc-news texts, batch {args.batch_size}, max_length {args.max_length}, "
        f"{torch.get_num_threads()} threads, device {torch_enc.device}"
    )
    ref = plain_loop(torch_enc.tokenizer, torch_enc.model, texts[:64], args.batch_size, args.max_length)
    assert np.allclose(ref, torch_enc.embed(texts[:64]), atol=1e-4), "the two PyTorch paths must agree"
    cos = (ref * encoders["fusion.encoder onnx-int8"].embed(texts[:64])).sum(1)
    print(f"int8 vs PyTorch embeddings: cosine min {cos.min():.4f}, mean {cos.mean():.4f}")

    runs = {
        "plain transformers loop": lambda: plain_loop(
            torch_enc.tokenizer, torch_enc.model, texts, args.batch_size, args.max_length
        ),
        **{name: (lambda e=e: e.embed(texts)) for name, e in encoders.items()},
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    rate = {name: len(texts) / statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"{name:<26} {rate[name]:7.1f} texts/s  (rounds: {', '.join(f'{x:.1f}s' for x in ts)})")
    print(f"fusion.encoder torch / plain loop: {rate['fusion.encoder torch'] / rate['plain transformers loop']:.2f}x")

    if not args.no_accuracy:
        splits = {name: builtin_split("bbc-news", name) for name in ("train", "val", "test")}
        acc = {name: accuracy(e, splits) for name, e in encoders.items()}
        for name, a in acc.items():
            print(f"{name:<26} bbc-news test accuracy {100 * a:.2f}% ({len(splits['test'])} texts)")
        diff = 100 * (acc["fusion.encoder onnx-int8"] - acc["fusion.encoder torch"])
        print(f"accuracy int8 - torch: {diff:+.2f} points")
    print(f"ratio: {rate['fusion.encoder onnx-int8'] / rate['fusion.encoder torch']:.2f}")


if __name__ == "__main__":
    main()
