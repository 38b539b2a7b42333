"""The reliability suite (`pytest -m reliability`; CI runs it with the rest): sustained HTTP load, Kafka
taggers killed mid-stream while the LLM fails 30% of its calls, and labels training does not know. Each test prints
its figures. The killed-and-resumed backfill is tests/test_data_jobs.py::test_a_killed_backfill_resumes_..., bad
HTTP bodies tests/test_serve_kafka.py::test_bad_http_bodies_get_a_4xx_... (on that module's app).

The one fake is the LLM in the Kafka test: a scripted OpenAI-compatible stub standing in for a flaky paid
API (fail_rate=0.3), which no real endpoint here can be made to be."""

import json
import threading
import time
import uuid
from collections import Counter

import pytest
import ray
import requests
from conftest import TEST_MAX_LENGTH, report, sample
from kafka import KafkaConsumer, KafkaProducer
from ray import serve
from stub_llm import StubServer

from fusion import cli
from fusion.classifier import AutoFusionClassifier
from serve.app import build
from serve.dev_kafka import DEV_CLIENT, create_topics, dev_kafka_args

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]


def delete_app(name: str, timeout_s: float = 180.0) -> None:
    """``serve.delete`` with more patience than its own 60 s. A tagger replica finishes its in-flight batches
    before it stops (graceful_shutdown_timeout_s=60), and while the app's Fusion is torn down beside it those
    batches can take that long; their offsets stay uncommitted, so nothing is lost either way."""
    try:
        serve.delete(name)
    except TimeoutError:
        deadline = time.monotonic() + timeout_s
        while name in serve.status().applications and time.monotonic() < deadline:
            time.sleep(1)
        assert name not in serve.status().applications, f"{name} still not deleted after {timeout_s + 60:.0f} s"


@pytest.mark.serial  # its ok-requests floor holds on cores of its own, not beside another pytest worker
def test_http_sustained_load_for_15s_gives_no_5xx_but_intended_503s(serve_url, encoder, bbc, tmp_path, capsys):
    # a model of 100 texts: the load is what is tested, and the serial lane's process has no bbc_model to share
    cfg = {"encoder": {"max_length": TEST_MAX_LENGTH}}
    AutoFusionClassifier(cfg, encoder=encoder).fit(sample(bbc["train"], 100, seed=4)).save(tmp_path / "model")
    serve.run(build({"bundle": str(tmp_path / "model")}), name="labelfuse-load", route_prefix="/")
    texts = sample(bbc["test"], 64, seed=9)["text"].str.slice(0, 1500).tolist()
    codes: Counter = Counter()
    wrong: list[str] = []
    stop = time.monotonic() + 15

    def client(i: int) -> None:
        s = requests.Session()
        k = 0
        while time.monotonic() < stop:
            batch = [texts[(i * 7 + k + j) % len(texts)] for j in range(1 + k % 4)]
            k += 1
            try:
                r = s.post(f"{serve_url}/v1/classify", json={"texts": batch}, timeout=60)
            except requests.RequestException as err:
                codes[type(err).__name__] += 1
                continue
            codes[r.status_code] += 1
            if r.status_code == 200 and len(r.json()["results"]) != len(batch):
                wrong.append(r.text[:200])

    start = time.monotonic()
    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        serve.delete("labelfuse-load")
    seconds = time.monotonic() - start
    report(capsys, f"HTTP 16 clients x {seconds:.0f} s: {dict(codes)}; {codes[200] / seconds:.1f} ok requests/s")
    assert set(codes) <= {200, 503}, codes  # no 5xx but the intended 503, no connection errors
    assert codes[200] >= 100 and not wrong


