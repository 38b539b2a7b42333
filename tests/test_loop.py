"""The learning loop's library parts: the label store, the registry, soft-label training, retrain and selection.

Real parts only: parquet parts on disk, the real encoder, real bbc-news texts. No Ray, broker or LLM
(the LLM answers here are written into the store as a teacher would; the Serve and LLM paths are in
tests/test_learning_loop.py).
"""

import json
import threading

import numpy as np
import pytest
from conftest import TEST_MAX_LENGTH, class_ids, sample
from fuzz import budget
from hypothesis import given
from hypothesis import strategies as st

from fusion.bootstrap import coverage, least_certain
from fusion.classifier import AutoFusionClassifier
from fusion.config import EncoderConfig
from fusion.encoder import TextEncoder
from fusion.errors import ConfigError, DataError
from fusion.labels import LabelSpace
from fusion.labelstore import LabelRecord, LabelStore, human_label, llm_labels
from fusion.loop import LoopSettings, examples, retrain
from fusion.registry import Registry, resolve_bundle
from fusion.texts import text_id

CLASSES = ["business", "entertainment", "politics", "sports", "tech"]
FAST = {"encoder": {"max_length": 64}, "labels": {"classes": CLASSES}}


# -- the label store ---------------------------------------------------------------------------------------------
def test_records_newer_than_a_part_are_counted_through_compactions(tmp_path):
    """A retrain's watermark is the newest part it read; compacting (twice) must not make old records new."""
    store = LabelStore(tmp_path / "labels")
    names = [store.append([human_label(f"text {i} {j}", "sport") for j in range(i + 1)]) for i in range(3)]
    assert store.count_after(names[0]) == 5 and store.count_after(None) == 6
    store.compact()
    watermark = store.stats()["newest_part"]
    assert watermark == names[-1] and store.count_after(names[0]) == 5 and store.count_after(watermark) == 0
    store.append([human_label("text new", "sport")])
    store.compact()
    assert len(store.parts()) == 1 and store.count_after(watermark) == 1 and store.count_after(names[1]) == 4


def test_a_human_label_wins_and_a_label_written_twice_is_one(tmp_path):
    store = LabelStore(tmp_path / "labels")
    assert store.labels().empty and store.stats()["labels"] == 0
    scores = np.array([[0.1, 0.1, 0.6, 0.1, 0.1], [np.nan] * 5, [0.7, 0.1, 0.1, 0.05, 0.05]])
    store.append(llm_labels(["a", "b", "c"], scores, CLASSES, False, llm="teacher", bundle_version="v1"))
    store.append([human_label("a", "tech", label_id="fb-1")])
    store.append([human_label("a", "sports", label_id="fb-1")])  # a retry that changed its mind: the later wins
    labels = store.labels().set_index("text_id")
    assert len(labels) == 2  # b had no answer (a NaN row): nothing kept
    a, c = labels.loc[text_id("a")], labels.loc[text_id("c")]
    assert a["source"] == "human" and a["labels"] == ["sports"] and a["label_id"] == "fb-1"
    assert a["llm"] == "teacher" and a["llm_scores"]["politics"] == pytest.approx(0.6)  # the answer stays beside
    assert c["source"] == "llm" and c["labels"] == ["business"]
    st_ = store.stats()
    assert (st_["parts"], st_["records"], st_["labels"], st_["human"], st_["llm"]) == (3, 4, 2, 1, 1)
    raw = store.records()
    assert raw.loc[raw["source"] == "llm", "bundle_version"].eq("v1").all()


def test_unfinished_writes_are_invisible_and_compaction_keeps_the_labels(tmp_path):
    store = LabelStore(str(tmp_path))
    store.append([human_label(f"text {i}", CLASSES[i % 5], label_id=f"id-{i}") for i in range(10)])
    store.append([human_label("text 3", "tech", label_id="id-3")])
    (tmp_path / ".part-99999999999999999999-dead.parquet.tmp").write_bytes(b"PAR1 half a part")  # a writer died
    (tmp_path / "notes.txt").write_text("not a part")
    before = store.labels()
    assert len(before) == 10 and store.stats()["records"] == 11
    assert store.compact() == 2 and len(store.parts()) == 1
    after = store.labels()
    assert after.drop(columns="llm_scores").equals(before.drop(columns="llm_scores"))
    assert store.stats()["records"] == 11  # compaction keeps what was written; the rules apply at reading


