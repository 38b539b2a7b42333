"""Real-time Kafka tagging through the Serve graph, against a real Kafka-protocol broker (tansu).

One app with two tagger replicas in one consumer group serves every test here. The tests
share its topics: each tells its messages apart by a per-test key prefix and reads the
output with a consumer group of its own.
"""

import json
import time
import uuid
from types import SimpleNamespace

import pytest
import ray
import requests
from conftest import report, sample
from fuzz import GOOD_TEXT, JSON, NASTY_TEXT, RAW, budget, dumps
from hypothesis import given
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from ray import serve

from serve.app import build
from serve.dev_kafka import DEV_CLIENT, create_topics, dev_kafka_args

pytestmark = [pytest.mark.integration, pytest.mark.slow]
APP = "labelfuse-kafka"
IN, OUT, DLQ = "tickets", "tickets-tagged", "tickets-dead"
PARTITIONS = 4
PRODUCED = [0]  # messages this module sent to IN


@pytest.fixture(scope="module")
def tagging(serve_url, kafka_broker, bbc_model, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("kafka") / "model"
    bbc_model.save(bundle)
    create_topics(kafka_broker.bootstrap, [IN], PARTITIONS)
    create_topics(kafka_broker.bootstrap, [OUT, DLQ], 1)
    # gzip-compressed results, a producer option and a client setting read from the replicas' environment:
    # every test of this module runs through them
    kafka = dev_kafka_args(
        kafka_broker.bootstrap, [IN, OUT, DLQ], "labelfuse-test-tagger",
        replicas=2, batch_size=16, max_in_flight=2, max_chars=5000,
        client={"client_id_env": "LABELFUSE_TEST_KAFKA_CLIENT"},
        producer={"compression_type": "gzip", "linger_ms": 20, "options": {"max_request_size": 2_000_000}},
    )  # fmt: skip
    env = {"runtime_env": {"env_vars": {"LABELFUSE_TEST_KAFKA_CLIENT": "labelfuse-test-tagger"}}}
    options = {"KafkaTagger": {"ray_actor_options": {"num_cpus": 0, **env}}}
    serve.run(build({"bundle": str(bundle), "kafka": kafka}, options), name=APP, route_prefix="/")
    handle = serve.get_deployment_handle("KafkaTagger", app_name=APP)
    yield {"bootstrap": kafka_broker.bootstrap, "handle": handle, "model": bbc_model}
    serve.delete(APP)


def replica_stats(handle, want: int = 2, timeout_s: float = 60) -> dict[str, dict]:
    """Counters of every tagger replica (the handle picks a replica per call: call until all answered)."""
    seen: dict[str, dict] = {}
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            s = handle.stats.remote().result(timeout_s=30)
        except ray.exceptions.RayError:  # routed to a replica that just died, before Serve noticed
            time.sleep(0.5)
            continue
        seen[s["replica"]] = s
        if len(seen) >= want and all(s["assignment"] for s in seen.values()):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"only saw {seen}")


def produce(bootstrap: str, messages: list[tuple[bytes | None, bytes | None]], partition: int | None = None) -> None:
    p = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=4_000_000)
    for key, value in messages:
        p.send(IN, key=key, value=value, partition=partition)
    p.flush()
    p.close()
    PRODUCED[0] += len(messages)


def collect(bootstrap: str, want, timeout_s: float = 180) -> tuple[list, list]:
    """(results, dead letters) read from the start of both topics until ``want(results, dead)`` holds."""
    c = KafkaConsumer(
        OUT,
        DLQ,
        bootstrap_servers=bootstrap,
        group_id=f"check-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **DEV_CLIENT,
    )
    results, dead = [], []
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and not want(results, dead):
            for tp, records in c.poll(500).items():
                for r in records:
                    (results if tp.topic == OUT else dead).append(r)
    finally:
        c.close()
    return results, dead


def test_two_replicas_split_the_partitions(tagging):
    stats = replica_stats(tagging["handle"])
    parts = [set(s["assignment"]) for s in stats.values()]
    assert len(parts) == 2 and all(parts)
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == {f"{IN}:{p}" for p in range(PARTITIONS)}


