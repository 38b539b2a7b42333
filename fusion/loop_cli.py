"""The learning loop's commands: ``bootstrap``, ``retrain``, ``registry`` and ``labels`` (see docs/learning-loop.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fusion.args import add_config_args, add_llm_args, add_output_arg, config_from_args, with_llm_args
from fusion.errors import ConfigError

EPILOG = "The learning loop: docs/learning-loop.md. Errors exit with status 2."


def add_loop_args(p: argparse.ArgumentParser) -> None:
    """What ``labelfuse retrain`` and ``python -m data_jobs.retrain`` share."""
    from fusion.loop import LoopSettings

    d = LoopSettings()
    p.add_argument("--store", required=True, metavar="URI", help="the label store: a directory or URI")
    p.add_argument("--registry", required=True, metavar="DIR", help="the model registry (champion, bundles, reports)")
    p.add_argument(
        "--human-weight", type=float, default=d.human_weight, help="weight of a person's label against an LLM's"
    )
    p.add_argument(
        "--holdout", type=float, default=d.holdout_fraction, help="share of texts held out for the comparison"
    )
    p.add_argument(
        "--min-delta",
        type=float,
        default=d.min_delta,
        help="promote when the challenger's headline metric is at least the champion's minus this",
    )
    p.add_argument(
        "--min-new-labels",
        type=int,
        default=d.min_new_labels,
        metavar="N",
        help="skip unless the store has N new records since the last retrain (for schedules)",
    )
    p.add_argument(
        "--min-human-holdout",
        type=int,
        default=d.min_human_holdout,
        metavar="N",
        help="compare on the people's labels held out when there are at least N, else on agreement with the LLM",
    )
    p.add_argument(
        "--embedding-cache-rows",
        type=int,
        default=d.embedding_cache_rows,
        metavar="N",
        help="keep the encoder's vectors of up to N texts in the registry, so the next retrain embeds only new "
        "texts (0: keep none)",
    )
    add_config_args(p)


def loop_settings(args: argparse.Namespace) -> Any:
    from fusion.loop import LoopSettings

    if not 0 < args.holdout < 1:
        raise ConfigError(f"--holdout must be in (0, 1), got {args.holdout}")
    if args.human_weight <= 0:
        raise ConfigError(f"--human-weight must be positive, got {args.human_weight}")
    if args.embedding_cache_rows < 0:
        raise ConfigError(f"--embedding-cache-rows must be 0 or more, got {args.embedding_cache_rows}")
    return LoopSettings(
        human_weight=args.human_weight,
        holdout_fraction=args.holdout,
        min_delta=args.min_delta,
        min_new_labels=args.min_new_labels,
        min_human_holdout=args.min_human_holdout,
        embedding_cache_rows=args.embedding_cache_rows,
    )


def loop_config(args: argparse.Namespace) -> Any:
    """The --config file, or None to keep the champion's (--set changes either)."""
    from fusion.config import load_config

    return load_config(args.config) if args.config else None


def print_report(report: dict[str, Any]) -> None:
    print(json.dumps(report, indent=2, default=str))


