"""serve/config.yaml, the application args and the `labelfuse dev-kafka` command."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from fusion.errors import ConfigError
from fusion.llm.local import free_port
from serve.dev_kafka import DEV_CLIENT, _listening
from serve.settings import parse_settings

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration  # a real Ray runtime, broker or local LLM


def test_bad_application_args_name_every_field():
    with pytest.raises(ConfigError) as err:
        parse_settings({"bundle": "m", "limits": {"max_texts": 0}, "kafka": {"input_topics": [], "colour": 1}})
    msg = str(err.value)
    for field in ("limits.max_texts", "kafka.bootstrap_servers", "kafka.input_topics", "kafka.colour"):
        assert field in msg, msg
    assert parse_settings({"bundle": "m", "kafka": {
        "bootstrap_servers": "a:1, b:2", "input_topics": ["t"], "output_topic": "o", "dead_letter_topic": "d",
    }}).kafka.bootstrap_servers == ["a:1", "b:2"]  # fmt: skip


def test_dev_kafka_command_runs_a_broker_until_sigterm():
    port = free_port()
    topic = f"t-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusion.cli", "dev-kafka", "--port", str(port), "--topics", topic, "--partitions", "2"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in line and topic in line, line
        p = KafkaProducer(bootstrap_servers=f"127.0.0.1:{port}")
        p.send(topic, value=json.dumps({"text": "hello"}).encode()).get(timeout=30)
        p.close()
        c = KafkaConsumer(topic, bootstrap_servers=f"127.0.0.1:{port}", auto_offset_reset="earliest", **DEV_CLIENT)
        got = [r.value for rs in c.poll(10_000).values() for r in rs]
        c.close()
        assert got == [b'{"text": "hello"}']
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0
    assert not _listening(port)  # the broker went with it


@pytest.mark.slow
def test_labelfuse_serve_one_command_serves_http_and_tags_kafka(bbc_model, tmp_path):
    """`labelfuse serve --dev-kafka`: its own Ray, a local broker and the app; SIGTERM stops them."""
    import requests

    bbc_model.save(tmp_path / "model")
    port, kafka_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "fusion.cli", "serve", "--bundle", str(tmp_path / "model"), "--address", "local"]
    cmd += ["--port", str(port), "--dev-kafka", "--kafka-port", str(kafka_port)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env, start_new_session=True)
    try:
        lines = []
        while not lines or lines[-1] != "Ctrl-C stops it.\n":
            lines.append(proc.stdout.readline())
            assert lines[-1], f"labelfuse serve exited early: {lines}"
        r = requests.post(f"http://127.0.0.1:{port}/v1/classify", json={"text": "The striker scored twice"}, timeout=60)
        assert (
            r.status_code == 200
            and r.json()["results"][0]["label"] == bbc_model.predict(["The striker scored twice"])[0]
        )

        bootstrap = f"127.0.0.1:{kafka_port}"
        p = KafkaProducer(bootstrap_servers=bootstrap)
        p.send("labelfuse-in", key=b"k1", value=json.dumps({"id": 7, "text": "Parliament passed the budget"}).encode())
        p.flush()
        p.close()
        c = KafkaConsumer("labelfuse-out", bootstrap_servers=bootstrap, auto_offset_reset="earliest", **DEV_CLIENT)
        got = []
        for _ in range(60):
            got += [json.loads(m.value) for ms in c.poll(1000).values() for m in ms]
            if got:
                break
        c.close()
        assert [(g["key"], g["id"]) for g in got] == [("k1", 7)] and got[0]["label"] in bbc_model.classes
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(90)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left behind in its session
    assert rc == 0
    assert not _listening(kafka_port)
