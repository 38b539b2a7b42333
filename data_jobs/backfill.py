"""Classify a whole corpus with a trained bundle: read, embed, gate, LLM-score, fuse, write.

    python -m data_jobs.backfill --bundle model/ --input corpus/ --output predictions/
    ray job submit --working-dir . -- .venv/bin/python -m data_jobs.backfill --bundle ... (see docs/batch-jobs.md)

Two actor pools: encoder actors (GPU when the cluster has one) and predictor actors that run
the bundle's cost gate, ask the LLMs about the texts the encoder is unsure of (every call
reserved with one shared ledger actor) and fuse. A run that asks no LLM (a bundle without
LLMs, or ``--llm off``) has one pool: each encoder actor applies the head to its own
embeddings, so they never leave it. Output rows: ``id``, ``label`` (or
``labels``), ``probabilities`` (one field per class), ``llm_used``, ``gated_out``,
``llm_cost_usd``, ``llm_error`` and ``error`` (the row could not be classified).

Resumable and exactly-once by id: each output part is written to a temporary name and
renamed, so a part is either whole or absent; its name is a hash of its ids, so a retried
task rewrites the same part. A re-run after a crash reads the ids already written and skips
them. Each part's parquet metadata carries its counts, so ``_summary.json`` (rows, throughput,
LLM calls, cache hits, tokens, dollars, errors) covers every run that wrote into ``--output``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_jobs import common
from data_jobs.embed import EncodeRows, add_pool_args, embed_dataset, map_on_encoders
from fusion.args import deprecated
from fusion.config import LLM_MODES, LLMMode

if TYPE_CHECKING:  # fusion.head imports torch: the read and write tasks of a backfill must not pay for it
    from fusion.head import Prediction

PARTS_PREFIX = "part-"
META_KEY = b"labelfuse"
SUMMARY = "_summary.json"
USAGE = ("llm_calls", "cache_hits", "over_budget", "prompt_tokens", "completion_tokens", "spent_usd")
# what each part's parquet metadata records and the summary adds up
COUNTS = ("rows", "errors", "llm_used", "gated_out", "llm_errors", "llm_cost_usd", *USAGE)


class PredictRows:
    """Ray Data callable class: the bundle's fusion head (gate, fuse, decide) and its LLM panel bound to the
    shared ledger; the encoder is not loaded (the rows carry their embeddings)."""

    def __init__(self, bundle: str, ledger: Any, id_column: str, llm: LLMMode = "auto"):
        from fusion.bundle import Bundle

        b = Bundle.open(bundle)
        self.head = b.head()
        self.panel = b.panel(ledger) if self.head.layout.n_llms and llm != "off" else None
        self.id_column, self.llm = id_column, llm

    def _predict(self, texts: list[str], emb: np.ndarray) -> Prediction:
        return self.head.predict(texts, emb, self.panel, self.llm)

    def _isolate(self, batch: pa.Table, texts: list[str], ok: list[int]) -> pa.Table:
        """After a failed batch: rows that fail alone get their reason in ``error``; if every row
        fails and a known-good input fails too, the predictor itself is broken and the error is raised."""
        from fusion.texts import PROBE_TEXT

        emb = common.embeddings(batch)
        failed: dict[int, str] = {}
        for i in ok:
            try:
                self._predict([texts[i]], emb[i : i + 1])
            except Exception as err:
                failed[i] = f"text failed alone in the model ({type(err).__name__}: {err})"[:500]
        if len(failed) == len(ok):  # the training mean embedding is a known-good input: raises if broken
            self._predict([PROBE_TEXT], self.head.scaler.mean[None, : self.head.layout.embed_dim])
        return common.with_errors(batch, failed)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = common.ok_rows(batch)
        texts = batch.column("text").to_pylist()
        pred = None
        if ok:
            try:
                pred = self._predict([texts[i] for i in ok], common.embeddings(batch)[ok])
            except Exception as err:
                common.log.warning("a batch of %d rows failed (%s); predicting each alone", len(ok), err)
                batch = self._isolate(batch, texts, ok)
                ok = common.ok_rows(batch)
                pred = self._predict([texts[i] for i in ok], common.embeddings(batch)[ok]) if ok else None
        rows: list[dict[str, Any] | None] = [None] * batch.num_rows
        errors = batch.column("error").to_pylist()
        usage: dict[str, float] = {}
        if pred is not None:
            for i, res in zip(ok, pred.results(), strict=True):
                if "error" in res:
                    errors[i] = f"text {res['error']}"
                else:
                    rows[i] = res
            for u in pred.usage.values():
                for k in USAGE:
                    usage[k] = usage.get(k, 0) + (u.get(k) or 0)
        return self._table(batch, rows, errors, usage)

    def _table(
        self, batch: pa.Table, rows: list[dict[str, Any] | None], errors: list[str | None], usage: dict[str, float]
    ) -> pa.Table:
        """The output columns from per-row results (:meth:`fusion.head.Prediction.results`); None: no result."""
        n, classes, ml = batch.num_rows, self.head.classes, self.head.multilabel
        key = "labels" if ml else "label"

        def col(name: str, default: Any) -> list[Any]:
            return [default if r is None else r[name] for r in rows]

        proba = [pa.array([None if r is None else r["probabilities"][c] for r in rows], pa.float32()) for c in classes]
        cols = {
            self.id_column: batch.column(self.id_column),
            key: pa.array(col(key, None), pa.list_(pa.string()) if ml else pa.string()),
            "probabilities": pa.StructArray.from_arrays(proba, names=classes, mask=pa.array([r is None for r in rows])),
            "llm_used": pa.array(col("llm_used", False)),
            "gated_out": pa.array(col("gated_out", False)),
            "llm_cost_usd": pa.array(col("llm_cost_usd", 0.0), pa.float64()),
            "llm_error": pa.array(col("llm_error", None), pa.string()),
            "error": pa.array(errors, pa.string()),
            # this batch's LLM usage rides on its first row; write_part sums and drops it
            "_usage": pa.array([json.dumps(usage)] + [None] * (n - 1), pa.string()),
        }
        return pa.table(cols)


class EmbedAndPredict:
    """Ray Data callable class for a run that asks no LLM: the bundle's encoder and its head in one actor
    (:class:`~data_jobs.embed.EncodeRows`, then :class:`PredictRows` without a panel)."""

    def __init__(self, bundle: str, id_column: str, llm: LLMMode, threads: int = 1):
        self.encode = EncodeRows(bundle=bundle, threads=threads)
        self.predict = PredictRows(bundle, ledger=None, id_column=id_column, llm=llm)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.predict(self.encode(batch))


def part_counts(table: pa.Table) -> dict[str, float]:
    usage: dict[str, float] = {}
    for u in table.column("_usage").to_pylist():
        for k, v in json.loads(u or "{}").items():
            usage[k] = usage.get(k, 0) + v
    return {
        "rows": table.num_rows,
        "errors": table.num_rows - table.column("error").null_count,
        "llm_used": int(pc.sum(table.column("llm_used")).as_py() or 0),
        "gated_out": int(pc.sum(table.column("gated_out")).as_py() or 0),
        "llm_errors": table.num_rows - table.column("llm_error").null_count,
        "llm_cost_usd": float(pc.sum(table.column("llm_cost_usd")).as_py() or 0.0),
        **{k: usage.get(k, 0) for k in USAGE},
    }


def write_part(batch: pa.Table, output: str, id_column: str) -> pa.Table:
    """Write one output part atomically (temp name, then rename); return its counts as one row."""
    import pyarrow.parquet as pq

    counts = part_counts(batch)
    ids = sorted(batch.column(id_column).to_pylist())
    name = PARTS_PREFIX + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:24] + ".parquet"
    table = batch.drop_columns(["_usage"]).replace_schema_metadata({META_KEY: json.dumps(counts).encode()})
    fs, root = common.filesystem(output)
    tmp = f"{root}/.tmp-{uuid.uuid4().hex}-{name}"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, f"{root}/{name}")
    return pa.table({"part": [name], **{k: [v] for k, v in counts.items()}})


def output_ledger(output: str) -> str:
    """The default ledger's name: the output's own, so a killed run's journal (kept until a run finishes) is
    the one the run that resumes it attaches to, and the budget counts both runs' spend."""
    fs, root = common.filesystem(output)
    return "labelfuse-backfill-" + hashlib.sha1(f"{type(fs).__name__}:{root}".encode()).hexdigest()[:12]