def test_kafka_taggers_killed_twice_with_a_flaky_llm_lose_nothing(
    serve_url, kafka_broker, encoder, bbc, tmp_path, capsys
):
    n = 96
    run = uuid.uuid4().hex[:6]
    topics = [f"rel-{run}-{t}" for t in ("in", "out", "dead")]
    create_topics(kafka_broker.bootstrap, [topics[0]], 4)
    create_topics(kafka_broker.bootstrap, topics[1:], 1)
    classes = sorted(bbc["train"]["label"].unique())
    with StubServer(classes, answer=lambda text: 0, latency_s=0.02, fail_rate=0.3, seed=1) as stub:
        llm = {"name": "flaky", "provider": "custom", "model": "m", "base_url": stub.base_url}
        limits = {"cache": False, "max_retries": 2, "retry_base_s": 0.05, "retry_max_s": 0.2}
        cfg = {"encoder": {"max_length": TEST_MAX_LENGTH}, "llms": [llm], "llm_limits": limits}
        clf = AutoFusionClassifier(cfg, encoder=encoder)
        clf.fit(sample(bbc["train"], 100, seed=4), validation=sample(bbc["val"], 40, seed=4))
        clf.save(tmp_path / "model")
        kafka = dev_kafka_args(
            kafka_broker.bootstrap, topics, f"rel-{run}", replicas=2, batch_size=16, max_in_flight=2, llm="all"
        )
        settings = {"bundle": str(tmp_path / "model"), "kafka": kafka, "ledger_name": f"rel-{run}"}
        serve.run(build(settings), name="labelfuse-rel", route_prefix="/")
        handle = serve.get_deployment_handle("KafkaTagger", app_name="labelfuse-rel")
        try:
            texts = sample(bbc["test"], n, seed=6)["text"].str.slice(0, 800).tolist()
            p = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
            for i, t in enumerate(texts):
                p.send(topics[0], key=f"{run}-{i}".encode(), value=json.dumps({"id": i, "text": t}).encode())
            p.flush()
            p.close()
            c = KafkaConsumer(topics[1], topics[2], bootstrap_servers=kafka_broker.bootstrap, group_id=None,
                              auto_offset_reset="earliest", **DEV_CLIENT)  # fmt: skip
            results, dead, kills = [], [], 0
            start = time.monotonic()
            deadline = start + 300
            while len({r["id"] for r in results}) < n and time.monotonic() < deadline:
                for tp, recs in c.poll(500).items():
                    for r in recs:
                        (results if tp.topic == topics[1] else dead).append(
                            json.loads(r.value) if tp.topic == topics[1] else r
                        )
                if kills < 2 and len(results) >= (kills + 1) * n // 3:
                    actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                              if "labelfuse-rel#KafkaTagger" in a["name"]]  # fmt: skip
                    ray.kill(ray.get_actor(actors[0], namespace="serve"), no_restart=True)  # like kill -9
                    kills += 1
            c.close()
            seconds = time.monotonic() - start
            for _ in range(20):  # a call may be routed to the replica just killed, before Serve notices
                try:
                    stats = handle.stats.remote().result(timeout_s=30)
                    break
                except ray.exceptions.RayError:
                    time.sleep(1)
        finally:
            delete_app("labelfuse-rel")
    ids = [r["id"] for r in results]
    fallback = sum(1 for r in results if r["llm_error"])
    report(
        capsys,
        f"Kafka {n} messages, {kills} tagger kills, LLM failing {stub.failed}/{stub.requests} calls: "
        f"{len(set(ids))}/{n} ids arrived in {seconds:.0f} s, {len(ids) - len(set(ids))} repeats, "
        f"{len(dead)} dead letters, {fallback} answered by the encoder after the LLM's retries ran out",
    )
    assert kills == 2 and set(ids) == set(range(n)) and not dead
    assert stub.failed > 0.2 * stub.requests  # the LLM really was flaky
    assert all(r["llm_used"] or r["llm_error"] for r in results)  # every message asked it; failures said so
    assert stats["alive"]


def test_training_refuses_labels_outside_the_declared_classes_by_name(tmp_path, capsys):
    """Exit status 2, the unknown label named, no bundle. The other bad input: HTTP bodies in
    tests/test_serve_kafka.py::test_bad_http_bodies_get_a_4xx_... (marked reliability too), Kafka messages in
    ...::test_every_message_is_tagged_once_or_dead_lettered_..."""
    data = tmp_path / "train.csv"
    data.write_text("text,label\nthe match,sport\nthe vote,politics\nthe chip,tech\nthe goal,sport\n")
    out = tmp_path / "refused"
    rc = cli.main(
        ["-q", "train", "--train", str(data), "--set", "labels.classes=[sport,politics]", "--output", str(out)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "unknown label(s)" in err and "tech" in err and not out.exists()
