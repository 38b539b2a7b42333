"""Embed a corpus with the encoder on a Ray Data actor pool (GPU actors when the cluster has GPUs).

    python -m data_jobs.embed --input corpus.jsonl --output embedded/
    ray job submit --working-dir . -- .venv/bin/python -m data_jobs.embed --input s3://bucket/corpus/ --output ...

The output is parquet: the input's id/text/label columns, ``embedding`` (fixed-size list of
float32) and ``error`` (null, or why the row could not be embedded; its embedding is null).
A text that fails in the encoder fails alone (``TextEncoder.embed_each``): the rest of its
batch is embedded.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from data_jobs import common
from fusion.config import BACKENDS

BATCH_ROWS = 64


class EncodeRows:
    """Ray Data callable class: one encoder per actor, loaded once, running ``threads`` threads."""

    def __init__(self, encoder: dict[str, Any] | None = None, bundle: str | None = None, threads: int = 1):
        # Ray sets OMP_NUM_THREADS=1 in workers; say what we mean. On the CPU the encoder runs in ONNX
        # Runtime and this actor imports no torch.
        if bundle:
            from fusion.bundle import Bundle

            self.encoder = Bundle.open(bundle).encoder(threads=threads)  # the encoder alone, not the head or LLMs
        else:
            from fusion.config import EncoderConfig
            from fusion.encoder import TextEncoder

            self.encoder = TextEncoder(EncoderConfig(**{**(encoder or {}), "num_threads": threads}))

    def __call__(self, batch: pa.Table, text_column: str = "text") -> pa.Table:
        ok = common.ok_rows(batch)
        texts = batch.column(text_column).to_pylist()
        emb, reasons = self.encoder.embed_each([texts[i] for i in ok])  # a text that fails, fails alone
        batch = common.with_errors(batch, {i: f"text {r}" for i, r in zip(ok, reasons, strict=True) if r})
        keep = [j for j, r in enumerate(reasons) if r is None]
        rows = common.fixed_size_list(emb[keep], self.encoder.dim, [ok[j] for j in keep], batch.num_rows)
        return batch.append_column("embedding", rows)


def embed_dataset(
    ds: Any,
    *,
    text_column: str = "text",
    encoder: dict[str, Any] | None = None,
    bundle: str | None = None,
    actors: int | None = None,
    threads: int = 1,
    num_gpus: float | None = None,
    batch_size: int = BATCH_ROWS,
) -> Any:
    """Add ``embedding`` to every row of ``ds`` (rows with an ``error`` get null)."""
    kwargs = {"encoder": encoder, "bundle": bundle, "threads": threads}
    pool = {"actors": actors, "threads": threads, "num_gpus": num_gpus, "batch_size": batch_size}
    return map_on_encoders(ds, EncodeRows, kwargs, {"text_column": text_column}, **pool)


def map_on_encoders(
    ds: Any,
    fn: type,
    constructor_kwargs: dict[str, Any],
    fn_kwargs: dict[str, Any],
    *,
    actors: int | None,
    threads: int,
    num_gpus: float | None,
    batch_size: int,
) -> Any:
    """``ds.map_batches(fn)`` on an encoder actor pool: 1 GPU per actor when the cluster has GPUs (or
    ``num_gpus``), else ``threads`` CPUs; at most ``actors`` (default: one per GPU, else CPUs / threads)."""
    cpus, gpus = common.cluster_resources()
    if num_gpus is None:
        num_gpus = 1.0 if gpus else 0.0
    default = int(gpus / num_gpus) if num_gpus else int(cpus // threads)
    return ds.map_batches(
        fn,
        compute=common.pool(actors, default),
        fn_constructor_kwargs=constructor_kwargs,
        fn_kwargs=fn_kwargs,
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=threads if not num_gpus else 1,
        num_gpus=num_gpus,
    )


def write_parquet(ds: Any, output: str, rows_per_file: int) -> None:
    """Overwrite ``output`` with files of at least ``rows_per_file`` rows (not one file per block)."""
    import ray

    light = common.light()
    ds.write_parquet(
        output,
        min_rows_per_file=rows_per_file,
        mode=ray.data.SaveMode.OVERWRITE,
        ray_remote_args={"num_cpus": light["num_cpus"]},
        concurrency=light["concurrency"],
    )


def add_pool_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--actors", type=int, help="encoder actors at most (default: one per GPU, else CPUs / threads)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per encoder actor")
    p.add_argument("--num-gpus", type=float, help="GPUs per encoder actor (default: 1 if the cluster has GPUs)")
    p.add_argument("--batch-size", type=int, default=BATCH_ROWS, help="rows per encoder batch")


def build_parser() -> argparse.ArgumentParser:
    p = common.job_parser("Embed a corpus with the text encoder on a Ray Data actor pool; write parquet.")
    common.add_input_args(p)
    p.add_argument("--keep", default="id,label", help="comma-separated columns to carry to the output if present")
    p.add_argument("--output", required=True, help="output directory or URI (overwritten)")
    p.add_argument("--encoder", default="all-MiniLM-L6-v2", help="encoder model name or local directory")
    p.add_argument("--max-length", type=int, default=256, help="encoder max tokens per text")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="encoder runtime: auto (onnx on CPU actors, torch on GPU ones), torch (CPU or GPU), onnx (CPU, "
        "PyTorch's embeddings), or onnx-int8 (CPU, int8 weights)",
    )
    p.add_argument(
        "--bundle", help="use the encoder of this trained bundle instead of --encoder, --max-length and --backend"
    )
    p.add_argument("--rows-per-file", type=int, default=100_000, help="minimum rows per output file")
    add_pool_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from fusion.config import EncoderConfig

    common.check_output(args.output, args.input, replaced=True)
    common.connect(args.address)
    if args.bundle:
        from fusion.bundle import read_bundle

        encoder = read_bundle(args.bundle).manifest["config"]["encoder"]
    else:
        encoder = EncoderConfig(model=args.encoder, max_length=args.max_length, backend=args.backend).model_dump()
    keep = [c for c in (args.keep or "").split(",") if c]
    ds = common.read_corpus(args.input, args.format, args.text_column, args.id_column, keep=keep)
    start = time.perf_counter()
    ds = embed_dataset(
        ds,
        text_column=args.text_column,
        encoder=encoder,
        bundle=args.bundle,
        actors=args.actors,
        threads=args.threads,
        num_gpus=args.num_gpus,
        batch_size=args.batch_size,
    )
    write_parquet(ds, args.output, args.rows_per_file)
    common.write_sidecar(args.output, {"encoder": encoder})  # data_jobs.train trains with this same encoder
    common.log.info("embedded %s -> %s in %.1fs", args.input, args.output, time.perf_counter() - start)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
