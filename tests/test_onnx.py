"""The ONNX encoders: 'onnx' (float32, the CPU default through backend 'auto') and 'onnx-int8'. Each is exported
once, checked against PyTorch, cached, and a drop-in for the PyTorch encoder in a model; a process that embeds
with one imports neither torch nor transformers. Real ONNX Runtime, real MiniLM; no Ray: the fast lane."""

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import TEST_MAX_LENGTH
from fuzz import GOOD_TEXT, NASTY_TEXT, budget
from hypothesis import given
from hypothesis import strategies as st

from fusion import onnx_encoder
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
    assert int8.model is None and int8.onnx is not None  # no PyTorch model held: the graph does the work
    info = json.loads((int8.onnx.path.parent / "export.json").read_text())
    assert info["check"]["min_cosine"] >= onnx_encoder.MIN_COSINE["onnx-int8"]
    assert info["fused"]["Attention"] == 6  # ONNX Runtime's fused attention: what makes it fast
    assert int8.reference()["backend"] == "onnx-int8" and int8.dim == 384

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_encoder, "_export", no_export)
    again = TextEncoder(INT8)
    assert again.onnx.path == int8.onnx.path
    np.testing.assert_array_equal(again.embed(["a text"]), int8.embed(["a text"]))


def test_a_damaged_cached_export_is_made_again(int8, tmp_path, monkeypatch):
    key = int8.onnx.path.parent.name
    shutil.copytree(int8.onnx.path.parent, tmp_path / "onnx" / key)
    (tmp_path / "onnx" / key / "model.onnx").write_bytes(b"not a model")
    monkeypatch.setenv("LABELFUSE_CACHE_DIR", str(tmp_path))
    second = TextEncoder(INT8)
    assert second.onnx.path == tmp_path / "onnx" / key / "model.onnx"
    np.testing.assert_allclose(second.embed(["a text"]), int8.embed(["a text"]), atol=1e-6)


def test_int8_embeddings_stay_close_to_pytorch_on_real_articles(int8, encoder, bbc):
    texts = bbc["test"]["text"].tolist()[:48]
    cos = cosines(int8.embed(texts), encoder.embed(texts))
    assert cos.min() >= onnx_encoder.MIN_COSINE["onnx-int8"] and cos.mean() >= 0.99, (cos.min(), cos.mean())


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
    assert loaded.encoder.backend == "onnx-int8"  # the backend is part of the model
    np.testing.assert_allclose(loaded.predict_proba(test), before, atol=1e-5)
    assert np.mean(np.array(loaded.predict(test)) == bbc["test"]["label"].to_numpy()[:40]) > 0.8


def test_bad_backend_settings_are_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="runs on the CPU"):
        parse_config({"encoder": {"backend": "onnx-int8", "device": "cuda"}})
    with pytest.raises(ConfigError, match="does not fine-tune"):
        parse_config({"encoder": {"backend": "onnx-int8", "fine_tune": "two-stage"}})
    with pytest.raises(ConfigError, match="runs on the CPU"):
        parse_config({"encoder": {"backend": "onnx", "device": "cuda"}})
    with pytest.raises(ConfigError, match="backend"):
        parse_config({"encoder": {"backend": "onnx-fp16"}})
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
    left = [p.name for p in (tmp_path / "onnx").iterdir() if p.suffix != ".lock"]
    assert not left  # no half-made export for the next load to trust


def test_without_onnxruntime_the_error_says_what_to_install_and_auto_runs_pytorch(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(EncoderError, match=r"pip install onnxruntime"):
        TextEncoder(INT8)
    with caplog.at_level(logging.WARNING, logger="fusion.encoder"):
        enc = TextEncoder(EncoderConfig(max_length=TEST_MAX_LENGTH))
    assert enc.backend == "torch" and enc.model is not None and "runs in PyTorch instead" in caplog.text


def test_auto_runs_onnx_on_the_cpu_and_the_process_loads_no_torch(encoder, bbc):
    """The CPU default: PyTorch's embeddings from ONNX Runtime, in a process that never imports torch."""
    assert encoder.backend == "onnx" and encoder.model is None
    assert "backend" not in encoder.reference()  # the same embeddings as 'torch': bundles do not tell them apart
    code = (
        "import sys, json; from fusion.config import EncoderConfig; from fusion.encoder import TextEncoder; "
        f"e = TextEncoder(EncoderConfig(max_length={TEST_MAX_LENGTH})); v = e.embed(json.load(sys.stdin)); "
        "print(json.dumps([e.backend, 'torch' in sys.modules, 'transformers' in sys.modules, v.tolist()]))"
    )
    texts = bbc["test"]["text"].tolist()[:8]
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    backend, torch_loaded, transformers_loaded, emb = json.loads(out.stdout)
    assert (backend, torch_loaded, transformers_loaded) == ("onnx", False, False)
    np.testing.assert_allclose(np.array(emb, np.float32), encoder.embed(texts), atol=1e-6)


def test_an_auto_encoder_that_cannot_be_exported_runs_in_pytorch(tmp_path, monkeypatch, caplog):
    from onnxruntime.transformers import optimizer

    def broken(*args, **kwargs):
        raise RuntimeError("no fusion pattern for this architecture")

    monkeypatch.setenv("LABELFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(optimizer, "optimize_model", broken)
    with caplog.at_level(logging.WARNING, logger="fusion.encoder"):
        enc = TextEncoder(EncoderConfig(max_length=TEST_MAX_LENGTH))
    assert enc.backend == "torch" and "no fusion pattern" in caplog.text
    with pytest.raises(EncoderError, match="no fusion pattern"):
        TextEncoder(EncoderConfig(max_length=TEST_MAX_LENGTH, backend="onnx"))


def test_fine_tuning_an_onnx_encoder_trains_its_pytorch_weights(encoder):
    from fusion.config import parse_config
    from fusion.finetune import tuning_copy

    copy = tuning_copy(encoder, parse_config({"encoder": {"fine_tune": "joint", "fine_tune_lr": 1e-4}}))
    assert copy.backend == "torch" and copy.model is not None and copy.config.fine_tune_lr == 1e-4
    assert encoder.backend == "onnx"  # the caller's encoder is not changed
    np.testing.assert_allclose(copy.embed(["a text"]), encoder.embed(["a text"]), atol=1e-5)


def test_the_parts_a_replica_or_a_backfill_actor_loads_import_no_torch(bbc_model, bbc, tmp_path):
    """A Fusion replica (encoder + head) and a backfill encoder actor run a bundle without torch or
    transformers in the process: the encoder in ONNX Runtime, the head's MLP in numpy."""
    path = bbc_model.save(tmp_path / "m")
    texts = bbc["test"]["text"].tolist()[:16]
    code = (
        "import sys, json; from fusion.bundle import Bundle; b = Bundle.open(sys.argv[1]); h = b.head(); "
        "e = b.encoder(threads=1); t = json.load(sys.stdin); p = h.predict(t, e.embed(t), None); "
        "print(json.dumps([p.proba.tolist(), 'torch' in sys.modules, 'transformers' in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], input=json.dumps(texts), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    proba, torch_loaded, transformers_loaded = json.loads(out.stdout)
    assert not torch_loaded and not transformers_loaded
    np.testing.assert_allclose(np.array(proba), bbc_model.predict_proba(texts), atol=1e-5)