def add_commands(sub: Any) -> None:
    b = sub.add_parser(
        "bootstrap",
        help="train a model from unlabelled texts and class names, with an LLM as the teacher",
        epilog=EPILOG,
        description="Asks the LLMs about --ask texts (first spread over the embedding space, then those a "
        "provisional model is least sure about), trains on their soft labels and saves a bundle. With --gold, "
        "calibration and the gate use those labelled texts; without, held-out LLM-labelled texts.",
    )
    b.add_argument("--input", required=True, metavar="FILE", help="unlabelled texts (.csv, .tsv, .jsonl, .parquet)")
    b.add_argument("--text-column", metavar="NAME", help="column with the text (config: data.text_column)")
    g = b.add_mutually_exclusive_group(required=True)
    g.add_argument("--classes", metavar="A,B,..", help="the class names")
    g.add_argument(
        "--classes-file", metavar="FILE", help="YAML or JSON mapping each class name to a one-line description"
    )
    b.add_argument("--multilabel", action="store_true", help="multilabel task")
    b.add_argument("--ask", type=int, required=True, metavar="N", help="texts to ask the LLMs about")
    b.add_argument("--gold", metavar="FILE", help="a small labelled set (text and label columns) for calibration")
    b.add_argument("--store", metavar="URI", help="keep every LLM answer (and --gold) in this label store")
    b.add_argument("--registry", metavar="DIR", help="register the bundle and make it the champion")
    add_config_args(b)
    add_llm_args(b, train=True)
    add_output_arg(b, "where to write the model bundle", metavar="DIR")
    b.set_defaults(run=cmd_bootstrap)

    r = sub.add_parser(
        "retrain",
        help="train a challenger on the label store; promote it if it is not worse than the champion",
        epilog=EPILOG,
        description="Trains on every label in --store (people's labels weighted above LLM answers), compares "
        "with the registry's champion on held-out labels and promotes or refuses; prints the report, which "
        "the registry keeps too. A Serve app whose bundle is the registry rolls the new champion out.",
    )
    add_loop_args(r)
    r.set_defaults(run=cmd_retrain)

    reg = sub.add_parser("registry", help="show the model registry, promote a bundle, or roll back", epilog=EPILOG)
    reg.add_argument("action", choices=("show", "promote", "rollback"))
    reg.add_argument("--registry", required=True, metavar="DIR", help="the model registry")
    reg.add_argument("--bundle", metavar="DIR", help="promote: the bundle to register and make the champion")
    reg.set_defaults(run=cmd_registry)

    lab = sub.add_parser(
        "labels",
        help="the label store: counts, import people's labels, export the texts most worth a label, compact",
        epilog=EPILOG,
        description="export: the texts the LLMs answered where a person's label would help most (the champion's "
        "encoder disagrees with the LLM, a low margin, a rare predicted class), at most --count, and at most "
        "--max-per-day a day; to --output FILE or a Kafka --topic. People answer with POST /v1/feedback or on the "
        "labels topic, naming each text by its text_id.",
    )
    lab.add_argument("action", choices=("stats", "import", "export", "compact"))
    lab.add_argument("--store", required=True, metavar="URI", help="the label store: a directory or URI")
    lab.add_argument("--input", metavar="FILE", help="import: a table of texts and labels")
    lab.add_argument("--text-column", default="text", help="import: the text column")
    lab.add_argument(
        "--label-column",
        default="label",
        help="import: the label column (a label set: a list, or labels joined by '|' as in CSV)",
    )
    lab.add_argument("--id-column", help="import: a column of label ids (a re-import then adds nothing)")
    lab.add_argument("--registry", metavar="DIR", help="export: the registry whose champion ranks the texts")
    lab.add_argument("--count", type=int, default=100, help="export: texts at most (default: 100)")
    lab.add_argument("--max-per-day", type=int, help="export: texts at most per day, counting earlier exports")
    lab.add_argument("--output", metavar="FILE", help="export: a .jsonl, .csv or .parquet file")
    lab.add_argument("--topic", help="export: a Kafka topic instead (one JSON message per text, keyed by text_id)")
    lab.add_argument("--kafka-bootstrap", metavar="HOST:PORT,..", help="export: the brokers of --topic")
    lab.set_defaults(run=cmd_labels)


def read_classes(args: argparse.Namespace) -> tuple[list[str], dict[str, str] | None]:
    if args.classes:
        names = [c.strip() for c in args.classes.split(",") if c.strip()]
        return names, None
    import yaml

    try:
        data = yaml.safe_load(Path(args.classes_file).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--classes-file {args.classes_file}: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) or v is None for v in data.values()):
        raise ConfigError(f"--classes-file {args.classes_file}: expected a mapping of class name to description")
    return [str(k) for k in data], {str(k): v for k, v in data.items() if v}


def bootstrap_config(args: argparse.Namespace) -> Any:
    """The config of ``bootstrap`` (command and job): --config/--set, the LLM options, the classes."""
    from fusion.config import parse_config

    classes, descriptions = read_classes(args)
    data = with_llm_args(config_from_args(args), args).model_dump()
    data["labels"].update(classes=classes, descriptions=descriptions)
    if args.multilabel:
        data["labels"]["mode"] = "multilabel"
    if getattr(args, "text_column", None):
        data["data"]["text_column"] = args.text_column
    return parse_config(data, source="bootstrap options")


