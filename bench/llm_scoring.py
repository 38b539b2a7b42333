"""LLM scoring throughput, measured side by side in one run.

(a) The scoring pipeline (fusion.llm.LLMScorer: ledger, semaphore, retries, parsing) against
    a local OpenAI-compatible stub that adds a fixed latency to every call, standing in for a
    remote API: texts/s sequentially (concurrency 1) and at concurrency C, each compared with
    the ideal C / latency. The stub runs in its own process so it does not share our GIL.
(b) texts/s against the real local model (SmolLM2-135M through llama.cpp's HTTP server).
(c) the speed-up of a re-run that is answered from the SQLite cache.

The last line is ``ratio to ideal: X`` for (a) at concurrency C (target >= 0.8 with C = 16).

    python bench/llm_scoring.py [--texts 256] [--latency 0.2] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from fusion.config import LLMLimitsConfig, LLMScorerConfig
from fusion.datasets import builtin_split
from fusion.llm import LLMScorer
from fusion.llm.cache import ScoreCache
from fusion.llm.local import free_port

CLASSES = ["business", "entertainment", "politics", "sports", "tech"]


def _scorer(base_url: str | None, concurrency: int, cache: ScoreCache | None = None, **cfg) -> LLMScorer:
    provider = "local" if base_url is None else "custom"
    model = cfg.pop("model", "stub")
    scorer_cfg = LLMScorerConfig(name="bench", provider=provider, model=model, base_url=base_url, **cfg)
    limits = LLMLimitsConfig(max_concurrency=concurrency, cache=cache is not None)
    return LLMScorer(scorer_cfg, CLASSES, False, limits, cache=cache)


def _rate(scorer: LLMScorer, texts: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    batch = asyncio.run(scorer.score(texts))
    took = time.perf_counter() - start
    assert not any(batch.errors), batch.errors[:3]
    return len(texts) / took, batch.stats.calls


def _wait(url: str, proc: subprocess.Popen) -> None:
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # the server answers (405 on GET of a POST route): it is up
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("stub server died") from None
            time.sleep(0.05)
    raise SystemExit("stub server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--latency", type=float, default=0.2, help="seconds the stub adds per call")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--local-texts", type=int, default=24, help="texts for the real local model (b)")
    args = ap.parse_args()
    texts = builtin_split("bbc-news", "test").sample(frac=1.0, random_state=0)["text"].tolist()
    texts = (texts * (args.texts // len(texts) + 1))[: args.texts]
    texts = [f"[{i}] {t}" for i, t in enumerate(texts)]  # distinct texts: no accidental cache hits

    port = free_port()
    stub = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve().parents[1] / "tests" / "stub_llm.py"),
            "--port",
            str(port),
            "--latency",
            str(args.latency),
            "--classes",
            ",".join(CLASSES),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}/v1"
        _wait(f"{base}/chat/completions", stub)
        c = args.concurrency
        n_seq = max(8, args.texts // c)  # the sequential run is slow by design: fewer texts
        seq, _ = _rate(_scorer(base, 1), texts[:n_seq])
        par, _ = _rate(_scorer(base, c), texts)
        ideal_seq, ideal_par = 1 / args.latency, c / args.latency
        print(f"(a) stub endpoint, {args.latency * 1000:.0f} ms per call, {args.texts} texts")
        print(f"    sequential:       {seq:8.2f} texts/s  (ideal {ideal_seq:.2f}, ratio {seq / ideal_seq:.3f})")
        print(f"    concurrency {c:>3}:  {par:8.2f} texts/s  (ideal {ideal_par:.2f}), {par / seq:.1f}x sequential")

        with tempfile.TemporaryDirectory() as tmp:
            cache = ScoreCache(os.path.join(tmp, "cache.sqlite"))
            cold, _ = _rate(_scorer(base, c, cache), texts)
            warm, warm_calls = _rate(_scorer(base, c, cache), texts)
        print(f"(c) cache: cold {cold:.1f} texts/s, re-run {warm:.1f} texts/s ({warm_calls} calls): {warm / cold:.0f}x")
    finally:
        stub.terminate()
        stub.wait(10)

    local_texts = texts[: args.local_texts]
    for conc in (1, 2):
        rate, _ = _rate(_scorer(None, conc, model="smollm2-135m"), local_texts)
        print(f"(b) local SmolLM2-135M (llama.cpp, {os.cpu_count()} CPUs), concurrency {conc}: {rate:.2f} texts/s")
    print(f"ratio below: concurrent texts/s over the ideal {ideal_par:.1f}")
    print(f"ratio: {par / ideal_par:.3f}")


if __name__ == "__main__":
    main()
