import json
import shutil

import numpy as np
import pytest
from conftest import TEST_MAX_LENGTH

from fusion.bundle import FORMAT_VERSION, HEAD_FILE, MANIFEST
from fusion.classifier import AutoFusionClassifier
from fusion.config import EncoderConfig
from fusion.encoder import TextEncoder
from fusion.errors import BundleError


@pytest.fixture(scope="module")
def saved(bbc_model, tmp_path_factory):
    return bbc_model.save(tmp_path_factory.mktemp("bundle") / "model")


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(saved, dst)
    return dst


def test_manifest_contents(saved, bbc_model):
    m = json.loads((saved / MANIFEST).read_text())
    assert m["format"] == "labelfuse-bundle" and m["format_version"] == FORMAT_VERSION
    assert m["label_space"] == {"classes": bbc_model.classes, "multilabel": False}
    assert m["encoder"]["model"] == "all-MiniLM-L6-v2" and m["encoder"]["dim"] == 384
    assert m["temperature"] == bbc_model.head.temperature
    assert m["config"]["encoder"]["max_length"] == TEST_MAX_LENGTH
    assert "accuracy" in m["metrics"]["validation"]
    assert set(m["files"]) == {HEAD_FILE}


def test_missing_dir_and_manifest(tmp_path, copy):
    with pytest.raises(BundleError, match="not found"):
        AutoFusionClassifier.load(tmp_path / "nope")
    (copy / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        AutoFusionClassifier.load(copy)


def test_missing_weights(copy):
    (copy / HEAD_FILE).unlink()
    with pytest.raises(BundleError, match=r"head\.safetensors is missing"):
        AutoFusionClassifier.load(copy)


def test_corrupted_weights(copy):
    data = bytearray((copy / HEAD_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / HEAD_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"corrupted: head\.safetensors does not match its checksum"):
        AutoFusionClassifier.load(copy)


def test_truncated_manifest(copy):
    text = (copy / MANIFEST).read_text()
    (copy / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match="not valid JSON"):
        AutoFusionClassifier.load(copy)


def test_other_format_version(copy):
    m = json.loads((copy / MANIFEST).read_text())
    m["format_version"] = FORMAT_VERSION + 1
    m["library_version"] = "9.0.0"
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"uses bundle format 2 \(written by labelfuse 9\.0\.0\)"):
        AutoFusionClassifier.load(copy)


def test_tampered_manifest_values(copy):
    m = json.loads((copy / MANIFEST).read_text())
    del m["layout"]
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="inconsistent manifest"):
        AutoFusionClassifier.load(copy)


def test_different_encoder_is_detected(copy):
    m = json.loads((copy / MANIFEST).read_text())
    m["encoder"]["probe"] = (np.asarray(m["encoder"]["probe"]) + 0.1).tolist()
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="different embeddings"):
        AutoFusionClassifier.load(copy, encoder=TextEncoder(EncoderConfig(max_length=TEST_MAX_LENGTH)))


def test_save_replaces_atomically_and_refuses_foreign_dirs(bbc_model, tmp_path):
    p = bbc_model.save(tmp_path / "m")
    bbc_model.save(p)  # overwrite an existing bundle
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m"]
    other = tmp_path / "docs"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="refusing to overwrite"):
        bbc_model.save(other)
    assert (other / "notes.txt").read_text() == "keep me"
