"""Backfill cost as the corpus grows: rows/s and the driver's peak memory at 1x, 2x and 4x the input.

The input is bbc-news repeated (each copy with its own ids); the bundle is an encoder-only model trained
here on a sample (no LLM, so the encoder's work is the cost). Each size runs ``python -m data_jobs.backfill``
as its own process with its own local Ray, as ``ray job submit`` would run it; rows/s is the job's own
``this_run.rows_per_s`` (reading to writing, not Ray's start), and the driver's peak RSS is its VmHWM,
read from /proc while it runs. A job whose cost grows linearly keeps rows/s and the driver's memory flat.

The last line is ``ratio: X``: rows/s at the largest size over the smallest (the target is 0.9 or more).
The line before fits the job's time as fixed seconds plus rows over a steady rate, and gives the rows/s
between consecutive sizes: equal rates there mean the cost per row does not grow with the corpus.

    python bench/backfill_scaling.py [--sizes 1,2,4] [--max-length 64] [--rows-per-file 1000]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import pandas as pd

from fusion.classifier import AutoFusionClassifier
from fusion.datasets import load_builtin


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def backfill(bundle: str, src: str, out: str, rows_per_file: int) -> tuple[dict, float, float]:
    """(the job's summary, the driver's peak RSS in MB, wall seconds)."""
    cmd = [sys.executable, "-m", "data_jobs.backfill", "--bundle", bundle, "--input", src, "--output", out]
    cmd += ["--id-column", "id", "--llm", "off", "--rows-per-file", str(rows_per_file)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def watch() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], peak_rss_mb(proc.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"backfill failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    return json.loads(stdout[stdout.index("{") :]), peak[0], time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,2,4", help="multiples of bbc-news (2,225 texts) to backfill")
    ap.add_argument("--max-length", type=int, default=64, help="encoder tokens per text (keeps the run short)")
    ap.add_argument("--rows-per-file", type=int, default=1000)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    work = Path(tempfile.mkdtemp(prefix="bench-backfill-scaling-"))
    base = load_builtin("bbc-news")
    clf = AutoFusionClassifier({"encoder": {"max_length": args.max_length}, "llms": []})
    clf.fit(base.groupby("label").head(40))
    clf.save(work / "bundle")
    print(f"bbc-news x {sizes}, encoder-only bundle (max_length {args.max_length}), {os.cpu_count()} CPUs")

    rates = {}
    for k in sizes:
        src = work / f"corpus-{k}x.parquet"
        pd.concat(
            [pd.DataFrame({"id": [f"{r}-{i}" for i in range(len(base))], "text": base["text"]}) for r in range(k)]
        ).to_parquet(src)
        summary, peak, wall = backfill(str(work / "bundle"), str(src), str(work / f"out-{k}x"), args.rows_per_file)
        rows = summary["this_run"]["rows"]
        assert rows == summary["output_rows"] == k * len(base) and summary["duplicate_ids"] == 0, summary
        rates[k] = summary["this_run"]["rows_per_s"]
        print(
            f"{k}x: {rows:6d} rows  {rates[k]:7.1f} rows/s  driver peak RSS {peak:6.0f} MB  "
            f"(job {summary['this_run']['elapsed_s']:.0f} s, process {wall:.0f} s)"
        )
    if len(sizes) > 2:  # the job's time as a line, t = fixed + rows / rate: what grows with the input
        rows = np.array([k * len(base) for k in sizes], float)
        slope, fixed = np.polyfit(rows, rows / np.array([rates[k] for k in sizes]), 1)
        marginal = [(rows[i + 1] - rows[i]) / (rows[i + 1] / rates[sizes[i + 1]] - rows[i] / rates[sizes[i]])
                    for i in range(len(sizes) - 1)]  # fmt: skip
        print(
            f"fitted: {fixed:.1f} s fixed (actors starting, the encoder loading) + {1 / slope:.1f} rows/s; "
            f"rows/s between sizes: {', '.join(f'{m:.1f}' for m in marginal)} "
            f"(last over first: {marginal[-1] / marginal[0]:.2f})"
        )
    print(f"ratio: {rates[sizes[-1]] / rates[sizes[0]]:.2f}")


if __name__ == "__main__":
    main()
