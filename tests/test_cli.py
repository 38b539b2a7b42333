"""The `labelfuse` command on real files, run in-process through ``main(argv)`` as a user's shell would run it
(one test runs the installed console script in a subprocess)."""

import argparse
import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from fusion.cli import build_parser, main


def labelfuse(*args, check=True):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["-q", *map(str, args)])
        except SystemExit as exit_:  # argparse refusing the arguments
            code = exit_.code
    proc = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check and code != 0:
        raise AssertionError(f"labelfuse {args} exited {code}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_the_installed_command_runs_with_its_plugins():
    """The console script, in a subprocess: the entry point, and the serve commands registered as plugins."""
    exe = Path(sys.executable).with_name("labelfuse")
    p = subprocess.run([exe, "config", "--set", "train.seed=9"], capture_output=True, text=True, check=True)
    assert "seed: 9" in p.stdout and "model: all-MiniLM-L6-v2" in p.stdout
    p = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert all(cmd in p.stdout for cmd in ("train", "predict", "eval", "serve", "dev-kafka", "demo"))


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
        "--output",
        out,
    )
    assert "saved model bundle" in p.stdout and "validation:" in p.stdout
    return out


def test_train_predict_eval(files, trained):
    labelfuse(
        "predict",
        "--bundle",
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
        "--bundle",
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
        "--output",
        tmp_path / "m",
    )
    labelfuse("predict", "--bundle", tmp_path / "m", "--input", tmp_path / "wide.csv", "--output", tmp_path / "p.csv")
    pred = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert set(pred["prediction"]) <= {"", "business", "sports", "business|sports"}
    assert (pred["prediction"] == "business").sum() > 10
    # the predictions, "a|b" label sets in CSV, train as they were written: corrected labels go straight back in
    pred.loc[0, "prediction"] = "business|sports"
    pred.to_csv(tmp_path / "p.csv", index=False)
    labelfuse("train", "--train", tmp_path / "p.csv", "--multilabel", "--label-column", "prediction",
              "--set", "encoder.max_length=48", "--output", tmp_path / "again")  # fmt: skip
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["label_space"]["classes"] == [
        "business", "sports"]  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--train", "missing.csv", "--output", "m"], "input file not found: missing.csv"),
        (["train", "--train", "{train}", "--output", "m"], "column(s) ['text'] not found"),
        (
            ["train", "--train", "{train}", "--text-column", "body", "--label-column", "nope", "--output", "m"],
            "column(s) ['nope'] not found",
        ),
        (
            ["train", "--dataset", "bbc-news", "--set", "train.learnig_rate=1", "--output", "m"],
            "did you mean 'learning_rate'",
        ),
        (
            [
                "eval",
                "--bundle",
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
        (["predict", "--bundle", "nowhere", "--input", "{train}", "--output", "o.csv"], "model bundle not found"),
        # options that would be ignored are refused, with why
        (["train", "--dataset", "bbc-news", "--val", "{train}", "--output", "m"], "--val: not used with --dataset"),
        (["train", "--train", "{train}", "--gate-rate", "0.3", "--output", "m"], "--gate-rate: sets when to ask"),
        (["eval", "--bundle", "{model}", "--data", "{train}", "--split", "val"], "--split: picks a split of --dataset"),
        # --split beside --dataset is taken: the command goes on, to the missing bundle
        (["eval", "--bundle", "nowhere", "--dataset", "bbc-news", "--split", "val"], "bundle not found"),
        (["eval", "--bundle", "{model}", "--data", "{train}", "--val", "{train}"], "--val: training data for"),
        # empty data is an error before any work, not a traceback after it
        (["train", "--train", "{train}", "--val", "{empty}", "--text-column", "body", "--label-column", "topic",
          "--output", "m"], "no validation rows"),
        (["eval", "--bundle", "{model}", "--data", "{empty}", "--text-column", "body", "--label-column", "topic"],
         "no rows to evaluate"),
    ],
)  # fmt: skip
def test_errors_are_human_readable(files, trained, args, message):
    pd.DataFrame({"body": ["rain"], "topic": ["weather"]}).to_csv(files / "bad.csv", index=False)
    (files / "empty.csv").write_text("body,topic\n")
    subst = {
        "train": files / "train.csv",
        "model": trained,
        "bad_labels": files / "bad.csv",
        "empty": files / "empty.csv",
    }
    p = labelfuse(*[a.format(**subst) for a in args], check=False)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr


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
                hidden = action.help == argparse.SUPPRESS  # an old spelling (--model, --out), still accepted
                assert bool(re.search(re.escape(flag) + r"(?![\w-])", h)) != hidden, (name, flag)


def test_llm_spec_parsing_and_errors():
    from fusion.args import parse_llm_spec
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


def test_llm_models_lists_bundled_models_and_bad_llm_flags_exit_2(files, monkeypatch):
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
        "--output",
        files / "x",
        check=False,
    )
    assert bad.returncode == 2 and "llms.0.provider" in bad.stderr
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    bad = labelfuse(
        "train",
        "--train",
        files / "train.csv",
        "--llm",
        "openai:gpt-4o-mini",
        "--output",
        files / "x",
        "--text-column",
        "body",
        "--label-column",
        "topic",
        check=False,
    )
    assert bad.returncode == 2 and "OPENAI_API_KEY" in bad.stderr


def test_old_flag_spellings_still_work_with_a_warning(files, trained):
    p = labelfuse("predict", "--model", trained, "--input", files / "test.parquet", "--text-column", "body",
                  "--out", files / "old.csv")  # fmt: skip
    assert (files / "old.csv").is_file() and "wrote 60 rows" in p.stdout
    assert "--model is deprecated and will be removed; use --bundle" in p.stderr and "use --output" in p.stderr
    p = labelfuse("predict", "--input", files / "test.parquet", "--output", files / "x.csv", check=False)
    assert p.returncode == 2 and "one of the arguments --bundle is required" in p.stderr
