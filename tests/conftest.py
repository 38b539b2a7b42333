"""Shared fixtures: the real bundled encoder and the real bbc-news corpus, with its embeddings (shipped in tests/data,
checked against the encoder, or else computed once per run)."""

import atexit
import hashlib
import http.server
import os
import shutil
import tempfile
import threading
import warnings
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# a fresh LLM score cache per test session (removed when it ends): no test may pass on answers cached by an earlier run
os.environ["LABELFUSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="labelfuse-test-cache-")
# Serve kills an HTTP proxy that is not ready within 5 s of its start, and serve.start then fails: on 2 busy
# cores (two xdist workers) a proxy's process can take longer to start. Every Ray the tests start inherits this.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
# Two of an idle Ray's own costs that no test looks at, for every Ray the tests start: its log monitor looks for
# new log files every 0.5 s instead of every 0.1 s (what Ray does once it watches 1,000 files), and its dashboard agent
# reads every process's CPU and memory for the node's stats every 30 s instead of 5 s. An idle Ray with Serve, an
# app and 6 actors, over 40 s: log monitor 1.14 -> 0.36 CPU-s, dashboard agent 0.86 -> 0.59.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", "30000")
# Serve replicas and routers hand their cached request metrics to Ray's every 1 s instead of every 0.1 s (Ray only
# reports them every 10 s). An idle app (two replicas and the proxy) over 30 s, two runs each: the whole Ray used
# 4.8 and 5.2 CPU-s before, 4.0 and 4.3 after.
os.environ.setdefault("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", "1000")
# Under pytest-xdist, each worker its share of the cores: torch, llama.cpp (fusion.llm.local.default_threads) and
# the Ray workers a test worker starts take their thread counts from OMP_NUM_THREADS, and two test workers each
# running thread pools as wide as the machine spin against each other on the same cores.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, share))

import numpy as np
import pytest

from fusion.config import EncoderConfig
from fusion.datasets import builtin_split, load_builtin, split
from fusion.encoder import TextEncoder

# The fresh cache of each test session links to one set of the encoder's ONNX exports for the whole run (made once
# per model and backend, checked against PyTorch as they are made): the pytest-xdist workers inherit the directory
# from the process that starts them, and `make test` gives both its lanes one.
atexit.register(shutil.rmtree, os.environ["LABELFUSE_CACHE_DIR"], ignore_errors=True)
if "LABELFUSE_TEST_ONNX_DIR" not in os.environ:  # removed by the process that made it, after its workers ended
    os.environ["LABELFUSE_TEST_ONNX_DIR"] = tempfile.mkdtemp(prefix="labelfuse-test-onnx-")
    atexit.register(shutil.rmtree, os.environ["LABELFUSE_TEST_ONNX_DIR"], ignore_errors=True)
os.symlink(os.environ["LABELFUSE_TEST_ONNX_DIR"], os.path.join(os.environ["LABELFUSE_CACHE_DIR"], "onnx"))

# A fifth of the product default (256) to keep the suite fast: embedding the bbc-news corpus on 2 cores took 20 s
# where it took 25 s at 64 tokens, and test accuracy is 96.4% (97.5% at 64, 98.0% at 128).
TEST_MAX_LENGTH = 48
MULTILABEL_MAX_LENGTH = 128


# The test files that take longest under `make test` (seconds of one xdist worker, measured on 2 cores), slowest
# first. pytest-xdist hands a file to whichever worker is free in collection order (`make test` turns off its own
# reordering by test count), so running these first leaves the short files to even out the end of the lane. An
# out-of-date list only costs balance.
SLOWEST_FILES = (
    "test_data_jobs.py",  # 256
    "test_serve_http.py",  # 132
    "test_learning_loop.py",  # 129
    "test_llm_local.py",  # 95
    "test_demo.py",  # 93
    "test_finetune.py",  # 64
    "test_serve_kafka.py",  # 59
    "test_classifier.py",  # 51
    "test_serve_config.py",  # 50
    "test_kafka_loop.py",  # 47
    "test_reliability.py",  # 46
    "test_serve_observability.py",  # 35
    "test_loop.py",  # 26
    "test_page.py",  # 23
    "test_cli.py",  # 22
)


def pytest_collection_modifyitems(items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: the order of the files is kept (the serial lane
        return  # runs the multi-node tests first, before its session-wide local Ray starts)
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def encoder() -> TextEncoder:
    return TextEncoder(EncoderConfig(max_length=TEST_MAX_LENGTH))


@pytest.fixture(scope="session")
def bbc() -> dict:
    return split(load_builtin("bbc-news"))


# Embeddings of the corpora the session fixtures share, shipped in tests/data: computing them took 67 CPU-s of
# every run (bbc-news at 48 tokens 40, the multi-label subset at 128 tokens 27; one process, 2 cores). A file is used
# only if it holds the same texts and the encoder, run on the first texts of each split now, gives the stored
# vectors (float16, so within 1e-3): a change of model, tokens or pooling falls back to embedding, with a warning.
# LABELFUSE_UPDATE_TEST_EMBEDDINGS=1 writes the files anew from what the run embedded.
TEST_DATA = Path(__file__).resolve().parent / "data"


def _texts_digest(texts: dict[str, list[str]]) -> str:
    h = hashlib.sha256()
    for k in sorted(texts):
        h.update(k.encode() + b"\0" + "\0".join(texts[k]).encode() + b"\1")
    return h.hexdigest()


def shipped_embeddings(name: str, encoder: TextEncoder, texts: dict[str, list[str]]) -> dict | None:
    """The stored embeddings of ``texts`` from tests/data, or None (and a warning) when they do not hold."""
    path = TEST_DATA / f"{name}.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        stored = {k: z[k].astype(np.float32) for k in z.files if k != "texts_sha256"}
        digest = str(z["texts_sha256"])
    if digest != _texts_digest(texts):
        warnings.warn(f"{path.name} holds other texts than the test corpus: embedding it instead", stacklevel=2)
        return None
    probe = {k: encoder.embed(t[:4]) for k, t in texts.items()}
    off = max(float(np.abs(probe[k] - stored[k][:4]).max()) for k in texts)
    if off > 1e-3:
        warnings.warn(f"{path.name} is not what this encoder gives (off by {off:.3g}): embedding instead; "
                      "LABELFUSE_UPDATE_TEST_EMBEDDINGS=1 writes it anew", stacklevel=2)  # fmt: skip
        return None
    return stored


def embed_once_per_run(tmp_path_factory, name: str, encoder: TextEncoder, texts: dict[str, list[str]]):
    """``encoder``'s embeddings of each list in ``texts``: the shipped ones (:func:`shipped_embeddings`), or
    computed once per test run. Under pytest-xdist the workers share that work in chunks kept in the run's shared
    temp dir: each embeds the chunks no other worker holds and loads the rest, instead of one embedding all while
    another waits for it (both need them first)."""
    update = bool(os.environ.get("LABELFUSE_UPDATE_TEST_EMBEDDINGS"))
    stored = None if update else shipped_embeddings(name, encoder, texts)
    if stored is not None:
        return stored
    emb = _embed_in_chunks(tmp_path_factory, name, encoder, texts)
    if update:
        TEST_DATA.mkdir(exist_ok=True)
        tmp = TEST_DATA / f".{name}.{os.getpid()}.npz"
        arrays = {k: v.astype(np.float16) for k, v in emb.items()}
        np.savez_compressed(tmp, texts_sha256=np.array(_texts_digest(texts)), **arrays)
        os.replace(tmp, TEST_DATA / f"{name}.npz")
    return emb


def _embed_in_chunks(tmp_path_factory, name: str, encoder: TextEncoder, texts: dict[str, list[str]]):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return {k: encoder.embed(t) for k, t in texts.items()}
    from filelock import FileLock, Timeout

    size = 8 * encoder.config.batch_size
    root = tmp_path_factory.getbasetemp().parent / name  # the run's dir, above each worker's
    root.mkdir(exist_ok=True)
    chunks: dict[tuple[str, int], np.ndarray] = {}
    todo = [(k, i) for k, t in texts.items() for i in range(0, len(t), size)]
    for wait in (0, -1):  # first the chunks no one holds, then wait for the others' to be written
        held = []
        for k, i in todo:
            path = root / f"{k}-{i}.npy"
            try:
                with FileLock(f"{path}.lock", timeout=wait):
                    if not path.is_file():
                        np.save(f"{path}.tmp.npy", encoder.embed(texts[k][i : i + size]))
                        os.replace(f"{path}.tmp.npy", path)
                    chunks[k, i] = np.load(path)
            except Timeout:
                held.append((k, i))
        todo = held
    return {k: np.concatenate([chunks[k, i] for i in range(0, len(t), size)]) for k, t in texts.items()}


@pytest.fixture(scope="session")
def bbc_emb(encoder, bbc, tmp_path_factory) -> dict:
    return embed_once_per_run(tmp_path_factory, "bbc_emb", encoder, {k: df["text"].tolist() for k, df in bbc.items()})


@pytest.fixture(scope="session")
def bbc_model(encoder, bbc, bbc_emb):
    from fusion.classifier import AutoFusionClassifier

    clf = AutoFusionClassifier({"encoder": {"max_length": TEST_MAX_LENGTH}}, encoder=encoder)
    return clf.fit(
        bbc["train"], validation=bbc["val"], embeddings=bbc_emb["train"], validation_embeddings=bbc_emb["val"]
    )


@pytest.fixture(scope="session")
def multilabel_frames() -> dict:
    """A subset of the derived bbc-news-multilabel set: train, val and test frames."""
    sizes = {"train": 400, "val": 150, "test": 200}
    return {k: builtin_split("bbc-news-multilabel", k).iloc[:n].reset_index(drop=True) for k, n in sizes.items()}


@pytest.fixture(scope="session")
def multilabel_data(multilabel_frames, tmp_path_factory) -> dict:
    """:func:`multilabel_frames` with embeddings, and the encoder that made them (``"encoder"``): 128 tokens, as
    a text there is two article openings and 64 tokens would cut the second."""
    encoder = TextEncoder(EncoderConfig(max_length=MULTILABEL_MAX_LENGTH))
    dfs = multilabel_frames
    emb = embed_once_per_run(
        tmp_path_factory, "multilabel_emb", encoder, {k: df["text"].tolist() for k, df in dfs.items()}
    )
    return {"encoder": encoder} | {k: (df, emb[k]) for k, df in dfs.items()}


def report(capsys, line: str, tag: str = "reliability") -> None:
    """Print a measured figure past pytest's capture, so CI's log keeps it."""
    with capsys.disabled():
        print(f"\n[{tag}] {line}")


def sample(df, n: int, seed: int = 0):
    """``n`` rows spread over all classes (bbc splits are ordered by class)."""
    return df.sample(n=n, random_state=seed).reset_index(drop=True)


# Words of each text in tests that ask the local LLM: a quarter of what the product sends it (llms[].max_words,
# 60). A call's CPU grows with its prompt: SmolLM2 on one idle thread answered 0.81 calls/s at 60 words and 1.55 at
# 20 (about 0.45 s a call plus 13 ms a word, on the EPYC without AVX-512 of 2026-12-03).
LLM_WORDS = 15


def short(text: str, words: int = LLM_WORDS) -> str:
    """The first ``words`` words of ``text``."""
    return " ".join(text.split()[:words])


def first_words(df, words: int = LLM_WORDS):
    """``df`` with each text cut to its first ``words`` words."""
    return df.assign(text=[short(t, words) for t in df["text"]])


def class_ids(df, classes) -> np.ndarray:
    return np.array([classes.index(c) for c in df["label"]])


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray runtime, started once per session (Prometheus metrics: the metrics_url fixture)."""
    import ray

    from fusion.llm.local import free_port

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    port = free_port()
    ray.init(
        address="local",  # its own, never a cluster someone started with `ray start` on this machine
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        namespace="labelfuse-tests",
        _metrics_export_port=port,
    )
    yield ray, f"http://127.0.0.1:{port}/metrics"
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_url(ray_local) -> str:
    """Where this session's Ray serves its Prometheus metrics."""
    return ray_local[1]


@pytest.fixture(scope="session")
def kafka_broker():
    """A real Kafka-protocol broker (tansu) on 127.0.0.1, in memory, stopped by its PID after the session."""
    from serve.dev_kafka import DevBroker

    with DevBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def serve_url(ray_local):
    """Ray Serve on this session's Ray, HTTP on a free 127.0.0.1 port; apps are deployed by the tests."""
    from ray import serve

    from fusion.llm.local import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def two_stage_bundle(bbc, tmp_path_factory):
    """A model whose encoder was fine-tuned as a classifier (``two-stage``, no LLM), saved: (path, model). Under
    pytest-xdist the first worker to need it fine-tunes and saves it (~10 CPU-s) and the others load it."""
    from filelock import FileLock

    from fusion.classifier import AutoFusionClassifier

    shared = os.environ.get("PYTEST_XDIST_WORKER")
    path = (tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.mktemp("two-stage")) / "two-stage"
    with FileLock(f"{path}.lock"):
        if not (path / "manifest.json").is_file():
            cfg = {"encoder": {"fine_tune": "two-stage", "max_length": 32, "fine_tuning": {"max_epochs": 2}}}
            clf = AutoFusionClassifier(cfg).fit(
                bbc["train"].groupby("label").head(8), validation=bbc["val"].groupby("label").head(4)
            )
            return str(clf.save(path)), clf
    return str(path), AutoFusionClassifier.load(path)


@pytest.fixture
def http_dir(tmp_path):
    """A directory served over HTTP on 127.0.0.1; yields (root dir, base URL, list of requested paths)."""
    root = tmp_path / "www"
    root.mkdir()
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
