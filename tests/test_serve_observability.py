"""Prometheus metrics (scraped from Ray's metrics agent) and structured JSON logs with request ids, from the
real Serve graph over real HTTP and real Kafka.

The one fake is the LLM: a scripted OpenAI-compatible stub standing in for a paid remote API, so that calls
cost money and the budget gauge moves (a local model is free)."""

import json
import time
import uuid
from pathlib import Path

import pytest
import ray
import requests
from conftest import TEST_MAX_LENGTH, sample
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from stub_llm import StubServer

from data_jobs.common import NAMESPACE
from fusion.classifier import AutoFusionClassifier
from serve.app import LOGGING, build
from serve.dev_kafka import DEV_CLIENT, create_topics, dev_kafka_args

pytestmark = [pytest.mark.integration, pytest.mark.slow]
APP = "labelfuse-obs"
BUDGET = 5.0


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels without Ray's own): value}, summed over replicas."""
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(requests.get(url, timeout=30).text):
        for s in family.samples:
            if not s.name.startswith("ray_labelfuse_"):
                continue
            keep = {"route", "status", "llm", "event", "path", "llm_used", "le"}
            key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in keep)))
            out[key] = out.get(key, 0.0) + s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


def test_metrics_and_request_id_logs_from_http_and_kafka(serve_url, metrics_url, kafka_broker, encoder, bbc, tmp_path):
    train = sample(bbc["train"], 120, seed=3)
    classes = sorted(bbc["train"]["label"].unique())
    topics = [f"obs-{uuid.uuid4().hex[:6]}-{t}" for t in ("in", "out", "dead")]
    create_topics(kafka_broker.bootstrap, topics, partitions=1)
    with StubServer(classes, answer=lambda text: 0) as stub:
        llm = {"name": "paid", "provider": "custom", "model": "m", "base_url": stub.base_url, "price_input": 10.0}
        cfg = {
            "encoder": {"max_length": TEST_MAX_LENGTH},
            "llms": [llm],
            "llm_limits": {"cache": False, "budget_usd": BUDGET},
        }
        clf = AutoFusionClassifier(cfg, encoder=encoder).fit(train, validation=sample(bbc["val"], 40))
        clf.save(tmp_path / "model")
        kafka = dev_kafka_args(kafka_broker.bootstrap, topics, f"obs-{uuid.uuid4().hex[:6]}")
        settings = {"bundle": str(tmp_path / "model"), "kafka": kafka, "ledger_name": f"obs-{uuid.uuid4().hex[:6]}"}
        serve.run(build(settings), name=APP, route_prefix="/", logging_config=LOGGING)
        try:
            rid = f"obs-{uuid.uuid4().hex}"
            r = requests.post(
                f"{serve_url}/v1/classify",
                json={"texts": ["Shares fell", "The match ended 2-1"], "llm": "all"},
                headers={"X-Request-ID": rid},
                timeout=60,
            )
            assert r.status_code == 200 and r.headers["x-request-id"] == rid
            assert all(res["llm_used"] for res in r.json()["results"]), r.text
            assert requests.post(f"{serve_url}/v1/classify", json={"texts": []}, timeout=30).status_code == 422

            # the ledger actor dies: Ray restarts it from its journal and the app spends on from where it was
            ledger = ray.get_actor(settings["ledger_name"], namespace=NAMESPACE)
            before = ray.get(ledger.snapshot.remote())
            ray.kill(ledger, no_restart=False)
            r = requests.post(f"{serve_url}/v1/classify", json={"texts": ["Profits rose"], "llm": "all"}, timeout=60)
            assert r.status_code == 200 and r.json()["results"][0]["llm_used"], r.text
            after = ray.get(ledger.snapshot.remote())
            assert after["calls"] == before["calls"] + 1 and after["spent_usd"] > before["spent_usd"] > 0

            producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
            for i in range(5):
                producer.send(topics[0], json.dumps({"id": i, "text": f"Budget vote number {i}"}).encode())
            producer.send(topics[0], b"\xff not json")  # dead-lettered
            producer.flush()
            producer.close()
            consumer = KafkaConsumer(topics[1], bootstrap_servers=kafka_broker.bootstrap, group_id=None,
                                     auto_offset_reset="earliest", **DEV_CLIENT)  # fmt: skip
            got = 0
            deadline = time.monotonic() + 90
            while got < 5 and time.monotonic() < deadline:
                got += sum(len(b) for b in consumer.poll(1000).values())
            consumer.close()
            assert got == 5

            # Ray's agent exports what the replicas recorded (they report every few seconds)
            want = {
                ("ray_labelfuse_http_requests_total", (("route", "/v1/classify"), ("status", "200"))): 1,
                ("ray_labelfuse_http_requests_total", (("route", "/v1/classify"), ("status", "422"))): 1,
                ("ray_labelfuse_texts_total", (("llm_used", "true"), ("path", "http"))): 3,
                ("ray_labelfuse_texts_total", (("path", "kafka"),)): 5,
                ("ray_labelfuse_llm_calls_total", (("llm", "paid"),)): 3,
                ("ray_labelfuse_kafka_messages_total", (("event", "consumed"),)): 6,
                ("ray_labelfuse_kafka_messages_total", (("event", "tagged"),)): 5,
                ("ray_labelfuse_kafka_messages_total", (("event", "dead_lettered"),)): 1,
                ("ray_labelfuse_predictions_total", (("path", "http"),)): 3,
                ("ray_labelfuse_predictions_total", (("path", "kafka"),)): 5,
                ("ray_labelfuse_confidence_count", (("path", "kafka"),)): 5,
            }
            deadline = time.monotonic() + 90
            while True:
                m = scrape(metrics_url)
                short = {
                    k: (value(m, k[0], **dict(k[1])), n) for k, n in want.items() if value(m, k[0], **dict(k[1])) < n
                }
                if not value(m, "ray_labelfuse_llm_budget_left_usd"):  # gauges arrive in their own report
                    short["budget gauge"] = (0, 1)
                # the tagger commits after it produced, so the gauge may still hold the batch a report ago
                if ("ray_labelfuse_kafka_commit_lag", ()) not in m or value(m, "ray_labelfuse_kafka_commit_lag"):
                    short["commit lag"] = (value(m, "ray_labelfuse_kafka_commit_lag"), 0)
                if not short or time.monotonic() > deadline:
                    break
                time.sleep(2)
            assert not short, short
            spent = value(m, "ray_labelfuse_llm_spent_usd_total", llm="paid")
            assert spent > 0
            # the gauge is the ledger as the last batch to finish saw it: concurrent batches may settle later
            assert BUDGET - spent - 1e-9 <= value(m, "ray_labelfuse_llm_budget_left_usd") < BUDGET
            assert value(m, "ray_labelfuse_http_request_seconds_count", route="/v1/classify") >= 2

            # GET /v1/stats: the 8 texts classified (3 over HTTP, 5 from Kafka), beside the training labels
            stats = requests.get(f"{serve_url}/v1/stats", timeout=30).json()
            assert stats["model_version"] == clf.version and stats["window"] == 8, stats
            assert set(stats["label_mix"]) == set(classes) and sum(stats["label_mix"].values()) == pytest.approx(1)
            assert stats["training_label_mix"] == pytest.approx(
                train["label"].value_counts(normalize=True).reindex(classes).to_dict(), abs=1e-3
            )
            assert stats["drift_psi"] is None and stats["llm_call_rate"] > 0  # under 100 predictions: no drift yet
            assert stats["budget"]["budget_usd"] == BUDGET and 0 < stats["budget"]["spent_usd"] < BUDGET

            # one JSON log line per classification, carrying the caller's request id
            logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
            lines = [
                json.loads(line)
                for f in logs.glob("replica_*Fusion*.log")
                for line in f.read_text().splitlines()
                if rid in line
            ]
            record = next(x for x in lines if x.get("texts") == 2)
            assert record["request_id"] == rid and record["llm_used"] == 2 and record["llm_cost_usd"] > 0
            assert record["model_version"] == clf.version
        finally:
            serve.delete(APP)