def test_every_message_is_tagged_once_or_dead_lettered_with_its_reason(tagging, bbc):
    run = uuid.uuid4().hex[:6]
    texts = sample(bbc["test"], 120, seed=4)["text"].str.slice(0, 1500).tolist()
    good = [(f"{run}-{i}".encode(), json.dumps({"id": f"{run}-{i}", "text": t}).encode()) for i, t in enumerate(texts)]
    poison = {
        f"{run}-utf8": (b"\xff\xfe\x00", "not valid UTF-8"),
        f"{run}-json": (b"{not json", "not valid JSON"),
        f"{run}-deep": (b"[" * 5000, "nested too deep"),  # once stopped the loop (RecursionError)
        f"{run}-bignum": (b'{"text": ' + b"9" * 5000 + b"}", "integer string conversion"),  # and this (ValueError)
        f"{run}-array": (b"[1, 2]", "expected an object"),
        f"{run}-notext": (json.dumps({"id": 1, "body": "x"}).encode(), "field 'text' is missing"),
        f"{run}-number": (json.dumps({"text": 42}).encode(), "field 'text' is a int"),
        f"{run}-empty": (json.dumps({"text": "   "}).encode(), "text is empty"),
        f"{run}-long": (json.dumps({"text": "y" * 5001}).encode(), "5001 characters; the limit is 5000"),
        f"{run}-surrogate": (json.dumps({"text": "ok \udfff"}).encode(), "lone surrogate (U+DFFF) at character 3"),
        f"{run}-null": (None, "null value"),
    }
    messages = good[:60] + [(k.encode(), v) for k, (v, _) in poison.items()] + good[60:]
    produce(tagging["bootstrap"], messages)

    def mine(records):
        return [r for r in records if r.key and r.key.decode().startswith(run)]

    results, dead = collect(tagging["bootstrap"], lambda r, d: len(mine(r)) + len(mine(d)) >= len(messages))
    results, dead = mine(results), mine(dead)
    keys = sorted(r.key.decode() for r in results)
    assert keys == sorted(k.decode() for k, _ in good)  # every good message, exactly once
    reasons = {r.key.decode(): dict(r.headers)["labelfuse.error"].decode() for r in dead}
    assert sorted(reasons) == sorted(poison)
    for key, (_, why) in poison.items():
        assert why in reasons[key], (key, reasons[key])
    assert {r.key.decode(): r.value for r in dead} == {k: v for k, (v, _) in poison.items()}  # original bytes kept

    model = tagging["model"]
    by_key = {r.key.decode(): json.loads(r.value) for r in results}
    expected = model.predict(texts)
    for i, label in enumerate(expected):
        out = by_key[f"{run}-{i}"]
        assert out["label"] == label and out["id"] == f"{run}-{i}" and out["model_version"] == model.version
        assert out["topic"] == IN and 0 <= out["partition"] < PARTITIONS and out["offset"] >= 0
        assert abs(sum(out["probabilities"].values()) - 1) < 1e-3 and out["llm_used"] is False


@pytest.mark.reliability
def test_bad_http_bodies_get_a_4xx_with_the_reason_under_the_default_limits(tagging, serve_url, capsys):
    """This module's app serves HTTP too, with the default limits (20,000 characters a text, 2 MiB a body): each
    bad body gets a 4xx that names the problem, and the app answers the next request."""
    post = lambda **kw: requests.post(f"{serve_url}/v1/classify", timeout=60, **kw)  # noqa: E731
    http = {
        "empty text": (post(json={"text": "  "}), 422, "text 0 is empty"),
        "1 MB text": (post(json={"text": "word " * 200_000}), 422, "1000000 characters; the limit is 20000"),
        "invalid UTF-8": (
            post(data=b'{"text": "\xff\xfe"}', headers={"content-type": "application/json"}),
            400,
            "error parsing the body",
        ),
        "text is a number": (post(json={"text": 5}), 422, "string"),
        "texts is a string": (post(json={"texts": "one text"}), 422, "list"),
        "3 MB body": (post(json={"texts": ["x" * 1_000_000] * 3}), 413, "larger than"),
    }
    for name, (r, code, words) in http.items():
        assert r.status_code == code and words in r.text, (name, r.status_code, r.text[:300])
    assert post(json={"text": "Shares in BP fell"}).status_code == 200
    report(capsys, f"bad input: {len(http)} HTTP cases -> 4xx with the reason, the app answers the next request")


def keyed(run: str):
    """Records of this run, by key."""
    return lambda records: [r for r in records if r.key and r.key.decode().startswith(run)]


