"""The Serve graph over real HTTP: a real Ray, real Serve replicas, the real encoder and bundles.

The one fake is the LLM in the capacity test: a scripted OpenAI-compatible stub standing in
for a paid remote API (it gives a steady latency, which a real provider cannot here).
"""

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
import requests
from conftest import TEST_MAX_LENGTH, sample
from fuzz import GOOD_TEXT, JSON, NASTY_TEXT, RAW, budget, dumps
from hypothesis import given
from hypothesis import strategies as st
from ray import serve
from stub_llm import StubServer

from fusion.classifier import AutoFusionClassifier
from serve.app import build

pytestmark = [pytest.mark.integration, pytest.mark.slow]
APP = "labelfuse-http"
LIMITS = {"max_texts": 8, "max_chars": 2000, "max_body_bytes": 65536}


def deploy(settings: dict, options: dict | None = None) -> None:
    serve.run(build(settings, options), name=APP, route_prefix="/")


@pytest.fixture(scope="module")
def bundles(bbc_model, encoder, bbc, bbc_emb, tmp_path_factory):
    """Two different bundles of the same encoder: the one served first and its replacement."""
    root = tmp_path_factory.mktemp("bundles")
    bbc_model.save(root / "a")
    other = AutoFusionClassifier(
        {"encoder": {"max_length": TEST_MAX_LENGTH}, "fusion": {"hidden_dims": [64]}, "train": {"seed": 7}},
        encoder=encoder,
    )
    other.fit(bbc["train"], validation=bbc["val"], embeddings=bbc_emb["train"], validation_embeddings=bbc_emb["val"])
    other.save(root / "b")
    assert bbc_model.version != other.version
    return {"a": (str(root / "a"), bbc_model), "b": (str(root / "b"), other)}


@pytest.fixture(scope="module")
def url(serve_url, bundles):
    deploy({"bundle": bundles["a"][0], "limits": LIMITS})
    yield serve_url
    serve.delete(APP)


