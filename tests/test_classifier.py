"""AutoFusionClassifier on real data with the real encoder.

Where a test needs an LLM score block, the block is *simulated* from the true labels with a known error rate:
live LLM scorers are a later issue, and a controlled block is what makes the fusion and missing-LLM paths
measurable here. The simulation stands in for scores only; encoder, training and data are real.
"""

import numpy as np
import pytest
import torch
from conftest import MULTILABEL_MAX_LENGTH, TEST_MAX_LENGTH, class_ids

from fusion.classifier import AutoFusionClassifier
from fusion.encoder import TextEncoder
from fusion.errors import ConfigError, DataError, NotFittedError
from fusion.model import FeatureLayout
from fusion.train import drop_llm_blocks


def simulated_llm(y: np.ndarray, n_classes: int, accuracy: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    guess = np.where(rng.random(len(y)) < accuracy, y, rng.integers(0, n_classes, len(y)))
    p = np.full((len(y), n_classes), 0.02, np.float32)
    p[np.arange(len(y)), guess] = 1 - 0.02 * (n_classes - 1)
    return p


def test_bbc_news_accuracy_and_api(bbc_model, bbc, bbc_emb):
    m = bbc_model.evaluate(bbc["test"], embeddings=bbc_emb["test"])
    assert m["accuracy"] > 0.95 and m["macro_f1"] > 0.95, m
    assert bbc_model.classes == ["business", "entertainment", "politics", "sports", "tech"]
    proba = bbc_model.predict_proba(bbc["test"], embeddings=bbc_emb["test"])
    assert proba.shape == (len(bbc["test"]), 5)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    assert 0 < bbc_model.training["best_epoch"] <= bbc_model.training["epochs_run"]


def test_predict_from_raw_texts(bbc_model):
    texts = [
        "Shares in the oil giant fell after quarterly profits missed forecasts and the dollar weakened.",
        "The striker scored twice as the home side won the cup final in extra time.",
    ]
    assert bbc_model.predict(texts) == ["business", "sports"]


def test_training_is_deterministic(encoder, bbc, bbc_emb):
    def fit():
        clf = AutoFusionClassifier({"encoder": {"max_length": TEST_MAX_LENGTH}}, encoder=encoder)
        clf.fit(bbc["train"], validation=bbc["val"], embeddings=bbc_emb["train"], validation_embeddings=bbc_emb["val"])
        return clf.predict_proba(bbc["test"], embeddings=bbc_emb["test"])

    np.testing.assert_array_equal(fit(), fit())


def test_save_load_gives_identical_probabilities(bbc_model, bbc, bbc_emb, tmp_path, encoder):
    path = bbc_model.save(tmp_path / "model")
    loaded = AutoFusionClassifier.load(path, encoder=encoder)
    texts = bbc["test"]["text"].tolist()[:40]
    np.testing.assert_array_equal(bbc_model.predict_proba(texts), loaded.predict_proba(texts))
    assert loaded.classes == bbc_model.classes and loaded.head.temperature == bbc_model.head.temperature
    assert loaded.metrics["validation"]["accuracy"] == bbc_model.metrics["validation"]["accuracy"]
    # loading without a shared encoder finds the bundled one by its reference
    fresh = AutoFusionClassifier.load(path)
    np.testing.assert_allclose(fresh.predict_proba(texts), bbc_model.predict_proba(texts), atol=1e-6)


def test_a_model_trained_with_a_shared_encoder_loads_that_encoder(encoder, bbc, bbc_emb, tmp_path):
    """The config says 256 tokens, the shared encoder cuts at 64: the bundle must load the encoder it was
    trained with (it once loaded the config's; the bundle's probe, a short text, did not tell them apart)."""
    rows = np.random.default_rng(0).choice(len(bbc["train"]), 300, replace=False)  # the split is sorted by class
    clf = AutoFusionClassifier(encoder=encoder).fit(bbc["train"].iloc[rows], embeddings=bbc_emb["train"][rows])
    assert clf.config.encoder.max_length != encoder.config.max_length
    loaded = AutoFusionClassifier.load(clf.save(tmp_path / "m"))
    assert loaded.config.encoder.max_length == encoder.config.max_length
    texts = bbc["test"]["text"].tolist()[:40]  # articles, far longer than 64 tokens
    np.testing.assert_allclose(loaded.predict_proba(texts), clf.predict_proba(texts), atol=1e-6)


def test_fusion_with_llm_block_and_missing_llm_fallback(encoder, bbc, bbc_emb):
    classes = sorted(bbc["train"]["label"].unique())
    y = {k: class_ids(bbc[k], classes) for k in bbc}
    scores = {k: simulated_llm(y[k], 5, 0.8, seed=i) for i, k in enumerate(bbc)}
    # a small training set keeps the encoder-only baseline well below 100% so fusion has room to help
    idx = np.random.default_rng(0).choice(len(bbc["train"]), 60, replace=False)
    train = bbc["train"].iloc[idx]
    common = dict(validation=bbc["val"], embeddings=bbc_emb["train"][idx], validation_embeddings=bbc_emb["val"])

    base = AutoFusionClassifier(encoder=encoder).fit(train, **common)
    fused = AutoFusionClassifier(encoder=encoder).fit(
        train, llm_scores={"sim": scores["train"][idx]}, validation_llm_scores={"sim": scores["val"]}, **common
    )
    assert fused.head.layout.llm_names == ("sim",) and fused.head.layout.dim == 384 + 5 + 1
    acc_base = base.evaluate(bbc["test"], embeddings=bbc_emb["test"])["accuracy"]
    acc_llm = float((scores["test"].argmax(1) == y["test"]).mean())
    acc_fused = fused.evaluate(bbc["test"], embeddings=bbc_emb["test"], llm_scores={"sim": scores["test"]})["accuracy"]
    assert acc_fused > max(acc_base, acc_llm), (acc_base, acc_llm, acc_fused)

    # the LLM missing for every text (not passed), or for some rows (NaN): still close to the encoder-only model
    acc_missing = fused.evaluate(bbc["test"], embeddings=bbc_emb["test"])["accuracy"]
    assert acc_missing > acc_base - 0.03, (acc_base, acc_missing)
    partial = scores["test"].copy()
    partial[::2] = np.nan
    acc_partial = fused.evaluate(bbc["test"], embeddings=bbc_emb["test"], llm_scores={"sim": partial})["accuracy"]
    assert acc_missing - 0.01 <= acc_partial <= acc_fused + 0.01


def test_gating_by_call_rate_and_by_target_accuracy(encoder, bbc, bbc_emb):
    """Simulated 90%-accurate LLM block (stands in for a strong LLM; see simulated_llm)."""
    classes = sorted(bbc["train"]["label"].unique())
    scores = {k: simulated_llm(class_ids(bbc[k], classes), 5, 0.9, seed=i) for i, k in enumerate(bbc)}
    idx = np.random.default_rng(1).choice(len(bbc["train"]), 60, replace=False)
    common = dict(
        validation=bbc["val"],
        embeddings=bbc_emb["train"][idx],
        validation_embeddings=bbc_emb["val"],
        llm_scores={"sim": scores["train"][idx]},
        validation_llm_scores={"sim": scores["val"]},
    )
    clf = AutoFusionClassifier({"gating": {"enabled": True, "target_call_rate": 0.3}}, encoder=encoder)
    clf.fit(bbc["train"].iloc[idx], **common)
    table = clf.metrics["gating"]
    row = next(r for r in table if r["target_rate"] == 0.3)
    assert clf.head.gate_threshold == row["threshold"] and abs(row["call_rate"] - 0.3) < 0.01
    assert table[-1]["accuracy"] > table[0]["accuracy"]  # asking the LLM about every text helps here

    d = clf.predict_details(bbc["test"], embeddings=bbc_emb["test"], llm_scores={"sim": scores["test"]})
    assert 0.1 < (~d.gated_out).mean() < 0.6  # about the validation rate on test data
    assert (d.llm_used[:, 0] == ~d.gated_out).all()  # given scores are not used for gated-out texts
    given = {"embeddings": bbc_emb["test"], "llm_scores": {"sim": scores["test"]}}
    # the gate compares calibrated confidences with its threshold, whichever probabilities are asked for
    assert clf.head.temperature != 1.0
    raw = clf.predict_details(bbc["test"], calibrated=False, **given)
    np.testing.assert_array_equal(raw.gated_out, d.gated_out)
    every, none = (clf.predict_details(bbc["test"], llm=m, **given) for m in ("all", "off"))
    assert every.llm_used.all() and not none.llm_used.any() and none.gated_out.all()
    with pytest.warns(DeprecationWarning, match="llm='all'"):  # the old spelling, for one release
        np.testing.assert_array_equal(clf.predict_details(bbc["test"], gate=False, **given).proba, every.proba)
    results = d.results()
    assert [r["label"] for r in results] == d.labels
    assert [r["gated_out"] for r in results] == d.gated_out.tolist()

    # target accuracy: the lowest tabulated call rate whose validation accuracy reaches it
    target = next(r for r in table if r["accuracy"] > table[0]["accuracy"])
    acc = AutoFusionClassifier({"gating": {"enabled": True, "target_accuracy": target["accuracy"]}}, encoder=encoder)
    acc.fit(bbc["train"].iloc[idx], **common)
    assert acc.head.gate_threshold == target["threshold"]
    unreachable = AutoFusionClassifier({"gating": {"enabled": True, "target_accuracy": 1.0}}, encoder=encoder)
    unreachable.fit(bbc["train"].iloc[idx], **common)
    best = max(r["accuracy"] for r in table)  # unreachable: the lowest rate within a point of the best
    if best < 1.0:
        assert unreachable.head.gate_threshold == next(r for r in table if r["accuracy"] >= best - 0.01)["threshold"]


def test_llm_dropout_hides_blocks_and_sets_flags():
    layout = FeatureLayout(embed_dim=3, n_classes=2, llm_names=("a", "b"))
    x = torch.ones(20000, layout.dim)
    x[:, layout.flag(0)] = 0
    x[:, layout.flag(1)] = 0
    out = drop_llm_blocks(x, layout, 0.3, torch.Generator().manual_seed(0))
    hidden = out[:, layout.flag(0)] == 1
    assert 0.28 < hidden.float().mean() < 0.32
    assert (out[hidden, layout.block(0)] == 0).all() and (out[~hidden, layout.block(0)] == 1).all()
    assert (out[:, :3] == 1).all()  # the embedding is never touched
    assert torch.equal(drop_llm_blocks(x, layout, 0.0, torch.Generator()), x)


def test_configured_llm_without_key_or_with_unknown_scores_is_a_clear_error(encoder, bbc, bbc_emb, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    clf = AutoFusionClassifier(
        {"llms": [{"name": "gpt", "provider": "openai", "model": "gpt-4o-mini"}]}, encoder=encoder
    )
    df, emb = bbc["train"].iloc[::30], bbc_emb["train"][::30]
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):  # never dummy scores instead
        clf.fit(df, embeddings=emb)
    # refused before the texts are embedded (on a large corpus, minutes), not after
    monkeypatch.setattr(TextEncoder, "embed", lambda *a, **k: pytest.fail("the texts were embedded first"))
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
        clf.fit(df)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-used")
    with pytest.raises(ConfigError, match=r"scores given for LLM\(s\) \['other'\]"):
        clf.fit(df, embeddings=emb, llm_scores={"other": np.zeros((len(df), 5))})


def test_input_errors(bbc_model, encoder):
    with pytest.raises(NotFittedError):
        AutoFusionClassifier(encoder=encoder).predict(["x"])
    with pytest.raises(DataError, match="labels are required"):
        AutoFusionClassifier(encoder=encoder).fit(["a", "b"])
    with pytest.raises(DataError, match="got 2 texts but 1 labels"):
        AutoFusionClassifier(encoder=encoder).fit(["a", "b"], ["x"])
    with pytest.raises(DataError, match="unknown LLM"):
        bbc_model.predict_proba(["x"], llm_scores={"nope": np.zeros((1, 5))})
    with pytest.raises(DataError, match=r"unknown label\(s\) \['weather'\]"):
        bbc_model.evaluate(["rain today"], ["weather"])


def test_multilabel_path(multilabel_data):
    (tr, etr), (va, eva), (te, ete) = multilabel_data["train"], multilabel_data["val"], multilabel_data["test"]
    cfg = {"labels": {"mode": "multilabel"}, "encoder": {"max_length": MULTILABEL_MAX_LENGTH}}
    clf = AutoFusionClassifier(cfg, encoder=multilabel_data["encoder"]).fit(
        tr, validation=va, embeddings=etr, validation_embeddings=eva
    )
    assert clf.classes == ["business", "entertainment", "politics", "sports"]
    assert clf.head.thresholds is not None and clf.head.thresholds.shape == (4,)
    assert not clf.head.at_least_one  # tech-only rows have no label, so empty predictions must stay possible
    m = clf.evaluate(te, embeddings=ete)
    assert m["micro_f1"] > 0.85 and m["subset_accuracy"] > 0.6 and m["hamming_loss"] < 0.1, m
    preds = clf.predict(te, embeddings=ete)
    truth = te["label"].tolist()
    empty_rows = [i for i, t in enumerate(truth) if not t]
    assert empty_rows and sum(1 for i in empty_rows if preds[i] == []) / len(empty_rows) > 0.5
    assert any(len(p) == 2 for p in preds)


def test_multilabel_at_least_one_fallback(multilabel_data):
    (tr, etr), (va, eva), (te, ete) = multilabel_data["train"], multilabel_data["val"], multilabel_data["test"]
    keep = tr["label"].map(len) > 0
    keep_v = va["label"].map(len) > 0
    cfg = {"labels": {"mode": "multilabel"}, "encoder": {"max_length": MULTILABEL_MAX_LENGTH}}
    clf = AutoFusionClassifier(cfg, encoder=multilabel_data["encoder"]).fit(
        tr[keep], validation=va[keep_v], embeddings=etr[keep.to_numpy()], validation_embeddings=eva[keep_v.to_numpy()]
    )
    assert clf.head.at_least_one
    assert all(len(p) >= 1 for p in clf.predict(te, embeddings=ete))


def test_fine_tuning_updates_encoder_and_roundtrips(tmp_path, bbc):
    df = bbc["train"].groupby("label").head(8)
    cfg = {
        "encoder": {"fine_tune": True, "max_length": 32, "batch_size": 16, "fine_tune_lr": 1e-4},
        "train": {"max_epochs": 2, "batch_size": 16, "patience": 2},
    }
    clf = AutoFusionClassifier(cfg)
    before = {k: v.clone() for k, v in clf.encoder.model.state_dict().items()}
    clf.fit(df, validation=bbc["val"].groupby("label").head(3))
    after = clf.encoder.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    path = clf.save(tmp_path / "ft")
    assert (path / "encoder" / "config.json").is_file()
    texts = bbc["test"]["text"].tolist()[:8]
    loaded = AutoFusionClassifier.load(path)
    assert loaded.encoder.source == str(path / "encoder")
    np.testing.assert_allclose(loaded.predict_proba(texts), clf.predict_proba(texts), atol=1e-6)
    with pytest.raises(ConfigError, match="fine_tune needs texts"):
        AutoFusionClassifier(cfg, encoder=clf.encoder).fit(df, embeddings=np.zeros((len(df), 384)))


def test_llm_fraction_scores_a_stratified_sample_and_marks_the_rest_missing(encoder, bbc, bbc_emb, tmp_path):
    """The LLM is a local stub HTTP server (an OpenAI-compatible endpoint) answering with the true class."""
    from stub_llm import StubServer

    classes = sorted(bbc["train"]["label"].unique())
    truth = {
        " ".join(t.split())[:60]: classes.index(label)
        for part in ("train", "val")
        for t, label in zip(bbc[part]["text"], bbc[part]["label"], strict=True)
    }
    idx = np.random.default_rng(2).choice(len(bbc["train"]), 80, replace=False)
    train = bbc["train"].iloc[idx]
    with StubServer(classes, lambda prompt: next(c for t, c in truth.items() if t in prompt)) as stub:
        llm = {"name": "stub", "provider": "custom", "model": "m", "base_url": stub.base_url}
        cfg = {"llms": [llm], "llm_limits": {"cache": False}, "train": {"llm_fraction": 0.25}}
        clf = AutoFusionClassifier(cfg, encoder=encoder).fit(
            train, validation=bbc["val"], embeddings=bbc_emb["train"][idx], validation_embeddings=bbc_emb["val"]
        )
    per_class = train["label"].value_counts()
    expected_train = int(sum(max(1, round(0.25 * n)) for n in per_class))
    assert clf.llm_usage["train"]["stub"]["llm_calls"] == expected_train < len(train)
    n_val = clf.llm_usage["validation"]["stub"]["llm_calls"]
    assert 0.2 * len(bbc["val"]) <= n_val <= 0.3 * len(bbc["val"]) + len(classes)
    assert stub.requests == expected_train + n_val
    # the sampled rows taught the head to use the LLM block; the others to answer without it
    y = class_ids(bbc["test"], classes)
    perfect = np.eye(len(classes), dtype=np.float32)[y]
    missing = np.full_like(perfect, np.nan)
    acc = {
        name: clf.evaluate(bbc["test"], embeddings=bbc_emb["test"], llm_scores={"stub": s})["accuracy"]
        for name, s in (("perfect", perfect), ("missing", missing))
    }
    assert acc["perfect"] > acc["missing"] > 0.8, acc
