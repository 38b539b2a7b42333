"""The Kafka tagger loop's failure isolation, on the real broker, with the real model as the graph.

A text the graph fails on alone cannot be made with real inputs any more (the text rule refuses them at
decoding, see test_serve_kafka.py); nor can a graph that is down be made to stay down on cue. So the graph
here is a function over the real model that fails as told: for texts holding a marker (a bad item), or for
every call (a deployment down). Everything else (broker, consumer group, commits) is real.
"""

import json
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from fusion.texts import PROBE_TEXT
from serve.dev_kafka import DEV_CLIENT, create_topics, dev_kafka_args
from serve.kafka import GraphUnavailable, TaggerLoop
from serve.settings import KafkaSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Graph:
    """Fusion.classify over the real model; ``fail`` says when to raise instead."""

    def __init__(self, model, fail):
        self.model, self.fail, self.calls = model, fail, []

    def __call__(self, texts):
        self.calls.append(texts)
        self.fail(texts)
        labels = self.model.predict(texts)
        return {"model_version": "v", "results": [{"label": lab, "llm_used": False} for lab in labels]}


def poisoned(texts):
    if any("POISON" in t for t in texts):
        raise ValueError("the head cannot take this text")


def down(texts):
    raise GraphUnavailable("ActorDiedError: Fusion is gone")


@pytest.fixture
def topics(kafka_broker):
    run = uuid.uuid4().hex[:6]
    names = [f"loop-{run}-{t}" for t in ("in", "out", "dead")]
    create_topics(kafka_broker.bootstrap, names, 1)
    settings = KafkaSettings.model_validate(
        dev_kafka_args(kafka_broker.bootstrap, names, f"loop-{run}", max_retries=0, batch_size=8)
    )
    return kafka_broker.bootstrap, names, settings


def send(bootstrap, topic, texts):
    p = KafkaProducer(bootstrap_servers=bootstrap)
    for i, t in enumerate(texts):
        p.send(topic, key=str(i).encode(), value=json.dumps({"text": t}).encode())
    p.flush()
    p.close()


def run_until(loop, done, timeout_s=60):
    loop.start()
    deadline = time.monotonic() + timeout_s
    try:
        while not done(loop.stats()) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        loop.stop()
    return loop.stats()


def read(bootstrap, topic):
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", **DEV_CLIENT)
    out = {}
    for _ in range(10):
        for recs in c.poll(300).values():
            for r in recs:
                out[r.key.decode()] = r
    c.close()
    return out


def committed(bootstrap, group, topic):
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, **DEV_CLIENT)
    try:
        return c.committed(TopicPartition(topic, 0)) or 0
    finally:
        c.close()


def test_a_message_that_fails_alone_is_dead_lettered_and_the_rest_are_tagged(topics, bbc_model):
    bootstrap, (inp, out, dead), s = topics
    texts = ["Shares in BP fell", "POISON the striker scored", "Parliament passed the bill", "A new chip"]
    send(bootstrap, inp, texts)
    graph = Graph(bbc_model, poisoned)
    stats = run_until(TaggerLoop(s, graph), lambda st: st["tagged"] + st["dead_lettered"] >= 4)
    assert stats["alive"] is False and stats["error"] is None  # stopped by us, not by the failure
    assert (stats["tagged"], stats["dead_lettered"], stats["failed_alone"], stats["graph_failures"]) == (3, 1, 1, 0)
    why = dict(read(bootstrap, dead)["1"].headers)["labelfuse.error"].decode()
    assert why == "text failed alone in the model (ValueError: the head cannot take this text)"
    assert sorted(read(bootstrap, out)) == ["0", "2", "3"]
    assert committed(bootstrap, s.group_id, inp) == 4


def test_a_graph_that_is_down_stops_the_loop_uncommitted_and_a_new_loop_loses_nothing(topics, bbc_model):
    bootstrap, (inp, out, _), s = topics
    send(bootstrap, inp, ["Shares in BP fell", "The striker scored"])
    stats = run_until(TaggerLoop(s, Graph(bbc_model, down)), lambda st: not st["alive"] and st["consumed"])
    assert stats["graph_failures"] == 1 and "GraphUnavailable" in stats["error"] and stats["dead_lettered"] == 0
    assert committed(bootstrap, s.group_id, inp) == 0
    stats = run_until(TaggerLoop(s, Graph(bbc_model, lambda t: None)), lambda st: st["tagged"] >= 2)
    assert stats["tagged"] == 2 and sorted(read(bootstrap, out)) == ["0", "1"]


def test_when_every_message_fails_a_known_good_probe_decides_who_is_at_fault(topics, bbc_model):
    bootstrap, (inp, _, dead), s = topics
    send(bootstrap, inp, ["POISON one", "POISON two"])
    graph = Graph(bbc_model, poisoned)  # the probe text passes: the messages are bad, not the graph
    stats = run_until(TaggerLoop(s, graph), lambda st: st["dead_lettered"] >= 2)
    assert stats["failed_alone"] == 2 and stats["graph_failures"] == 0 and [PROBE_TEXT] in graph.calls
    assert sorted(read(bootstrap, dead)) == ["0", "1"]

    send(bootstrap, inp, ["one more", "and another"])  # now the graph fails everything, the probe included

    def broken(texts):
        raise ValueError("the model is corrupt")

    stats = run_until(TaggerLoop(s, Graph(bbc_model, broken)), lambda st: not st["alive"] and st["consumed"])
    assert stats["graph_failures"] == 1 and stats["dead_lettered"] == 0 and "corrupt" in stats["error"]
    assert committed(bootstrap, s.group_id, inp) == 2  # the new messages stay for the next consumer
