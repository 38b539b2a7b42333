"""Fine-tuning the encoder: the schedule, the two-stage recipe and its bundle (real MiniLM, real bbc-news texts).

The LLM block here is simulated (a score matrix that is right 80% of the time): what matters is how the
fusion head weighs an informative block, not which LLM gave it.
"""

import numpy as np
import pytest
import torch
from conftest import TEST_MAX_LENGTH
from hypothesis import given
from hypothesis import strategies as st

import fusion.config
from fusion.bundle import Bundle
from fusion.classifier import AutoFusionClassifier, _fine_tune_mode
from fusion.config import EncoderConfig, FineTuneConfig, FusionConfig, TrainConfig, parse_config
from fusion.encoder import CLASSIFIER_FILE, TextEncoder
from fusion.errors import ConfigError, DataError
from fusion.model import FeatureLayout, FeatureScaler
from fusion.train import fit_head, warmup_linear

CLASSES = ["a", "b", "c"]


def simulated_llm(df, rng, right=0.8) -> dict:
    """Scores that put 0.8 on the true class for ``right`` of the rows, on a random class otherwise."""
    y = np.array([CLASSES.index(c) for c in df["label"]])
    pred = np.where(rng.random(len(df)) < right, y, rng.integers(0, len(CLASSES), len(df)))
    s = np.full((len(df), len(CLASSES)), 0.1, np.float32)
    s[np.arange(len(df)), pred] = 0.8
    return {"sim": s}


def random_labels(df, rng):
    """bbc-news texts with labels the text says nothing about: only memorising can fit them."""
    df = df.copy()
    df["label"] = rng.choice(CLASSES, len(df))
    return df


@given(
    total=st.integers(1, 5000),
    fraction=st.floats(0.0, 0.99),
    step=st.integers(0, 6000),
)
def test_warmup_linear_rises_then_decays_to_zero(total, fraction, step):
    warmup = max(1, round(fraction * total))
    f = warmup_linear(step, warmup, total)
    assert 0.0 <= f <= 1.0
    if step == 0:
        assert f == 0.0
    if step >= total:
        assert f == 0.0
    if 0 < step < warmup:
        assert warmup_linear(step - 1, warmup, total) < f  # rising
    if warmup <= step < total:
        assert warmup_linear(step + 1, warmup, total) <= f  # decaying


def test_fine_tuning_checks_often_stops_on_patience_and_restores_the_best(bbc):
    tr, va = bbc["train"].groupby("label").head(6), bbc["val"].groupby("label").head(2)
    classes = sorted(tr["label"].unique())
    y_tr, y_va = (np.array([classes.index(c) for c in d["label"]]) for d in (tr, va))
    tune = FineTuneConfig(max_epochs=30, batch_size=8, eval_every=1, patience=3)
    enc = TextEncoder(EncoderConfig(max_length=24, fine_tune_lr=3e-4, fine_tuning=tune, backend="torch"))
    t_tr, t_va = tr["text"].tolist(), va["text"].tolist()
    emb_tr, emb_va = enc.embed(t_tr), enc.embed(t_va)
    layout = FeatureLayout(enc.dim, len(classes))
    scaler = FeatureScaler.fit(emb_tr, layout)
    fit = fit_head(
        scaler.transform(emb_tr),
        y_tr,
        scaler.transform(emb_va),
        y_va,
        layout,
        FusionConfig(hidden_dims=[]),
        TrainConfig(learning_rate=0.05, calibrate=False),
        False,
        encoder=enc,
        texts_train=t_tr,
        texts_val=t_va,
        scaler=scaler,
    )
    hist = fit.history
    assert [h["step"] for h in hist] == list(range(1, len(hist) + 1))  # a check after every step (eval_every 1)
    assert fit.epochs_run < 30  # patience ended it, long before max_epochs
    best = int(np.argmin([h["val_loss"] for h in hist]))
    assert hist[best]["step"] == fit.best_step and len(hist) - 1 - best == 3  # `patience` checks after the best
    # the weights kept are the best ones: their validation loss is the best seen, not the last
    z = torch.from_numpy(scaler.transform(enc.embed(t_va)))
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(fit.head.eval()(z), torch.from_numpy(y_va)))
    assert loss == pytest.approx(hist[best]["val_loss"], rel=1e-4)
    assert loss < hist[-1]["val_loss"]


