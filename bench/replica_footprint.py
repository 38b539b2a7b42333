"""What each Serve replica and backfill actor loads: start time and peak RSS, whole model vs its part.

Before the model was split into parts, every Serve replica and every backfill actor ran
``AutoFusionClassifier.load`` (encoder weights, probe embedding, head, pool, config). Now each loads
only its parts through :class:`fusion.bundle.Bundle`: a Fusion replica the encoder and the head, a
Scorer replica the LLM panel, a Ray Data embed actor the encoder, a backfill predictor the head and the
LLM panel. Each row (one part, or the predictor's two) runs both in fresh
Python processes, side by side, alternating, ``--repeats`` times (medians), and prints seconds from
process start to loaded (imports included) and peak RSS. The last line is the ratio of the summed
start times of the four rows, parts vs whole (``ratio: X``; below 1 is faster).

    python bench/replica_footprint.py [--repeats 3]

The bundle has one LLM configured (an OpenAI-compatible endpoint that is never called) and a
few-shot pool, so the Scorer builds a real LLM panel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROLE = {
    "encoder": "Bundle.open(path).encoder()",
    "Scorer": "Bundle.open(path).panel(LocalLedger())",
    "head": "Bundle.open(path).head()",
    "backfill predictor": "b = Bundle.open(path); b.head(); b.panel(LocalLedger())",
}
WHOLE = (
    "from fusion.classifier import AutoFusionClassifier\n"
    "AutoFusionClassifier.load(path, device='cpu', ledger=LocalLedger())"
)

PROGRAM = """
import time, sys, json
t0 = time.perf_counter()
from fusion.bundle import Bundle
from fusion.llm import LocalLedger
path = sys.argv[1]
{load}
# VmHWM: this process's peak RSS (ru_maxrss would carry the parent's peak across fork and exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"s": time.perf_counter() - t0, "rss_mb": hwm / 1024}}))
"""


def make_bundle() -> str:
    import numpy as np

    from fusion.classifier import AutoFusionClassifier
    from fusion.datasets import load_builtin, split

    d = split(load_builtin("bbc-news"))
    train, val = d["train"].sample(200, random_state=0), d["val"].sample(60, random_state=0)
    llm = {"name": "remote", "provider": "custom", "model": "m", "base_url": "http://127.0.0.1:9/v1", "few_shot": 2}
    clf = AutoFusionClassifier({"llms": [llm], "encoder": {"max_length": 128}})
    rng = np.random.default_rng(0)
    given = {"remote": rng.dirichlet(np.ones(5), len(train)).astype("float32")}  # no call is made
    clf.fit(train, validation=val, llm_scores=given, validation_llm_scores={"remote": np.full((60, 5), np.nan)})
    return str(clf.save(os.path.join(tempfile.mkdtemp(prefix="labelfuse-footprint-"), "model")))


def measure(load: str, path: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM.format(load=load), path], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = make_bundle()
    print(f"{'role':<20} {'whole s':>8} {'part s':>8} {'whole MB':>9} {'part MB':>9}")
    total_whole = total_part = 0.0
    for role, load in ROLE.items():
        runs: dict[str, list[dict[str, float]]] = {"whole": [], "part": []}
        for _ in range(args.repeats):
            runs["whole"].append(measure(WHOLE, path))
            runs["part"].append(measure(load, path))
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("s", "rss_mb")} for k, v in runs.items()}
        total_whole += med["whole"]["s"]
        total_part += med["part"]["s"]
        print(
            f"{role:<20} {med['whole']['s']:>8.2f} {med['part']['s']:>8.2f} "
            f"{med['whole']['rss_mb']:>9.0f} {med['part']['rss_mb']:>9.0f}"
        )
    print(f"ratio: {total_part / total_whole:.2f}")


if __name__ == "__main__":
    main()
