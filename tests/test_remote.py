"""Bundles at URIs (fusion/remote.py), against what runs here: a directory served over real HTTP, a real
S3-compatible server (moto's, on 127.0.0.1) reached through s3fs, and a local Hugging Face Hub cache read
offline by huggingface_hub. Nothing leaves the machine."""

import json
import shutil

import numpy as np
import pytest

from fusion.bundle import HEAD_FILE, MANIFEST
from fusion.classifier import AutoFusionClassifier
from fusion.cli import main as cli
from fusion.errors import BundleError, ConfigError
from fusion.remote import cache_root, local_bundle, parse_hub_uri, publish

TEXTS = ["Shares fell after the bank's results", "The striker scored twice in the derby"]


@pytest.fixture(scope="module")
def saved(bbc_model, tmp_path_factory):
    return bbc_model.save(tmp_path_factory.mktemp("bundle") / "model")


def test_a_path_and_a_file_uri_open_in_place(saved):
    assert local_bundle(saved) == saved and local_bundle(f"file://{saved}") == saved
    assert AutoFusionClassifier.load(f"file://{saved}").version == AutoFusionClassifier.load(saved).version


def test_a_bundle_over_http_is_fetched_once_checked_and_reused(saved, bbc_model, http_dir):
    root, base, seen = http_dir
    shutil.copytree(saved, root / "model")
    uri = f"{base}/model"
    clf = AutoFusionClassifier.load(uri)
    np.testing.assert_allclose(clf.predict_proba(TEXTS), bbc_model.predict_proba(TEXTS), atol=1e-6)
    local = local_bundle(uri)
    assert local.parent == cache_root() and (local / HEAD_FILE).is_file()
    assert any(p.endswith(HEAD_FILE) for p in seen)
    seen.clear()
    assert AutoFusionClassifier.load(uri).version == clf.version
    assert not any(p.endswith(HEAD_FILE) for p in seen) and seen  # the manifest is read; the weights are reused


def test_a_corrupted_or_hostile_remote_bundle_is_refused_and_nothing_is_cached(saved, http_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LABELFUSE_CACHE_DIR", str(tmp_path / "cache"))  # an empty cache: the same manifest
    root, base, _ = http_dir  # fetched before would be reused, rightly (its files were checked then)
    bad = root / "bad"
    shutil.copytree(saved, bad)
    data = bytearray((bad / HEAD_FILE).read_bytes())
    data[100] ^= 0xFF
    (bad / HEAD_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its checksum"):
        AutoFusionClassifier.load(f"{base}/bad")
    hostile = root / "hostile"
    shutil.copytree(saved, hostile)
    manifest = json.loads((hostile / MANIFEST).read_text())
    manifest["files"]["../../escape"] = "0" * 64
    (hostile / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        AutoFusionClassifier.load(f"{base}/hostile")
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        AutoFusionClassifier.load(f"{base}/nothing-here")
    assert not [p for p in cache_root().glob("*") if p.name.startswith(".tmp-")]  # no half-fetched leftovers
    with pytest.raises(ConfigError, match="nosuchproto"):
        local_bundle("nosuchproto://x/y")


@pytest.fixture
def s3(monkeypatch):
    """moto's S3-compatible server on 127.0.0.1 with one bucket; s3fs reaches it through AWS_ENDPOINT_URL."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    from fusion.llm.local import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                 "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("models")
    yield
    server.stop()


def test_publish_to_s3_with_the_cli_then_load_from_there(saved, bbc_model, s3, capsys, tmp_path):
    assert cli(["publish", "--bundle", str(saved), "s3://models/news/v1"]) == 0
    assert "load it with: --bundle s3://models/news/v1" in capsys.readouterr().out
    clf = AutoFusionClassifier.load("s3://models/news/v1")
    np.testing.assert_allclose(clf.predict_proba(TEXTS), bbc_model.predict_proba(TEXTS), atol=1e-6)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    argv = ["predict", "--bundle", "s3://models/news/v1", "--input", str(tmp_path / "in.jsonl")]
    assert cli([*argv, "--output", str(tmp_path / "out.jsonl")]) == 0
    labels = [json.loads(line)["prediction"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert labels == list(bbc_model.predict(TEXTS))


def _hub_cache(root, repo: str, bundle, subdir: str | None = None) -> str:
    """A Hugging Face Hub cache as huggingface_hub lays it out after a download: refs/main -> a commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(bundle, snapshot / subdir if subdir else snapshot)
    return commit


def test_a_hub_repo_at_a_revision_loads_from_the_local_hub_cache(saved, bbc_model, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    commit = _hub_cache(tmp_path / "hub", "acme/news-tagger", saved)
    _hub_cache(tmp_path / "hub", "acme/models", saved, subdir="tagger")
    want = bbc_model.predict_proba(TEXTS)
    for uri in ("hf://acme/news-tagger", f"hf://acme/news-tagger@{commit}", "hf://acme/models@main/tagger"):
        np.testing.assert_allclose(AutoFusionClassifier.load(uri).predict_proba(TEXTS), want, atol=1e-6)
    with pytest.raises(BundleError, match="not in the local Hugging Face cache"):
        AutoFusionClassifier.load("hf://acme/unknown@v2")
    assert parse_hub_uri("hf://a/b@v1.2/x/y") == ("a/b", "v1.2", "x/y")
    with pytest.raises(ConfigError, match="hf://owner/repo"):
        parse_hub_uri("hf://just-a-name")


def test_publish_checks_the_bundle_and_never_overwrites_a_path(copy_of_saved, tmp_path):
    with pytest.raises(ConfigError, match="exists"):
        publish(copy_of_saved, str(copy_of_saved))
    (copy_of_saved / HEAD_FILE).write_bytes(b"broken")
    with pytest.raises(BundleError, match="checksum"):
        publish(copy_of_saved, str(tmp_path / "published"))


@pytest.fixture
def copy_of_saved(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "m")
