import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, hamming_loss

from fusion.labels import LabelSpace
from fusion.metrics import ece, evaluate, nll, reliability


def test_multiclass_metrics_match_reference_definitions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, 4, 300))
    proba = np.full((300, 4), 0.1)
    proba[np.arange(300), pred] = 0.7
    m = evaluate(y, pred, proba, LabelSpace(list("abcd")))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert np.asarray(m["confusion_matrix"]).sum() == 300
    assert set(m["per_class"]) == set("abcd")


def test_absent_class_counts_as_zero_in_macro_f1():
    y = np.array([0, 0, 1, 1])
    m = evaluate(y, y, np.eye(3)[y], LabelSpace(["a", "b", "c"]))
    assert m["accuracy"] == 1.0
    assert m["macro_f1"] == pytest.approx(2 / 3)  # class c: no support, no predictions -> F1 0


def test_multilabel_metrics():
    y = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 0]])
    pred = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0]])
    m = evaluate(y, pred, pred * 0.9 + 0.05, LabelSpace(list("abc"), multilabel=True))
    assert m["subset_accuracy"] == pytest.approx(1 / 3)
    assert m["hamming_loss"] == pytest.approx(hamming_loss(y, pred))
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))


def test_ece_zero_when_confidence_equals_accuracy():
    # 10 rows at confidence 0.8, 8 of them right -> perfectly calibrated
    proba = np.tile([0.8, 0.2], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert ece(proba, y, multilabel=False) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_computed():
    # bin of conf 0.9 with accuracy 0.5 (4 rows) and bin of conf 0.6 with accuracy 1.0 (4 rows)
    proba = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 4)
    y = np.array([0, 0, 1, 1, 0, 0, 0, 0])
    assert ece(proba, y, multilabel=False) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    r = reliability(proba, y, multilabel=False)
    assert sum(r["count"]) == 8 and len(r["edges"]) == 16


def test_nll():
    assert nll(np.array([[0.5, 0.5]]), np.array([0]), False) == pytest.approx(np.log(2))
