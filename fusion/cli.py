"""The ``labelfuse`` command: train, predict, eval, config."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fusion.errors import LabelfuseError

log = logging.getLogger("labelfuse")

EPILOG = "Configuration reference: README.md#configuration. Errors exit with status 2."


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML or JSON config file (default: built-in defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config value, e.g. --set train.seed=7 --set encoder.max_length=128 (repeatable)",
    )


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
    p.add_argument("--split", choices=SPLITS, default="test", help="split of --dataset to use (default: test)")


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
    _add_config_args(t)
    g = t.add_mutually_exclusive_group(required=True)
    from fusion.datasets import BUILTIN

    g.add_argument("--dataset", choices=sorted(BUILTIN), help="built-in offline dataset")
    g.add_argument("--train", metavar="FILE", help="training data: .csv, .tsv, .jsonl, .json or .parquet")
    t.add_argument("--val", metavar="FILE", help="validation data (default: hold out train.val_fraction of --train)")
    _add_column_args(t)
    t.add_argument("--multilabel", action="store_true", help="multilabel task (config: labels.mode=multilabel)")
    t.add_argument("--out", required=True, metavar="DIR", help="where to write the model bundle")

    pr = sub.add_parser("predict", help="label texts in a file with a trained model", epilog=EPILOG)
    pr.add_argument("--model", required=True, metavar="DIR", help="model bundle written by 'labelfuse train'")
    pr.add_argument(
        "--input", required=True, metavar="FILE", help="texts to label (.csv, .tsv, .jsonl, .json, .parquet)"
    )
    pr.add_argument(
        "--output",
        required=True,
        metavar="FILE",
        help="result table (.csv, .jsonl or .parquet): input columns + 'prediction'",
    )
    pr.add_argument("--proba", action="store_true", help="also write one 'proba_<class>' column per class")
    _add_column_args(pr, labels=False)

    e = sub.add_parser(
        "eval",
        help="evaluate a trained model and write a report",
        epilog=EPILOG,
        description="Metrics before and after calibration, written as report.json, report.md, "
        "reliability.png and (multiclass) confusion_matrix.png.",
    )
    e.add_argument("--model", required=True, metavar="DIR", help="model bundle written by 'labelfuse train'")
    _add_data_args(e, "--data", "labelled data file to evaluate on")
    _add_column_args(e)
    e.add_argument("--report", metavar="DIR", help="report directory (default: <model>/eval-<data>)")

    c = sub.add_parser("config", help="print the effective configuration as YAML", epilog=EPILOG)
    _add_config_args(c)
    return parser


# -- helpers -------------------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Any:
    from fusion.config import Config, apply_overrides, load_config

    cfg = load_config(args.config) if args.config else Config()
    return apply_overrides(cfg, args.overrides) if args.overrides else cfg


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


# -- commands ------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from fusion.classifier import AutoFusionClassifier
    from fusion.config import apply_overrides
    from fusion.datasets import BUILTIN, builtin_split, read_table
    from fusion.report import format_summary

    cfg = _config(args)
    if args.dataset:
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
    print(f"training on {source}; encoder {cfg.encoder.model}, max_length {cfg.encoder.max_length}", file=sys.stderr)
    start = time.perf_counter()
    clf = AutoFusionClassifier(cfg).fit(train_df, validation=val_df, progress=not args.quiet)
    path = clf.save(args.out)
    tr = clf.training
    print(
        f"trained in {time.perf_counter() - start:.1f}s: {tr['n_train']} train / {tr['n_val']} validation rows, "
        f"best epoch {tr['best_epoch']} of {tr['epochs_run']}"
    )
    print("validation:\n" + format_summary(clf.metrics["validation"]))
    print(f"saved model bundle to {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from fusion.classifier import AutoFusionClassifier
    from fusion.datasets import output_format, read_table, write_table

    fmt = output_format(args.output)
    clf = AutoFusionClassifier.load(args.model)
    if args.text_column:
        clf.config.data.text_column = args.text_column
    df = read_table(args.input)
    proba = clf.predict_proba(df, progress=not args.quiet)
    preds = clf.decide(proba)
    out = df.copy()
    if clf.multilabel and fmt == "csv":
        out["prediction"] = ["|".join(p) for p in preds]
    else:
        out["prediction"] = preds
    if args.proba:
        for j, c in enumerate(clf.classes):
            out[f"proba_{c}"] = np.round(proba[:, j], 6)
    write_table(out, args.output)
    print(f"wrote {len(out)} predictions to {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fusion.classifier import AutoFusionClassifier
    from fusion.datasets import builtin_split, read_table
    from fusion.report import format_summary, write_report

    clf = AutoFusionClassifier.load(args.model)
    if args.dataset:
        df = builtin_split(args.dataset, args.split)
        data_name = f"{args.dataset}:{args.split}"
        from fusion.config import DataConfig

        clf.config.data = DataConfig()
    else:
        df = read_table(args.data)
        data_name = Path(args.data).name
        clf.config = _with_columns(clf.config, args)
    y = clf.targets(df)
    emb = clf.embed(df, progress=not args.quiet)
    metrics = clf.evaluate(df, embeddings=emb)
    proba = clf.predict_proba(df, embeddings=emb)
    raw = clf.predict_proba(df, embeddings=emb, calibrated=False)
    report_dir = Path(args.report) if args.report else Path(args.model) / f"eval-{data_name.replace(':', '-')}"
    info = {
        "model": str(args.model),
        "data": data_name,
        "rows": len(df),
        "encoder": clf.config.encoder.model,
        "mode": clf.config.labels.mode,
        "classes": ", ".join(clf.classes),
    }
    paths = write_report(report_dir, metrics, clf.label_space, y, proba, raw, info)
    print(f"evaluation on {data_name} ({len(df)} rows):")
    print(format_summary(metrics))
    print(f"report: {paths['markdown']} (+ report.json, PNG plots)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fusion.config import config_to_yaml

    print(config_to_yaml(_config(args)), end="")
    return 0


COMMANDS = {"train": cmd_train, "predict": cmd_predict, "eval": cmd_eval, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except LabelfuseError as err:
        print(f"labelfuse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
