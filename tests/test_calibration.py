import numpy as np
import pytest

from fusion.calibration import decide, fit_temperature, fit_thresholds, nll, to_proba
from fusion.classifier import AutoFusionClassifier
from fusion.metrics import ece


def test_calibration_lowers_heldout_ece_of_a_small_data_model(encoder, bbc, bbc_emb):
    """A head trained on 40 rows is underconfident; the temperature fitted on the validation split
    must lower ECE and NLL on the untouched test split (the product path: fit + evaluate)."""
    idx = np.random.default_rng(0).choice(len(bbc["train"]), 40, replace=False)
    clf = AutoFusionClassifier(encoder=encoder).fit(
        bbc["train"].iloc[idx],
        validation=bbc["val"],
        embeddings=bbc_emb["train"][idx],
        validation_embeddings=bbc_emb["val"],
    )
    m = clf.evaluate(bbc["test"], embeddings=bbc_emb["test"])
    assert clf.head.temperature < 0.95
    assert m["ece"] < m["uncalibrated"]["ece"] * 0.9, m
    assert m["nll"] < m["uncalibrated"]["nll"]
    assert m["accuracy"] == m["uncalibrated"]["accuracy"]  # temperature never changes the argmax


def test_temperature_undoes_strong_underconfidence_on_heldout_data(bbc_model, bbc, bbc_emb):
    """Real logits of the bbc-news model, flattened x0.25: fitted on validation, checked on test."""
    clf = bbc_model
    lv = 0.25 * clf.head.logits(clf.head.features(bbc_emb["val"]))
    lt = 0.25 * clf.head.logits(clf.head.features(bbc_emb["test"]))
    yv, yt = clf.targets(bbc["val"]), clf.targets(bbc["test"])
    t = fit_temperature(lv, yv, multilabel=False)
    assert t < 0.4
    before = ece(to_proba(lt, 1.0, False), yt, False)
    after = ece(to_proba(lt, t, False), yt, False)
    assert after < before / 5, (before, after)
    assert nll(lt, yt, False, t) < nll(lt, yt, False, 1.0)


def test_temperature_recovers_a_known_scale():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(size=(4000, 5)) * 2
    y = np.array([rng.choice(5, p=p) for p in to_proba(true_logits, 1.0, False)])
    assert fit_temperature(true_logits * 3, y, False) == pytest.approx(3.0, rel=0.1)


def test_thresholds_maximise_f1_per_class():
    proba = np.array([[0.30, 0.9], [0.35, 0.8], [0.10, 0.2], [0.05, 0.7]])
    y = np.array([[1, 1], [1, 1], [0, 0], [0, 0]])
    t = fit_thresholds(proba, y)
    assert 0.10 < t[0] <= 0.30  # any cut in (0.10, 0.30] is perfect; the one nearest 0.5 wins
    assert t[0] == pytest.approx(0.30)
    assert 0.70 < t[1] <= 0.80


def test_threshold_default_when_class_has_no_positives():
    assert fit_thresholds(np.array([[0.9], [0.1]]), np.array([[0], [0]]))[0] == pytest.approx(0.5)


def test_decide_with_at_least_one_fallback():
    proba = np.array([[0.2, 0.3], [0.9, 0.1]])
    t = np.array([0.5, 0.5])
    assert decide(proba, True, t, at_least_one=False).tolist() == [[0, 0], [1, 0]]
    assert decide(proba, True, t, at_least_one=True).tolist() == [[0, 1], [1, 0]]
    assert decide(proba, False, None, False).tolist() == [1, 0]
