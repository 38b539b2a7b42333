"""`labelfuse demo` (what `make demo` runs), end to end on a small sample: real training with the local
SmolLM2 LLM, a real local Ray, Serve application, Kafka-protocol broker and HTTP. The full-size run is
`make demo` itself."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_MAX_LENGTH

from fusion.classifier import AutoFusionClassifier
from serve.dev_kafka import _listening

N = 30

pytestmark = pytest.mark.integration  # a real Ray runtime, broker or local LLM


@pytest.mark.slow
def test_demo_trains_serves_streams_reports_and_stops_only_what_it_started(ray_local, tmp_path):
    import ray

    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "fusion.cli", "-q", "demo", "--output", str(out), "--limit", str(N),
           "--llm", "local:smollm2-135m", "--llm-fraction", "0.15", "--gate-rate", "0.15",
           "--max-length", str(TEST_MAX_LENGTH)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=os.environ
    )
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]

    # the final table: both paths, every test text
    lines = {ln.split("  ")[0]: ln for ln in stdout.splitlines()}
    assert "kafka: gated fusion" in lines and "encoder only" in lines, stdout
    report = json.loads((out / "report" / "report.json").read_text())
    fused, base = report["tables"]["Demo paths"]
    assert fused["texts"] == base["texts"] == N
    assert fused["accuracy"] > 0.6 and base["accuracy"] > 0.6
    assert 0 < fused["llm_answers"] <= N // 2 and base["llm_answers"] == 0
    assert 0 <= fused["llm_calls"] <= fused["llm_answers"]
    assert fused["p50_s"] <= fused["p99_s"] and fused["msg_per_s"] > 0
    results = [json.loads(x) for x in (out / "report" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in results) == list(range(N))
    for name in ("report.md", "reliability.png", "confusion_matrix.png"):
        assert (out / "report" / name).stat().st_size > 0
    assert str(out / "report" / "report.md") in stdout
    assert AutoFusionClassifier.load(out / "model").version == results[0]["model_version"]

    # it stopped what it started (its Ray is in its process group, the broker on its own port) and nothing else
    try:
        os.killpg(proc.pid, 0)
        leftover = True
    except ProcessLookupError:
        leftover = False
    assert not leftover, "processes of the demo's process group are still running"
    port = int(re.search(r"on 127\.0\.0\.1:(\d+)", stderr).group(1))
    assert not _listening(port)
    assert ray.get(ray.remote(lambda: 1).remote()) == 1  # the Ray this session started is untouched


def test_demo_rejects_bad_arguments(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "fusion.cli", "demo", "--gate-rate", "1.5", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--gate-rate" in r.stderr
    assert not Path(tmp_path / "model").exists()