def existing_parts(output: str) -> tuple[Any, str, list[str]]:
    """(filesystem, root, part paths) of ``output``, creating it and removing leftover temp files."""
    import pyarrow.fs as pafs

    fs, root = common.filesystem(output)
    fs.create_dir(root, recursive=True)
    parts = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.base_name.startswith(".tmp-"):
            fs.delete_file(info.path)  # an interrupted write; its rows were never counted as done
        elif info.base_name.startswith(PARTS_PREFIX) and info.is_file:
            parts.append(info.path)
    return fs, root, parts


def done_ids(fs: Any, parts: list[str], id_column: str) -> pa.Array:
    import pyarrow.parquet as pq

    if not parts:
        return pa.array([], pa.string())
    tables = [pq.read_table(p, columns=[id_column], filesystem=fs) for p in parts]
    return pa.concat_tables(tables).column(id_column).combine_chunks()


def drop_done(batch: pa.Table, id_column: str, done: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch.column(id_column), value_set=done)))


def summarize(fs: Any, parts: list[str]) -> dict[str, float]:
    """Counts summed over every part in the output (all runs), from parquet metadata only."""
    import pyarrow.parquet as pq

    total: dict[str, float] = dict.fromkeys(COUNTS, 0)
    for p in parts:
        meta = pq.read_schema(p, filesystem=fs).metadata or {}
        for k, v in json.loads(meta.get(META_KEY, b"{}")).items():
            total[k] = total.get(k, 0) + v
    return total