def test_classify_matches_the_library_and_reports_the_model(url, bundles, bbc):
    clf = bundles["a"][1]
    texts = sample(bbc["test"], 6, seed=1)["text"].str.slice(0, 1500).tolist()
    r = requests.post(f"{url}/v1/classify", json={"texts": texts}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == clf.version and body["latency_ms"] > 0 and body["llm_cost_usd"] == 0
    expected = clf.predict_proba(texts)
    got = np.array([[res["probabilities"][c] for c in clf.classes] for res in body["results"]])
    assert np.allclose(got, expected, atol=1e-4)
    assert [res["label"] for res in body["results"]] == clf.predict(texts)
    assert not any(res["llm_used"] for res in body["results"])

    one = requests.post(f"{url}/v1/classify", json={"text": texts[0]}, timeout=60).json()
    assert one["results"][0]["label"] == body["results"][0]["label"] and len(one["results"]) == 1

    model = requests.get(f"{url}/v1/model", timeout=30).json()
    assert model["model_version"] == clf.version and model["classes"] == clf.classes
    assert model["encoder"]["max_length"] == TEST_MAX_LENGTH and model["llms"] == []
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    ready = requests.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["model_version"] == clf.version
    assert "/v1/classify" in requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200
    assert requests.get(f"{url}/v1/kafka", timeout=30).status_code == 404  # no Kafka in this app


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"texts": ["a"] * 9}, "9 texts in one request; the limit is 8"),
        ({"texts": ["x" * 2001]}, "text 0 has 2001 characters; the limit is 2000"),
        ({"texts": ["ok", "  "]}, "text 1 is empty"),
        ({"texts": []}, "'texts' is empty"),
        ({}, "give exactly one of 'text' or 'texts'"),
        ({"text": "a", "texts": ["b"]}, "give exactly one of 'text' or 'texts'"),
        ({"texts": "not a list"}, "list"),
        ({"text": "a", "llm": "sometimes"}, "auto"),
        ({"text": "a", "colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_requests_get_422_with_the_reason(url, body, message):
    r = requests.post(f"{url}/v1/classify", json=body, timeout=30)
    assert r.status_code == 422 and message in r.text, r.text


def post_raw(url: str, body: bytes) -> requests.Response:
    return requests.post(f"{url}/v1/classify", data=body, headers={"content-type": "application/json"}, timeout=60)


def test_a_lone_surrogate_gets_422_while_the_requests_around_it_are_answered(url, bbc):
    """The reported defect: one text with a lone surrogate (valid JSON) failed every request batched with it."""
    good = sample(bbc["test"], 8, seed=3)["text"].str.slice(0, 500).tolist()
    with ThreadPoolExecutor(9) as pool:
        bad = pool.submit(post_raw, url, b'{"text": "\\ud800 abc"}')
        answers = list(pool.map(lambda t: requests.post(f"{url}/v1/classify", json={"text": t}, timeout=60), good))
    assert bad.result().status_code == 422, bad.result().text
    assert "text 0 contains a lone surrogate (U+D800) at character 0" in bad.result().json()["detail"]
    assert [r.status_code for r in answers] == [200] * len(good)
    many = post_raw(url, dumps({"texts": ["fine", "\x00\u200b", "also fine \udfff"]}))
    assert many.status_code == 422 and "text 1 is empty; text 2 contains a lone surrogate (U+DFFF)" in many.text
    # control characters are cleaned, not refused: the same answer as the clean text
    same = [
        post_raw(url, dumps({"text": t})).json()["results"][0] for t in ("BP\x00 shares \x1bfell", "BP shares fell")
    ]
    assert same[0] == same[1]


def test_a_text_that_fails_in_the_encoder_fails_alone_in_a_shared_batch(url, bundles):
    """Texts from concurrent requests share the encoder's batch. Sent to Fusion through a handle (past the text
    rule its HTTP API applies, as the Kafka tagger does), a text the real tokenizer cannot take fails its own
    item, not the batch: every other text gets the answer it gets alone."""
    models = {m.version: m for _, m in bundles.values()}
    fusion = serve.get_deployment_handle("Fusion", app_name=APP)
    items = [["Shares in BP fell"], ["\ud800 abc"], ["The striker scored", "abc \udfff", "Parliament voted"]] * 3
    calls = [fusion.classify.remote(texts, "off", record=False) for texts in items]  # concurrent: batched together
    for texts, call in zip(items, calls, strict=True):
        out = call.result(timeout_s=60)
        for t, res in zip(texts, out["results"], strict=True):
            if any("\ud800" <= c <= "\udfff" for c in t):
                assert res["error"].startswith("contains a lone surrogate"), res
            else:
                assert "error" not in res
                alone = models[out["model_version"]].predict_proba([t])[0]
                np.testing.assert_allclose(list(res["probabilities"].values()), alone, atol=1e-4)


REQUESTS = st.one_of(
    st.fixed_dictionaries({"text": NASTY_TEXT}).map(dumps),
    st.fixed_dictionaries({"texts": st.lists(st.one_of(NASTY_TEXT, GOOD_TEXT), max_size=10)}).map(dumps),
    st.fixed_dictionaries({"text": GOOD_TEXT}, optional={"llm": JSON, "extra": JSON}).map(dumps),
    st.dictionaries(st.sampled_from(["text", "texts", "llm", "x"]), JSON, max_size=3).map(dumps),
    RAW,
)


@budget(60)
@given(body=REQUESTS)
def test_fuzzed_requests_never_get_a_server_error(url, body):
    r = post_raw(url, body)
    assert r.status_code in (200, 400, 413, 422), (r.status_code, r.text[:300])
    answer = r.json()  # every answer is JSON, whatever the request held
    if r.status_code == 200:
        texts = json.loads(body)
        texts = [texts["text"]] if "text" in texts else texts["texts"]
        assert len(answer["results"]) == len(texts) and all(res["label"] for res in answer["results"])
    else:
        assert answer["detail"]


def test_oversized_bodies_get_413_declared_or_streamed(url):
    big = {"texts": ["word " * 300] * 60}  # ~90 KB > 64 KiB, before any per-text check
    r = requests.post(f"{url}/v1/classify", json=big, timeout=30)
    assert r.status_code == 413 and "larger than 65536 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold on the streamed body too
        yield b'{"texts": ['
        for i in range(60):
            yield (b"," if i else b"") + b'"' + b"word " * 300 + b'"'
        yield b"]}"

    r = requests.post(f"{url}/v1/classify", data=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert requests.post(f"{url}/v1/classify", json={"text": "still serving"}, timeout=30).status_code == 200


def test_a_new_bundle_rolls_out_through_user_config_without_failing_requests(url, bundles, http_dir):
    """The new bundle comes from a URI (a directory served over HTTP): each replica fetches it into its cache."""
    a, (dir_b, b) = bundles["a"][1], bundles["b"]
    root, base, _ = http_dir
    shutil.copytree(dir_b, root / "b")
    path_b = f"{base}/b"
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            r = requests.post(f"{url}/v1/classify", json={"text": "The striker scored twice"}, timeout=60)
            seen.append((r.status_code, r.json().get("model_version") if r.ok else r.text))

    t = threading.Thread(target=traffic)
    t.start()
    try:
        while len(seen) < 5:
            time.sleep(0.05)
        # serve.run gives each deployment a new code version, so Serve replaces the replicas a few at a time (a
        # `serve deploy` that changes only Fusion's user_config reconfigures them in place, docs/serving.md)
        deploy({"bundle": path_b, "limits": LIMITS})
        after = len(seen)
        while len(seen) < after + 10:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert all(code == 200 for code, _ in seen), [s for s in seen if s[0] != 200][:3]
    versions = [v for _, v in seen]
    assert versions[0] == a.version and versions[-1] == b.version
    switch = versions.index(b.version)
    assert set(versions[switch:]) == {b.version}  # once live, the new bundle answers every request
    assert requests.get(f"{url}/v1/model", timeout=30).json()["bundle"] == path_b


def test_llm_path_over_capacity_503_and_a_replica_killed_mid_request(serve_url, encoder, bbc, bbc_emb, tmp_path):
    """Fusion takes one request at a time with one queued: the rest get 503 + Retry-After, not a queue."""
    train = sample(bbc["train"], 150, seed=2)
    classes = sorted(bbc["train"]["label"].unique())
    truth = dict(zip(train["text"], train["label"], strict=True))
    with StubServer(classes, answer=lambda text: classes.index(truth.get(text, "tech"))) as stub:
        llm = {"name": "paid", "provider": "custom", "model": "m", "base_url": stub.base_url, "price_input": 1.0}
        cfg = {"encoder": {"max_length": TEST_MAX_LENGTH}, "llms": [llm], "llm_limits": {"cache": False}}
        clf = AutoFusionClassifier(cfg, encoder=encoder).fit(train, validation=sample(bbc["val"], 60))
        clf.save(tmp_path / "llm-model")
        stub.latency_s = 1.0
        one = {"num_replicas": 1, "autoscaling_config": None}
        deploy(
            {"bundle": str(tmp_path / "llm-model")},
            {"Fusion": {**one, "max_ongoing_requests": 1, "max_queued_requests": 1}},
        )
        try:
            r = requests.post(f"{serve_url}/v1/classify", json={"text": "Parliament passed the bill"}, timeout=60)
            res = r.json()["results"][0]
            assert res["llm_used"] and res["llm_cost_usd"] > 0 and not res["gated_out"]
            off = requests.post(f"{serve_url}/v1/classify", json={"text": "a text", "llm": "off"}, timeout=60)
            assert not off.json()["results"][0]["llm_used"] and off.json()["llm_cost_usd"] == 0

            codes, retry = [], []

            def call(i):
                r = requests.post(f"{serve_url}/v1/classify", json={"text": f"request {i}", "llm": "all"}, timeout=60)
                codes.append(r.status_code)
                retry.append(r.headers.get("Retry-After"))

            threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

            # the Fusion replica dies while a request waits on the LLM
            died: list[requests.Response] = []
            headers = {"X-Request-ID": "killed-mid-request"}
            body = {"text": "in flight", "llm": "all"}
            t = threading.Thread(target=lambda: died.append(requests.post(f"{serve_url}/v1/classify", json=body,
                                                                          headers=headers, timeout=60)))  # fmt: skip
            seen = stub.requests
            t.start()
            deadline = time.monotonic() + 30
            while stub.requests == seen and time.monotonic() < deadline:  # until Fusion waits on the LLM
                time.sleep(0.02)
            [fusion] = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#Fusion" in a["name"]]
            ray.kill(ray.get_actor(fusion["name"], namespace=fusion["namespace"]))
            t.join()
        finally:
            serve.delete(APP)
    assert sorted(set(codes)) == [200, 503], codes
    assert all(ra == "1" for code, ra in zip(codes, retry, strict=True) if code == 503)
    assert 1 <= codes.count(200) <= 3  # one running, one queued (a third may slip in as the first finishes)
    # the process that would answer is gone: Serve's proxy answers 500, and leaks nothing of the replica
    assert died[0].status_code == 500 and died[0].text == "Internal Server Error", died[0].text


def test_a_two_stage_bundle_serves_what_the_library_predicts(serve_url, two_stage_bundle, bbc):
    """Fusion loads the fine-tuned encoder with its classification layer and feeds its logits to the head."""
    path, clf = two_stage_bundle
    texts = sample(bbc["test"], 5, seed=4)["text"].str.slice(0, 1500).tolist()
    deploy({"bundle": path, "limits": LIMITS})
    try:
        r = requests.post(f"{serve_url}/v1/classify", json={"texts": texts}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == clf.version
        got = np.array([[res["probabilities"][c] for c in clf.classes] for res in body["results"]])
        np.testing.assert_allclose(got, clf.predict_proba(texts), atol=1e-4)
    finally:
        serve.delete(APP)
