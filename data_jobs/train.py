"""Train the fusion model from embedded (and LLM-scored) parquet and write a model bundle.

    python -m data_jobs.train --input scored/ --llm local:smollm2-135m --output model/

The input is what :mod:`data_jobs.embed` / :mod:`data_jobs.score` wrote: ``embedding``, the
label column and, per configured LLM ``NAME``, ``llm_NAME`` scores (null = no answer; the
model learns to do without). Rows with an ``error`` are left out and counted. Training runs
in the job's driver: the data are embeddings and scores, small next to the texts they came from.
With ``encoder.fine_tune`` on (and with the default 'auto' where the driver has a CUDA GPU), the
encoder trains on the texts instead.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_jobs import common
from fusion.args import add_output_arg


def load_table(path: str, columns: list[str]) -> Any:
    """A pandas frame of ``columns`` (plus ``error``) from a parquet output directory or URI."""
    ds = common.read_parquet(path)
    missing = [c for c in columns if c not in ds.columns()]
    if missing:
        raise common.DataError(f"{path} has no column(s) {missing}; it has {ds.columns()}")
    keep = [c for c in dict.fromkeys([*columns, "error"]) if c in ds.columns()]
    return ds.select_columns(keep).to_pandas()


def scores_matrix(column: Any, n_classes: int) -> np.ndarray:
    """A list column with nulls to an (n, n_classes) float32 array with NaN rows for the nulls."""
    out = np.full((len(column), n_classes), np.nan, dtype=np.float32)
    for i, v in enumerate(column):
        if v is not None:
            out[i] = v
    return out


def split_features(df: Any, config: Any, classes: list[str]) -> tuple[Any, np.ndarray, dict[str, np.ndarray]]:
    """(rows without errors, embeddings, {llm: scores}) of a loaded table."""
    if "error" in df.columns:
        bad = df["error"].notna()
        if bad.any():
            common.log.warning("leaving out %d row(s) with errors (first: %s)", bad.sum(), df["error"][bad].iloc[0])
        df = df[~bad].reset_index(drop=True)
    if df.empty:
        raise common.DataError("no usable rows to train on")
    emb = np.stack(df["embedding"].to_numpy()).astype(np.float32)
    scores = {c.name: scores_matrix(df[f"llm_{c.name}"].tolist(), len(classes)) for c in config.llms}
    return df, emb, scores


def build_parser() -> argparse.ArgumentParser:
    from fusion.args import add_config_args, add_llm_args

    p = common.job_parser("Train the fusion model from embedded/scored parquet; write a model bundle.")
    p.add_argument("--input", required=True, help="training rows: output of data_jobs.embed or data_jobs.score")
    p.add_argument("--validation", help="validation rows, same layout (default: hold out train.val_fraction)")
    add_output_arg(p, "bundle directory to write")
    p.add_argument("--text-column", help="column with the text, kept for few-shot examples (config: data.text_column)")
    p.add_argument("--label-column", help="column with the label or list of labels (config: data.label_column)")
    add_config_args(p)
    add_llm_args(p, train=True)
    return p


def run(args: argparse.Namespace) -> int:
    from fusion.args import config_from_args, with_llm_args
    from fusion.bundle import check_destination
    from fusion.classifier import AutoFusionClassifier
    from fusion.config import parse_config

    check_destination(args.output)
    common.connect(args.address)
    config = with_llm_args(config_from_args(args), args).model_dump()
    if args.text_column:
        config["data"]["text_column"] = args.text_column
    if args.label_column:
        config["data"].update(label_column=args.label_column, label_columns=None)
    info = common.read_sidecar(args.input)
    if not info.get("encoder"):  # a killed embed or score job leaves parts, but not the sidecar it writes last
        raise common.DataError(
            f"{args.input} has no {common.SIDECAR} naming the encoder of its embeddings: it is not the output of a "
            "finished embed job (or of a score job run on one); run that job again"
        )
    config["encoder"] = info["encoder"]  # the embeddings came from this encoder: the bundle must embed the same way
    if info.get("classes"):  # score columns are in the scorer's class order: train in the same order
        config["labels"].update(classes=info["classes"], mode="multilabel" if info["multilabel"] else "multiclass")
    if not config["llms"] and info.get("llms"):
        config["llms"] = info["llms"]  # the LLMs that scored the input
    config = parse_config(config, source="data_jobs.train options")
    if config.llms and not config.labels.classes:
        raise common.ConfigError(f"{args.input} names no classes in {common.SIDECAR}; set labels.classes")
    labels = config.data.label_columns or [config.data.label_column]
    columns = [config.data.text_column, "embedding", *labels, *[f"llm_{c.name}" for c in config.llms]]
    classes = config.labels.classes or []
    train_df, emb, scores = split_features(load_table(args.input, columns), config, classes)
    tuned = config.encoder.fine_tuned  # a fine-tuned encoder trains on the texts, not on their frozen embeddings
    val: dict[str, Any] = {}
    if args.validation:
        v_df, v_emb, v_scores = split_features(load_table(args.validation, columns), config, classes)
        val = {"validation": v_df, "validation_llm_scores": v_scores or None}
        val["validation_embeddings"] = None if tuned else v_emb
    common.log.info("training on %d rows (%d-d embeddings, LLMs %s)", len(train_df), emb.shape[1], list(scores))
    start = time.perf_counter()
    clf = AutoFusionClassifier(config)
    clf.fit(train_df, embeddings=None if tuned else emb, llm_scores=scores or None, **val)
    path = clf.save(args.output)
    summary = {k: clf.metrics["validation"].get(k) for k in ("accuracy", "macro_f1", "ece")}
    common.log.info("trained in %.1fs; validation %s; bundle %s", time.perf_counter() - start, summary, path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
