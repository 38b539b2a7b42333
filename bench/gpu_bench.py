"""GPU vs CPU on one machine: the embed job, a backfill and the HTTP graph; rows/s and utilisation.

One phase per process (each starts its own local Ray), driven by ``bench/gpu.sh``; every phase
appends one JSON line per measurement to ``WORK/results.jsonl`` and ``report`` prints the table
and ``ratio: X`` (GPU over CPU rows/s of the embed job, at the job's defaults). CPU phases run
with ``CUDA_VISIBLE_DEVICES=""`` (gpu.sh sets it), so neither Ray nor torch sees the GPU there.
GPU utilisation is sampled with ``nvidia-smi -lms 200`` over each measured window only; CPU
busy % comes from /proc/stat over the same window.

    python bench/gpu_bench.py check|prepare|rate|embed|backfill|http|report --work DIR [options]

Row counts follow measured speed: ``--seconds`` times the rate of the last embed job on the same
device (or, before one ran, the raw encoder rate of ``rate``), so each job runs for about that long
whatever the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from _serve_common import cpu_times

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_LENGTH = 256


# -- measuring ------------------------------------------------------------------------------------------------
class Sampler:
    """GPU utilisation and memory (nvidia-smi every ``ms`` ms) and CPU busy % over one window."""

    def __init__(self, ms: int = 200):
        self.ms = ms
        self.samples: list[tuple[float, float]] = []
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.t0 = 0.0
        self.cpu0 = (0.0, 0.0)

    def start(self) -> Sampler:
        self.t0, self.cpu0 = time.perf_counter(), cpu_times()
        if shutil.which("nvidia-smi"):
            q = ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", str(self.ms)]
            self.proc = subprocess.Popen(
                ["nvidia-smi", *q], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((util, mem))

    def stop(self) -> dict[str, Any]:
        total, idle = cpu_times()
        dt, di = total - self.cpu0[0], idle - self.cpu0[1]
        out: dict[str, Any] = {"window_s": round(time.perf_counter() - self.t0, 2)}
        out["cpu_busy_pct"] = round(100 * (1 - di / dt), 1) if dt > 0 else None
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            if self.thread is not None:
                self.thread.join(2)
            utils = [u for u, _ in self.samples]
            if utils:
                out.update(
                    gpu_util_mean=round(statistics.mean(utils), 1),
                    gpu_util_p50=statistics.median(utils),
                    gpu_util_max=max(utils),
                    gpu_mem_max_mib=max(m for _, m in self.samples),
                    gpu_samples=len(utils),
                )
        return out


# -- shared ---------------------------------------------------------------------------------------------------
def record(args: argparse.Namespace, row: dict[str, Any]) -> None:
    row = {"device": args.dev, **row}
    print("RESULT " + json.dumps(row), flush=True)
    with open(os.path.join(args.work, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def results(work: str) -> list[dict[str, Any]]:
    path = os.path.join(work, "results.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rows_for(args: argparse.Namespace, scale: float = 1.0) -> int:
    """About ``--seconds`` of work at the last measured rate on this device."""
    if args.rows:
        return args.rows
    rate = None
    for r in results(args.work):
        if r.get("device") == args.dev and r.get("ok"):
            if r["phase"] == "embed" and r.get("config", {}).get("job_defaults"):
                rate = r["rows_per_s"]
            elif r["phase"] == "rate" and rate is None:
                rate = r["texts_per_s"]
    rate = rate or 20.0
    n = int(rate * args.seconds * scale)
    return max(args.min_rows, min(args.max_rows, (n // 100 + 1) * 100))


def corpus(work: str, rows: int) -> str:
    """bbc-news repeated to ``rows`` rows with unique ids, as one parquet file (cached)."""
    import pandas as pd

    path = os.path.join(work, f"corpus-{rows}.parquet")
    if not os.path.exists(path):
        base = pd.read_parquet(os.path.join(work, "bbc.parquet"))
        reps = -(-rows // len(base))
        df = pd.concat([base] * reps, ignore_index=True).iloc[:rows]
        df = df.assign(id=[str(i) for i in range(rows)])
        df[["id", "text", "label"]].to_parquet(path, index=False)
    return path


def ray_init(args: argparse.Namespace) -> tuple[Any, int]:
    import ray

    kwargs: dict[str, Any] = {"namespace": "labelfuse", "include_dashboard": False, "log_to_driver": args.verbose}
    if args.dev == "cpu":
        kwargs["num_gpus"] = 0
    elif os.environ.get("BENCH_FAKE_GPU") == "1":  # plumbing test on a CPU machine: a logical GPU, torch on CPU
        kwargs["num_gpus"] = 1
    ray.init(**kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray, int(ray.cluster_resources().get("GPU", 0))


def gpus_used(n_gpus: int, num_gpus: float | None, actors: int | None) -> int:
    """GPUs the job could use: what its actors reserve, at most the cluster's."""
    if not n_gpus:
        return 0
    per = 1.0 if num_gpus is None else num_gpus
    return max(1, min(n_gpus, round(per * (actors or int(n_gpus / per)))))


