"""Score a corpus with the configured LLMs on a Ray Data actor pool, under ONE shared ledger.

    python -m data_jobs.score --input embedded/ --output scored/ --llm local:smollm2-135m --classes a,b,c

Every scorer actor reserves and settles each call with the same named ledger actor
(:mod:`data_jobs.ledger`), so the dollar budget, the global concurrency cap and the
request/token rates hold for the whole pool, on any number of nodes. The SQLite score cache
is per node (``$LABELFUSE_CACHE_DIR`` or ``~/.cache/labelfuse`` on each machine): a text
scored on one node is a cache hit only for actors on that node.

Output: the input columns plus, per LLM ``NAME``: ``llm_NAME`` (per-class scores; null where
the LLM gave none), ``llm_NAME_error`` and ``llm_NAME_cost_usd``. A text that fails (over
budget, out of retries, an invalid answer) gets a null score and its reason; the job goes on.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_jobs import common
from data_jobs.embed import write_parquet

BATCH_ROWS = 32


class ScoreRows:
    """Ray Data callable class: an :class:`fusion.llm.LLMPanel` bound to the shared ledger."""

    def __init__(self, llms: list[dict[str, Any]], classes: list[str], multilabel: bool, limits: dict, ledger: Any):
        from fusion.config import LLMLimitsConfig, LLMScorerConfig
        from fusion.llm import LLMPanel

        configs = [LLMScorerConfig(**c) for c in llms]
        self.panel = LLMPanel(configs, classes, multilabel, LLMLimitsConfig(**limits), ledger=ledger)
        self.names = [c.name for c in configs]
        self.n_classes = len(classes)

    def __call__(self, batch: pa.Table, text_column: str = "text") -> pa.Table:
        ok = common.ok_rows(batch)
        texts = batch.column(text_column).to_pylist()
        scored = self.panel.score([texts[i] for i in ok]) if ok else {}
        n = batch.num_rows
        for name in self.names:
            b = scored.get(name)
            used = [j for j in range(len(ok)) if b is not None and b.used[j]]
            rows = b.scores[used] if b is not None else np.zeros((0, self.n_classes), np.float32)
            errors: list[str | None] = [None] * n
            cost = np.zeros(n)
            if b is not None:
                for j, i in enumerate(ok):
                    errors[i] = b.errors[j]
                    cost[i] = b.cost_usd[j]
            batch = batch.append_column(
                f"llm_{name}", common.fixed_size_list(rows, self.n_classes, [ok[j] for j in used], n)
            )
            batch = batch.append_column(f"llm_{name}_error", pa.array(errors, pa.string()))
            batch = batch.append_column(f"llm_{name}_cost_usd", pa.array(cost, pa.float64()))
        return batch


def score_dataset(
    ds: Any,
    *,
    config: Any,
    classes: list[str],
    ledger: Any,
    text_column: str = "text",
    actors: int | None = None,
    num_cpus: float | None = None,
    batch_size: int = BATCH_ROWS,
) -> Any:
    """Add the LLM score columns to ``ds``; ``ledger`` is a :class:`data_jobs.ledger.RayLedger`."""
    local = any(c.provider == "local" for c in config.llms)
    return ds.map_batches(
        ScoreRows,
        compute=common.pool(actors, 1),
        fn_constructor_kwargs={
            "llms": [c.model_dump() for c in config.llms],
            "classes": classes,
            "multilabel": config.labels.mode == "multilabel",
            "limits": config.llm_limits.model_dump(),
            "ledger": ledger,
        },
        fn_kwargs={"text_column": text_column},
        batch_size=batch_size,
        batch_format="pyarrow",
        # a local model computes in the actor's process; a remote API only waits on the network
        num_cpus=num_cpus if num_cpus is not None else (1.0 if local else 0.25),
    )


def _distinct(batch: pa.Table, column: str) -> pa.Table:
    return pa.table({column: pc.unique(batch.column(column))})


def infer_classes(ds: Any, label_column: str) -> list[str]:
    if label_column not in ds.columns():
        raise common.DataError(f"no --classes given and the input has no {label_column!r} column to infer them from")
    # each block's distinct labels, merged here: Ray Data's ds.unique() shuffles through aggregator actors, about
    # 7 s even for a few rows on 2 cores
    per_block = ds.select_columns([label_column]).map_batches(
        _distinct, fn_args=(label_column,), batch_format="pyarrow", batch_size=None, **common.light()
    )
    classes = sorted({str(r[label_column]) for r in per_block.take_all() if r[label_column] is not None})
    if not classes:  # e.g. an embed job's output of an unlabelled corpus: the column is there, all null
        raise common.DataError(f"no --classes given and the input's {label_column!r} column has no labels")
    return classes


def build_parser() -> argparse.ArgumentParser:
    from fusion.args import add_config_args, add_llm_args

    p = common.job_parser("Score a corpus with the configured LLMs on a Ray Data actor pool; write parquet.")
    common.add_input_args(p)
    add_config_args(p)
    add_llm_args(p, train=True, gate=False)
    p.add_argument("--output", required=True, help="output directory or URI (overwritten)")
    p.add_argument("--classes", help="comma-separated class names (default: config labels.classes, else the labels)")
    p.add_argument("--label-column", default="label", help="carried to the output; classes are inferred from it")
    p.add_argument("--multilabel", action="store_true", help="multi-label task (needs --classes or labels.classes)")
    p.add_argument(
        "--ledger-name", help="named ledger actor to share (default: a new one for this run, its journal deleted after)"
    )
    p.add_argument("--actors", type=int, help="scorer actors (default 1; the ledger caps calls in flight anyway)")
    p.add_argument(
        "--cpus-per-actor",
        type=float,
        help="CPUs per scorer actor (default 1 for local models, else 0.25); a local model runs one thread per CPU",
    )
    p.add_argument("--batch-size", type=int, default=BATCH_ROWS, help="texts per scorer batch")
    p.add_argument("--rows-per-file", type=int, default=100_000, help="minimum rows per output file")
    return p


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from data_jobs.ledger import shared_ledger
    from fusion.args import config_from_args, with_llm_args
    from fusion.config import LabelsConfig, apply_overrides

    common.check_output(args.output, args.input, replaced=True)
    config = with_llm_args(config_from_args(args), args)
    if args.multilabel:
        config = apply_overrides(config, ["labels.mode=multilabel"])
    if not config.llms:
        raise common.ConfigError("no LLM to score with: pass --llm PROVIDER:MODEL or set llms in --config")
    classes: list[str] | None = None
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        try:
            LabelsConfig(classes=classes)
        except ValidationError as err:
            raise common.ConfigError(f"--classes {args.classes!r}: {err.errors()[0]['msg']}") from None
    elif config.labels.classes:
        classes = list(config.labels.classes)
    elif config.labels.mode == "multilabel":
        raise common.ConfigError("a multi-label task needs its classes: pass --classes or set labels.classes")
    common.connect(args.address)
    keep = ["id", "embedding", args.label_column]
    ds = common.read_corpus(args.input, args.format, args.text_column, args.id_column, keep=keep)
    if classes is None:
        classes = infer_classes(ds, args.label_column)
    name = args.ledger_name or f"labelfuse-ledger-{uuid.uuid4().hex[:8]}"
    ledger = shared_ledger(name, config.llm_limits)
    common.log.info("scoring with %s over %d classes; ledger %s", [c.name for c in config.llms], len(classes), name)
    start = time.perf_counter()
    ds = score_dataset(
        ds,
        config=config,
        classes=classes,
        ledger=ledger,
        text_column=args.text_column,
        actors=args.actors,
        num_cpus=args.cpus_per_actor,
        batch_size=args.batch_size,
    )
    write_parquet(ds, args.output, args.rows_per_file)
    info = {"classes": classes, "multilabel": config.labels.mode == "multilabel", "llms": config.model_dump()["llms"]}
    common.write_sidecar(args.output, {**common.read_sidecar(args.input), **info})  # keeps the embed job's encoder
    snap = ledger.snapshot()
    if args.ledger_name is None:  # this run's own ledger: nothing to resume later
        ledger.discard()
    common.log.info(
        "scored %s -> %s in %.1fs: %d LLM calls, %d tokens, $%.4f spent, %d denied by the budget",
        args.input,
        args.output,
        time.perf_counter() - start,
        snap["calls"],
        snap["tokens"],
        snap["spent_usd"],
        snap["denied_budget"],
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
