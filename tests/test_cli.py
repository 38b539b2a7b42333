"""The `labelfuse` command run as a subprocess on real files, as a user would."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from fusion.cli import build_parser


def labelfuse(*args, check=True, env=None):
    cmd = [sys.executable, "-m", "fusion.cli", "-q", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"labelfuse {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def files(bbc, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    bbc["train"].groupby("label").head(40).rename(columns={"text": "body", "label": "topic"}).to_csv(
        d / "train.csv", index=False
    )
    bbc["val"].groupby("label").head(10).rename(columns={"text": "body", "label": "topic"}).to_json(
        d / "val.jsonl", orient="records", lines=True
    )
    bbc["test"].sample(60, random_state=0).reset_index(drop=True).rename(
        columns={"text": "body", "label": "topic"}
    ).to_parquet(d / "test.parquet")
    return d


@pytest.fixture(scope="module")
def trained(files):
    out = files / "model"
    p = labelfuse(
        "train",
        "--train",
        files / "train.csv",
        "--val",
        files / "val.jsonl",
        "--text-column",
        "body",
        "--label-column",
        "topic",
        "--set",
        "encoder.max_length=64",
        "--out",
        out,
    )
    assert "saved model bundle" in p.stdout and "validation:" in p.stdout
    return out


def test_train_predict_eval(files, trained):
    labelfuse(
        "predict",
        "--model",
        trained,
        "--input",
        files / "test.parquet",
        "--output",
        files / "pred.jsonl",
        "--text-column",
        "body",
        "--proba",
    )
    pred = pd.read_json(files / "pred.jsonl", lines=True)
    truth = pd.read_parquet(files / "test.parquet")
    assert len(pred) == 60 and set(pred["prediction"]) <= set(truth["topic"])
    assert (pred["prediction"].to_numpy() == truth["topic"].to_numpy()).mean() > 0.8
    proba_cols = [c for c in pred.columns if c.startswith("proba_")]
    assert len(proba_cols) == 5 and (pred[proba_cols].sum(axis=1) - 1).abs().max() < 1e-4
    assert "id" in pred.columns  # input columns are kept

    p = labelfuse(
        "eval",
        "--model",
        trained,
        "--data",
        files / "test.parquet",
        "--text-column",
        "body",
        "--label-column",
        "topic",
        "--report",
        files / "report",
    )
    assert "uncalibrated" in p.stdout and "accuracy" in p.stdout and "ece" in p.stdout
    report = json.loads((files / "report" / "report.json").read_text())
    assert report["metrics"]["n"] == 60 and report["metrics"]["accuracy"] > 0.8
    assert "## Per class" in (files / "report" / "report.md").read_text()
    for png in ("confusion_matrix.png", "reliability.png"):
        assert (files / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multilabel_indicator_columns_via_cli(bbc, tmp_path):
    df = bbc["train"].groupby("label").head(30)
    wide = pd.DataFrame({"text": df["text"]})
    for c in ("business", "sports"):
        wide[c] = (df["label"] == c).astype(int)
    wide.to_csv(tmp_path / "wide.csv", index=False)
    labelfuse(
        "train",
        "--train",
        tmp_path / "wide.csv",
        "--multilabel",
        "--label-columns",
        "business,sports",
        "--set",
        "encoder.max_length=48",
        "--out",
        tmp_path / "m",
    )
    labelfuse("predict", "--model", tmp_path / "m", "--input", tmp_path / "wide.csv", "--output", tmp_path / "p.csv")
    pred = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert set(pred["prediction"]) <= {"", "business", "sports", "business|sports"}
    assert (pred["prediction"] == "business").sum() > 10


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--train", "missing.csv", "--out", "m"], "input file not found: missing.csv"),
        (["train", "--train", "{train}", "--out", "m"], "column(s) ['text'] not found"),
        (
            ["train", "--train", "{train}", "--text-column", "body", "--label-column", "nope", "--out", "m"],
            "column(s) ['nope'] not found",
        ),
        (
            ["train", "--dataset", "bbc-news", "--set", "train.learnig_rate=1", "--out", "m"],
            "did you mean 'learning_rate'",
        ),
        (
            [
                "eval",
                "--model",
                "{model}",
                "--data",
                "{bad_labels}",
                "--text-column",
                "body",
                "--label-column",
                "topic",
            ],
            "unknown label(s) ['weather']",
        ),
        (["predict", "--model", "nowhere", "--input", "{train}", "--output", "o.csv"], "model bundle not found"),
    ],
)
def test_errors_are_human_readable(files, trained, args, message):
    pd.DataFrame({"body": ["rain"], "topic": ["weather"]}).to_csv(files / "bad.csv", index=False)
    subst = {"train": files / "train.csv", "model": trained, "bad_labels": files / "bad.csv"}
    p = labelfuse(*[a.format(**subst) for a in args], check=False)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr


def test_config_command_prints_effective_yaml():
    p = labelfuse("config", "--set", "train.seed=9")
    assert "seed: 9" in p.stdout and "model: all-MiniLM-L6-v2" in p.stdout


def test_help_lists_every_command_and_option():
    parser = build_parser()
    text = parser.format_help()
    for cmd in ("train", "predict", "eval", "config"):
        assert cmd in text
    sub = parser._subparsers._group_actions[0].choices
    for name, sp in sub.items():
        h = sp.format_help()
        for action in sp._actions:
            for flag in action.option_strings:
                assert flag in h, (name, flag)


def test_llm_spec_parsing_and_errors():
    from fusion.cli import parse_llm_spec
    from fusion.errors import ConfigError

    assert parse_llm_spec("local:qwen2.5-coder-0.5b") == {
        "name": "qwen2.5-coder-0.5b",
        "provider": "local",
        "model": "qwen2.5-coder-0.5b",
    }
    assert parse_llm_spec("fast=vllm:meta/llama-3@http://gpu1:8000/v1") == {
        "name": "fast",
        "provider": "vllm",
        "model": "meta/llama-3",
        "base_url": "http://gpu1:8000/v1",
    }
    assert parse_llm_spec("local:/models/My Model.gguf")["name"] == "My-Model"
    with pytest.raises(ConfigError, match="expected \\[NAME=\\]PROVIDER:MODEL"):
        parse_llm_spec("gpt-4o-mini")


def test_llm_models_lists_bundled_models_and_bad_llm_flags_exit_2(files):
    out = labelfuse("llm-models").stdout
    assert "smollm2-135m" in out and "ready" in out and "qwen2.5-coder-0.5b" in out
    bad = labelfuse(
        "train",
        "--train",
        files / "train.csv",
        "--text-column",
        "body",
        "--label-column",
        "topic",
        "--llm",
        "nosuch:model",
        "--out",
        files / "x",
        check=False,
    )
    assert bad.returncode == 2 and "llms.0.provider" in bad.stderr
    no_key = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    bad = labelfuse(
        "train",
        "--train",
        files / "train.csv",
        "--llm",
        "openai:gpt-4o-mini",
        "--out",
        files / "x",
        "--text-column",
        "body",
        "--label-column",
        "topic",
        check=False,
        env=no_key,
    )
    assert bad.returncode == 2 and "OPENAI_API_KEY" in bad.stderr