@pytest.mark.slow
def test_two_stage_head_leans_on_the_llm_where_the_joint_head_learns_to_ignore_it(bbc):
    """The trap: an encoder fine-tuned on the training rows memorises them, so a head trained on the same rows
    (joint) learns the LLM adds nothing. The two-stage head sees out-of-fold logits and learns to trust the LLM:
    hiding the LLM costs it dearly, and costs the joint head nothing (it never used it)."""
    rng = np.random.default_rng(0)
    tr, va, te = (random_labels(bbc[p].iloc[:n], rng) for p, n in (("train", 60), ("val", 30), ("test", 60)))
    s_tr, s_va, s_te = (simulated_llm(d, rng) for d in (tr, va, te))
    acc = {}
    for mode in ("joint", "two-stage"):
        cfg = {
            "labels": {"classes": CLASSES},
            "encoder": {
                "fine_tune": mode,
                "max_length": 16,
                "fine_tune_lr": 1e-4,
                "fine_tuning": {"max_epochs": 8, "folds": 2},
            },
        }
        clf = AutoFusionClassifier(cfg).fit(tr, validation=va, llm_scores=s_tr, validation_llm_scores=s_va)
        if mode == "two-stage":  # crossfit: one encoder per fold, then the one kept; the head sees every row
            ts = clf.training["two_stage"]
            assert [f["rows"] for f in ts["fine_tunes"]] == [30, 30, 60] and ts["head_rows"] == 60
        y = clf.targets(te)
        acc[mode] = {
            m: float((clf.predict_proba(te, llm_scores=s_te, llm=m).argmax(1) == y).mean()) for m in ("all", "off")
        }
    print(acc)
    assert acc["two-stage"]["all"] - acc["two-stage"]["off"] >= 0.25
    assert abs(acc["joint"]["all"] - acc["joint"]["off"]) <= 0.1
    assert acc["two-stage"]["all"] >= acc["joint"]["all"] + 0.2


def test_two_stage_multilabel_round_trips_through_a_bundle(multilabel_frames, tmp_path):
    train, val = multilabel_frames["train"].iloc[:36], multilabel_frames["val"].iloc[:16]
    rng = np.random.default_rng(1)
    classes = ["business", "entertainment", "politics", "sports"]
    sim = lambda df: {"sim": rng.random((len(df), len(classes))).astype(np.float32)}  # noqa: E731
    cfg = {
        "labels": {"mode": "multilabel", "classes": classes},
        "encoder": {
            "fine_tune": "two-stage",
            "max_length": 24,
            "fine_tuning": {"max_epochs": 1, "features": "holdout", "holdout_fraction": 0.5},
        },
    }
    clf = AutoFusionClassifier(cfg).fit(train, validation=val, llm_scores=sim(train), validation_llm_scores=sim(val))
    ts = clf.training["two_stage"]
    assert ts["features"] == "holdout" and ts["head_rows"] == 18  # the head trains on the rows held out
    assert [f["rows"] for f in ts["fine_tunes"]] == [18]  # from an encoder fine-tuned on the others
    assert clf.encoder.dim == len(classes) and clf.head.layout.embed_dim == len(classes)

    path = clf.save(tmp_path / "m")
    assert (path / "encoder" / CLASSIFIER_FILE).is_file()
    texts = multilabel_frames["test"]["text"].tolist()[:6]
    loaded = AutoFusionClassifier.load(path)
    assert loaded.encoder.dim == len(classes)
    np.testing.assert_allclose(loaded.predict_proba(texts, llm="off"), clf.predict_proba(texts, llm="off"), atol=1e-5)
    # Serve's Fusion replicas and the Ray Data jobs load the encoder part alone: it gives the same logits
    np.testing.assert_allclose(Bundle.open(path).encoder().embed(texts), clf.encoder.embed(texts), atol=1e-5)


