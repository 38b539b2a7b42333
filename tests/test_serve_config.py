"""serve/config.yaml, the application args and the `labelfuse dev-kafka` command."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from fusion.cli import main
from fusion.errors import ConfigError
from fusion.llm.local import free_port
from serve.dev_kafka import DEV_CLIENT, _listening
from serve.settings import client_options, parse_settings

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
        assert f"127.0.0.1:{port}" in line and topic in line and f"(pid {proc.pid})" in line, line  # the PID to kill
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

    # a broker that dies by itself ends the command, saying so, instead of leaving it waiting on nothing
    proc = subprocess.Popen([sys.executable, "-m", "fusion.cli", "dev-kafka", "--port", str(port), "--topics", topic],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    try:
        assert "127.0.0.1" in proc.stdout.readline()
        broker = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(broker[0]), signal.SIGKILL)
        assert proc.wait(20) == 1 and "the broker stopped by itself" in proc.stderr.read()
    finally:
        proc.kill()


@pytest.mark.slow
def test_labelfuse_serve_joins_a_running_serve_and_stops_only_what_it_started(bbc_model, serve_url, tmp_path, capsys):
    """`labelfuse serve --dev-kafka` on a Ray already running Serve (this session's): the app goes beside the
    others under its name and prefix, on Serve's own port, answers HTTP and tags Kafka; SIGTERM removes the app
    and the broker and leaves Serve running. (`labelfuse demo` runs the same code on a Ray and Serve of its own.)"""
    import ray
    import requests
    from ray import serve

    from serve.app import serving

    bbc_model.save(tmp_path / "model")
    refused = [
        (["--route-prefix", "cli"], "--route-prefix must start with '/', got 'cli'"),
        # Kafka options without a broker to tag were ignored: the app served HTTP only
        (["--input-topic", "tickets", "--group", "g"], "--input-topic, --group: Kafka tagging needs --dev-kafka or"),
        (["--kafka-bootstrap", "h:9092", "--kafka-port", "9093"], "--kafka-port: the port of the --dev-kafka broker"),
    ]
    for extra, words in refused:
        assert main(["serve", "--bundle", str(tmp_path / "model"), *extra]) == 2
        assert words in capsys.readouterr().err
    kafka_port = free_port()
    cmd = [sys.executable, "-m", "fusion.cli", "serve", "--bundle", str(tmp_path / "model")]
    cmd += ["--address", ray.get_runtime_context().gcs_address, "--name", "cli-app", "--route-prefix", "/cli"]
    cmd += ["--dev-kafka", "--kafka-port", str(kafka_port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    try:
        lines = []
        while not lines or lines[-1] != "Ctrl-C stops it.\n":
            lines.append(proc.stdout.readline())
            assert lines[-1], f"labelfuse serve exited early: {lines}"
        assert f"at {serve_url}/cli (docs: {serve_url}/cli/docs)" in lines[0], lines  # Serve's port, not --port's
        r = requests.post(f"{serve_url}/cli/v1/classify", json={"text": "The striker scored twice"}, timeout=60)
        assert (
            r.status_code == 200
            and r.json()["results"][0]["label"] == bbc_model.predict(["The striker scored twice"])[0]
        )
        with pytest.raises(ConfigError, match="an application named 'cli-app' is already running"):
            with serving({"bundle": "unused"}, address=None, host="127.0.0.1", port=8000, name="cli-app"):
                pass

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
                os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0
    assert not _listening(kafka_port)
    assert "cli-app" not in serve.status().applications
    assert requests.get(f"{serve_url}/-/healthz", timeout=10).status_code == 200  # Serve itself goes on


def test_kafka_client_settings_are_checked_by_name_and_secrets_come_from_the_environment(monkeypatch):
    def app(**extra):
        return {"bundle": "m", "kafka": {"bootstrap_servers": "b:1", "input_topics": ["in"], "output_topic": "out",
                                         "dead_letter_topic": "dead", **extra}}  # fmt: skip

    cases = {
        "kafka.client.sasl_plain_pasword": {"client": {"sasl_plain_pasword": "x"}},  # a typo names its fix
        "did you mean 'sasl_plain_password'": {"client": {"sasl_plain_pasword": "x"}},
        "kafka.client.fetch_max_bytes: not a setting of both clients": {"client": {"fetch_max_bytes": 1}},
        "kafka.consumer.acks: set by labelfuse; use kafka.producer.acks": {"consumer": {"acks": 1}},
        "kafka.consumer.group_id: set by labelfuse; use kafka.group_id": {"consumer": {"group_id": "g"}},
        "kafka.consumer.enable_auto_commit: set by labelfuse": {"consumer": {"enable_auto_commit": True}},
        "kafka.producer.options.client_id: a setting of both clients": {"producer": {"options": {"client_id": "c"}}},
        "kafka.client.ssl_password_env: the name of an environment variable": {"client": {"ssl_password_env": 3}},
        "kafka.producer.acks": {"producer": {"acks": "most"}},
        "value_format avro needs schema_registry": {"value_format": "avro"},
        "schema_registry is used by value_format avro or json_schema only": {"schema_registry": {"url": "http://r"}},
    }
    for message, extra in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_settings(app(**extra))
    s = parse_settings(app(
        client={"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "tagger",
                "sasl_plain_password_env": "LF_TEST_KAFKA_PASSWORD"},
        consumer={"fetch_max_bytes": 1 << 20}, producer={"compression_type": "gzip", "options": {"retries": 5}},
    )).kafka  # fmt: skip
    assert s.producer.acks == "all" and s.producer.linger_ms == 5  # the safe defaults
    with pytest.raises(ConfigError, match="LF_TEST_KAFKA_PASSWORD, which is not set on this node"):
        client_options(s.client, "kafka.client")
    monkeypatch.setenv("LF_TEST_KAFKA_PASSWORD", "s3cret")
    resolved = client_options(s.client, "kafka.client")
    assert resolved["sasl_plain_password"] == "s3cret" and "sasl_plain_password_env" not in resolved
    from kafka.codec import has_lz4

    if not has_lz4():  # said when the tagger starts, not when its first result is produced
        with pytest.raises(ConfigError, match="compression_type lz4 needs the Python package lz4"):
            parse_settings(app(producer={"compression_type": "lz4"})).kafka.producer.check_codec()
