"""The learning loop end to end: a real Ray, the real Serve app following a registry, real HTTP, a label store
on disk, the retrain Ray job and the CLI, and start-from-class-names (the Ray job, and the command with the
real local LLM).

The one fake is a paid LLM: a scripted OpenAI-compatible stub stands in for the served model's LLM, because the
answers the loop keeps are the ones the app pays for, and for the Ray bootstrap job's teacher, which must know
the answers for the test to tell whether its student learned them.
"""

import json
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
import requests
from conftest import TEST_MAX_LENGTH, first_words, sample, short
from ray import serve
from stub_llm import StubServer

from data_jobs import retrain as retrain_job
from fusion.classifier import AutoFusionClassifier
from fusion.cli import main as cli
from fusion.labelstore import LabelStore
from fusion.registry import Registry
from serve.app import build
from serve.dev_kafka import DEV_CLIENT, create_topics, dev_kafka_args

pytestmark = [pytest.mark.integration, pytest.mark.slow]
APP = "labelfuse-loop"
TOPICS = ("loop-labels", "loop-in", "loop-out", "loop-dead")  # labels, then the tagger's in, out, dead letters


@pytest.fixture(scope="module")
def loop(serve_url, kafka_broker, encoder, bbc, tmp_path_factory):
    """The app serving a registry's champion (a poor model, on purpose), keeping labels in a store, and
    reading people's labels from a Kafka topic too."""
    root = tmp_path_factory.mktemp("loop")
    classes = sorted(bbc["train"]["label"].unique())
    truth = dict(zip(bbc["train"]["text"], bbc["train"]["label"], strict=True))
    with StubServer(classes, answer=lambda text: classes.index(truth.get(text, "tech"))) as stub:
        llm = {"name": "paid", "provider": "custom", "model": "m", "base_url": stub.base_url, "price_input": 1.0}
        cfg = {"encoder": {"max_length": TEST_MAX_LENGTH}, "llms": [llm], "llm_limits": {"cache": False},
               "train": {"llm_fraction": 0.5}}  # fmt: skip
        poor = sample(bbc["train"], 60, seed=5)
        poor["label"] = np.random.default_rng(0).permutation(poor["label"].to_numpy())  # wrong labels
        champion = AutoFusionClassifier(cfg, encoder=encoder).fit(poor)
        reg = Registry(root / "registry")
        version = reg.register(champion.save(root / "poor"))
        reg.promote(version)
        store = root / "labels"
        create_topics(kafka_broker.bootstrap, [TOPICS[0], TOPICS[1]], 2)
        create_topics(kafka_broker.bootstrap, [TOPICS[2]], 1)
        kafka = dev_kafka_args(kafka_broker.bootstrap, list(TOPICS[1:]), "loop-tagger", batch_size=16)
        kafka["labels_topic"] = TOPICS[0]
        settings = {"bundle": str(reg.root), "registry_poll_s": 0.5, "label_store": str(store), "kafka": kafka}
        # one Fusion replica: it reserves a CPU, and the retrain jobs below need the session's other one
        one = {"Fusion": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}}
        serve.run(build(settings, one), name=APP, route_prefix="/")
        try:
            yield {"url": serve_url, "registry": reg, "store": LabelStore(store), "first": version,
                   "bootstrap": kafka_broker.bootstrap}  # fmt: skip
        finally:
            serve.delete(APP)


def served_version(url: str) -> str:
    r = requests.post(f"{url}/v1/classify", json={"text": "Shares rose after the results", "llm": "off"}, timeout=60)
    return r.json()["model_version"]


def wait_for_version(url: str, version: str, timeout: float = 20) -> float:
    start = time.monotonic()
    while served_version(url) != version:
        assert time.monotonic() - start < timeout, f"{version} not served after {timeout}s"
        time.sleep(0.2)
    return time.monotonic() - start


def post_until_kept(url: str, body: dict, deadline_s: float = 60) -> dict:
    """A client that retries with the same id until the label is kept (what feedback clients should do)."""
    start = time.monotonic()
    while True:
        try:
            r = requests.post(f"{url}/v1/feedback", json=body, timeout=30)
            if r.status_code == 200:
                return r.json()
        except requests.RequestException:
            pass
        assert time.monotonic() - start < deadline_s, f"feedback {body['id']} never kept"
        time.sleep(0.1)


