"""The int8 CPU encoder (encoder.backend onnx-int8): exported once, checked against PyTorch, cached, and a
drop-in for the PyTorch encoder in a model. Real ONNX Runtime, real MiniLM; no Ray: the fast lane."""

import json
import shutil
import sys

import numpy as np
import pytest
from conftest import TEST_MAX_LENGTH
from fuzz import GOOD_TEXT, NASTY_TEXT, budget
from hypothesis import given
from hypothesis import strategies as st

from fusion import onnx_int8
from fusion.classifier import AutoFusionClassifier
from fusion.config import EncoderConfig, parse_config
from fusion.encoder import TextEncoder
from fusion.errors import ConfigError, EncoderError
from fusion.texts import TextError, clean_text

pytest.importorskip("onnxruntime")

INT8 = EncoderConfig(max_length=TEST_MAX_LENGTH, backend="onnx-int8")


@pytest.fixture(scope="module")
def int8() -> TextEncoder:
    return TextEncoder(INT8)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_export_is_checked_cached_and_loaded_without_pytorch_weights(int8, monkeypatch):
    assert int8.model is None and int8.int8 is not None  # no PyTorch model held: the graph does the work
    info = json.loads((int8.int8.path.parent / "export.json").read_text())
    assert info["check"]["min_cosine"] >= onnx_int8.MIN_COSINE
    assert info["fused"]["Attention"] == 6  # ONNX Runtime's fused attention: what makes it fast
    assert int8.reference()["backend"] == "onnx-int8" and int8.dim == 384

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_int8, "_export", no_export)
    again = TextEncoder(INT8)
    assert again.int8.path == int8.int8.path
    np.testing.assert_array_equal(again.embed(["a text"]), int8.embed(["a text"]))


def test_a_damaged_cached_export_is_made_again(int8, tmp_path, monkeypatch):
    key = int8.int8.path.parent.name
    shutil.copytree(int8.int8.path.parent, tmp_path / "onnx" / key)
    (tmp_path / "onnx" / key / "model.onnx").write_bytes(b"not a model")
    monkeypatch.setenv("LABELFUSE_CACHE_DIR", str(tmp_path))
    second = TextEncoder(INT8)
    assert second.int8.path == tmp_path / "onnx" / key / "model.onnx"
    np.testing.assert_allclose(second.embed(["a text"]), int8.embed(["a text"]), atol=1e-6)


def test_int8_embeddings_stay_close_to_pytorch_on_real_articles(int8, encoder, bbc):
    texts = bbc["test"]["text"].tolist()[:48]
    cos = cosines(int8.embed(texts), encoder.embed(texts))
    assert cos.min() >= onnx_int8.MIN_COSINE and cos.mean() >= 0.99, (cos.min(), cos.mean())


@budget(25)
@given(st.lists(st.one_of(GOOD_TEXT, NASTY_TEXT), min_size=1, max_size=6))
def test_any_batch_of_texts_embeds_like_pytorch_within_tolerance(int8, encoder, texts):
    ok = []
    for t in texts:
        try:
            ok.append(clean_text(t))
        except TextError:
            pass
    emb = int8.embed(ok)
    assert emb.shape == (len(ok), 384) and np.isfinite(emb).all()
    if ok:
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
        assert cosines(emb, encoder.embed(ok)).min() >= 0.9


def test_a_model_trained_on_the_int8_encoder_saves_and_loads_with_it(int8, bbc, tmp_path):
    train = bbc["train"].groupby("label").head(12)
    clf = AutoFusionClassifier({"encoder": INT8.model_dump(), "llms": [], "train": {"max_epochs": 30}}, encoder=int8)
    clf.fit(train, validation=bbc["val"].groupby("label").head(4))
    test = bbc["test"]["text"].tolist()[:40]
    before = clf.predict_proba(test)
    clf.save(tmp_path / "m")
    loaded = AutoFusionClassifier.load(tmp_path / "m")
    assert loaded.encoder.int8 is not None  # the backend is part of the model
    np.testing.assert_allclose(loaded.predict_proba(test), before, atol=1e-5)
    assert np.mean(np.array(loaded.predict(test)) == bbc["test"]["label"].to_numpy()[:40]) > 0.8


def test_bad_backend_settings_are_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="runs on the CPU"):
        parse_config({"encoder": {"backend": "onnx-int8", "device": "cuda"}})
    with pytest.raises(ConfigError, match="does not fine-tune"):
        parse_config({"encoder": {"backend": "onnx-int8", "fine_tune": "two-stage"}})
    with pytest.raises(ConfigError, match="backend"):
        parse_config({"encoder": {"backend": "onnx"}})
    assert EncoderConfig(backend="onnx-int8").resolved_fine_tune() == "off"
    with pytest.raises(ConfigError, match="runs on the CPU"):
        EncoderConfig(backend="onnx-int8").on("cuda:1")  # AutoFusionClassifier.load(device=...)
    assert EncoderConfig(backend="onnx-int8").on("cpu").device == "cpu"


def test_an_export_that_fails_says_so_and_leaves_nothing_behind(tmp_path, monkeypatch):
    from onnxruntime.transformers import optimizer

    def broken(*args, **kwargs):
        raise RuntimeError("no fusion pattern for this architecture")

    monkeypatch.setenv("LABELFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(optimizer, "optimize_model", broken)
    with pytest.raises(EncoderError, match=r"cannot export .* no fusion pattern.*encoder.backend 'torch'"):
        TextEncoder(INT8)
    assert not any((tmp_path / "onnx").iterdir())  # no half-made export for the next load to trust


def test_without_onnxruntime_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(EncoderError, match=r"labelfuse\[onnx\]"):
        TextEncoder(INT8)