def test_bad_labels_and_uris_are_refused_with_the_reason(tmp_path):
    with pytest.raises(DataError, match="empty"):
        human_label("   ", "tech")
    with pytest.raises(DataError, match="source"):
        LabelRecord("x", "robot", ["tech"]).row()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="label store"):
        LabelStore("nosuchscheme://bucket/labels")


# Each op appends one part: records (kind, text index, label id index or None, class index).
OPS = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from(["human", "llm"]), st.integers(0, 4), st.none() | st.integers(0, 3), st.integers(0, 4)
        ),
        min_size=1,
        max_size=4,
    ),
    min_size=1,
    max_size=6,
)


@given(ops=OPS)
@budget(40)
def test_fuzzed_appends_follow_the_rules(tmp_path_factory, ops):
    """Whatever the order of writes: one row per text; a human label over an LLM's; the later of the same id."""
    store = LabelStore(tmp_path_factory.mktemp("store"))
    written = []  # (label_id, text, source, label) in write order
    for part in ops:
        records = []
        for kind, t, lid, c in part:
            text = f"text number {t}"
            if kind == "human":
                r = human_label(text, CLASSES[c], label_id=None if lid is None else f"h{lid}")
            else:
                p = np.full((1, 5), 0.05)
                p[0, c] = 0.8
                [r] = llm_labels([text], p, CLASSES, False, llm="teacher")
            records.append(r)
            written.append((r.key, text, kind, CLASSES[c]))
        store.append(records)
    last = {lid: (i, text, kind, label) for i, (lid, text, kind, label) in enumerate(written)}
    expected = {}
    for _, text, kind, label in sorted(last.values()):
        prev = expected.get(text)
        if prev is None or (kind == "human") >= (prev[0] == "human"):
            expected[text] = (kind, label)
    got = {row.text: (row.source, row.labels[0]) for row in store.labels().itertuples()}
    assert got == expected
    store.compact()
    assert {row.text: (row.source, row.labels[0]) for row in store.labels().itertuples()} == expected


# -- the registry ------------------------------------------------------------------------------------------------
def test_registry_promotes_refuses_and_rolls_back(tmp_path, bbc_model, encoder):
    reg = Registry(tmp_path / "reg")
    a = bbc_model.save(tmp_path / "a")
    other = AutoFusionClassifier(bbc_model.config.model_copy(update={"train": bbc_model.config.train.model_copy(
        update={"seed": 3, "max_epochs": 2})}), encoder=encoder)  # fmt: skip
    b = other.fit(["a b c", "d e f", "g h i", "j k l"] * 5, ["x", "y"] * 10).save(tmp_path / "b")
    with pytest.raises(ConfigError, match="no earlier champion"):
        reg.rollback()
    va, vb = reg.register(a), reg.register(b)
    assert reg.register(a) == va and reg.versions() == sorted([va, vb])
    reg.promote(va)
    assert resolve_bundle(reg.root) == reg.bundle_path(va) and resolve_bundle(a) == a
    reg.refuse(vb, {"reason": "worse"})
    assert reg.champion() == va
    reg.promote(vb, {"reason": "better"})
    assert reg.champion() == vb and reg.rollback() == va and reg.champion() == va
    events = [e["event"] for e in reg.state()["history"]]
    assert events == ["promote", "refuse", "promote", "rollback"]
    report = json.loads((reg.root / reg.state()["history"][1]["report"]).read_text())
    assert report == {"reason": "worse"}
    with pytest.raises(ConfigError, match="no earlier champion"):
        reg.rollback()


