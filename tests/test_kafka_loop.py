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
from serve.kafka import GraphUnavailable, RegistryDecoder, RegistryUnavailable, TaggerLoop
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


def read(bootstrap, topic, n):
    """The topic's records by key: polled until ``n`` keys are in, then once more for any that should not be."""
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", **DEV_CLIENT)
    out = {}
    deadline = time.monotonic() + 30
    while len(out) < n and time.monotonic() < deadline:
        for recs in c.poll(300).values():
            out.update((r.key.decode(), r) for r in recs)
    for recs in c.poll(300).values():
        out.update((r.key.decode(), r) for r in recs)
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
    why = dict(read(bootstrap, dead, 1)["1"].headers)["labelfuse.error"].decode()
    assert why == "text failed alone in the model (ValueError: the head cannot take this text)"
    assert sorted(read(bootstrap, out, 3)) == ["0", "2", "3"]
    assert committed(bootstrap, s.group_id, inp) == 4


def test_a_message_the_dead_letter_topic_cannot_take_whole_goes_without_its_value(topics, bbc_model):
    """Kafka clients refuse a message with neither key nor value, and one over the producer's max_request_size:
    such a dead letter goes without its key and value, or it could never be sent and its partition would stop
    for good (the loop re-reads a batch whose acks failed)."""
    bootstrap, (inp, _, dead), s = topics
    s = s.model_copy(update={"producer": s.producer.model_copy(update={"options": {"max_request_size": 30_000}})})
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap})  # librdkafka sends what kafka-python refuses to
    p.produce(inp, value=None)  # neither key nor value
    p.produce(inp, key=b"big", value=json.dumps({"text": "word " * 10_000}).encode())  # over max_chars, and 50 KB
    p.produce(inp, key=b"gone", value=None)  # a tombstone: the dead letter keeps its key
    p.produce(inp, key=b"ok", value=json.dumps({"text": "Shares in BP fell"}).encode())
    assert p.flush(30) == 0
    stats = run_until(TaggerLoop(s, Graph(bbc_model, lambda t: None)), lambda st: st["tagged"] >= 1)
    assert stats["error"] is None and (stats["tagged"], stats["dead_lettered"]) == (1, 3)
    assert committed(bootstrap, s.group_id, inp) == 4
    c = KafkaConsumer(dead, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", **DEV_CLIENT)
    letters = [r for recs in c.poll(5000, max_records=10).values() for r in recs]
    c.close()
    got = {int(dict(r.headers)["labelfuse.source"].split(b":")[-1]): (r.key, r.value, dict(r.headers)) for r in letters}
    assert sorted(got) == [0, 1, 2]
    assert got[0][:2] == (None, b"") and got[0][2]["labelfuse.dropped"] == b"0"
    assert got[1][:2] == (None, b"") and int(got[1][2]["labelfuse.dropped"]) > 50_000
    assert got[1][2]["labelfuse.error"].endswith(b"characters; the limit is 20000")
    assert got[2][:2] == (b"gone", None) and "labelfuse.dropped" not in got[2][2]


def test_a_graph_that_is_down_stops_the_loop_uncommitted_and_a_new_loop_loses_nothing(topics, bbc_model):
    bootstrap, (inp, out, _), s = topics
    send(bootstrap, inp, ["Shares in BP fell", "The striker scored"])
    stats = run_until(TaggerLoop(s, Graph(bbc_model, down)), lambda st: not st["alive"] and st["consumed"])
    assert stats["graph_failures"] == 1 and "GraphUnavailable" in stats["error"] and stats["dead_lettered"] == 0
    assert committed(bootstrap, s.group_id, inp) == 0
    stats = run_until(TaggerLoop(s, Graph(bbc_model, lambda t: None)), lambda st: st["tagged"] >= 2)
    assert stats["tagged"] == 2 and sorted(read(bootstrap, out, 2)) == ["0", "1"]


def test_when_every_message_fails_a_known_good_probe_decides_who_is_at_fault(topics, bbc_model):
    bootstrap, (inp, _, dead), s = topics
    send(bootstrap, inp, ["POISON one", "POISON two"])
    graph = Graph(bbc_model, poisoned)  # the probe text passes: the messages are bad, not the graph
    stats = run_until(TaggerLoop(s, graph), lambda st: st["dead_lettered"] >= 2)
    assert stats["failed_alone"] == 2 and stats["graph_failures"] == 0 and [PROBE_TEXT] in graph.calls
    assert sorted(read(bootstrap, dead, 2)) == ["0", "1"]

    send(bootstrap, inp, ["one more", "and another"])  # now the graph fails everything, the probe included

    def broken(texts):
        raise ValueError("the model is corrupt")

    stats = run_until(TaggerLoop(s, Graph(bbc_model, broken)), lambda st: not st["alive"] and st["consumed"])
    assert stats["graph_failures"] == 1 and stats["dead_lettered"] == 0 and "corrupt" in stats["error"]
    assert committed(bootstrap, s.group_id, inp) == 2  # the new messages stay for the next consumer


class Registry:
    """A Confluent-compatible schema registry's REST API, the two calls the clients make (register a schema,
    fetch one by id), served over real HTTP on 127.0.0.1. A stand-in: no schema registry server ships in a
    package this machine can install (Confluent's and Apicurio's are Java downloads; Karapace is not on PyPI)."""

    def __init__(self):
        import http.server
        import threading

        self.schemas: list[dict] = []
        self.down: int | None = None  # the status every schema lookup gets while the registry is "down"
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # /subjects/<subject>/versions
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                registry.schemas.append({"schema": body["schema"], "schemaType": body.get("schemaType", "AVRO")})
                self._send(200, {"id": len(registry.schemas)})

            def do_GET(self):  # /schemas/ids/<id>; anything else (newer clients' lookups) is not found
                if registry.down:
                    return self._send(registry.down, {"error_code": registry.down * 100 + 1, "message": "down"})
                path = self.path.split("?")[0]
                if not path.startswith("/schemas/ids/"):
                    return self._send(404, {"error_code": 40401, "message": "Not found"})
                sid = int(path.rsplit("/", 1)[1])
                if not 1 <= sid <= len(registry.schemas):
                    return self._send(404, {"error_code": 40403, "message": "Schema not found"})
                self._send(200, registry.schemas[sid - 1])

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


TICKET = {
    "type": "record",
    "name": "Ticket",
    "fields": [{"name": "id", "type": "long"}, {"name": "body", "type": "string"}],
}


def test_avro_messages_from_a_schema_registry_are_decoded_and_bad_ones_dead_lettered(topics, bbc_model):
    """Avro values written by confluent-kafka's own serializer (the registry's wire format) are tagged; a value
    without the wire format or naming an unknown schema is dead-lettered with the reason; a registry that is
    down stops the loop uncommitted (the messages are not at fault)."""
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    bootstrap, (inp, out, dead), s = topics
    registry = Registry()
    try:
        serialize = AvroSerializer(SchemaRegistryClient({"url": registry.url}), json.dumps(TICKET))
        ctx = SerializationContext(inp, MessageField.VALUE)
        texts = ["Shares in BP fell after the results", "The striker scored twice", "Parliament passed the bill"]
        values = [serialize({"id": 100 + i, "body": t}, ctx) for i, t in enumerate(texts)]
        values += [json.dumps({"body": "plain JSON"}).encode(), b"\x00\x00\x00\x00\x09garbage"]  # no format; id 9
        p = KafkaProducer(bootstrap_servers=bootstrap)
        for i, v in enumerate(values):
            p.send(inp, key=str(i).encode(), value=v)
        p.flush()
        settings = s.model_copy(update={"value_format": "avro", "text_field": "body"})
        # no retries of a 429 or 503 (the client's default: 3, backing off from 1 s): the test needs none
        registry_settings = {"url": registry.url, "options": {"max.retries": 0}}
        settings = KafkaSettings.model_validate({**settings.model_dump(), "schema_registry": registry_settings})
        graph = Graph(bbc_model, lambda t: None)
        stats = run_until(TaggerLoop(settings, graph), lambda st: st["tagged"] + st["dead_lettered"] >= 5)
        assert (stats["tagged"], stats["dead_lettered"]) == (3, 2)
        results = {k: json.loads(r.value) for k, r in read(bootstrap, out, 3).items()}
        assert [results[str(i)]["id"] for i in range(3)] == [100, 101, 102]
        assert [results[str(i)]["label"] for i in range(3)] == list(bbc_model.predict(texts))
        why = {k: dict(r.headers)["labelfuse.error"].decode() for k, r in read(bootstrap, dead, 2).items()}
        assert "not in the schema registry's wire format" in why["3"] and "schema id 9: Schema not found" in why["4"]

        other = AvroSerializer(SchemaRegistryClient({"url": registry.url}), json.dumps({**TICKET, "name": "Ticket2"}))
        p.send(inp, key=b"5", value=other({"id": 5, "body": "A new phone"}, ctx))
        p.flush()
        p.close()
        registry.down = 503  # the new schema id, not cached by the loop yet, must be fetched: the registry is down
        before = committed(bootstrap, s.group_id, inp)
        stats = run_until(TaggerLoop(settings, graph), lambda st: not st["alive"] and st["consumed"])
        assert "RegistryUnavailable" in stats["error"] and stats["dead_lettered"] == 0
        assert committed(bootstrap, s.group_id, inp) == before == 5  # nothing dead-lettered, nothing committed
        # a registry refusing the loop's credentials or throttling it: not the message's fault either
        value = read(bootstrap, inp, 6)["5"].value
        for status in (401, 403, 429):
            registry.down = status
            with pytest.raises(RegistryUnavailable, match=f"{status}"):
                RegistryDecoder(settings)(inp, value)
    finally:
        registry.server.shutdown()


def test_json_schema_values_decode_like_json_objects():
    from types import SimpleNamespace

    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.json_schema import JSONSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    from serve.kafka import decode

    registry = Registry()
    try:
        schema = {"type": "object", "properties": {"id": {"type": "integer"}, "body": {"type": "string"}}}
        serialize = JSONSerializer(json.dumps(schema), SchemaRegistryClient({"url": registry.url}))
        raw = serialize({"id": 7, "body": "Shares fell"}, SerializationContext("t", MessageField.VALUE))
        s = KafkaSettings.model_validate(
            {"bootstrap_servers": "b:1", "input_topics": ["t"], "output_topic": "o", "dead_letter_topic": "d",
             "value_format": "json_schema", "text_field": "body", "schema_registry": {"url": registry.url}}
        )  # fmt: skip
        got = decode(SimpleNamespace(topic="t", value=raw), s, RegistryDecoder(s))
        assert (got.text, got.id, got.error) == ("Shares fell", 7, None)
        bad = decode(SimpleNamespace(topic="t", value=raw[:5] + b"{not json"), s, RegistryDecoder(s))
        assert bad.text is None and "does not decode with schema id 1" in bad.error
    finally:
        registry.server.shutdown()