# -- phases ---------------------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> None:
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "cpus": os.cpu_count(),
    }
    if info["cuda"]:
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["gpus_torch"] = torch.cuda.device_count()
    ray, n_gpus = ray_init(args)
    info["ray"] = ray.__version__
    info["ray_resources"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}

    def probe() -> tuple[str | None, bool]:
        import os

        import torch

        return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available()

    # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone in tasks that reserve no GPU: torch there still sees the GPU
    info["zero_gpu_task_sees"] = ray.get(ray.remote(num_gpus=0)(probe).remote())
    if n_gpus:
        info["one_gpu_task_sees"] = ray.get(ray.remote(num_gpus=1)(probe).remote())
    ray.shutdown()
    record(args, {"phase": "check", "ok": True, **info})


def cmd_prepare(args: argparse.Namespace) -> None:
    from fusion.classifier import AutoFusionClassifier
    from fusion.datasets import load_builtin, split

    base = load_builtin("bbc-news").reset_index(drop=True)
    base.assign(id=[str(i) for i in range(len(base))])[["id", "text", "label"]].to_parquet(
        os.path.join(args.work, "bbc.parquet"), index=False
    )
    bundle = os.path.join(args.work, "bundle")
    t = time.perf_counter()
    if not os.path.exists(os.path.join(bundle, "manifest.json")):
        d = split(base)
        clf = AutoFusionClassifier({"encoder": {"max_length": MAX_LENGTH}})
        clf.fit(
            d["train"].sample(args.train, random_state=0), validation=d["val"].sample(args.train // 3, random_state=0)
        )
        clf.save(bundle)
        acc = clf.evaluate(d["test"].sample(min(300, len(d["test"])), random_state=0))["accuracy"]
        record(
            args,
            {
                "phase": "prepare",
                "ok": True,
                "bundle": bundle,
                "train_s": round(time.perf_counter() - t, 1),
                "encoder_device": str(clf.encoder.device),
                "test_accuracy_300": round(float(acc), 4),
            },
        )


def cmd_rate(args: argparse.Namespace) -> None:
    """The raw encoder in this process (all cores, or the GPU): texts/s, the yardstick for sizing."""
    import pandas as pd
    import torch

    from fusion.config import EncoderConfig
    from fusion.encoder import TextEncoder

    texts = pd.read_parquet(os.path.join(args.work, "bbc.parquet"))["text"].tolist()
    dev = "cuda" if args.dev == "gpu" and torch.cuda.is_available() else "cpu"
    enc = TextEncoder(EncoderConfig(max_length=MAX_LENGTH, batch_size=64, device=dev))
    enc.embed(texts[:64])
    chunk = 512 if dev == "cuda" else 64
    n, i = 0, 0
    s = Sampler().start()
    t = time.perf_counter()
    while time.perf_counter() - t < args.rate_seconds:
        enc.embed(texts[i : i + chunk])
        n, i = n + chunk, (i + chunk) % (len(texts) - chunk)
    if dev == "cuda":
        torch.cuda.synchronize()
    el = time.perf_counter() - t
    record(
        args,
        {
            "phase": "rate",
            "ok": True,
            "texts": n,
            "seconds": round(el, 2),
            "texts_per_s": round(n / el, 1),
            "config": {"batch": 64, "max_length": MAX_LENGTH, "torch_threads": torch.get_num_threads()},
            **s.stop(),
        },
    )


def cmd_embed(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from data_jobs import embed

    ray, n_gpus = ray_init(args)
    job_defaults = args.encoder_batch is None and not args.actors and args.num_gpus is None and args.batch_size == 64
    rows = rows_for(args, 1.0 if job_defaults else args.scale)
    src = corpus(args.work, rows)
    out = os.path.join(args.work, f"emb-{args.dev}-{args.label}")
    config = {
        "actors": args.actors,
        "num_gpus": args.num_gpus,
        "batch_size": args.batch_size,
        "encoder_batch": args.encoder_batch or 32,
        "threads": args.threads,
        "job_defaults": job_defaults,
    }
    s = Sampler().start()
    t = time.perf_counter()
    if args.encoder_batch is None:  # the job itself, as `python -m data_jobs.embed` runs it
        argv = ["--input", src, "--output", out, "--id-column", "id", "--max-length", str(MAX_LENGTH)]
        argv += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        argv += ["--actors", str(args.actors)] if args.actors else []
        argv += ["--num-gpus", str(args.num_gpus)] if args.num_gpus is not None else []
        rc = embed.main(argv)
        assert rc == 0, f"data_jobs.embed exited {rc}"
    else:  # the job's pipeline with a larger encoder forward batch (the job's CLI keeps the default 32)
        from data_jobs.common import read_corpus

        ds = read_corpus(src, "parquet", "text", "id")
        ds = embed.embed_dataset(
            ds,
            encoder={"max_length": MAX_LENGTH, "batch_size": args.encoder_batch},
            actors=args.actors,
            threads=args.threads,
            num_gpus=args.num_gpus,
            batch_size=args.batch_size,
        )
        embed.write_parquet(ds, out, 100_000)
    el = time.perf_counter() - t
    util = s.stop()
    table = pq.read_table(out, columns=["id", "error"])
    errors = table.num_rows - table.column("error").null_count
    used = gpus_used(n_gpus, args.num_gpus, args.actors)
    ray.shutdown()
    assert table.num_rows == rows and errors == 0, f"wrote {table.num_rows} of {rows} rows, {errors} errors"
    record(
        args,
        {
            "phase": "embed",
            "label": args.label,
            "ok": True,
            "rows": rows,
            "seconds": round(el, 2),
            "rows_per_s": round(rows / el, 1),
            "gpus": used,
            "rows_per_s_per_gpu": round(rows / el / used, 1) if used else None,
            "config": config,
            "cluster_gpus": n_gpus,
            **util,
        },
    )


def cmd_backfill(args: argparse.Namespace) -> None:
    from data_jobs import backfill

    ray, n_gpus = ray_init(args)
    rows = rows_for(args, args.scale)
    src = corpus(args.work, rows)
    out = os.path.join(args.work, f"pred-{args.dev}-{args.label}")
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resume
    argv = ["--bundle", os.path.join(args.work, "bundle"), "--input", src, "--output", out, "--id-column", "id"]
    argv += ["--llm", "off", "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    argv += ["--actors", str(args.actors)] if args.actors else []
    argv += ["--num-gpus", str(args.num_gpus)] if args.num_gpus is not None else []
    s = Sampler().start()
    t = time.perf_counter()
    rc = backfill.main(argv)
    el = time.perf_counter() - t
    util = s.stop()
    used = gpus_used(n_gpus, args.num_gpus, args.actors)
    ray.shutdown()
    assert rc == 0, f"data_jobs.backfill exited {rc}"
    with open(os.path.join(out, "_summary.json")) as f:
        summary = json.load(f)
    run = summary["this_run"]
    assert summary["output_rows"] == rows and summary["duplicate_ids"] == 0 and not run["errors"], summary
    rate = run["rows_per_s"]  # the job's own figure: from its first read to its last part written
    record(
        args,
        {
            "phase": "backfill",
            "label": args.label,
            "ok": True,
            "rows": rows,
            "seconds": round(el, 2),
            "job_elapsed_s": run["elapsed_s"],
            "rows_per_s": rate,
            "rows_per_s_wall": round(rows / el, 1),
            "gpus": used,
            "rows_per_s_per_gpu": round(rate / used, 1) if used else None,
            "config": {
                "actors": args.actors,
                "num_gpus": args.num_gpus,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "no_llm": True,
            },
            "cluster_gpus": n_gpus,
            **util,
        },
    )


def cmd_http(args: argparse.Namespace) -> None:
    import asyncio

    from ray import serve

    sys.path.insert(0, HERE)
    from _serve_common import texts
    from http_load import _load

    from fusion.llm.local import free_port
    from serve.app import build

    ray, n_gpus = ray_init(args)
    replicas = args.replicas
    if args.dev == "gpu":
        per = round(1.0 / replicas, 3) if n_gpus == 1 else 1.0
        actor = {"num_cpus": 1, "num_gpus": per}
        threads = 1
    else:
        actor = {"num_cpus": args.threads}
        threads = args.threads
    options = {
        "Fusion": {
            "ray_actor_options": actor,
            "autoscaling_config": {"min_replicas": replicas, "max_replicas": replicas, "target_ongoing_requests": 2},
        }
    }
    port = free_port()
    t = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build({"bundle": os.path.join(args.work, "bundle"), "threads": threads}, options),
        name="bench",
        route_prefix="/",
    )
    start_s = time.perf_counter() - t
    url = f"http://127.0.0.1:{port}/v1/classify"
    sample = texts("long", 2000)
    warmup = args.warmup
    try:
        for per_request in [int(x) for x in args.texts_per_request.split(",")]:
            s = Sampler()
            timer = threading.Timer(warmup, s.start)  # the load's measuring window starts after its warm-up
            timer.start()
            r = asyncio.run(_load(url, sample, per_request, args.concurrency, warmup, args.http_seconds))
            util = s.stop()
            if not r["requests"]:  # Fusion runs queued requests as one batch: it took longer than the window
                raise RuntimeError(
                    f"no request was answered within the {args.http_seconds:g} s window: raise --http-seconds"
                )
            record(
                args,
                {
                    "phase": "http",
                    "label": f"{per_request}/req",
                    "ok": True,
                    "texts_per_request": per_request,
                    "concurrency": args.concurrency,
                    "rows_per_s": round(r["texts_per_s"], 1),
                    "req_per_s": round(r["req_per_s"], 1),
                    "p50_ms": r["p50_ms"] and round(r["p50_ms"], 1),
                    "p99_ms": r["p99_ms"] and round(r["p99_ms"], 1),
                    "requests": r["requests"],
                    "errors": r["errors"],
                    "seconds": args.http_seconds,
                    "gpus": (1 if n_gpus else 0),
                    "rows_per_s_per_gpu": round(r["texts_per_s"], 1) if n_gpus else None,
                    "serve_start_s": round(start_s, 1),
                    "config": {
                        "embedder_replicas": replicas,
                        "embedder_actor": actor,
                        "threads": threads,
                        "embed_batch": 64,
                        "kind": "long",
                    },
                    **util,
                },
            )
            warmup = 3.0
    finally:
        serve.shutdown()
        ray.shutdown()


def cmd_report(args: argparse.Namespace) -> None:
    rows = results(args.work)
    by = {(r["phase"], r.get("label", ""), r["device"]): r for r in rows if r.get("ok")}
    info = next((r for r in rows if r["phase"] == "check" and r["device"] == "gpu"), None) or next(
        (r for r in rows if r["phase"] == "check"), {}
    )
    print()
    print(
        f"labelfuse GPU bench: {info.get('gpu_name', 'no GPU')}, {info.get('cpus')} CPUs, torch {info.get('torch')}, "
        f"ray {info.get('ray')}, MiniLM-L6 max_length {MAX_LENGTH}, bbc-news articles"
    )
    hdr = f"{'phase':9} {'config':16} {'dev':4} {'rows':>7} {'s':>6} {'rows/s':>8} {'/GPU':>8} {'GPU% avg/max':>12} {'GPU MiB':>8} {'CPU%':>5}  notes"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if r["phase"] in ("check", "prepare"):
            continue
        if not r.get("ok"):
            print(f"{r['phase']:9} {r.get('label', ''):16} {r['device']:4} FAILED: {r.get('error', '')[:150]}")
            continue
        rate = r.get("rows_per_s", r.get("texts_per_s"))
        util = f"{r['gpu_util_mean']:.0f}/{r['gpu_util_max']:.0f}" if "gpu_util_mean" in r else "-"
        per_gpu = r.get("rows_per_s_per_gpu")
        note = ""
        if r["phase"] == "http":
            note = f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, {r['concurrency']} clients"
        elif r["phase"] == "rate":
            note = "raw encoder, one process"
        elif r["phase"] in ("embed", "backfill"):
            c = r["config"]
            note = f"actors {c['actors'] or 'default'}, gpu/actor {c['num_gpus'] or ('1' if r['gpus'] else '0')}, batch {c['batch_size']}"
            if r["phase"] == "embed":
                note += f", fwd batch {c['encoder_batch']}"
        print(
            f"{r['phase']:9} {r.get('label', ''):16} {r['device']:4} {r.get('rows', r.get('texts', r.get('requests', 0))):>7} "
            f"{r.get('seconds', 0):>6} {rate:>8} {per_gpu if per_gpu else '-':>8} {util:>12} "
            f"{r.get('gpu_mem_max_mib', '-'):>8} {r.get('cpu_busy_pct') or '-':>5}  {note}"
        )
    ratios: dict[str, float] = {}
    for key in sorted({(p, lab) for p, lab, _ in by}):
        g, c = by.get((*key, "gpu")), by.get((*key, "cpu"))
        if g and c and c.get("rows_per_s"):
            ratios[f"{key[0]} {key[1]}".strip()] = round(g["rows_per_s"] / c["rows_per_s"], 2)
    g_best = max(
        (r for (p, _, d), r in by.items() if p == "embed" and d == "gpu"), key=lambda r: r["rows_per_s"], default=None
    )
    c_job = by.get(("embed", "job", "cpu"))
    if g_best and c_job:
        ratios[f"embed best GPU ({g_best['label']}) / CPU job"] = round(g_best["rows_per_s"] / c_job["rows_per_s"], 2)
    print()
    for k, v in ratios.items():
        print(f"GPU/CPU rows/s  {k:40s} {v}")
    summary = {"info": info, "results": rows, "ratios": ratios}
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    r = ratios.get("embed job")
    print(f"ratio: {r}" if r is not None else "ratio: n/a (no GPU and CPU embed job pair in this run)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=["check", "prepare", "rate", "embed", "backfill", "http", "report"])
    ap.add_argument("--work", required=True)
    ap.add_argument(
        "--dev", choices=["gpu", "cpu"], default="gpu" if os.environ.get("CUDA_VISIBLE_DEVICES") != "" else "cpu"
    )
    ap.add_argument("--label", default="job")
    ap.add_argument("--rows", type=int, help="fixed row count (default: --seconds at the measured rate)")
    ap.add_argument("--seconds", type=float, default=20.0, help="target length of each job")
    ap.add_argument("--scale", type=float, default=1.0, help="rows x this for non-default configs")
    ap.add_argument("--min-rows", type=int, default=500)
    ap.add_argument("--max-rows", type=int, default=40_000)
    ap.add_argument("--actors", type=int)
    ap.add_argument("--num-gpus", type=float)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--encoder-batch", type=int, help="encoder forward batch (embed; default: the job's 32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--replicas", type=int, default=2, help="Fusion replicas (http)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--texts-per-request", default="1,8")
    ap.add_argument("--http-seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=15.0)
    ap.add_argument("--rate-seconds", type=float, default=3.0)
    ap.add_argument("--train", type=int, default=300, help="bundle training texts (prepare)")
    ap.add_argument("--verbose", action="store_true", help="Ray worker logs to this terminal")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    t = time.perf_counter()
    try:
        globals()[f"cmd_{args.phase}"](args)
    except BaseException as err:
        if args.phase != "report":
            record(
                args,
                {
                    "phase": args.phase,
                    "label": args.label,
                    "ok": False,
                    "error": f"{type(err).__name__}: {err}"[:2000],
                    "seconds": round(time.perf_counter() - t, 1),
                },
            )
        raise


if __name__ == "__main__":
    main()
