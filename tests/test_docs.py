"""The README and docs/ document what the code does."""

import argparse
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

from pydantic import BaseModel

from fusion.cli import build_parser

REPO = Path(__file__).parent.parent
README = (REPO / "README.md").read_text()


def test_every_cli_subcommand_is_documented():
    sub = build_parser()._subparsers._group_actions[0].choices
    for name in sub:
        assert re.search(rf"labelfuse {name}\b", README), name


def test_first_screen_has_the_two_commands():
    first = "\n".join(README.splitlines()[:40])
    assert "make demo" in first and "make test" in first


def test_every_serve_metric_is_in_the_operations_guide():
    names = set(re.findall(r'"(labelfuse_[a-z_]+)"', (REPO / "serve" / "metrics.py").read_text()))
    assert len(names) >= 10
    guide = (REPO / "docs" / "operations.md").read_text()
    missing = [n for n in sorted(names) if f"| `{n}` |" not in guide]
    assert not missing, f"metrics missing from the table in docs/operations.md: {missing}"


# -- generated references ------------------------------------------------------------------------------------
def test_generated_references_are_current():
    """docs/configuration.md, http-api.md, openapi.json and the price table are what docs/generate.py writes."""
    out = subprocess.run(
        [sys.executable, str(REPO / "docs" / "generate.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr


def _keys(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        args = (f.annotation, *get_args(f.annotation), *(a for t in get_args(f.annotation) for a in get_args(t)))
        inner = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner:
            yield from _keys(inner[0], f"{prefix}{name}{'[]' if name == 'llms' else ''}.")
        else:
            yield f"{prefix}{name}"


def test_the_configuration_reference_has_every_setting_with_its_default():
    from fusion.config import Config
    from serve.settings import AppSettings, KafkaSettings

    ref = (REPO / "docs" / "configuration.md").read_text()
    keys = [*_keys(Config), *_keys(AppSettings)]
    assert "llms[].provider" in keys and "kafka.bootstrap_servers" in keys and len(keys) > 70
    missing = [k for k in keys if f"| `{k}` |" not in ref]
    assert not missing, f"docs/configuration.md lacks {missing}"
    # defaults and limits come from the models, whatever they are
    assert f"| `encoder.max_length` | integer | `{Config().encoder.max_length}` |" in ref
    batch = KafkaSettings.model_fields["batch_size"]
    ge, le = (next(getattr(m, k) for m in batch.metadata if hasattr(m, k)) for k in ("ge", "le"))
    assert f"| `kafka.batch_size` | integer | `{batch.default}` |" in ref and f"Allowed: >= `{ge}`, <= `{le}`." in ref


def test_the_http_reference_lists_every_route_and_status_the_app_answers():
    spec = json.loads((REPO / "docs" / "openapi.json").read_text())
    ref = (REPO / "docs" / "http-api.md").read_text()
    routes = [f"## {method.upper()} {path}" for path, item in spec["paths"].items() for method in item]
    assert "## POST /v1/classify" in routes and not [r for r in routes if r not in ref]
    for path, item in spec["paths"].items():  # every error status of every route is in that route's table
        for method, op in item.items():
            section = ref.split(f"## {method.upper()} {path}\n", 1)[1].split("\n## ", 1)[0]
            assert not [c for c in op["responses"] if c != "200" and f"\n| {c} |" not in section], (method, path)
    from serve.schemas import ClassifyResult

    results = ref.split("#### ClassifyResult\n", 1)[1].split("####", 1)[0]
    assert not [f for f in ClassifyResult.model_fields if f"| `{f}` |" not in results]


# -- the error reference ---------------------------------------------------------------------------------------
def test_every_error_class_and_http_status_is_in_the_error_reference():
    import fusion.llm.scorer  # noqa: F401  (defines LLMCallError)
    from fusion.errors import LabelfuseError

    guide = (REPO / "docs" / "operations.md").read_text()
    classes = {c.__name__ for c in LabelfuseError.__subclasses__()}
    assert {"ConfigError", "DataError", "BundleError", "LLMCallError"} <= classes
    assert not [c for c in classes if f"| `{c}` |" not in guide]
    spec = json.loads((REPO / "docs" / "openapi.json").read_text())
    statuses = {int(s) for item in spec["paths"].values() for op in item.values() for s in op["responses"]}
    assert not [s for s in statuses - {200} if f"\n| {s} |" not in guide]


PLACEHOLDERS = {"(...)": r"\(.*\)", "N": r"\d+", "M": r"\d+", "TYPE": r"\w+"}  # in the guide's reason table


def test_every_dead_letter_reason_is_in_the_kafka_guide():
    from serve.kafka import decode
    from serve.settings import KafkaSettings

    s = KafkaSettings(
        bootstrap_servers="x:9092", input_topics=["in"], output_topic="o", dead_letter_topic="d", max_chars=50
    )
    bad = [
        None,
        b"\xff\xfe",
        b"{not json",
        b"[1, 2]",
        b"7",
        b"{}",
        b'{"text": 5}',
        b'{"text": ["a"]}',
        b'{"text": " "}',
        b'{"text": "\\u0000\\u200b"}',
        b'{"text": "ok \\ud800"}',
        b"[" * 5000,
        b'{"text": ' + b"9" * 5000 + b"}",
    ]
    bad.append(json.dumps({"text": "x" * 51}).encode())
    reasons = [decode(SimpleNamespace(value=v), s).error for v in bad]
    assert all(reasons)
    # and the reasons of messages that fail alone in the graph (serve.deployments.Fusion, serve.kafka.TaggerLoop)
    reasons += [
        "text could not be embedded (TypeError: TextEncodeInput must be ...)",
        "text got no finite probabilities from the model",
        "text failed alone in the model (ValueError: boom)",
    ]
    guide = (REPO / "docs" / "kafka.md").read_text()
    table = guide.split("| reason (`labelfuse.error`) | cause |", 1)[1].split("\n\n", 1)[0]
    cells = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    patterns = [
        "".join(PLACEHOLDERS.get(t, re.escape(t)) for t in re.split(r"(\(\.\.\.\)|\b(?:N|M|TYPE)\b)", c)) for c in cells
    ]
    unlisted = [r for r in reasons if not any(re.fullmatch(p, r) for p in patterns)]
    assert not unlisted, f"dead-letter reasons missing from docs/kafka.md: {unlisted}"


# -- every command in the docs ---------------------------------------------------------------------------------
# Each command in the docs' ```bash blocks is checked against the code below; and each one is run by the test
# named here (or by `make demo`, which runs `labelfuse demo`), or it is listed in NOT_RUN_HERE with the reason.
RETRAIN = (
    "tests/test_learning_loop.py::test_retrain_promotes_the_better_model_refuses_a_worse_one_and_rollback_restores"
)
RUN_BY = {
    "make demo": "tests/test_demo.py::test_demo_trains_serves_streams_reports_and_stops_only_what_it_started",
    "make test": ".ci/run",
    "make lint": ".ci/run",
    "make docs": "tests/test_docs.py::test_generated_references_are_current",
    "make serve": "tests/test_serve_config.py::test_labelfuse_serve_joins_a_running_serve_and_stops_only_what_it_started",
    "labelfuse train": "tests/test_cli.py::test_train_predict_eval",
    "labelfuse predict": "tests/test_cli.py::test_train_predict_eval",
    "labelfuse eval": "tests/test_llm_local.py::test_cli_train_and_eval_with_the_local_llm",
    "labelfuse config": "tests/test_cli.py::test_the_installed_command_runs_with_its_plugins",
    "labelfuse publish": "tests/test_remote.py::test_publish_to_s3_with_the_cli_then_load_from_there",
    "labelfuse llm-server": "tests/test_llm_local.py::test_llm_server_stops_cleanly_on_sigterm",
    "labelfuse llm-models": "tests/test_cli.py::test_llm_models_lists_bundled_models_and_bad_llm_flags_exit_2",
    "labelfuse demo": "tests/test_demo.py::test_demo_trains_serves_streams_reports_and_stops_only_what_it_started",
    "labelfuse prepare": "tests/test_benchmarks.py::test_reuters_recipe_trains_and_evaluates_multilabel",
    "labelfuse serve": "tests/test_serve_config.py::test_labelfuse_serve_joins_a_running_serve_and_stops_only_what_it_started",
    "labelfuse dev-kafka": "tests/test_serve_config.py::test_dev_kafka_command_runs_a_broker_until_sigterm",
    "labelfuse bootstrap": "tests/test_learning_loop.py::test_bootstrap_command_calibrates_on_gold_labels",
    "labelfuse labels": "tests/test_loop.py::test_labels_command_imports_counts_and_compacts",
    "labelfuse retrain": RETRAIN,
    "labelfuse registry": RETRAIN,
    "data_jobs.retrain": RETRAIN,
    "data_jobs.bootstrap": "tests/test_learning_loop.py::test_bootstrap_from_class_names_trains_a_model_without_gold_labels",
    "data_jobs.embed": "tests/test_data_jobs.py::test_embed_job_writes_embeddings_and_keeps_bad_rows_with_a_reason",
    "data_jobs.score": "tests/test_data_jobs.py::test_score_train_and_backfill_with_the_local_llm",
    "data_jobs.train": "tests/test_data_jobs.py::test_score_train_and_backfill_with_the_local_llm",
    "data_jobs.backfill": "tests/test_data_jobs.py::test_a_killed_backfill_resumes_and_writes_every_id_exactly_once",
    "ray job submit": "tests/test_multinode.py::test_a_backfill_finishes_when_a_worker_node_is_lost",
    "curl /v1/classify": "tests/test_serve_http.py::test_classify_matches_the_library_and_reports_the_model",
    "curl /v1/feedback": "tests/test_learning_loop.py::test_paid_llm_answers_and_feedback_are_kept_once_even_when_the_writer_dies",
    "python -c": "tests/test_serve_config.py::test_labelfuse_serve_joins_a_running_serve_and_stops_only_what_it_started",
    "pytest": ".ci/run",
}
NOT_RUN_HERE = {
    "make bench": "benchmarks take minutes and their figures vary by machine; docs/development.md gives the measured ratios",
    "make system-deps": ".ci/run",
    "make fuzz": "the same property tests make test runs, with 10x the examples (about 15 minutes)",
    "make test-fast": "the tests make test runs that are not marked integration (pytest -m 'not integration')",
    "ray up": "needs a cloud account; tests/test_deploy.py validates cluster.yaml",
    "ray exec": "needs a cloud account",
    "ray down": "needs a cloud account",
    "ray job logs": "Ray's own CLI, a view of a running job",
    "ray start": "Ray's own CLI; the multi-node tests start the same head and worker processes with "
    "ray.cluster_utils.Cluster and `ray job submit` a backfill to it",
    "ray get-auth-token": "Ray's own CLI; a local Ray writes the same token file (~/.ray/auth_token) when there is "
    "none, and every later Ray and `ray job submit` on the machine use it",
    "docker": "no Docker daemon on the test machine; the Dockerfile's base image is Ray's",
    "kubectl": "no Kubernetes here; tests/test_deploy.py validates the manifests",
    "serve deploy": "serve/config.yaml and deploy/serve-cluster.yaml are built by tests/test_deploy.py",
    "grep": "a shell utility",
    "export": "a shell builtin",
}


def _expand(arg: str, env: dict[str, str]) -> str:
    """``$NAME`` from the block's own ``NAME=value`` lines, then from the environment (``$PWD``)."""
    return os.path.expandvars(re.sub(r"\$(\w+)", lambda m: env.get(m[1], m[0]), arg))


def _doc_commands():
    """(file, argv) for every command line in the ```bash blocks of README.md and docs/*.md."""
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            env: dict[str, str] = {}
            for line in block.replace("\\\n", " ").splitlines():
                argv = [_expand(a, env) for a in shlex.split(line, comments=True)]
                if len(argv) == 1 and re.fullmatch(r"\w+=\S+", argv[0]):
                    name, _, value = argv[0].partition("=")
                    env[name] = value
                elif argv:
                    yield path.relative_to(REPO), argv


def _strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """No abbreviated flags: a misspelt `--gate-rat` in the docs must not pass as `--gate-rate`."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _strict(sub)
    return parser


def _check_python(argv: list[str]) -> str:
    """The RUN_BY key of a python command line, after checking it against the code."""
    if argv[0] == "-m" and argv[1].startswith("data_jobs."):
        module = importlib.import_module(argv[1])
        _strict(module.build_parser()).parse_args(argv[2:])  # SystemExit (argparse's error) fails the test
        return argv[1]
    if argv[0] == "-m" and argv[1] == "pytest":
        assert all((REPO / a.split("::")[0]).exists() for a in argv[2:] if not a.startswith("-"))
        return "pytest"
    if argv[0] == "-c":
        compile(argv[1], "<docs>", "exec")
        return "python -c"
    raise AssertionError(f"no rule for python {argv}")


def _check(argv: list[str]) -> str:
    cmd, args = Path(argv[0]).name, argv[1:]
    if cmd == "labelfuse":
        _strict(build_parser()).parse_args(args)
        return f"labelfuse {next(a for a in args if not a.startswith('-'))}"
    if cmd.startswith("python"):
        return _check_python(args)
    if cmd == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        assert args[0] in targets, f"no make target {args[0]}"
        return f"make {args[0]}"
    if cmd == "curl":
        from serve.schemas import ClassifyRequest, FeedbackRequest

        url = next(a for a in args if "localhost" in a or a.startswith("http"))
        path = "/" + url.split("//")[-1].split("/", 1)[1]
        assert path in json.loads((REPO / "docs" / "openapi.json").read_text())["paths"], path
        if "-d" in args:
            schema = {"/v1/classify": ClassifyRequest, "/v1/feedback": FeedbackRequest}[path]
            schema.model_validate_json(args[args.index("-d") + 1])
        return f"curl {path}"
    if cmd == "ray" and args[:2] == ["job", "submit"]:
        _check(args[args.index("--") + 1 :])  # the entrypoint
        return "ray job submit"
    if cmd == "ray":
        for a in args:  # files named on the command line exist: cluster.yaml, serve configs
            for f in re.findall(r"[\w/.-]+\.ya?ml", a):
                assert (REPO / f).is_file(), f
        return f"ray {args[0]}" if args[0] != "job" else f"ray job {args[1]}"
    if cmd in ("docker", "kubectl", "serve"):
        for f in [a for a in args if a.endswith((".yaml", "Dockerfile"))]:
            assert (REPO / f).is_file(), f
        return cmd if cmd != "serve" else f"serve {args[0]}"
    return cmd


def test_every_command_in_the_docs_matches_the_code_and_is_run_by_a_test():
    commands = list(_doc_commands())
    assert len(commands) > 40
    seen = set()
    for where, argv in commands:
        try:
            key = _check(argv)
        except (SystemExit, Exception) as err:
            raise AssertionError(f"{where}: `{shlex.join(argv)}` does not match the code: {err!r}") from None
        assert key in RUN_BY or key in NOT_RUN_HERE, f"{where}: `{shlex.join(argv)}`: no test runs {key!r}"
        seen.add(key)
    for test in {RUN_BY[k] for k in seen & RUN_BY.keys()}:
        file, _, name = test.partition("::")
        assert (REPO / file).is_file() and (not name or f"def {name}(" in (REPO / file).read_text()), test
    assert {"labelfuse serve", "data_jobs.backfill", "curl /v1/classify", "ray job submit"} <= seen


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_docs_leads_to_a_file_and_heading():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    anchors = {p.resolve(): {_slug(h) for h in re.findall(r"^#+ (.+)$", p.read_text(), re.M)} for p in pages}
    broken, links = [], 0
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", page.read_text()):
            if target.startswith(("http:", "https:")):
                continue
            links += 1
            path = (page.parent / target).resolve() if target else page.resolve()
            if not path.exists() or (anchor and anchor not in anchors.get(path, set())):
                broken.append(f"{page.name}: ({target}#{anchor})")
    assert links > 30 and not broken, broken


def test_the_yaml_examples_are_valid_settings():
    import yaml

    from fusion.config import parse_config
    from serve.settings import KafkaSettings

    example = README.split("## Configuration", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    parse_config(yaml.safe_load(example))  # raises ConfigError naming any wrong key or value
    kafka = (REPO / "docs" / "kafka.md").read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    KafkaSettings.model_validate(yaml.safe_load(kafka)["kafka"])  # raises ValidationError likewise