def test_paid_llm_answers_and_feedback_are_kept_once_even_when_the_writer_dies(loop, bbc):
    url, store = loop["url"], loop["store"]
    texts = sample(bbc["test"], 6, seed=3)["text"].str.slice(0, 1500).tolist()
    answer = requests.post(f"{url}/v1/classify", json={"texts": texts, "llm": "all"}, timeout=60).json()
    assert all(r["llm_used"] for r in answer["results"])
    requests.post(f"{url}/v1/classify", json={"texts": texts, "llm": "all"}, timeout=60)  # the same answers again
    kept = store.records()
    assert sorted(kept["text"]) == sorted(texts) and set(kept["llm"]) == {"paid"}  # once each, though asked twice
    assert set(kept["bundle_version"]) == {answer["model_version"]} and kept["prompt_version"].notna().all()

    # people's labels, 4 clients at once; the Labels replica is killed once mid-way, and clients retry
    rows = sample(bbc["train"], 120, seed=6)
    bodies = [
        {"id": f"fb-{i}", "text": t, "label": lab}
        for i, (t, lab) in enumerate(zip(rows["text"], rows["label"], strict=True))
    ]
    done = []
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post_until_kept, url, b) for b in bodies]
        while sum(f.done() for f in futures) < 40:
            time.sleep(0.05)
        [labels] = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#Labels" in a["name"]]
        ray.kill(ray.get_actor(labels["name"], namespace=labels["namespace"]), no_restart=True)  # like kill -9
        done = [f.result() for f in futures]
    assert all(d["kept"] for d in done)
    human = store.labels().query("source == 'human'")
    assert sorted(human["label_id"]) == sorted(f"feedback:fb-{i}" for i in range(120))  # each exactly once
    truth = dict(zip(rows["text"], rows["label"], strict=True))
    assert all(lab == [truth[t]] for t, lab in zip(human["text"], human["labels"], strict=True))

    # a label for a text already seen, by its id; the later label for the same text wins
    tid = done[0]["text_id"]
    other = "tech" if rows["label"].iloc[0] != "tech" else "sports"
    assert post_until_kept(url, {"id": "fb-by-id", "text_id": tid, "label": other})["text_id"] == tid
    assert store.labels().set_index("text_id").loc[tid, "labels"] == [other]

    bad = [
        ({"id": "x", "text": "t", "label": "weather"}, "unknown class"),
        ({"id": "x", "text": "t", "labels": ["tech", "sports"]}, "exactly one label"),
        ({"id": "x", "text": "t", "text_id": tid, "label": "tech"}, "exactly one of 'text' or 'text_id'"),
        ({"id": "x", "text_id": "0000000000000000", "label": "tech"}, "not in the label store"),
        ({"id": "x", "text": "\u200b ", "label": "tech"}, "empty"),
        ({"text": "t", "label": "tech"}, "id"),
    ]
    for body, message in bad:
        r = requests.post(f"{url}/v1/feedback", json=body, timeout=30)
        assert r.status_code == 422 and message in r.text, (body, r.text)
    info = requests.get(f"{url}/v1/model", timeout=30).json()
    assert info["registry"] == str(loop["registry"].root) and info["llm_call_rate"] is not None
    assert info["label_store"]["human"] == 120 and info["label_store"]["llm"] >= 0


