"""Kafka tagging through the Serve graph vs the raw model on the same machine, side by side in one run.

A local tansu broker, the labelfuse application with its default sizing and ``--replicas``
tagger replicas. ``--messages`` JSON messages (bbc-news texts) are produced up front; the
clock starts ``--warmup`` seconds after Fusion runs all its replicas (2 when it autoscales), so the
group join and the scaling from 1 to 2 replicas are left out however long they take, and stops at
the last result: the steady state is measured. The raw side is
``AutoFusionClassifier.predict_proba`` in this process on all cores, measured before and after, each
once the machine is quiet. Printed ratio: tagged messages/s over raw texts/s (the target is 0.9 or
more).

    python bench/kafka_throughput.py [--bundle DIR | --backend auto|torch|onnx|onnx-int8] [--kind long|short] [--messages 3000] [--warmup 10] [--replicas 1]
                                   [--threads 1] [--fusion-replicas N]
"""

import argparse
import json
import os
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _serve_common import (
    add_bundle_args,
    add_sizing_args,
    bundle,
    describe_sizing,
    full_fusion,
    raw_rate,
    running_replicas,
    sizing,
    texts,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bundle_args(ap)
    add_sizing_args(ap)
    ap.add_argument("--kind", choices=["long", "short"], default="long")
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds not timed once Fusion runs all its replicas")
    ap.add_argument("--replicas", type=int, default=1, help="tagger replicas")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    import ray
    from kafka import KafkaConsumer, KafkaProducer
    from ray import serve

    from serve.app import build
    from serve.dev_kafka import DEV_CLIENT, DevBroker, create_topics

    model = bundle(args)
    sample = texts(args.kind, args.messages)
    raw = [raw_rate(model, sample[:256] if args.kind == "long" else sample)]
    with DevBroker() as broker:
        run = uuid.uuid4().hex[:6]
        topics = {"input_topics": [f"in-{run}"], "output_topic": f"out-{run}", "dead_letter_topic": f"dlq-{run}"}
        create_topics(broker.bootstrap, topics["input_topics"], 4)
        create_topics(broker.bootstrap, [topics["output_topic"], topics["dead_letter_topic"]], 1)
        ray.init(include_dashboard=False, log_to_driver=False)
        kafka = {
            "bootstrap_servers": broker.bootstrap,
            **topics,
            "replicas": args.replicas,
            "batch_size": args.batch_size,
        }
        settings, options = sizing(args)
        app = build({"bundle": model, **settings, "kafka": {**kafka, **DEV_CLIENT}}, options)
        serve.run(app, name="bench", route_prefix="/")
        p = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=20)
        for i, t in enumerate(sample):
            p.send(topics["input_topics"][0], key=str(i).encode(), value=json.dumps({"text": t}).encode())
        p.flush()
        c = KafkaConsumer(
            topics["output_topic"],
            bootstrap_servers=broker.bootstrap,
            auto_offset_reset="earliest",
            group_id=f"bench-{run}",
            **DEV_CLIENT,
        )
        seen: set[bytes] = set()
        measured: set[bytes] = set()  # results read after the warm-up
        full, timed_from, checked = full_fusion(args), None, 0.0
        first = last = None
        deadline = time.time() + 1800
        while len(seen) < len(sample) and time.time() < deadline:
            now = time.perf_counter()
            if timed_from is None and now - checked >= 1.0:
                checked = now
                if running_replicas("bench") >= full:
                    timed_from = now + args.warmup
            for records in c.poll(200).values():
                for r in records:
                    now = time.perf_counter()
                    seen.add(r.key)
                    if timed_from is not None and now >= timed_from:
                        first = first or now
                        last = now
                        measured.add(r.key)
        c.close()
        serve.shutdown()
        ray.shutdown()
    if len(measured) < 2:
        why = (
            f"Fusion never ran {full} replica(s)"
            if timed_from is None
            else f"the results ended within {args.warmup:.0f} s of Fusion running {full} replica(s)"
        )
        raise SystemExit(f"nothing was timed: {why} ({len(seen)}/{len(sample)} results); give more --messages")
    raw.append(raw_rate(model, sample[:256] if args.kind == "long" else sample))
    rate = (len(measured) - 1) / (last - first)
    raw_mean = statistics.mean(raw)
    print(
        f"\nKafka tagging vs raw model, {os.cpu_count()} CPUs, {args.kind} texts, {args.replicas} tagger replica(s), "
        f"batch {args.batch_size}, {describe_sizing(args)}"
    )
    print(
        f"tagged {len(seen)}/{len(sample)} messages, {len(measured)} timed from {args.warmup:.0f} s after Fusion ran "
        f"{full} replica(s): "
        f"{rate:.1f} msg/s; raw model {raw_mean:.1f} texts/s ({raw[0]:.1f} before, {raw[1]:.1f} after)"
    )
    print(f"ratio: {rate / raw_mean:.2f}")


if __name__ == "__main__":
    main()
