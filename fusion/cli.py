"""The ``labelfuse`` command: train, predict, eval, config, llm-server, llm-models, and the learning loop's
bootstrap, retrain, registry and labels (:mod:`fusion.loop_cli`).

``serve`` and ``dev-kafka`` come from :mod:`serve.cli` through the ``labelfuse.commands``
entry point group, so this library never imports the Ray parts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fusion.args import (
    add_bundle_arg,
    add_config_args,
    add_llm_args,
    add_output_arg,
    config_from_args,
    refuse_unused,
    show_defaults,
    with_llm_args,
)
from fusion.errors import ConfigError, LabelfuseError
from fusion.remote import is_uri

log = logging.getLogger("labelfuse")

EPILOG = "Configuration reference: docs/configuration.md. Errors exit with status 2 (docs/operations.md#errors)."


def _add_column_args(p: argparse.ArgumentParser, labels: bool = True) -> None:
    p.add_argument("--text-column", metavar="NAME", help="column with the text (config: data.text_column)")
    if labels:
        p.add_argument("--label-column", metavar="NAME", help="column with a label or list of labels per row")
        p.add_argument("--label-columns", metavar="A,B,..", help="one 0/1 column per class instead of --label-column")


def _add_data_args(p: argparse.ArgumentParser, file_flag: str, file_help: str) -> None:
    from fusion.datasets import BUILTIN, SPLITS

    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--dataset", choices=sorted(BUILTIN), help="built-in offline dataset")
    g.add_argument(file_flag, metavar="FILE", help=file_help)
    p.add_argument("--split", choices=SPLITS, help="split of --dataset to use (default: test)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labelfuse",
        description="Text classification that fuses a transformer encoder with LLM class scores.",
        epilog=EPILOG,
    )
    from fusion import __version__

    parser.add_argument("--version", action="version", version=f"labelfuse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a model and save it as a bundle",
        epilog=EPILOG,
        description="Train on a built-in dataset (its train split; val split for early stopping and "
        "calibration) or on a file (validation held out from it unless --val is given).",
    )
    add_config_args(t)
    g = t.add_mutually_exclusive_group(required=True)
    from fusion.datasets import BUILTIN

    g.add_argument("--dataset", choices=sorted(BUILTIN), help="built-in offline dataset")
    g.add_argument("--train", metavar="FILE", help="training data: .csv, .tsv, .jsonl, .json or .parquet")
    t.add_argument("--val", metavar="FILE", help="validation data (default: hold out train.val_fraction of --train)")
    _add_column_args(t)
    t.add_argument("--multilabel", action="store_true", help="multilabel task (config: labels.mode=multilabel)")
    add_llm_args(t, train=True)
    add_output_arg(t, "where to write the model bundle", metavar="DIR")

    pr = sub.add_parser("predict", help="label texts in a file with a trained model", epilog=EPILOG)
    add_bundle_arg(pr, "model bundle written by 'labelfuse train'")
    pr.add_argument(
        "--input", required=True, metavar="FILE", help="texts to label (.csv, .tsv, .jsonl, .json, .parquet)"
    )
    add_output_arg(
        pr,
        "result table (.csv, .jsonl or .parquet): input columns + 'prediction' + 'error' (why a row has none)",
        metavar="FILE",
    )
    pr.add_argument("--proba", action="store_true", help="also write one 'proba_<class>' column per class")
    _add_column_args(pr, labels=False)

    e = sub.add_parser(
        "eval",
        help="evaluate a trained model and write a report",
        epilog=EPILOG,
        description="Metrics before and after calibration, written as report.json, report.md, "
        "reliability.png and (multiclass) confusion_matrix.png. A model with LLMs is also compared with "
        "its parts: encoder-only, LLM-only, fusion and gated fusion, with LLM calls, cache hits, tokens, "
        "dollars and latency, plus accuracy at each LLM-call rate.",
    )
    add_bundle_arg(e, "model bundle written by 'labelfuse train'")
    _add_data_args(e, "--data", "labelled data file to evaluate on")
    _add_column_args(e)
    add_llm_args(e, train=False)
    e.add_argument(
        "--train-fractions",
        metavar="F,F,..",
        help="also train every method on these shares of the training data (same splits and seed) and "
        "report learning curves on the evaluation rows, e.g. 0.05,0.1,0.2,0.5,1.0; training data is the "
        "--dataset train split, or --train/--val",
    )
    e.add_argument("--train", metavar="FILE", help="training data for --train-fractions with --data")
    e.add_argument("--val", metavar="FILE", help="validation data for --train-fractions with --data (required then)")
    e.add_argument("--report", metavar="DIR", help="report directory (default: <bundle>/eval-<data>)")

    s = sub.add_parser(
        "llm-server",
        help="serve a local GGUF model over an OpenAI-compatible HTTP API",
        epilog=EPILOG,
        description="Runs llama.cpp's server in this process: /v1/chat/completions (with logprobs and "
        "JSON-schema answers), /v1/models, /health. Point a scorer at it with provider 'custom' and "
        "base_url http://HOST:PORT/v1. Stops on Ctrl-C or SIGTERM.",
    )
    s.add_argument(
        "--model",
        default="smollm2-135m",
        help="bundled model name (see llm-models) or a GGUF path (default: smollm2-135m)",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    s.add_argument("--parallel", type=int, default=2, help="requests decoded at once (default: 2)")
    s.add_argument(
        "--threads", type=int, help="CPU threads (default: $OMP_NUM_THREADS, else every CPU this process may use)"
    )

    lm = sub.add_parser("llm-models", help="list the bundled local LLMs; --prepare assembles and verifies them")
    lm.add_argument(
        "--prepare",
        nargs="*",
        metavar="NAME",
        help="assemble (if split) and sha256-check these models (none: all installed)",
    )

    pb = sub.add_parser(
        "prepare",
        help="write the paper's train/val/test split of AG News or Reuters-10 from your copy of the files",
        description="ag-news: DIR with train.csv and test.csv of the AG News CSV release -> 4,000/500/500 "
        "balanced. reuters-10: DIR with the original reut2-*.sgm files of Reuters-21578 -> ModApte, the 10 most "
        "frequent topics, multi-label, 5,842/647/2,545. Writes DIR_OUT/{train,val,test}.jsonl (id, text, label).",
        epilog="Then: labelfuse train --train OUT/train.jsonl --val OUT/val.jsonl [--multilabel] --output MODEL; "
        "labelfuse eval --bundle MODEL --data OUT/test.jsonl. See docs/benchmarks.md.",
    )
    pb.add_argument("benchmark", choices=("ag-news", "reuters-10"))
    pb.add_argument("--source", required=True, metavar="DIR", help="where your copy of the original files is")
    add_output_arg(pb, "where the three JSON-lines files go", metavar="DIR")
    pb.add_argument("--seed", type=int, default=42, help="seed of the sampled splits (default: 42)")

    pub = sub.add_parser(
        "publish",
        help="copy a trained bundle to object storage, a model hub or a path, to load it from anywhere",
        description="Checks the bundle, then copies it to URI: s3://bucket/key, gs://..., az://... (with s3fs, "
        "gcsfs or adlfs installed), hf://owner/repo[@branch][/subdir] (a Hugging Face Hub model repo, created if "
        "needed; the printed URI names the commit), or a new local path. Every --bundle takes the printed URI; "
        "each machine downloads it once into $LABELFUSE_CACHE_DIR/bundles.",
        epilog=EPILOG,
    )
    add_bundle_arg(pub, "the bundle directory to publish")
    pub.add_argument("uri", metavar="URI", help="where to publish it")

    c = sub.add_parser("config", help="print the effective configuration as YAML", epilog=EPILOG)
    add_config_args(c)
    from fusion.loop_cli import add_commands

    add_commands(sub)  # bootstrap, retrain, registry, labels
    # commands of the Ray parts (serve, dev-kafka) register themselves: fusion does not import them
    from importlib.metadata import entry_points

    for ep in entry_points(group="labelfuse.commands"):
        ep.load()(sub)
    show_defaults(parser)
    return parser


# -- helpers -------------------------------------------------------------------------------------------------


def _column_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if getattr(args, "text_column", None):
        out.append(f"data.text_column={json.dumps(args.text_column)}")
    if getattr(args, "label_columns", None):
        cols = [c.strip() for c in args.label_columns.split(",") if c.strip()]
        out += [f"data.label_columns={json.dumps(cols)}", "data.label_column=null"]
    elif getattr(args, "label_column", None):
        out += [f"data.label_column={json.dumps(args.label_column)}", "data.label_columns=null"]
    return out


def _with_columns(config: Any, args: argparse.Namespace) -> Any:
    from fusion.config import apply_overrides

    extra = _column_overrides(args)
    return apply_overrides(config, extra) if extra else config


USAGE_COLUMNS = (
    "llm",
    "texts",
    "llm_calls",
    "cache_hits",
    "errors",
    "over_budget",
    "prompt_tokens",
    "completion_tokens",
    "spent_usd",
    "latency_mean_s",
)


def usage_rows(usage: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"llm": name, **u} for name, u in usage.items()]


def _rate_columns(clf: Any) -> tuple[str, ...]:
    from fusion.metrics import headline_key

    return ("target_rate", "call_rate", "threshold", headline_key(clf.multilabel), "macro_f1")


# -- commands ------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from fusion.bundle import check_destination
    from fusion.classifier import AutoFusionClassifier
    from fusion.config import apply_overrides
    from fusion.datasets import BUILTIN, builtin_split, read_table
    from fusion.report import format_summary, format_table

    check_destination(args.output)
    cfg = config_from_args(args)
    if args.dataset:
        columns = ("val", "multilabel", "text_column", "label_column", "label_columns")
        refuse_unused(
            {f"--{c.replace('_', '-')}": getattr(args, c) for c in columns},
            f"not used with --dataset, which brings its own split, columns and mode ({BUILTIN[args.dataset]})",
        )
        cfg = apply_overrides(
            cfg,
            [
                f"labels.mode={BUILTIN[args.dataset]}",
                "data.text_column=text",
                "data.label_column=label",
                "data.label_columns=null",
            ],
        )
        train_df = builtin_split(args.dataset, "train")
        val_df = builtin_split(args.dataset, "val")
        source = f"built-in {args.dataset} (train {len(train_df)}, val {len(val_df)})"
    else:
        if args.multilabel:
            cfg = apply_overrides(cfg, ["labels.mode=multilabel"])
        cfg = _with_columns(cfg, args)
        train_df = read_table(args.train)
        val_df = read_table(args.val) if args.val else None
        source = f"{args.train}" + (f" (validation {args.val})" if args.val else "")
    cfg = with_llm_args(cfg, args)
    if not cfg.llms:
        refuse_unused(
            {"--gate-rate": args.gate_rate, "--gate-accuracy": args.gate_accuracy},
            "sets when to ask the LLMs, and none is configured: add --llm",
        )
    llms = ", ".join(f"{c.name} ({c.provider}:{c.model})" for c in cfg.llms) or "none"
    print(
        f"training on {source}; encoder {cfg.encoder.model}, max_length {cfg.encoder.max_length}; LLMs: {llms}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    clf = AutoFusionClassifier(cfg).fit(train_df, validation=val_df, progress=not args.quiet)
    path = clf.save(args.output)
    tr = clf.training
    print(
        f"trained in {time.perf_counter() - start:.1f}s: {tr['n_train']} train / {tr['n_val']} validation rows, "
        f"best epoch {tr['best_epoch']} of {tr['epochs_run']}"
    )
    if "two_stage" in tr:
        ts = tr["two_stage"]
        print(
            f"encoder fine-tuned in two stages ({ts['features']}): {len(ts['fine_tunes'])} fine-tune(s) in "
            f"{ts['seconds']}s; the fusion head trained on the logits of {ts['head_rows']} rows"
        )
    print("validation:\n" + format_summary(clf.metrics["validation"]))
    for part, usage in clf.llm_usage.items():
        print(f"LLM usage ({part}):\n" + format_table(usage_rows(usage), USAGE_COLUMNS))
    if "gating" in clf.metrics:
        print("validation accuracy by LLM-call rate:\n" + format_table(clf.metrics["gating"], _rate_columns(clf)))
    gate = clf.head.gate_threshold if clf.head else None
    if gate is not None:
        print(f"cost gating on: LLMs asked when encoder confidence < {gate:.4f}")
    print(f"saved model bundle to {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from fusion.classifier import AutoFusionClassifier
    from fusion.datasets import BAD_LINE, output_format, read_table, require_columns, write_table
    from fusion.texts import clean_texts

    output_format(args.output)  # a bad output path is refused before the work
    clf = AutoFusionClassifier.load(args.bundle)
    column = args.text_column or clf.config.data.text_column
    df = read_table(args.input, keep_bad_lines=True)
    lines = df.pop(BAD_LINE).tolist() if BAD_LINE in df.columns else [None] * len(df)
    lines = [why if isinstance(why, str) else None for why in lines]
    if any(why is None for why in lines):
        require_columns(df, [column], "text")
    # a bad row fails alone: it gets its reason in 'error' and no prediction (the text rule: fusion.texts)
    cells = df[column].tolist() if column in df.columns else [None] * len(df)
    missing = lambda c: c is None or (isinstance(c, float) and c != c)  # noqa: E731
    texts, reasons = clean_texts(None if missing(c) else c for c in cells)  # CSV cells are read as strings
    reasons = [line or (r and f"text {r}") for line, r in zip(lines, reasons, strict=True)]
    ok = [i for i, r in enumerate(reasons) if r is None]
    proba = np.full((len(df), len(clf.classes)), np.nan)
    preds: list[Any] = [None] * len(df)
    if ok:
        results = clf.predict_details([texts[i] for i in ok], progress=not args.quiet).results()
        for i, res in zip(ok, results, strict=True):
            if "error" in res:
                reasons[i] = f"text {res['error']}"
                continue
            label = res["labels"] if clf.multilabel else res["label"]
            preds[i] = label  # a label set is written "a|b" to CSV
            proba[i] = [res["probabilities"][c] for c in clf.classes]
    out = df.copy()
    out["prediction"] = preds
    out["error"] = reasons
    if args.proba:
        for j, c in enumerate(clf.classes):
            out[f"proba_{c}"] = np.round(proba[:, j], 6)
    write_table(out, args.output)
    bad = sum(r is not None for r in reasons)
    print(f"wrote {len(out)} rows to {args.output}: {len(df) - bad} predictions" + (f", {bad} errors" if bad else ""))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fusion.classifier import AutoFusionClassifier
    from fusion.compare import compare_methods
    from fusion.datasets import builtin_split, read_table
    from fusion.metrics import headline_key
    from fusion.report import format_summary, format_table, write_report

    fractions = _fractions(args.train_fractions) if args.train_fractions else None
    if args.data:
        refuse_unused({"--split": args.split}, "picks a split of --dataset; --data is evaluated whole")
    if not fractions or args.dataset:
        refuse_unused(
            {"--train": args.train, "--val": args.val},
            "training data for --train-fractions with --data" + (" (--dataset brings its own)" if fractions else ""),
        )
    if fractions and not args.dataset and not (args.train and args.val):
        raise ConfigError("--train-fractions needs training data: use --dataset, or --train FILE and --val FILE")
    clf = AutoFusionClassifier.load(args.bundle)
    clf.config = with_llm_args(clf.config, args)
    if args.dataset:
        split = args.split or "test"
        df = builtin_split(args.dataset, split)
        data_name = f"{args.dataset}:{split}"
        from fusion.config import DataConfig

        clf.config.data = DataConfig()
    else:
        df = read_table(args.data)
        data_name = Path(args.data).name
        clf.config = _with_columns(clf.config, args)
    y = clf.targets(df)
    emb = clf.embed(df, progress=not args.quiet)
    # every LLM answer once (calls or cache), then reused by every metric, plot and comparison
    texts = list(df[clf.config.data.text_column])
    scores, batches = clf.llm_panel.score_missing(texts, emb, progress=not args.quiet)
    metrics = clf.evaluate(df, embeddings=emb, llm_scores=scores)
    proba = clf.predict_proba(df, embeddings=emb, llm_scores=scores, llm="all")
    raw = clf.predict_proba(df, embeddings=emb, llm_scores=scores, llm="all", calibrated=False)
    report_name = f"eval-{data_name.replace(':', '-')}"
    report_dir = Path(args.report or (report_name if is_uri(args.bundle) else Path(args.bundle) / report_name))
    info = {
        "model": str(args.bundle),
        "data": data_name,
        "rows": len(df),
        "encoder": clf.config.encoder.model,
        "llms": ", ".join(f"{c.name} ({c.provider}:{c.model})" for c in clf.config.llms) or "none",
        "mode": clf.config.labels.mode,
        "classes": ", ".join(clf.classes),
    }
    sections: dict[str, tuple[list[dict[str, Any]], tuple[str, ...]]] = {}
    print(f"evaluation on {data_name} ({len(df)} rows):")
    print(format_summary(metrics))
    head = clf._require_fitted()
    if head.layout.n_llms:
        cmp = compare_methods(clf, df, y, emb, batches)
        method_cols = ("method", headline_key(clf.multilabel), "macro_f1", "ece", "llm_texts", "usd", "call_rate")
        sections["Methods compared"] = (cmp["methods"], method_cols)
        usage = {name: b.stats.to_dict() for name, b in batches.items()}
        sections["LLM usage in this run"] = (usage_rows(usage), USAGE_COLUMNS)
        sections["Accuracy by LLM-call rate"] = (cmp["call_rates"], _rate_columns(clf))
    if fractions:
        sections["Learning curves"] = _learning_curves(args, clf, df, fractions, report_dir)
    for title, (rows, cols) in sections.items():
        print(f"\n{title}:\n" + format_table(rows, cols))
    paths = write_report(report_dir, metrics, head.label_space, y, proba, raw, info, sections)
    print(f"\nreport: {paths['markdown']} (+ report.json, PNG plots)")
    return 0


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--train-fractions {text!r}: expected numbers like 0.05,0.1,1.0") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise ConfigError(f"--train-fractions {text!r}: every share must be in (0, 1]")
    return sorted(set(values))


def _learning_curves(
    args: argparse.Namespace, clf: Any, test_df: Any, fractions: list[float], report_dir: Path
) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    from fusion.compare import learning_curves, plot_learning_curves
    from fusion.datasets import builtin_split, read_table
    from fusion.report import can_plot

    if args.dataset:
        train_df, val_df = builtin_split(args.dataset, "train"), builtin_split(args.dataset, "val")
    else:
        train_df, val_df = read_table(args.train), read_table(args.val)
    rows = learning_curves(clf.config, train_df, val_df, test_df, fractions, progress=not args.quiet)
    report_dir.mkdir(parents=True, exist_ok=True)
    from fusion.metrics import headline_key

    if can_plot():
        plot_learning_curves(rows, report_dir / "learning_curves.png", headline_key(clf.multilabel))
    return rows, tuple(rows[0])


def cmd_llm_server(args: argparse.Namespace) -> int:
    import signal
    import threading

    from fusion.llm.local import start_server

    server = start_server(args.model, host=args.host, port=args.port, parallel=args.parallel, threads=args.threads)
    print(f"serving {server.model_path} at {server.base_url} (OpenAI-compatible; Ctrl-C stops)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    print("stopped", flush=True)
    return 0


def cmd_llm_models(args: argparse.Namespace) -> int:
    from fusion.llm.local import BUNDLED, model_status, resolve_model

    if args.prepare is not None:
        names = args.prepare or [n for n in BUNDLED if model_status(n) != "not installed"]
        for name in names:
            if name not in BUNDLED:
                raise ConfigError(f"unknown bundled model {name!r}; known: {', '.join(BUNDLED)}")
            print(f"{name}: {resolve_model(name)} (sha256 verified)")
        return 0
    for name, m in BUNDLED.items():
        print(f"{name:<22} {model_status(name):<26} install: {m.install}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from fusion.benchmarks import prepare
    from fusion.datasets import read_table

    for split, path in prepare(args.benchmark, args.source, args.output, args.seed).items():
        df = read_table(path)
        labels = df["label"].explode().value_counts()
        print(f"{split:<5} {len(df):>6} rows -> {path}  ({len(labels)} classes: {', '.join(labels.index)})")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from fusion.remote import publish

    uri = publish(args.bundle, args.uri)
    print(f"published {args.bundle} to {uri}\nload it with: --bundle {uri}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fusion.config import config_to_yaml

    print(config_to_yaml(config_from_args(args)), end="")
    return 0


COMMANDS = {
    "train": cmd_train,
    "predict": cmd_predict,
    "eval": cmd_eval,
    "config": cmd_config,
    "publish": cmd_publish,
    "prepare": cmd_prepare,
    "llm-server": cmd_llm_server,
    "llm-models": cmd_llm_models,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        run = getattr(args, "run", None) or COMMANDS[args.command]  # plugins set `run`
        return run(args)
    except LabelfuseError as err:
        print(f"labelfuse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
