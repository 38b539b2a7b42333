"""HTTP load on the Serve graph vs the raw model on the same machine, side by side in one run.

The Serve side is the labelfuse application with its default sizing (Fusion, which serves HTTP and
runs the encoder, autoscaling 1→2 replicas of 1 encoder thread), behind ``--proxy`` (Serve's proxy,
or Ray Serve's HAProxy ingress), driven by a separate load-generator process (aiohttp,
``--concurrency`` closed-loop clients posting ``--texts-per-request`` texts with ``llm: off``, the
encoder path). It warms up first so
autoscaling settles, then measures req/s, texts/s and p50/p99 latency. The raw side is
``AutoFusionClassifier.predict_proba`` over the whole sample in this process on all cores (sorted by
length into passes of 32, so it pads less than a replica's batches can), measured before and after
the load, each once the machine is quiet (requests still in flight after the load would slow it).
Each row's ratio: HTTP texts/s over raw texts/s; the last line, ``ratio: X``, is the lowest of them.

    python bench/http_load.py [--bundle DIR | --backend auto|torch|onnx|onnx-int8] [--proxy serve|haproxy]
                              [--threads 1] [--fusion-replicas N]
                              [--kind long|short|both] [--concurrency 16] [--texts-per-request 1,8]
                              [--seconds 30] [--warmup 30]

The first measurement warms up for ``--warmup`` seconds (Fusion scales 1→2 replicas in
about 20 s); later ones for 5 s, as the replicas stay up.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _serve_common import (
    add_bundle_args,
    add_proxy_arg,
    add_sizing_args,
    bundle,
    describe_sizing,
    raw_rate,
    serve_app,
    texts,
)


async def _load(url: str, sample: list[str], per_request: int, concurrency: int, warmup: float, seconds: float):
    import aiohttp

    lat: list[float] = []
    errors = 0
    sent = 0
    measuring = False

    async def client(session, k: int):
        nonlocal errors, sent
        i = k
        while True:
            batch = [sample[(i + j) % len(sample)] for j in range(per_request)]
            i += concurrency * per_request
            t = time.perf_counter()
            async with session.post(url, json={"texts": batch, "llm": "off"}) as r:
                await r.read()
                ok = r.status == 200
            if measuring:
                if ok:
                    lat.append(time.perf_counter() - t)
                    sent += 1
                else:
                    errors += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        tasks = [asyncio.create_task(client(session, k)) for k in range(concurrency)]
        await asyncio.sleep(warmup)
        measuring = True
        start = time.perf_counter()
        await asyncio.sleep(seconds)
        measuring = False
        elapsed = time.perf_counter() - start
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lat.sort()
    return {
        "requests": sent,
        "errors": errors,
        "req_per_s": sent / elapsed,
        "texts_per_s": sent * per_request / elapsed,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
    }


def loadgen(args: argparse.Namespace) -> None:
    sample = texts(args.kind, 2000)
    per_request = int(args.texts_per_request)
    result = asyncio.run(_load(args.loadgen, sample, per_request, args.concurrency, args.warmup, args.seconds))
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bundle_args(ap)
    add_proxy_arg(ap)
    add_sizing_args(ap)
    ap.add_argument("--kind", choices=["long", "short", "both"], default="both")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--texts-per-request", default="1,8", help="comma list; one measurement each")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=30)
    ap.add_argument("--loadgen", metavar="URL", help=argparse.SUPPRESS)  # internal: the load-generator process
    args = ap.parse_args()
    if args.loadgen:
        return loadgen(args)

    model = bundle(args)
    url = serve_app(args, model) + "/v1/classify"
    rows = []
    warmup = args.warmup
    for kind in ["long", "short"] if args.kind == "both" else [args.kind]:
        sample = texts(kind, 256 if kind == "long" else 1536)
        for per_request in [int(x) for x in args.texts_per_request.split(",")]:
            raw = [raw_rate(model, sample)]
            cmd = [sys.executable, __file__, "--loadgen", url, "--kind", kind, "--concurrency", str(args.concurrency)]
            cmd += ["--texts-per-request", str(per_request), "--seconds", str(args.seconds), "--warmup", str(warmup)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            http = json.loads(out.strip().splitlines()[-1])
            raw.append(raw_rate(model, sample))
            rows.append((kind, per_request, statistics.mean(raw), raw, http))
            warmup = 5.0
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()

    print(
        f"\nHTTP encoder path (llm: off) vs raw model, {os.cpu_count()} CPUs, {args.concurrency} concurrent clients, "
        f"{args.proxy} proxy, {describe_sizing(args)}"
    )
    print(
        f"{'texts':6} {'per req':>7} {'raw texts/s':>16} {'HTTP texts/s':>13} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'ratio':>6}"
    )
    for kind, per_request, raw_mean, raw, http in rows:
        ratio = http["texts_per_s"] / raw_mean
        print(
            f"{kind:6} {per_request:7d} {raw_mean:7.1f} ({raw[0]:.0f}/{raw[1]:.0f}) {http['texts_per_s']:13.1f} "
            f"{http['req_per_s']:7.1f} {http['p50_ms']:8.1f} {http['p99_ms']:8.1f} {http['errors']:6d} {ratio:6.2f}"
        )
    print("targets: single short texts >= 0.6, batched short >= 0.85, long >= 0.9")
    print(f"ratio: {min(http['texts_per_s'] / raw_mean for _, _, raw_mean, _, http in rows):.2f}")


if __name__ == "__main__":
    main()
