"""Start from class names on a cluster: Ray Data embeds the corpus, the LLMs label a chosen few texts.

    ray job submit --working-dir . -- python -m data_jobs.bootstrap --input s3://bucket/tickets/ \\
        --classes-file classes.yaml --llm openai:gpt-4o-mini --ask 500 --llm-budget 2 --output model/ \\
        --store s3://bucket/labels --registry /shared/models

The corpus is embedded on the encoder actor pool (GPU actors when the cluster has GPUs, as in
:mod:`data_jobs.embed`); the texts and embeddings then come to the driver, which chooses the texts
to ask about, asks the LLMs through the cluster's shared budget ledger and trains
(:func:`fusion.bootstrap.bootstrap`). Rows the text rule refuses are counted and left out. The driver
holds the corpus' embeddings (1.5 GB per million texts with MiniLM): sample very large corpora first.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from data_jobs import common


def build_parser() -> argparse.ArgumentParser:
    from data_jobs.embed import add_pool_args
    from fusion.args import add_llm_args, add_output_arg

    p = common.job_parser("Train a model from unlabelled texts and class names with an LLM as the teacher.")
    common.add_input_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--classes", help="the class names, comma-separated")
    g.add_argument("--classes-file", help="YAML or JSON mapping each class name to a one-line description")
    p.add_argument("--multilabel", action="store_true", help="multilabel task")
    p.add_argument("--ask", type=int, required=True, help="texts to ask the LLMs about")
    p.add_argument("--store", help="keep every LLM answer in this label store (directory or URI)")
    p.add_argument("--registry", help="register the bundle and make it the champion")
    p.add_argument("--ledger-name", default="labelfuse-ledger", help="the shared budget ledger actor")
    from fusion.args import add_config_args

    add_config_args(p)
    add_llm_args(p, train=True)
    add_pool_args(p)
    add_output_arg(p, "bundle directory to write")
    return p


def run(args: argparse.Namespace) -> int:
    from data_jobs.embed import embed_dataset
    from data_jobs.ledger import shared_ledger
    from fusion.bootstrap import bootstrap
    from fusion.labelstore import LabelStore
    from fusion.loop_cli import bootstrap_config, print_report, save_bootstrapped

    common.connect(args.address)
    config = bootstrap_config(args)
    ds = common.read_corpus(args.input, args.format, args.text_column, args.id_column)
    ds = embed_dataset(
        ds,
        text_column=args.text_column,
        encoder=config.encoder.model_dump(),
        actors=args.actors,
        threads=args.threads,
        num_gpus=args.num_gpus,
        batch_size=args.batch_size,
    )
    df = ds.select_columns([args.text_column, "embedding", "error"]).to_pandas()
    bad = df["error"].notna()
    if bad.any():
        common.log.warning(
            "left out %d rows the encoder could not take (first: %s)", bad.sum(), df["error"][bad].iloc[0]
        )
    df = df[~bad]
    ledger = shared_ledger(args.ledger_name, config.llm_limits, namespace=common.NAMESPACE)
    clf, report = bootstrap(
        df[args.text_column].tolist(),
        config,
        ask=args.ask,
        store=LabelStore(args.store) if args.store else None,
        embeddings=np.stack(df["embedding"].to_numpy()).astype(np.float32),
        ledger=ledger,
    )
    save_bootstrapped(clf, report, args.output, args.registry)
    report["rows_left_out"] = int(bad.sum())
    print_report(report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