def test_concurrent_promotions_lose_no_event(tmp_path, bbc_model):
    reg = Registry(tmp_path / "reg")
    v = reg.register(bbc_model.save(tmp_path / "a"))
    threads = [threading.Thread(target=lambda: [reg.refuse(v, {"n": 1}) for _ in range(10)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reg.state()["history"]) == 40


# -- soft labels and retraining ------------------------------------------------------------------------------------
def test_soft_labels_train_a_model_and_bad_ones_are_refused(bbc, bbc_emb, encoder):
    y = class_ids(bbc["train"], CLASSES)
    soft = np.full((len(y), 5), 0.1, np.float32)
    soft[np.arange(len(y)), y] = 0.6
    clf = AutoFusionClassifier(
        {"labels": {"classes": CLASSES}, "encoder": {"max_length": TEST_MAX_LENGTH}}, encoder=encoder
    )
    weights = np.where(np.arange(len(y)) % 2 == 0, 1.0, 0.2)
    clf.fit(bbc["train"]["text"], soft_labels=soft, sample_weight=weights, embeddings=bbc_emb["train"])
    pred = clf.predict(bbc["test"]["text"], embeddings=bbc_emb["test"])
    assert np.mean(np.array(pred) == bbc["test"]["label"].to_numpy()) > 0.9
    texts = ["a", "b", "c"]
    with pytest.raises(ConfigError, match=r"labels\.classes"):
        AutoFusionClassifier(encoder=encoder).fit(texts, soft_labels=np.ones((3, 5)) / 5)
    with pytest.raises(DataError, match="shape"):
        clf.fit(texts, soft_labels=np.ones((3, 4)) / 4)
    with pytest.raises(DataError, match="probabilities"):
        clf.fit(texts, soft_labels=np.full((3, 5), np.nan))
    with pytest.raises(DataError, match="sample_weight"):
        clf.fit(texts, soft_labels=np.ones((3, 5)) / 5, sample_weight=[1, -1, 1])


def test_examples_weight_people_above_llms_and_unsure_answers_less():
    import pandas as pd

    rows = pd.DataFrame(
        {
            "text_id": ["1", "2", "3", "4"],
            "text": ["w", "x", "y", "z"],
            "source": ["human", "llm", "llm", "human"],
            "labels": [["tech"], ["sports"], ["tech"], ["no such class"]],
            "llm_scores": [None, {c: 0.2 for c in CLASSES}, {**{c: 0.025 for c in CLASSES}, "tech": 0.9}, None],
            "llm": [None, "t", "other", None],
        }
    )
    ex = examples(rows, LabelSpace(CLASSES, False), ("t",), human_weight=3.0)
    assert ex.texts == ["w", "x", "y"] and ex.skipped == 1
    assert ex.weights == pytest.approx([3.0, 0.2, 0.9])
    assert ex.targets[0].tolist() == [0, 0, 0, 0, 1] and ex.targets[2].argmax() == 4
    # the LLM block of the features: that LLM's stored answer, NaN for a person's label or another LLM's
    assert np.isnan(ex.scores["t"][[0, 2]]).all() and ex.scores["t"][1] == pytest.approx([0.2] * 5)


def test_retrain_promotes_a_better_challenger_refuses_a_worse_one_and_skips_without_new_labels(tmp_path, bbc):
    rows = sample(bbc["train"], 200, seed=4)
    store, reg = LabelStore(tmp_path / "labels"), Registry(tmp_path / "reg")
    rng = np.random.default_rng(0)
    y = class_ids(rows, CLASSES)
    noisy = np.where(rng.random(len(y)) < 0.6, y, rng.integers(0, 5, len(y)))  # a teacher right 2/3 of the time
    answers = np.full((len(y), 5), 0.1)
    answers[np.arange(len(y)), noisy] = 0.6
    store.append(llm_labels(rows["text"].tolist(), answers, CLASSES, False, llm="teacher"))

    first = retrain(store, reg, config=FAST)
    assert first["decision"] == "promote" and first["reason"] == "no champion yet"
    n = len(set(rows["text"]))  # one label per text, and bbc-news repeats a few articles
    assert first["embeddings"] == {"cached": 0, "embedded": n}
    assert first["holdout"]["kind"].startswith("agreement with the LLM")
    assert reg.champion() == first["challenger"]

    store.append(
        human_label(t, lab, label_id=f"p{i}")
        for i, (t, lab) in enumerate(zip(rows["text"], rows["label"], strict=True))
    )
    skipped = retrain(store, reg, LoopSettings(min_new_labels=500))
    assert skipped["decision"] == "skip" and reg.champion() == first["challenger"]
    assert store.compact() == 2  # the compacted part holds the champion's labels and the new ones
    skipped = retrain(store, reg, LoopSettings(min_new_labels=len(rows) + 1))  # every record counted as new before
    assert skipped["reason"] == f"{len(rows)} new label(s) since the last retrain; retraining needs {len(rows) + 1}"

    better = retrain(store, reg)
    assert better["embeddings"] == {"cached": n, "embedded": 0}  # people labelled texts it had embedded
    assert better["holdout"]["kind"] == "human labels" and better["decision"] == "promote", better
    assert better["challenger_scores"]["accuracy"] > better["champion_scores"]["accuracy"]
    assert better["trained_on"]["human"] > 100 and reg.champion() == better["challenger"]

    untrained = ["train.max_epochs=1", "train.learning_rate=1e-7"]  # an untrained head, on purpose
    worse = retrain(store, reg, overrides=untrained)  # on the champion's config: its encoder, so its cache
    assert worse["decision"] == "refuse" and reg.champion() == better["challenger"], worse
    assert worse["embeddings"] == {"cached": n, "embedded": 0}
    assert worse["challenger_scores"]["accuracy"] < worse["champion_scores"]["accuracy"]
    assert [e["event"] for e in reg.state()["history"]] == ["promote", "promote", "refuse"]
    assert worse["challenger"] in reg.versions()  # kept, as every challenger is
    again = retrain(store, reg, LoopSettings(min_new_labels=1))  # a schedule: the refused one is not trained again
    assert again["reason"] == "0 new label(s) since the last retrain; retraining needs 1"
    with pytest.raises(ConfigError, match="differ from the champion's"):  # it was ignored: the champion's stayed
        retrain(store, reg, overrides=["labels.classes=[sport,technology]"])


SHORT_TEXTS = [
    f"{w} news from the {p} today" for w in ("Market", "Match", "Film", "Vote") for p in ("city", "coast", "hills")
]


@given(calls=st.lists(st.lists(st.sampled_from(SHORT_TEXTS), max_size=8), min_size=1, max_size=5),
       max_rows=st.integers(1, 12))  # fmt: skip
@budget(15)
def test_the_embedding_cache_gives_the_encoders_vectors_and_stays_within_its_rows(encoder, calls, max_rows):
    import tempfile

    from fusion.embcache import EmbeddingCache

    with tempfile.TemporaryDirectory() as root:
        seen: set[str] = set()
        for texts in calls:
            cache = EmbeddingCache(root, encoder, max_rows)  # a new one each time: what a retrain finds on disk
            got = cache(texts)
            assert got.shape == (len(texts), encoder.dim)
            np.testing.assert_allclose(got, encoder.embed(texts), atol=1e-5)
            assert cache.stats["embedded"] <= len(set(texts))  # each new text once, however often it is in a call
            if set(texts) <= seen and len(seen) <= max_rows:  # nothing had to go: every text is found
                assert cache.stats == {"cached": len(texts), "embedded": 0}, (seen, texts)
            shards = list(cache.dir.glob("*.npz"))
            assert sum(len(np.load(s)["ids"]) for s in shards) <= max_rows
            seen |= set(texts)


def test_a_damaged_embedding_shard_is_removed_and_its_texts_embedded_again(tmp_path, encoder, caplog):
    from fusion.embcache import EmbeddingCache

    texts = SHORT_TEXTS[:5]
    EmbeddingCache(tmp_path, encoder, 100)(texts)
    (shard,) = tmp_path.glob("*/*.npz")
    shard.write_bytes(shard.read_bytes()[:100])  # cut short, as by a full disk
    cache = EmbeddingCache(tmp_path, encoder, 100)
    np.testing.assert_allclose(cache(texts), encoder.embed(texts), atol=1e-5)
    assert cache.stats == {"cached": 0, "embedded": 5} and not shard.exists()
    assert "cannot be used" in caplog.text
    again = EmbeddingCache(tmp_path, encoder, 100)
    assert again(texts[:2]).shape == (2, encoder.dim) and again.stats["cached"] == 2  # the new shard reads back
    other = TextEncoder(EncoderConfig(max_length=TEST_MAX_LENGTH // 2))
    assert EmbeddingCache(tmp_path, other, 100).dir != cache.dir  # another encoder never reads these vectors


# -- choosing what to ask --------------------------------------------------------------------------------------------
def test_coverage_picks_one_text_per_region_and_least_certain_the_unsure_ones():
    rng = np.random.default_rng(0)
    centres = np.eye(8, 16) * 10
    emb = np.concatenate([c + rng.normal(0, 0.1, (30, 16)) for c in centres]).astype(np.float32)
    picked = coverage(emb, 8)
    assert sorted(set(picked // 30)) == list(range(8))  # one from each of the 8 groups
    proba = np.array([[0.9, 0.1], [0.55, 0.45], [0.6, 0.4], [0.99, 0.01]])
    assert least_certain(proba, 2, np.array([0, 1, 2, 3]), False).tolist() == [1, 2]
    assert least_certain(proba, 1, np.array([0, 3]), False).tolist() == [0]


def test_bootstrap_refuses_what_it_cannot_learn_from(tmp_path, capsys):
    from fusion.cli import main

    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "classes.yaml").write_text("- a list\n- not a mapping\n")
    common = ["bootstrap", "--input", str(texts), "--output", str(tmp_path / "m"), "--ask", "10"]
    cases = [
        (["--classes", "sports"], "at least two classes"),
        (["--classes", "sports,politics"], "needs an LLM"),
        (["--classes-file", str(tmp_path / "classes.yaml"), "--llm", "local:smollm2-135m"], "mapping of class name"),
        (["--classes", "a,b", "--llm", "local:smollm2-135m", "--text-column", "body"], "body"),
        # before any LLM is asked (they were tracebacks after it had answered)
        (["--classes", "a,b", "--llm", "local:smollm2-135m", "--registry", str(texts)], "is a file"),
        (["--classes", "a,b", "--llm", "local:smollm2-135m", "--store", str(texts)], "is a file"),
    ]
    for extra, message in cases:
        assert main([*common, *extra]) == 2
        assert message in capsys.readouterr().err, extra


def test_labels_command_imports_counts_and_compacts(tmp_path, capsys):
    from fusion.cli import main

    (tmp_path / "reviewed.jsonl").write_text(
        '{"id": 1, "text": "Shares fell", "label": "business"}\n'
        '{"id": 2, "text": "", "label": "tech"}\n'  # refused alone: an empty text
        '{"id": 3, "text": "The striker scored", "label": null}\n'  # refused alone: no label
        '{"id": 4, "text": "Votes were counted", "label": "politics"}\n'
        '{"id": 5, "text": "Budget vote moves markets", "label": "business|politics"}\n'  # a label set, as in CSV
        '{"id": null, "text": "Chip sales rose", "label": "tech"}\n'  # no id: kept, and added again on re-import
    )
    store = str(tmp_path / "labels")
    argv = ["labels", "import", "--store", store, "--input", str(tmp_path / "reviewed.jsonl"), "--id-column", "id"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "imported 4 labels" in out.err and "refused 2 rows: row 1" in out.err and "row 2" in out.err
    assert main(argv) == 0  # the same ids again: still four labels
    capsys.readouterr()
    assert main(["labels", "compact", "--store", store]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["parts"], stats["records"], stats["labels"], stats["human"]) == (1, 8, 4, 4)
    from fusion.labelstore import LabelStore

    sets = {t: sorted(labels) for t, labels in LabelStore(store).labels()[["text", "labels"]].itertuples(index=False)}
    assert sets["Budget vote moves markets"] == ["business", "politics"] and sets["Shares fell"] == ["business"]
    assert main(["labels", "import", "--store", store]) == 2
    assert "needs --input" in capsys.readouterr().err
    assert main([*argv[:-1], "ticket"]) == 2
    assert "column(s) ['ticket'] not found" in capsys.readouterr().err
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "registry.json").write_text("{not json")
    assert main(["registry", "show", "--registry", str(tmp_path / "reg")]) == 2
    assert "registry.json is not valid JSON" in capsys.readouterr().err


def test_export_sends_people_the_disagreements_first_capped_per_day(tmp_path, bbc, bbc_model, capsys):
    import pandas as pd

    from fusion.cli import main

    rows = sample(bbc["test"], 40, seed=5)
    y = class_ids(rows, CLASSES)
    wrong = np.arange(len(y)) < 6  # the LLM is wrong on the first 6 texts, where the model is right
    answers = np.full((len(y), 5), 0.05)
    answers[np.arange(len(y)), np.where(wrong, (y + 1) % 5, y)] = 0.8
    store = LabelStore(tmp_path / "labels")
    store.append(llm_labels(rows["text"].tolist(), answers, CLASSES, False, llm="teacher"))
    store.append([human_label(rows["text"].iloc[7], rows["label"].iloc[7])])  # a person labelled it: not sent
    reg = Registry(tmp_path / "reg")
    reg.promote(reg.register(bbc_model.save(tmp_path / "model")))

    argv = ["labels", "export", "--store", store.uri, "--registry", str(reg.root), "--count", "6"]
    assert main([*argv, "--max-per-day", "10", "--output", str(tmp_path / "ask.jsonl")]) == 0
    first = pd.read_json(tmp_path / "ask.jsonl", lines=True)
    model = np.array(bbc_model.predict(rows["text"], llm="off"))
    llm = np.array(CLASSES)[answers.argmax(axis=1)]
    disagree = set(rows["text"][model != llm])
    assert len(disagree) >= 6 and set(first["text"]) <= disagree  # disagreements first
    assert all("disagree" in r for r in first["reason"])
    assert main([*argv, "--max-per-day", "10", "--output", str(tmp_path / "ask2.jsonl")]) == 0
    second = pd.read_json(tmp_path / "ask2.jsonl", lines=True)
    assert len(second) == 4 and set(second["text_id"]).isdisjoint(first["text_id"])  # 10 a day, none twice
    assert text_id(rows["text"].iloc[7]) not in set(second["text_id"])
    assert main([*argv, "--max-per-day", "10", "--output", str(tmp_path / "ask3.jsonl")]) == 0
    assert "exported 0 texts" in capsys.readouterr().err
    assert len(store.exported()) == 10
    assert main([*argv, "--output", "x.jsonl", "--topic", "t"]) == 2


def test_a_store_of_a_few_peoples_labels_is_compared_on_them(tmp_path, bbc):
    """Under --min-human-holdout people's labels and no LLM answers: there is nothing else to compare on (it
    compared on agreement with an LLM that never answered, and refused every challenger)."""
    rows = sample(bbc["train"], 60, seed=2)
    store, reg = LabelStore(tmp_path / "labels"), Registry(tmp_path / "reg")
    store.append(human_label(t, lab) for t, lab in zip(rows["text"], rows["label"], strict=True))
    retrain(store, reg, config=FAST)
    report = retrain(store, reg)
    assert report["holdout"]["kind"] == "human labels" and report["holdout"]["rows"] > 0, report["holdout"]
    assert report["decision"] == "promote", report  # the same labels, the same model: not worse


def test_retrain_learns_a_multilabel_task_from_llm_answers_and_people(tmp_path):
    """Multi-label: the LLM's per-class probabilities as soft targets, people's label sets one-hot."""
    from fusion.datasets import builtin_split

    rows = builtin_split("bbc-news-multilabel", "train").iloc[:240]
    truth = np.array([[c in labels for c in CLASSES] for labels in rows["label"]], np.float32)
    answers = np.clip(truth * 0.85 + 0.05 + np.random.default_rng(1).normal(0, 0.05, truth.shape), 0, 1)
    store, reg = LabelStore(tmp_path / "labels"), Registry(tmp_path / "reg")
    store.append(llm_labels(rows["text"].tolist(), answers, CLASSES, True, llm="teacher"))
    people = rows.iloc[::3]
    store.append(
        human_label(t, list(lab), label_id=f"p{i}")
        for i, (t, lab) in enumerate(zip(people["text"], people["label"], strict=True))
    )
    config = {**FAST, "labels": {"classes": CLASSES, "mode": "multilabel"}}
    report = retrain(store, reg, LoopSettings(min_human_holdout=10), config=config)
    assert report["decision"] == "promote" and report["metric"] == "subset_accuracy"
    clf = AutoFusionClassifier.load(reg.champion_path())
    assert clf.multilabel and clf.classes == CLASSES
    test = builtin_split("bbc-news-multilabel", "test").iloc[:100]
    pred = clf.predict(test["text"], llm="off")
    exact = np.mean([sorted(p) == sorted(t) for p, t in zip(pred, test["label"], strict=True)])
    assert exact > 0.5, exact  # chance is far below: 5 classes, label sets of one or two
