"""Encoder start, throughput and accuracy: a plain transformers loop, and fusion.encoder on PyTorch, on
ONNX Runtime (float32, the CPU default) and on int8 ONNX Runtime.

First, a cold start per backend: a fresh Python process that loads the encoder and embeds one text, as
a Serve replica or a Ray Data actor does (CPU seconds, imports included, and peak RSS; the export is
made before, as it is once per machine). Then throughput: same texts (bbc-news articles), same model,
batch size, max_length and threads. The plain loop pads each batch in input order; fusion.encoder sorts
by token length first (dynamic padding), on every backend (``encoder.backend``). Rounds alternate so
machine noise hits all alike; medians are compared. Then each backend embeds the whole bbc-news corpus
and the fusion head (no LLM) is trained on it: train/val/test splits as `labelfuse train --data
bbc-news`, accuracy on the test split.

The last line is ``ratio: X``: int8 texts/s over PyTorch's (the target is 1.8 or more, with accuracy
within 0.5 points).

    python bench/encoder_throughput.py [--texts 512] [--batch-size 32] [--max-length 256] [--threads 2]
        [--rounds 3] [--no-accuracy]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
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


COLD = """
import json, sys
from fusion.config import EncoderConfig
from fusion.encoder import TextEncoder
TextEncoder(EncoderConfig(max_length={max_length}, num_threads=1, backend={backend!r})).embed(["a text"])
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"rss_mb": hwm / 1024, "torch": "torch" in sys.modules}}))
"""


def cold_start(backend: str, max_length: int) -> tuple[float, float, bool]:
    """(CPU seconds, peak RSS MB, torch imported) of a fresh process that loads the encoder and embeds once."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [sys.executable, "-c", COLD.format(max_length=max_length, backend=backend)],
        capture_output=True,
        text=True,
        check=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return cpu, got["rss_mb"], got["torch"]


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
    backends = ("torch", "onnx", "onnx-int8")
    encoders = {f"fusion.encoder {b}": TextEncoder(EncoderConfig(**common, backend=b)) for b in backends}
    torch_enc = encoders["fusion.encoder torch"]
    print(
        f"{len(texts)} bbc-news texts, batch {args.batch_size}, max_length {args.max_length}, "
        f"{torch.get_num_threads()} threads, device {torch_enc.device}"
    )
    ref = plain_loop(torch_enc.tokenizer, torch_enc.model, texts[:64], args.batch_size, args.max_length)
    assert np.allclose(ref, torch_enc.embed(texts[:64]), atol=1e-4), "the two PyTorch paths must agree"
    for b in ("onnx", "onnx-int8"):
        cos = (ref * encoders[f"fusion.encoder {b}"].embed(texts[:64])).sum(1)
        print(f"{b} vs PyTorch embeddings: cosine min {cos.min():.7f}, mean {cos.mean():.7f}")

    starts: dict[str, list[tuple[float, float, bool]]] = {b: [] for b in backends}
    for _ in range(args.rounds):
        for b in backends:
            starts[b].append(cold_start(b, args.max_length))
    for b, runs_ in starts.items():
        cpu, rss = statistics.median(r[0] for r in runs_), statistics.median(r[1] for r in runs_)
        print(f"cold start {b:<10} {cpu:5.2f} CPU-s  {rss:5.0f} MB peak RSS  torch imported: {runs_[0][2]}")
    cpu = {b: statistics.median(r[0] for r in runs_) for b, runs_ in starts.items()}
    print(f"cold start onnx / torch: {cpu['onnx'] / cpu['torch']:.2f}x the CPU-s")

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
        for b in ("onnx", "onnx-int8"):
            diff = 100 * (acc[f"fusion.encoder {b}"] - acc["fusion.encoder torch"])
            print(f"accuracy {b} - torch: {diff:+.2f} points")
    print(f"ratio: {rate['fusion.encoder onnx-int8'] / rate['fusion.encoder torch']:.2f}")


if __name__ == "__main__":
    main()