def test_a_lone_surrogate_is_dead_lettered_and_its_partition_keeps_moving(tagging):
    """The reported defect: this message stopped the tagger loop without committing, again on every replica."""
    run = uuid.uuid4().hex[:6]
    mine = keyed(run)
    poison = json.dumps({"id": "poison", "text": "\ud800 surrogate"}).encode()  # valid JSON: b'"\\ud800 ...'
    good = [(f"{run}-{i}".encode(), json.dumps({"text": f"Election result number {i}"}).encode()) for i in range(4)]
    produce(tagging["bootstrap"], [(f"{run}-poison".encode(), poison), *good], partition=0)
    results, dead = collect(tagging["bootstrap"], lambda r, d: len(mine(r)) >= 4 and len(mine(d)) >= 1)
    assert sorted(r.key.decode() for r in mine(results)) == [f"{run}-{i}" for i in range(4)]
    [letter] = mine(dead)
    assert letter.value == poison
    why = dict(letter.headers)["labelfuse.error"].decode()
    assert why.startswith("text contains a lone surrogate (U+D800) at character 0"), why
    assert all(s["alive"] and s["error"] is None for s in replica_stats(tagging["handle"]).values())


MESSAGES = st.lists(
    st.one_of(
        RAW,
        st.fixed_dictionaries({"text": NASTY_TEXT}, optional={"id": JSON}).map(dumps),
        GOOD_TEXT.map(lambda t: dumps({"text": t})),
    ),
    min_size=5,
    max_size=30,
)


@budget(3)
@given(values=MESSAGES)
def test_fuzzed_messages_are_each_tagged_or_dead_lettered_and_the_stream_moves(tagging, values):
    from serve.kafka import decode
    from serve.settings import KafkaSettings

    run = uuid.uuid4().hex[:6]
    mine = keyed(run)
    keys = [f"{run}-{i}" for i in range(len(values))]
    produce(tagging["bootstrap"], [(k.encode(), v) for k, v in zip(keys, values, strict=True)])
    results, dead = collect(
        tagging["bootstrap"], lambda r, d: len({x.key for x in mine(r) + mine(d)}) >= len(keys), timeout_s=120
    )
    tagged, letters = {r.key.decode() for r in mine(results)}, {r.key.decode() for r in mine(dead)}
    assert tagged | letters == set(keys) and not tagged & letters  # each message: a result or a dead letter
    s = KafkaSettings.model_validate(dev_kafka_args("x:1", [IN, OUT, DLQ], "g", max_chars=5000))
    bad = {k for k, v in zip(keys, values, strict=True) if decode(SimpleNamespace(value=v), s).error}
    assert letters == bad  # exactly the messages the rule refuses; the graph failed none of the others
    assert all(s["alive"] for s in replica_stats(tagging["handle"]).values())


def test_killing_a_tagger_replica_mid_stream_loses_nothing(tagging, bbc):
    run = uuid.uuid4().hex[:6]
    n = 600
    texts = sample(bbc["train"], n, seed=5)["text"].str.slice(0, 1500).tolist()
    produce(
        tagging["bootstrap"], [(f"{run}-{i}".encode(), json.dumps({"text": t}).encode()) for i, t in enumerate(texts)]
    )

    def mine(records):
        return {r.key.decode() for r in records if r.key and r.key.decode().startswith(run)}

    collect(tagging["bootstrap"], lambda r, d: len(mine(r)) >= 60, timeout_s=120)
    victim = next(iter(replica_stats(tagging["handle"])))
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "KafkaTagger" in a["name"]]
    actor = next(name for name in names if victim.removeprefix("tagger-") in name)
    ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)  # like kill -9: no clean shutdown

    results, _ = collect(tagging["bootstrap"], lambda r, d: len(mine(r)) >= n, timeout_s=240)
    keys = [r.key.decode() for r in results if r.key.decode().startswith(run)]
    assert set(keys) == {f"{run}-{i}" for i in range(n)}  # nothing lost; at-least-once may repeat a few
    assert len(keys) - len(set(keys)) <= n // 2
    stats = replica_stats(tagging["handle"])  # Serve replaced the killed replica; the group has two again
    assert victim not in stats and len(stats) == 2


def test_clean_shutdown_commits_every_processed_message(tagging):
    """After the app is deleted, the group's committed offsets cover every message produced."""
    run = uuid.uuid4().hex[:6]
    produce(
        tagging["bootstrap"],
        [(f"{run}-{i}".encode(), json.dumps({"text": f"match report {i}"}).encode()) for i in range(40)],
    )

    def mine(records):
        return {r.key.decode() for r in records if r.key and r.key.decode().startswith(run)}

    collect(tagging["bootstrap"], lambda r, d: len(mine(r)) >= 40, timeout_s=120)
    serve.delete(APP)  # graceful: the taggers finish, commit and leave the group
    c = KafkaConsumer(bootstrap_servers=tagging["bootstrap"], group_id="labelfuse-test-tagger", **DEV_CLIENT)
    try:
        committed = sum(c.committed(TopicPartition(IN, p)) or 0 for p in range(PARTITIONS))
    finally:
        c.close()
    assert committed == PRODUCED[0]
