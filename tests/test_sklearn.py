"""AutoFusionClassifier keeps the scikit-learn estimator contract: clone, get/set_params, classes_, score,
cross_val_score and Pipeline, on the real bundled encoder and bbc-news texts."""

import numpy as np
import pytest
from conftest import sample
from sklearn.base import clone, is_classifier
from sklearn.exceptions import NotFittedError as SkNotFitted
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.validation import check_is_fitted

from fusion import AutoFusionClassifier
from fusion.config import Config
from fusion.llm import LocalLedger

CFG = {"encoder": {"max_length": 48}, "train": {"max_epochs": 30}}


@pytest.fixture(scope="module")
def data(bbc):
    df = sample(bbc["train"], 90, seed=1)
    return df["text"].tolist(), df["label"].to_numpy()


def test_clone_gives_an_unfitted_copy_with_equal_params(encoder, data):
    assert is_classifier(AutoFusionClassifier())
    clone(AutoFusionClassifier())  # the unfitted default, as `python -c` in the README checks
    texts, labels = data
    clf = AutoFusionClassifier(CFG, encoder=encoder).fit(texts, labels)
    twin = clone(clf)
    assert twin.head is None and twin.config == clf.config and twin.config is not clf.config
    with pytest.raises(SkNotFitted):
        check_is_fitted(twin)
    check_is_fitted(clf)
    assert not hasattr(twin, "classes_") and clf.classes_ == sorted(set(labels))


def test_get_and_set_params(encoder):
    clf = AutoFusionClassifier(CFG)
    params = clf.get_params()
    assert set(params) == {"config", "encoder", "ledger"} and isinstance(params["config"], Config)
    clf.set_params(config={"train": {"seed": 7}}, encoder=encoder)
    assert clf.config.train.seed == 7 and clf.encoder is encoder
    with pytest.raises(ValueError, match="invalid parameter"):
        clf.set_params(learning_rate=1)
    ledger = LocalLedger(budget_usd=1.0)  # a clone shares the budget: one budget is one ledger
    assert clone(AutoFusionClassifier(ledger=ledger)).get_params()["ledger"] is ledger


def test_cross_val_score_and_score_match_evaluate(encoder, data):
    texts, labels = data
    scores = cross_val_score(AutoFusionClassifier(CFG, encoder=encoder), texts, labels, cv=3)
    assert scores.shape == (3,) and (scores > 0.6).all()  # five topics: chance is 0.2
    clf = AutoFusionClassifier(CFG, encoder=encoder).fit(texts[:60], labels[:60])
    assert clf.score(texts[60:], labels[60:]) == clf.evaluate(texts[60:], labels[60:])["accuracy"]


def test_in_a_pipeline(encoder, data):
    texts, labels = data
    pipe = Pipeline(
        [
            ("first_words", FunctionTransformer(lambda X: [" ".join(t.split()[:40]) for t in X])),
            ("clf", AutoFusionClassifier(CFG, encoder=encoder)),
        ]
    )
    pipe.fit(texts[:60], labels[:60])
    pred = pipe.predict(texts[60:])
    assert len(pred) == 30 and set(pred) <= set(labels)
    assert pipe.score(texts[60:], labels[60:]) == np.mean(np.array(pred) == labels[60:])