def test_labels_from_a_kafka_topic_are_kept_once_through_a_killed_consumer_and_bad_ones_dead_lettered(loop, bbc):
    from kafka import KafkaConsumer, KafkaProducer

    store, run = loop["store"], f"k{time.monotonic_ns() % 10**6}"
    rows = sample(bbc["test"], 60, seed=12)
    good = [
        {"id": f"{run}-{i}", "text": t, "label": lab}
        for i, (t, lab) in enumerate(zip(rows["text"], rows["label"], strict=True))
    ]
    bad = {
        f"{run}-class": ({"id": "b1", "text": "t", "label": "weather"}, "unknown class"),
        f"{run}-noid": ({"text": "t", "label": "tech"}, "id: Field required"),
        f"{run}-json": (b"{not json", "JSON"),
        f"{run}-both": ({"id": "b2", "text": "t", "label": "tech", "labels": ["tech"]}, "exactly one of 'label'"),
        f"{run}-unseen": ({"id": "b3", "text_id": "ffffffffffffffff", "label": "tech"}, "not in the label store"),
    }
    p = KafkaProducer(bootstrap_servers=loop["bootstrap"])

    def send(key, value):
        p.send(TOPICS[0], key=key.encode(), value=value if isinstance(value, bytes) else json.dumps(value).encode())

    for i, g in enumerate(good):
        send(g["id"], g)
        if i == 30:
            for key, (v, _) in bad.items():
                send(key, v)
            p.flush()
            deadline = time.monotonic() + 60  # let the consumer take part of the stream, then kill its replica
            while store.labels()["label_id"].str.startswith(f"feedback:{run}").sum() < 10:
                assert time.monotonic() < deadline, "no Kafka label kept"
                time.sleep(0.2)
            [tagger] = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#KafkaTagger" in a["name"]]
            ray.kill(ray.get_actor(tagger["name"], namespace=tagger["namespace"]), no_restart=True)  # like kill -9
    p.flush()
    p.close()
    deadline = time.monotonic() + 120
    while True:
        human = store.labels().query("source == 'human'")
        ids = human.loc[human["label_id"].str.startswith(f"feedback:{run}"), "label_id"]
        if len(ids) >= len(good) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(ids) == sorted(f"feedback:{g['id']}" for g in good)  # each exactly once
    c = KafkaConsumer(TOPICS[3], bootstrap_servers=loop["bootstrap"], group_id=None, auto_offset_reset="earliest",
                      consumer_timeout_ms=3000, **DEV_CLIENT)  # fmt: skip
    reasons = {}
    for r in c:  # until every bad key is in, or 3 s without a record
        if r.key.decode() in bad:
            reasons[r.key.decode()] = dict(r.headers)["labelfuse.error"].decode()
            if len(reasons) == len(bad):
                break
    c.close()
    assert sorted(reasons) == sorted(bad)
    for key, (_, why) in bad.items():
        assert why in reasons[key], (key, reasons[key])


def test_retrain_promotes_the_better_model_refuses_a_worse_one_and_rollback_restores(loop, bbc, capsys):
    url, reg, store = loop["url"], loop["registry"], loop["store"]
    first = loop["first"]
    if store.stats()["human"] < 100:  # the test before gives these labels; this one also runs alone
        rows = sample(bbc["train"], 120, seed=6)
        for i, (t, lab) in enumerate(zip(rows["text"], rows["label"], strict=True)):
            post_until_kept(url, {"id": f"fb-{i}", "text": t, "label": lab})
    assert served_version(url) == first  # labels alone change nothing that is served

    loop_args = ["--store", store.uri, "--registry", str(reg.root), "--min-human-holdout", "10"]
    assert retrain_job.main(loop_args) == 0  # the Ray job
    better = reg.champion()
    assert better != first
    report = reg.state()["history"][-1]
    assert report["event"] == "promote"
    took = wait_for_version(url, better)
    print(f"\npromoted {better}: served after {took:.1f}s")

    worse = ["--set", "train.max_epochs=1", "--set", "train.learning_rate=1e-7"]  # an untrained head, on purpose
    assert cli(["retrain", *loop_args, *worse]) == 0
    out = capsys.readouterr().out
    assert '"decision": "refuse"' in out and reg.champion() == better
    time.sleep(1.5)  # three registry polls
    assert served_version(url) == better

    assert cli(["registry", "rollback", "--registry", str(reg.root)]) == 0
    took = wait_for_version(url, first)
    print(f"rolled back to {first}: served after {took:.1f}s")