def save_bootstrapped(clf: Any, report: dict[str, Any], output: str, registry: str | None) -> None:
    """Save the bundle (the report inside, under training.bootstrap); register and promote it with ``registry``."""
    clf.training["bootstrap"] = dict(report)
    report["bundle"] = str(clf.save(output))
    if registry:
        from fusion.registry import Registry

        reg = Registry(registry)
        report["champion"] = reg.register(output)
        reg.promote(report["champion"], {"bootstrap": report})


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from fusion.bootstrap import bootstrap
    from fusion.bundle import check_destination
    from fusion.datasets import read_table, require_columns
    from fusion.labelstore import LabelStore
    from fusion.registry import Registry

    check_destination(args.output)  # where the bundle goes is checked before any LLM is paid
    if args.registry:
        Registry(args.registry).state()

    config = bootstrap_config(args)
    df = read_table(args.input)
    column = config.data.text_column
    require_columns(df, [column], "text")
    gold: dict[str, Any] = {}
    if args.gold:
        g = read_table(args.gold)
        label_col = config.data.label_column or "label"
        require_columns(g, [column, label_col], "gold")
        gold = {"gold_texts": g[column].tolist(), "gold_labels": g[label_col]}
    store = LabelStore(args.store) if args.store else None
    clf, report = bootstrap(df[column].tolist(), config, ask=args.ask, store=store, progress=not args.quiet, **gold)
    save_bootstrapped(clf, report, args.output, args.registry)
    print_report(report)
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from fusion.labelstore import LabelStore
    from fusion.loop import retrain
    from fusion.registry import Registry

    report = retrain(
        LabelStore(args.store),
        Registry(args.registry),
        loop_settings(args),
        config=loop_config(args),
        overrides=args.overrides or (),
        progress=not args.quiet,
    )
    print_report(report)
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from fusion.registry import Registry

    reg = Registry(args.registry)
    if args.action == "promote":
        if not args.bundle:
            raise ConfigError("registry promote needs --bundle DIR")
        version = reg.register(args.bundle)
        reg.promote(version, {"manual": True, "bundle": args.bundle})
        print(f"champion: {version}")
    elif args.action == "rollback":
        print(f"champion: {reg.rollback()} (rolled back)")
    else:
        state = reg.state()
        print(json.dumps({"root": str(reg.root), **state, "versions": reg.versions()}, indent=2))
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    from fusion.labelstore import LabelStore

    store = LabelStore(args.store)
    if args.action == "import":
        import_labels(args, store)
    elif args.action == "export":
        export(args, store)
    elif args.action == "compact":
        print(f"compacted {store.compact()} parts", file=sys.stderr)
    print(json.dumps(store.stats(), indent=2))
    return 0


def import_labels(args: argparse.Namespace, store: Any) -> None:
    """People's labels from a table; a bad row is refused alone, with its row number and reason."""
    import pandas as pd

    from fusion.datasets import read_table, require_columns
    from fusion.errors import DataError
    from fusion.labels import LABEL_SEPARATOR, normalize_labels
    from fusion.labelstore import human_label

    if not args.input:
        raise ConfigError("labels import needs --input FILE")
    df = read_table(args.input)
    require_columns(df, [c for c in (args.text_column, args.label_column, args.id_column) if c], "labels")
    # a missing id is no id: the label is kept, and a re-import adds it again
    ids = [None if pd.isna(i) else str(i) for i in df[args.id_column]] if args.id_column else [None] * len(df)
    records, refused = [], []
    for row, (t, lab, i) in enumerate(zip(df[args.text_column], df[args.label_column], ids, strict=True)):
        try:
            labels = normalize_labels([lab], multilabel=True, separator=LABEL_SEPARATOR)[0]  # "a|b": a label set
            if not labels:
                raise DataError("has no label")
            records.append(human_label(t, labels, label_id=i, origin=f"import:{Path(args.input).name}"))
        except DataError as err:
            refused.append(f"row {row}: {err}")
    store.append(records)
    print(f"imported {len(records)} labels into {store.uri}", file=sys.stderr)
    if refused:
        print(f"refused {len(refused)} rows: " + "; ".join(refused[:5]), file=sys.stderr)


def export(args: argparse.Namespace, store: Any) -> None:
    from fusion.classifier import AutoFusionClassifier
    from fusion.loop import worth_asking
    from fusion.registry import resolve_bundle

    if not args.registry or (args.output is None) == (args.topic is None):
        raise ConfigError("labels export needs --registry and one of --output FILE or --topic (with --kafka-bootstrap)")
    if args.topic and not args.kafka_bootstrap:
        raise ConfigError("labels export --topic needs --kafka-bootstrap")
    champion = AutoFusionClassifier.load(resolve_bundle(args.registry))
    picked = worth_asking(store, champion, args.count, max_per_day=args.max_per_day)
    if args.output:
        from fusion.datasets import write_table

        write_table(picked, args.output)
    else:
        try:
            from kafka import KafkaProducer  # type: ignore[import-untyped]
        except ImportError:
            raise ConfigError("labels export --topic needs kafka-python: pip install 'labelfuse[ray]'") from None

        producer = KafkaProducer(bootstrap_servers=args.kafka_bootstrap.split(","), acks="all")
        for row in picked.to_dict("records"):
            producer.send(args.topic, key=row["text_id"].encode(), value=json.dumps(row, default=str).encode())
        producer.flush()
        producer.close()
    print(f"exported {len(picked)} texts to {args.output or args.topic}", file=sys.stderr)