def test_two_stage_without_llms_fine_tunes_once_and_a_refit_starts_from_the_stock_encoder(bbc, encoder):
    df, val = bbc["train"].groupby("label").head(4), bbc["val"].groupby("label").head(2)
    cfg = {"encoder": {"fine_tune": "two-stage", "max_length": 24, "fine_tuning": {"max_epochs": 1}}}
    stock = TextEncoder(EncoderConfig(max_length=24, backend="torch"))
    before = {k: v.clone() for k, v in stock.model.state_dict().items()}
    clf = AutoFusionClassifier(cfg, encoder=stock).fit(df, validation=val)
    [tuned] = clf.training["two_stage"]["fine_tunes"]
    assert tuned["on"] == "all rows" and tuned["epochs_run"] == 1  # the config's max_epochs, not the stock encoder's
    assert clf.encoder is not stock and clf.encoder.dim == 5
    assert all(
        torch.equal(before[k], v) for k, v in stock.model.state_dict().items()
    )  # the caller's encoder is untouched
    clf.fit(df, validation=val)  # again: from the stock encoder, not from the fine-tuned classifier
    assert clf.encoder.dim == 5 and stock.classifier is None
    joint = AutoFusionClassifier({**cfg, "encoder": {**cfg["encoder"], "fine_tune": "joint"}}, encoder=stock)
    assert joint.fit(df, validation=val).training["epochs_run"] == 1


def test_two_stage_refuses_what_it_cannot_do(bbc):
    df = bbc["train"].groupby("label").head(2)
    with pytest.raises(ConfigError, match="needs texts"):
        AutoFusionClassifier({"encoder": {"fine_tune": "two-stage"}}).fit(df, embeddings=np.zeros((len(df), 384)))
    three = bbc["train"].head(3).assign(label=CLASSES)
    with pytest.raises(DataError, match="at least 3 training rows"):  # 3 folds
        AutoFusionClassifier({"encoder": {"fine_tune": "two-stage"}, "labels": {"classes": CLASSES}}).fit(
            three.head(2), validation=three, llm_scores={"sim": np.zeros((2, 3))}
        )
    llm = {"name": "q", "provider": "local", "model": "qwen2.5-coder-0.5b", "few_shot": 2}
    with pytest.raises(ConfigError, match="few_shot"):
        AutoFusionClassifier({"encoder": {"fine_tune": "two-stage"}, "llms": [llm]}).fit(df)


def test_fine_tune_true_still_means_joint():
    assert EncoderConfig(fine_tune=True).fine_tune == "joint"
    assert EncoderConfig(fine_tune=False).fine_tune == "off"
    with pytest.raises(ValueError, match="two-stage"):
        EncoderConfig(fine_tune="twostage")


def test_auto_fine_tunes_two_stage_on_a_gpu_only_and_never_where_it_cannot(monkeypatch, bbc, encoder):
    llm = {"name": "q", "provider": "local", "model": "qwen2.5-coder-0.5b"}
    assert EncoderConfig().fine_tune == "auto"
    assert EncoderConfig(device="cpu").resolved_fine_tune() == "off"
    assert EncoderConfig(device="cuda:1").resolved_fine_tune() == "two-stage"
    monkeypatch.setattr(fusion.config, "gpu_possible", lambda: True)  # what `auto` sees on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert EncoderConfig().resolved_fine_tune() == "two-stage" and EncoderConfig().fine_tuned
    assert EncoderConfig().resolved_backend(fine_tuning=False) == "torch"  # the GPU runs PyTorch
    assert EncoderConfig(device="cpu").resolved_fine_tune() == "off"
    assert EncoderConfig(fine_tune="joint").resolved_fine_tune() == "joint"
    cfg = parse_config({"llms": [llm]})
    assert _fine_tune_mode(cfg, 150, precomputed=False) == "two-stage"
    assert _fine_tune_mode(cfg, 149, precomputed=False) == "off"  # encoder.fine_tuning.auto_min_rows
    assert _fine_tune_mode(cfg, 150, precomputed=True) == "off"
    assert _fine_tune_mode(parse_config({"llms": [{**llm, "few_shot": 2}]}), 150, precomputed=False) == "off"
    monkeypatch.undo()
    # on this CPU machine the default trains the frozen head, and its bundle carries no encoder weights
    df = bbc["train"].groupby("label").head(6)
    clf = AutoFusionClassifier({"encoder": {"max_length": TEST_MAX_LENGTH}}, encoder=encoder).fit(df)
    assert clf.training["fine_tuned_encoder"] == "off" and clf.encoder is encoder
    assert EncoderConfig().resolved_backend(fine_tuning=False) == "onnx"  # and the CPU runs ONNX