def test_bootstrap_from_class_names_trains_a_model_without_gold_labels(ray_local, tmp_path, bbc, capsys):
    """The Ray job (Ray Data embeds, the driver asks and trains) from class names alone; no label is given.

    The teacher is the scripted stub standing in for a paid LLM: what cannot run here is a teacher that knows
    the answers (SmolLM2-135M, the local model, answers bbc-news at about chance, so whether a student learned
    it could not be told). It answers the true label of 5 texts in 6 and a wrong one otherwise. The real local
    LLM teaches `labelfuse bootstrap` in the next test (the same code in one process)."""
    import json

    from data_jobs import bootstrap as bootstrap_job

    classes = ["sports", "politics", "business"]
    rows = sample(bbc["train"][bbc["train"]["label"].isin(classes)], 150, seed=8)
    truth = {short(t, 8): label for t, label in zip(rows["text"], rows["label"], strict=True)}

    def teacher(prompt: str) -> int:  # the stub is shown the prompt: the text is found by its first words
        text = short(prompt.split("Text:\n", 1)[-1], 8)
        right = classes.index(truth[text])
        return right if zlib.crc32(text.encode()) % 6 else (right + 1) % 3  # wrong for about 1 text in 6

    rows[["text"]].to_json(tmp_path / "unlabelled.jsonl", orient="records", lines=True)
    with StubServer(classes, answer=teacher) as stub:
        argv = ["--input", str(tmp_path / "unlabelled.jsonl"), "--classes", ",".join(classes),
                "--llm", f"paid=custom:m@{stub.base_url}", "--ask", "36", "--store", str(tmp_path / "labels"),
                "--registry", str(tmp_path / "registry"), "--output", str(tmp_path / "model"),
                "--set", f"encoder.max_length={TEST_MAX_LENGTH}"]  # fmt: skip
        assert bootstrap_job.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["asked"] == 36 and report["llm_calls"] + report["cache_hits"] == 36
    assert report["validation"].startswith("held-out LLM-labelled texts")
    assert sum(report["label_mix"].values()) == report["answered"] == 36
    clf = AutoFusionClassifier.load(tmp_path / "model")
    assert clf.classes == classes and clf.training["bootstrap"]["asked"] == 36
    assert Registry(tmp_path / "registry").champion() == clf.version
    kept = LabelStore(tmp_path / "labels").labels()
    assert len(kept) == 36 and set(kept["source"]) == {"llm"}
    assert all(t[0] == classes[teacher(x)] for x, t in zip(kept["text"], kept["labels"], strict=True))
    # the student learned its teacher: on the texts asked, the encoder-only path agrees with the LLM's answers,
    # and on texts no one labelled it is right far more often than chance (1/3)
    student = clf.predict(kept["text"].tolist(), llm="off")
    agree = np.mean([s == t[0] for s, t in zip(student, kept["labels"], strict=True)])
    unseen = rows[~rows["text"].isin(set(kept["text"]))]
    accuracy = np.mean(np.array(clf.predict(unseen["text"].tolist(), llm="off")) == unseen["label"].to_numpy())
    print(f"\nbootstrap: {report['label_mix']}, agreement with the teacher {agree:.2f}, accuracy {accuracy:.2f}")
    assert agree >= 0.75 and accuracy >= 0.6


def test_bootstrap_command_calibrates_on_gold_labels(tmp_path, bbc, capsys):
    """`labelfuse bootstrap` in one process, with a small gold set: the LLM scores it too, and the report says so."""
    import json

    keep = ["sports", "politics", "business"]
    rows = first_words(sample(bbc["train"][bbc["train"]["label"].isin(keep)], 80, seed=9))[["text"]]
    gold = first_words(sample(bbc["val"][bbc["val"]["label"].isin(keep)], 12, seed=9))[["text", "label"]]
    rows.to_json(tmp_path / "unlabelled.jsonl", orient="records", lines=True)
    gold.to_csv(tmp_path / "gold.csv", index=False)
    (tmp_path / "classes.yaml").write_text("sports: games, players, scores\npolitics: parties, votes\nbusiness:\n")
    argv = ["bootstrap", "--input", str(tmp_path / "unlabelled.jsonl"), "--classes-file", str(tmp_path / "classes.yaml"),
            "--gold", str(tmp_path / "gold.csv"), "--llm", "local:smollm2-135m", "--ask", "12",
            "--output", str(tmp_path / "model"), "--set", f"encoder.max_length={TEST_MAX_LENGTH}"]  # fmt: skip
    assert cli(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["validation"].startswith("gold labels (12 texts") and "accuracy" in report["agreement_with_gold"]
    assert report["asked"] == 12 and report["llm_calls"] + report["cache_hits"] >= 12 + 12  # the gold texts too
    clf = AutoFusionClassifier.load(tmp_path / "model")
    assert clf.config.labels.descriptions == {"sports": "games, players, scores", "politics": "parties, votes"}
    assert clf.training["n_val"] == 12
