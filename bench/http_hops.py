"""Where a single-text HTTP request's CPU goes: requests/s with and without the model behind the proxy.

The labelfuse application at its default sizing, 16 closed-loop clients in a separate load-generator process,
one route at a time: ``GET /healthz`` (the HTTP proxy and Fusion's HTTP API) and ``POST /v1/classify`` with
one short text and ``llm: off`` (and the encoder and head, in the same replica). The raw model's texts/s on
the same short texts is measured in this process. The first route alone is the floor the HTTP path puts
under single texts: with Serve's proxy in front (``--proxy serve``) it is about as fast as the raw model on
2 cores; with Ray Serve's HAProxy ingress (``--proxy haproxy``) several times faster.

The last line is ``ratio: X``: classify requests/s over the raw model's texts/s.

    python bench/http_hops.py [--bundle DIR | --backend auto|torch|onnx|onnx-int8] [--proxy serve|haproxy] [--seconds 15]
                              [--warmup 20] [--threads 1] [--fusion-replicas N]
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _serve_common import add_bundle_args, add_proxy_arg, add_sizing_args, bundle, raw_rate, serve_app, texts

ROUTES = {  # name: (method, path, what the request passes through)
    "healthz": ("GET", "/healthz", "proxy + Fusion's HTTP API"),
    "classify": ("POST", "/v1/classify", "proxy + Fusion's HTTP API + encoder + head"),
}


async def _load(url: str, method: str, body: object, concurrency: int, seconds: float) -> float:
    import aiohttp

    done = 0
    stop = False

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while not stop:
            async with session.request(method, url, json=body) as r:
                await r.read()
                done += r.status == 200

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(concurrency)]
        await asyncio.sleep(5)  # warm-up
        start, before = time.perf_counter(), done
        await asyncio.sleep(seconds)
        rate = (done - before) / (time.perf_counter() - start)
        stop = True
        await asyncio.gather(*tasks, return_exceptions=True)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bundle_args(ap)
    add_proxy_arg(ap)
    add_sizing_args(ap)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--warmup", type=float, default=20, help="seconds of classify load first (Fusion scales 1 -> 2)")
    ap.add_argument("--loadgen", nargs=3, metavar=("URL", "METHOD", "BODY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loadgen:
        url, method, body = args.loadgen
        print(json.dumps(asyncio.run(_load(url, method, json.loads(body), args.concurrency, args.seconds))))
        return

    model = bundle(args)
    sample = texts("short", 1536)
    raw = raw_rate(model, sample)
    base = serve_app(args, model)
    rates = {}
    for name, (method, path, _) in [("warmup", ROUTES["classify"]), *ROUTES.items()]:
        body = {"texts": sample[:1], "llm": "off"} if method == "POST" else None
        cmd = [sys.executable, __file__, "--loadgen", f"{base}{path}", method, json.dumps(body)]
        seconds = args.warmup if name == "warmup" else args.seconds
        cmd += ["--concurrency", str(args.concurrency), "--seconds", str(seconds)]
        rates[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()

    print(
        f"\n{args.concurrency} clients, {os.cpu_count()} CPUs, {args.proxy} proxy; "
        f"raw model {raw:.1f} short texts/s in one process"
    )
    for name, (method, path, through) in ROUTES.items():
        r = rates[name]
        print(f"{method:4} {path:13} {r:7.1f} req/s  {1000 / r:5.1f} ms each  {r / raw:5.2f} of raw  ({through})")
    print(f"ratio: {rates['classify'] / raw:.2f}")


if __name__ == "__main__":
    main()
