"""The web page the Serve app serves at /, in a real headless Chromium (Debian's chromium and chromium-driver,
driven by selenium) against the running app: the token entered once, a classification's bars, a bad input's
error, and the Kafka view filling up from a real broker. Screenshots go to the test's directory, and to docs/
with LABELFUSE_UPDATE_SCREENSHOTS=1. The same app checks the API's bearer token over plain HTTP."""

import json
import os
import shutil
import uuid

import pytest
import requests
from conftest import sample
from kafka import KafkaProducer
from ray import serve

from serve.app import build
from serve.dev_kafka import create_topics, dev_kafka_args

pytestmark = [pytest.mark.integration, pytest.mark.slow]
APP = "labelfuse-page"
TOKEN = "page-test-token"
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromedriver = shutil.which("chromedriver")
    if chromedriver is None or shutil.which("chromium") is None:
        if os.environ.get("LABELFUSE_REQUIRE_SYSTEM_TOOLS"):
            pytest.fail("chromium / chromedriver are not installed (Debian packages chromium, chromium-driver)")
        pytest.skip("apt install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def app(serve_url, kafka_broker, bbc_model, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("page") / "model"
    bbc_model.save(bundle)
    run = uuid.uuid4().hex[:6]
    topics = [f"page-{run}-{t}" for t in ("in", "out", "dead")]
    create_topics(kafka_broker.bootstrap, topics, 1)
    kafka = dev_kafka_args(kafka_broker.bootstrap, topics, f"page-{run}", batch_size=32)
    env = {"runtime_env": {"env_vars": {"LABELFUSE_PAGE_TOKEN": TOKEN}}}
    settings = {"bundle": str(bundle), "kafka": kafka, "auth_token_env": "LABELFUSE_PAGE_TOKEN"}
    serve.run(build(settings, {"Fusion": {"ray_actor_options": {"num_cpus": 1, **env}}}), name=APP, route_prefix="/")
    yield {"url": serve_url, "topic": topics[0], "bootstrap": kafka_broker.bootstrap, "model": bbc_model}
    serve.delete(APP)


def screenshot(driver, tmp_path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / name))
    if os.environ.get("LABELFUSE_UPDATE_SCREENSHOTS"):
        shutil.copy(tmp_path / name, os.path.join(DOCS, name))


def test_the_page_classifies_shows_errors_and_watches_kafka(browser, app, bbc, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d, wait = browser, WebDriverWait(browser, 60)
    d.get(app["url"] + "/")
    assert d.title == "labelfuse"
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), "401"))  # no token yet: the page says so

    token = d.find_element(By.ID, "token")
    token.send_keys(TOKEN + "\n")  # entered once; the page keeps it for the session
    token.send_keys("\t")
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), app["model"].version))

    texts = sample(bbc["test"], 2, seed=5)["text"].str.slice(0, 600).tolist()
    d.find_element(By.ID, "per-line").click()
    d.find_element(By.ID, "texts").send_keys("\n".join(t.replace("\n", " ") for t in texts))
    Select(d.find_element(By.ID, "llm")).select_by_visible_text("off")
    d.find_element(By.ID, "classify").click()
    wait.until(lambda drv: len(drv.find_elements(By.CSS_SELECTOR, "#results .card")) == 2)
    cards = d.find_elements(By.CSS_SELECTOR, "#results .card")
    model = app["model"]
    want = model.predict_proba([t.replace("\n", " ") for t in texts])
    for card, probs, label in zip(cards, want, model.predict([t.replace("\n", " ") for t in texts]), strict=True):
        assert card.find_element(By.TAG_NAME, "h3").text == label
        bars = card.find_elements(By.CSS_SELECTOR, ".bar")
        assert [b.get_attribute("data-label") for b in bars] == model.classes
        widths = [float(b.value_of_css_property("width").removesuffix("px")) for b in bars]
        assert max(range(len(widths)), key=widths.__getitem__) == int(probs.argmax())  # the longest bar wins
        assert "LLM not asked" in card.find_element(By.CLASS_NAME, "llm").text
    assert "ms in the model" in d.find_element(By.ID, "timing").text
    screenshot(d, tmp_path, "page-classify.png")

    d.find_element(By.ID, "per-line").click()
    d.find_element(By.ID, "texts").clear()  # an empty text: the app answers 422 and the page shows why
    d.find_element(By.ID, "classify").click()
    error = wait.until(ec.visibility_of_element_located((By.ID, "error")))
    assert error.text.startswith("422") and "text 0" in error.text
    assert not d.find_elements(By.CSS_SELECTOR, "#results .card")

    producer = KafkaProducer(bootstrap_servers=app["bootstrap"])
    for i, text in enumerate(sample(bbc["test"], 120, seed=6)["text"].str.slice(0, 400)):
        producer.send(app["topic"], json.dumps({"id": i, "text": text}).encode())
    producer.flush()
    producer.close()
    d.find_element(By.ID, "tab-live").click()
    wait = WebDriverWait(d, 180)
    wait.until(lambda drv: int(drv.find_element(By.ID, "window").text) >= 102)  # 120 from Kafka, 2 from the page
    wait.until(lambda drv: drv.find_element(By.ID, "drift").text not in ("", "–"))
    assert float(d.find_element(By.ID, "drift").text) >= 0
    assert d.find_element(By.ID, "calls").text == "no LLM" and d.find_element(By.ID, "budget").text == "no budget"
    assert len(d.find_elements(By.CSS_SELECTOR, "#mix .bar[data-label]")) == len(model.classes)
    wait.until(lambda drv: "120 tagged" in drv.find_element(By.ID, "kafka").text)
    screenshot(d, tmp_path, "page-live.png")


def test_bearer_token_auth(app):
    """The app of the page test (its token in Fusion's environment): no browser needed."""
    url, body = app["url"], {"text": "Parliament passed the bill"}
    r = requests.post(f"{url}/v1/classify", json=body, timeout=30)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    r = requests.post(f"{url}/v1/classify", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert r.status_code == 403 and "invalid API token" in r.text
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.post(f"{url}/v1/classify", json=body, headers=ok, timeout=30).status_code == 200
    assert requests.get(f"{url}/v1/model", timeout=30).status_code == 401
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # probes need no token