def build_parser() -> argparse.ArgumentParser:
    p = common.job_parser("Classify a corpus with a trained bundle (embed, gate, LLM-score, fuse); resumable by id.")
    p.add_argument(
        "--bundle",
        required=True,
        help="trained model bundle: a directory every node can read, or a URI (s3://, gs://, hf://owner/repo, "
        "http(s)://) that each node fetches once",
    )
    common.add_input_args(p, id_required=True)
    p.add_argument("--output", required=True, help="predictions directory or URI; a re-run resumes into it")
    llm = p.add_mutually_exclusive_group()
    llm.add_argument(
        "--llm",
        choices=LLM_MODES,
        default="auto",
        help="which texts the LLMs are asked about: auto (the bundle's cost gate; every text without one), "
        "off (none: the encoder-only path answers), all",
    )
    deprecated(llm, "--no-llm", "--llm off", dest="llm", const="off")
    deprecated(llm, "--no-gate", "--llm all", dest="llm", const="all")
    deprecated(llm, "--gate", "--llm auto", dest="llm", const="auto")
    p.add_argument(
        "--llm-budget",
        type=float,
        metavar="USD",
        help="dollar cap for this run's LLM calls, counting what a killed run into the same --output spent",
    )
    p.add_argument(
        "--ledger-name",
        help="named ledger actor to share (default: the output's own, its journal kept until a run finishes)",
    )
    p.add_argument(
        "--predictors",
        type=int,
        help="predictor (gate + LLM + fusion) actors at most (default 1); a run that asks no LLM has none",
    )
    p.add_argument(
        "--predictor-cpus",
        type=float,
        help="CPUs per predictor (default 1 with a local LLM, else 0); a local LLM runs one thread per CPU",
    )
    p.add_argument("--rows-per-file", type=int, default=1000, help="rows per output part (also the resume unit)")
    add_pool_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    import ray

    from data_jobs.ledger import shared_ledger
    from fusion.bundle import Bundle

    common.check_output(args.output, args.input, replaced=False)  # it resumes: earlier parts stay
    bundle = Bundle.open(args.bundle)
    config = bundle.config
    if args.llm_budget is not None:
        config.llm_limits.budget_usd = args.llm_budget
    common.connect(args.address)
    fs, root, parts = existing_parts(args.output)
    done = done_ids(fs, parts, args.id_column)
    if len(done):
        common.log.info("resuming: %d rows already in %d part(s) of %s are skipped", len(done), len(parts), args.output)
    ds = common.read_corpus(args.input, args.format, args.text_column, args.id_column)
    light = common.light()
    if len(done):
        ds = ds.map_batches(
            drop_done, batch_format="pyarrow", fn_kwargs={"id_column": args.id_column, "done": done}, **light
        )
    if args.text_column != "text":
        ds = ds.rename_columns({args.text_column: "text"})
    asks_llm = bool(config.llms) and args.llm != "off"
    pool = {"actors": args.actors, "threads": args.threads, "num_gpus": args.num_gpus, "batch_size": args.batch_size}
    ledger = None  # no LLM to ask: no ledger actor, and the encoder actors apply the head themselves
    if not asks_llm:
        kwargs = {"bundle": args.bundle, "id_column": args.id_column, "llm": args.llm, "threads": args.threads}
        ds = map_on_encoders(ds, EmbedAndPredict, kwargs, {}, **pool)
    else:
        ledger = shared_ledger(args.ledger_name or output_ledger(args.output), config.llm_limits)
        ds = embed_dataset(ds, bundle=args.bundle, **pool)
        local = any(c.provider == "local" for c in config.llms)
        ds = ds.map_batches(
            PredictRows,
            compute=common.pool(args.predictors, 1),
            fn_constructor_kwargs={
                "bundle": args.bundle,
                "ledger": ledger,
                "id_column": args.id_column,
                "llm": args.llm,
            },
            batch_size=args.batch_size,
            batch_format="pyarrow",
            num_cpus=args.predictor_cpus if args.predictor_cpus is not None else (1.0 if local else 0.0),
        )
    ds = ds.map_batches(
        write_part,
        batch_size=args.rows_per_file,
        batch_format="pyarrow",
        fn_kwargs={"output": args.output, "id_column": args.id_column},
        **light,
    )
    common.log.info("backfill of %s with bundle %s", args.input, args.bundle)
    from tqdm.auto import tqdm

    start = time.perf_counter()
    this_run: dict[str, float] = dict.fromkeys(COUNTS, 0)
    with tqdm(desc="backfill", unit="row") as bar:  # no total: counting the input would read it twice
        for part in ds.iter_rows():
            for k in this_run:
                this_run[k] += part[k]
            bar.update(part["rows"])
    elapsed = time.perf_counter() - start
    fs, root, parts = existing_parts(args.output)
    written = done_ids(fs, parts, args.id_column)
    summary = {
        "input": args.input,
        "output": args.output,
        "bundle": args.bundle,
        "classes": list(bundle.manifest["label_space"]["classes"]),
        "input_rows": len(done) + this_run["rows"],
        "skipped_already_done": len(done),
        "output_rows": len(written),
        "duplicate_ids": len(written) - len(pc.unique(written)),
        "parts": len(parts),
        "this_run": {**this_run, "elapsed_s": round(elapsed, 2), "rows_per_s": round(this_run["rows"] / elapsed, 2)},
        "all_runs": summarize(fs, parts),
        "ledger": ledger and {k: (None if v == float("inf") else v) for k, v in ledger.snapshot().items()},
        "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
    }
    if ledger is not None and args.ledger_name is None:  # the output's own ledger: the run is over
        ledger.discard()
    with fs.open_output_stream(f"{root}/{SUMMARY}") as f:
        f.write(json.dumps(summary, indent=2).encode())
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
