"""``labelfuse demo``: the main job end to end on the embedded defaults, in one process tree.

1. Train a fusion model on the built-in bbc-news set: the bundled MiniLM encoder plus a local
   LLM (answers cached in SQLite, so a re-run makes no LLM calls), with cost gating.
2. Start a local Kafka-protocol broker (tansu) and a new local Ray, and deploy the Serve
   application with a Kafka tagger on the demo's input topic.
3. Stream the test split through the input topic, keeping ``--window`` messages outstanding,
   and read the tagged results back from the output topic (live progress line).
4. Send the test split over HTTP with ``llm: off``: the encoder-only answer of the same model.
5. Print the final table, write the report, and stop Serve, Ray and the broker: only what this
   command started (``ray.init(address="local")`` never attaches to another cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fusion.args import add_output_arg

TOPICS = ("labelfuse-demo-in", "labelfuse-demo-out", "labelfuse-demo-dead-letter")
LEDGER = "labelfuse-demo-ledger"  # + a run id: the ledger's journal keeps a name's calls across runs
COLUMNS = ("path", "texts", "accuracy", "macro_f1", "ece", "llm_answers", "llm_calls", "llm_usd", "msg_per_s",
           "p50_s", "p99_s")  # fmt: skip


def register(sub: Any) -> None:
    d = sub.add_parser(
        "demo",
        help="the main job on local defaults: train with a local LLM, serve it, tag a Kafka stream, report",
        description="Trains a fusion model on bbc-news (bundled encoder + local LLM, cost-gated), starts a local "
        "Kafka-protocol broker, a new local Ray and the Serve application, streams the test split through the "
        "input topic, checks the same model over HTTP, prints accuracy, macro-F1, ECE, LLM use, messages/s and "
        "latency, writes a report, and stops everything it started.",
    )
    add_output_arg(d, "model bundle and report go here", required=False, default="runs/demo", metavar="DIR")
    d.add_argument("--llm", default="local:qwen2.5-coder-0.5b", metavar="SPEC", help="the LLM to fuse")
    d.add_argument(
        "--llm-fraction",
        type=float,
        default=0.02,
        help="share of training rows the LLM reads (train.llm_fraction); the rest train as LLM-missing",
    )
    d.add_argument("--gate-rate", type=float, default=0.06, help="share of streamed texts the gate sends to the LLM")
    d.add_argument("--max-length", type=int, default=128, help="encoder tokens per text (encoder.max_length)")
    d.add_argument("--limit", type=int, metavar="N", help="use a random N rows of each split (a quick look)")
    d.add_argument("--window", type=int, default=32, help="messages outstanding in the stream at once")
    d.add_argument("--port", type=int, default=0, help="HTTP port of the Serve app (default: a free one)")
    d.add_argument("--stall-s", type=float, default=300.0, help="give up when no result arrives for this long")
    d.set_defaults(run=cmd_demo)


class Progress:
    """One status line: rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, every_s: float | None = None):
        self.tty = sys.stderr.isatty()
        self.every_s = every_s or (0.5 if self.tty else 5.0)
        self.last = 0.0

    def show(self, line: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        print(("\r" + line.ljust(100)) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _phase(name: str) -> float:
    print(f"==> {name}", file=sys.stderr, flush=True)
    return time.perf_counter()


def _quantiles(lat: list[float]) -> tuple[float | None, float | None]:
    if not lat:
        return None, None
    p50, p99 = np.percentile(lat, [50, 99])
    return float(p50), float(p99)


def _post(url: str, body: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def train(args: argparse.Namespace, data: dict[str, Any], model_dir: Path) -> Any:
    from fusion.args import parse_llm_spec
    from fusion.classifier import AutoFusionClassifier
    from fusion.config import parse_config

    cfg = parse_config(
        {
            "encoder": {"max_length": args.max_length},
            "llms": [parse_llm_spec(args.llm)],
            "gating": {"enabled": True, "target_call_rate": args.gate_rate},
            "train": {"llm_fraction": args.llm_fraction},
        },
        "labelfuse demo",
    )
    clf = AutoFusionClassifier(cfg).fit(data["train"], validation=data["val"], progress=not args.quiet)
    clf.save(model_dir)
    calls = {part: sum(u["llm_calls"] for u in usage.values()) for part, usage in clf.llm_usage.items()}
    print(
        f"trained on {len(data['train'])} rows (LLM read {calls}), validation accuracy "
        f"{clf.metrics['validation']['accuracy']:.4f}; bundle {model_dir}",
        file=sys.stderr,
    )
    return clf


def stream(bootstrap: str, texts: list[str], window: int, stall_s: float) -> tuple[dict[int, Any], list[float], float]:
    """Produce ``texts`` (JSON, id = row) keeping ``window`` outstanding; results by id, latencies, seconds."""
    from kafka import KafkaConsumer, KafkaProducer

    from serve.dev_kafka import DEV_CLIENT

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    consumer = KafkaConsumer(
        TOPICS[1], TOPICS[2], bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", **DEV_CLIENT
    )
    results: dict[int, Any] = {}
    sent_at: dict[int, float] = {}
    latency: list[float] = []
    progress = Progress()
    n, sent, llm = len(texts), 0, 0
    start = last_result = time.monotonic()
    try:
        while len(results) < n:
            while sent < n and sent - len(results) < window:
                producer.send(
                    TOPICS[0], key=str(sent).encode(), value=json.dumps({"id": sent, "text": texts[sent]}).encode()
                )
                sent_at[sent] = time.monotonic()
                sent += 1
            producer.flush()
            for records in consumer.poll(timeout_ms=200).values():
                for r in records:
                    if r.topic == TOPICS[2]:  # a demo text never should be: stop with the broker's reason
                        reason = dict(r.headers).get("labelfuse.error", b"?").decode()
                        raise RuntimeError(f"message {r.key!r} was dead-lettered: {reason}")
                    out = json.loads(r.value)
                    if out["id"] in results:  # at-least-once: a redelivery after a rebalance
                        continue
                    results[out["id"]] = out
                    latency.append(time.monotonic() - sent_at[out["id"]])
                    llm += bool(out["llm_used"])
                    last_result = time.monotonic()
            elapsed = time.monotonic() - start
            p50, p99 = _quantiles(latency)
            progress.show(
                f"stream {len(results)}/{n} tagged  {len(results) / elapsed:.1f} msg/s  LLM {llm}  "
                f"p50 {p50 or 0:.2f} s  p99 {p99 or 0:.2f} s"
            )
            if time.monotonic() - last_result > stall_s:
                raise RuntimeError(f"no result for {stall_s:.0f} s ({len(results)}/{n} tagged): see the Ray logs")
        progress.show(f"stream {n}/{n} tagged in {time.monotonic() - start:.1f} s", force=True)
        progress.done()
        return results, latency, time.monotonic() - start
    finally:
        producer.close()
        consumer.close()


def http_pass(url: str, texts: list[str], batch: int = 16) -> tuple[list[dict[str, Any]], list[float], float]:
    """POST the texts in requests of ``batch`` with ``llm: off``; results, per-request latency, seconds."""
    results, latency = [], []
    start = time.monotonic()
    for i in range(0, len(texts), batch):
        t = time.monotonic()
        results += _post(f"{url}/v1/classify", {"texts": texts[i : i + batch], "llm": "off"})["results"]
        latency.append(time.monotonic() - t)
    return results, latency, time.monotonic() - start


def score_rows(results: list[dict[str, Any]], labels: list[str], space: Any) -> dict[str, Any]:
    from fusion.metrics import evaluate

    classes = space.classes
    proba = np.array([[r["probabilities"][c] for c in classes] for r in results], dtype=np.float64)
    y = np.array([classes.index(label) for label in labels])
    pred = np.array([classes.index(r["label"]) for r in results])
    return {"metrics": evaluate(y, pred, proba, space), "proba": proba, "y": y, "space": space}


def cmd_demo(args: argparse.Namespace) -> int:
    from fusion.datasets import builtin_split
    from fusion.errors import ConfigError

    if not 0 < args.gate_rate <= 1 or args.window < 1:
        raise ConfigError("--gate-rate must be in (0, 1] and --window at least 1")
    out = Path(args.output)
    model_dir, report_dir = out / "model", out / "report"
    timings: dict[str, float] = {}
    total = time.perf_counter()
    data = {s: builtin_split("bbc-news", s) for s in ("train", "val", "test")}
    if args.limit:
        data = {s: df.sample(n=min(args.limit, len(df)), random_state=0) for s, df in data.items()}

    t = _phase(f"1/4 training on bbc-news with {args.llm} (LLM reads {args.llm_fraction:.0%} of training rows)")
    clf = train(args, data, model_dir)
    timings["train_s"] = time.perf_counter() - t

    t = _phase("2/4 starting a local Kafka-protocol broker, a local Ray and the Serve application")
    import ray

    from data_jobs.common import NAMESPACE
    from fusion.llm.local import free_port
    from serve.app import serving
    from serve.dev_kafka import DevBroker, create_topics, dev_kafka_args

    broker = DevBroker()
    app = contextlib.ExitStack()
    try:
        broker.start()
        create_topics(broker.bootstrap, TOPICS, partitions=2)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        ray.init(
            address="local", namespace=NAMESPACE, include_dashboard=False, log_to_driver=False, logging_level="WARNING"
        )
        # small batches keep several in flight: one waits on the LLM while others embed
        kafka = dev_kafka_args(broker.bootstrap, TOPICS, f"labelfuse-demo-{uuid.uuid4().hex[:8]}", batch_size=16)
        ledger_name = f"{LEDGER}-{uuid.uuid4().hex[:8]}"
        settings = {"bundle": str(model_dir.resolve()), "ledger_name": ledger_name, "kafka": kafka}
        where = {"host": "127.0.0.1", "port": args.port or free_port(), "name": "labelfuse-demo"}
        url = app.enter_context(serving(settings, address=None, **where))
        deadline = time.monotonic() + 60
        while not _get(f"{url}/v1/kafka").get("assignment"):  # the tagger joined its group
            if time.monotonic() > deadline:
                raise RuntimeError("the Kafka tagger did not join its consumer group in 60 s")
            time.sleep(0.5)
        timings["start_s"] = time.perf_counter() - t
        print(f"serving at {url} (docs {url}/docs); tagging {TOPICS[0]} -> {TOPICS[1]} on {broker.bootstrap}",
              file=sys.stderr)  # fmt: skip

        texts, labels = data["test"]["text"].tolist(), data["test"]["label"].tolist()
        t = _phase(f"3/4 streaming the {len(texts)} test texts through Kafka (gated fusion, {args.window} in flight)")
        by_id, k_lat, k_secs = stream(broker.bootstrap, texts, args.window, args.stall_s)
        timings["stream_s"] = time.perf_counter() - t
        ledger = ray.get(ray.get_actor(ledger_name, namespace=NAMESPACE).snapshot.remote())

        # where the gate kept the LLM out, the stream's answer is already the encoder-only one (same features);
        # the texts the LLM did answer go over HTTP with llm off, which completes the encoder-only baseline
        asked = [i for i in range(len(texts)) if by_id[i]["llm_used"]]
        t = _phase(f"4/4 the {len(asked)} texts the LLM answered, over HTTP with llm off (encoder-only baseline)")
        h_results, h_lat, h_secs = http_pass(url, [texts[i] for i in asked])
        timings["http_s"] = time.perf_counter() - t
    finally:
        t = time.perf_counter()
        app.close()  # the application and Serve
        ray.shutdown()
        broker.stop()
        timings["shutdown_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - total

    k_results = [by_id[i] for i in range(len(texts))]
    baseline = list(k_results)
    for i, res in zip(asked, h_results, strict=True):
        baseline[i] = res
    kafka_eval = score_rows(k_results, labels, clf.head.label_space)
    rows = []
    for name, ev, res, lat, rate in (
        ("kafka: gated fusion", kafka_eval, k_results, k_lat, len(texts) / k_secs),
        (
            "encoder only",
            score_rows(baseline, labels, clf.head.label_space),
            baseline,
            h_lat,
            len(asked) / max(h_secs, 1e-9),
        ),
    ):
        m = ev["metrics"]
        p50, p99 = _quantiles(lat)
        rows.append(
            {
                "path": name,
                "texts": len(res),
                "accuracy": m["accuracy"],
                "macro_f1": m["macro_f1"],
                "ece": m["ece"],
                "llm_answers": sum(bool(r["llm_used"]) for r in res),
                "llm_usd": sum(r["llm_cost_usd"] for r in res),
                "msg_per_s": rate if lat else None,
                "p50_s": p50,
                "p99_s": p99,
            }
        )
    rows[0]["llm_calls"] = int(ledger["calls"])  # answers not taken from the cache
    paths = write(report_dir, args, clf, kafka_eval, rows, timings, k_results)

    from fusion.report import format_table

    print(format_table(rows, COLUMNS))
    print(
        "llm_answers: texts the gate sent to the LLM and it answered; llm_calls: of those, not from the cache.\n"
        "kafka latency: per message, produce to result. encoder only: the stream's answers where the gate kept the "
        "LLM out (the same features), plus the LLM-answered texts sent over HTTP with llm off (16 per request; "
        "msg/s and latency are those requests')."
    )
    print("time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()))
    print(f"report: {paths['markdown']} (plots: {paths['reliability']}"
          + (f", {paths['confusion']}" if "confusion" in paths else "") + f"); model bundle: {model_dir}")  # fmt: skip
    return 0


def write(
    report_dir: Path,
    args: argparse.Namespace,
    clf: Any,
    ev: dict[str, Any],
    rows: list[dict[str, Any]],
    timings: dict[str, float],
    results: list[dict[str, Any]],
) -> dict[str, Path]:
    from fusion.report import write_report

    info = {
        "data": f"bbc-news test split, {len(results)} texts streamed through Kafka",
        "model_version": clf.version,
        "llm": args.llm,
        "llm_fraction": args.llm_fraction,
        "gate_rate": args.gate_rate,
        "encoder_max_length": args.max_length,
        **{k: round(v, 1) for k, v in timings.items()},
    }
    timing_rows = [{"phase": k[:-2], "seconds": v} for k, v in timings.items()]
    paths = write_report(
        report_dir,
        ev["metrics"],
        ev["space"],
        ev["y"],
        ev["proba"],
        None,
        info,
        {"Demo paths": (rows, COLUMNS), "Timings": (timing_rows, ("phase", "seconds"))},
    )
    paths["results"] = report_dir / "results.jsonl"
    paths["results"].write_text("".join(json.dumps(r) + "\n" for r in results))
    return paths
