"""Ray Data embed job vs a plain single-process loop: rows/s side by side in one run, and their ratio.

Both sides do the whole job on the same bbc-news texts: load the encoder, read parquet, embed,
write parquet. The plain side is one process with ``--threads`` CPU threads; the Ray side is
``data_jobs.embed`` with ``--actors`` actors of ``threads / actors`` threads each on a local Ray
with ``--threads`` CPUs (actor start and model load included). Rounds alternate so machine
noise hits both. With ``--num-gpus`` (a GPU machine) the actors take that many GPUs each and
the plain loop runs on one GPU; rows/s per GPU is printed.

    python bench/ray_data_embed.py [--rows 2000] [--threads 2] [--actors 2] [--rounds 2] [--encoder DIR]
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray
import torch

from data_jobs.common import read_corpus
from data_jobs.embed import embed_dataset, write_parquet
from fusion.config import EncoderConfig
from fusion.datasets import load_builtin
from fusion.encoder import TextEncoder


def plain(src: str, dst: str, cfg: EncoderConfig) -> float:
    t = time.perf_counter()
    enc = TextEncoder(cfg)
    df = pd.read_parquet(src)
    df["embedding"] = list(enc.embed(df["text"].tolist()))
    df.to_parquet(dst)
    return time.perf_counter() - t


def with_ray(src: str, dst: str, cfg: EncoderConfig, actors: int, threads: int, num_gpus: float) -> float:
    t = time.perf_counter()
    ds = read_corpus(src, "parquet", "text", "id")
    ds = embed_dataset(
        ds, encoder=cfg.model_dump(), actors=actors, threads=threads, num_gpus=num_gpus, batch_size=cfg.batch_size
    )
    write_parquet(ds, dst, rows_per_file=100_000)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2, help="total CPU threads (and Ray CPUs) on each side")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (GPU machines)")
    ap.add_argument("--encoder", default="all-MiniLM-L6-v2", help="encoder name or local model directory")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    gpu = args.num_gpus > 0
    cfg = EncoderConfig(
        model=args.encoder, max_length=args.max_length, batch_size=args.batch_size, device="cuda" if gpu else "cpu"
    )
    base = load_builtin("bbc-news")
    df = base.sample(n=args.rows, replace=args.rows > len(base), random_state=0).reset_index(drop=True)
    work = tempfile.mkdtemp(prefix="bench-ray-embed-")
    src = f"{work}/corpus.parquet"
    pd.DataFrame({"id": [str(i) for i in range(len(df))], "text": df["text"]}).to_parquet(src)
    n_gpus = torch.cuda.device_count() if gpu else 0
    ray.init(num_cpus=args.threads, num_gpus=n_gpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    per_actor = max(1, args.threads // args.actors)
    torch.set_num_threads(args.threads)
    print(
        f"{args.rows} bbc-news texts, {args.encoder}, max_length {args.max_length}, batch {args.batch_size}; "
        f"plain: 1 process x {args.threads} threads; Ray Data: {args.actors} actors x {per_actor} threads"
        + (f", {args.num_gpus} GPU each ({n_gpus} GPUs)" if gpu else "")
    )
    times: dict[str, list[float]] = {"plain loop": [], "Ray Data job": []}
    for r in range(args.rounds):
        times["plain loop"].append(plain(src, f"{work}/plain-{r}.parquet", cfg))
        times["Ray Data job"].append(
            with_ray(src, f"{work}/ray-{r}", cfg, args.actors, per_actor, args.num_gpus if gpu else 0.0)
        )
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()))
    a = pd.read_parquet(f"{work}/plain-0.parquet").set_index("id")
    b = pq.read_table(f"{work}/ray-0").to_pandas().set_index("id").loc[a.index]
    diff = np.abs(np.stack(a["embedding"].to_numpy()) - np.stack(b["embedding"].to_numpy())).max()
    assert diff < 1e-4, f"the two sides must compute the same embeddings (max diff {diff})"
    rate = {k: args.rows / statistics.median(v) for k, v in times.items()}
    for k, v in rate.items():
        extra = f" ({v / max(n_gpus, 1):.1f} rows/s per GPU)" if gpu else ""
        print(f"{k:14s} {v:8.1f} rows/s (median of {args.rounds}){extra}")
    print("ratio below: Ray Data job rows/s over the plain loop's")
    print(f"ratio: {rate['Ray Data job'] / rate['plain loop']:.3f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
