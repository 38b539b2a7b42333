"""What the Serve benchmarks share: a bundle, the texts, and the raw model's throughput."""

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from fusion.classifier import AutoFusionClassifier
from fusion.config import BACKENDS
from fusion.datasets import load_builtin, split


def texts(kind: str, n: int) -> list[str]:
    """bbc-news test texts: ``long`` whole articles (cut at the encoder's max_length) or ``short``
    (their first 24 words: ticket- or headline-sized)."""
    df = split(load_builtin("bbc-news"))["test"].sample(frac=1.0, random_state=0)
    out = df["text"].tolist()
    if kind == "short":
        out = [" ".join(t.split()[:24]) for t in out]
    return (out * (n // len(out) + 1))[:n]


def add_bundle_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--bundle", help="model bundle (default: train a small one)")
    ap.add_argument("--backend", choices=BACKENDS, default="torch", help="encoder backend of the trained bundle")


def bundle(args: argparse.Namespace) -> str:
    """``--bundle``, or a fresh encoder-only bundle on ``--backend``, trained on a bbc-news sample (about a minute)."""
    if args.bundle:
        return args.bundle
    d = split(load_builtin("bbc-news"))
    out = os.path.join(tempfile.mkdtemp(prefix="labelfuse-bench-"), "model")
    print(f"training a bench bundle ({args.backend}) on 300 bbc-news texts ...", flush=True)
    clf = AutoFusionClassifier({"encoder": {"backend": args.backend}}).fit(
        d["train"].sample(300, random_state=0), validation=d["val"].sample(100, random_state=0)
    )
    clf.save(out)
    return out


def raw_rate(model: str, sample: list[str]) -> float:
    """Texts/s of the raw model in this process (all cores): encoder.embed in batches of 64, then the head."""
    clf = AutoFusionClassifier.load(model, device="cpu")
    clf.predict_proba(sample[:128])  # warm-up (ONNX Runtime sizes its buffers on the first long batches)
    t = time.perf_counter()
    clf.predict_proba(sample)
    return len(sample) / (time.perf_counter() - t)
