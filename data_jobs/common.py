"""What every data job shares: connecting to Ray, reading a corpus, per-row validation, sizing.

Input rows are read as Arrow tables. Each job keeps the columns it needs plus an ``error``
column: a row whose text the text rule refuses (:mod:`fusion.texts`: missing, not a string,
empty, a lone surrogate), a missing id, or (JSONL) a line that is not a JSON object keeps
flowing through the job with its reason in ``error`` instead of failing the job. Jobs skip
the model work for such rows and write them out with the reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from fusion.errors import ConfigError, DataError, LabelfuseError
from fusion.texts import TextError, arrow_array, clean_text, load_json_object

__all__ = ["ConfigError", "DataError"]

log = logging.getLogger("labelfuse.jobs")

NAMESPACE = "labelfuse"
# Ray Data's default 128 MiB blocks hold ~50k texts: one parquet row group would be one block, one
# actor's work, while the rest of the pool idles. 256 KiB blocks (~100-1000 texts) spread the work.
BLOCK_BYTES = 256 * 1024
FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
}


# -- Ray -----------------------------------------------------------------------------------------------------
def connect(address: str | None = None) -> None:
    """Attach to a cluster (``ray job submit`` sets RAY_ADDRESS) or start a local Ray; no-op if connected.

    The namespace makes named actors (the LLM ledger) visible to every job that shares it."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, namespace=NAMESPACE)


def light() -> dict[str, Any]:
    """Ray Data options for reading, parsing and writing: I/O that must never wait behind the model actors.

    No CPU is reserved, so each step is capped at one task per cluster CPU (at least 2) instead: a task that
    needs no resource has no limit, and Ray Data starts one per block at once and Ray a worker process for
    each. Two embed jobs and two backfills of 200 texts in 20 files on 2 cores started 22-23 task worker
    processes without the cap and 13-14 with it, and used 116-129 CPU-s in all against 94-105."""
    # the cap is a ceiling: Ray Data's warning that a small input gives a step fewer tasks than that is noise
    warnings.filterwarnings("ignore", "The maximum number of concurrent tasks", UserWarning)
    return {"num_cpus": 0, "concurrency": max(2, int(cluster_resources()[0]))}


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def job_parser(description: str) -> argparse.ArgumentParser:
    from fusion.args import HelpFormatter

    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument(
        "--address",
        help="Ray cluster address; default: RAY_ADDRESS (set by `ray job submit`), else a cluster started with "
        "`ray start` on this machine, else a new local Ray; 'local' always starts a new one",
    )
    return p


def add_input_args(p: argparse.ArgumentParser, id_required: bool = False) -> None:
    p.add_argument("--input", required=True, help="file, directory or URI (s3://, gs://, ...) of parquet/jsonl/csv")
    p.add_argument("--format", choices=sorted(set(FORMATS.values())), help="input format; default: from the suffix")
    p.add_argument("--text-column", default="text", help="column with the text")
    p.add_argument(
        "--id-column",
        default="id" if id_required else None,
        help="column with a unique row id" + (" (required: resuming is by id)" if id_required else ""),
    )


def run_main(fn: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """Parse, set up logging, run; user errors exit 2 with the message, not a traceback."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return fn(args)
    except LabelfuseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


# -- input ---------------------------------------------------------------------------------------------------
def data_files(fs: Any, root: str) -> list[Any]:
    """The files under a directory input, by path, without the hidden ones (``_*``, ``.*``) the readers skip."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted((i for i in infos if i.is_file and not i.base_name.startswith(("_", "."))), key=lambda i: i.path)


def detect_format(path: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    base = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for ext in (".gz", ".zst", ".bz2"):
        base = base.removesuffix(ext)
    suffix = "." + base.rsplit(".", 1)[-1] if "." in base else ""
    if suffix in FORMATS:
        return FORMATS[suffix]
    fs, root = filesystem(path)
    try:
        infos = data_files(fs, root)
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"cannot list input {path}: {err}") from None
    if not infos:
        raise DataError(f"input {path} has no files")
    found = {FORMATS.get("." + i.base_name.rsplit(".", 1)[-1].lower()) for i in infos}
    found.discard(None)
    if len(found) != 1:
        raise DataError(f"cannot tell the format of {path} (found {sorted(found) or 'no known files'}); pass --format")
    return found.pop()


def _parse_jsonl(batch: pa.Table, columns: list[str], text_column: str, id_column: str | None) -> pa.Table:
    """Whole files (``bytes``) to one row of ``columns`` per line. Lines end at ``\\n`` only (JSON text may hold
    U+2028 and other characters that str.splitlines breaks at); a line that is not UTF-8, not a JSON object,
    or whose text the text rule refuses becomes an error row."""
    out: dict[str, list[Any]] = {c: [] for c in columns}
    errors: list[str | None] = []
    for data in batch.column("bytes").to_pylist():
        file_digest = b""  # of this file, once it has a bad line
        for n, raw in enumerate(data.split(b"\n")):
            if not raw.strip():
                continue
            try:
                obj = load_json_object(raw)
            except ValueError as err:
                for c in columns:
                    out[c].append(None)
                if id_column:  # stable, so a resumed backfill recognises the row; its own, even for a repeated line
                    file_digest = file_digest or hashlib.sha1(data).digest()
                    where = file_digest + n.to_bytes(8, "little")
                    out[id_column][-1] = "invalid-line-" + hashlib.sha1(where + raw).hexdigest()[:16]
                shown = raw[:120].decode("utf-8", "backslashreplace")
                errors.append(f"invalid JSON line ({str(err)[:80]}): {shown!r}")
                continue
            for c in columns:
                out[c].append(obj.get(c))
            try:  # the text rule here already: a lone surrogate ("\\ud800" in JSON) cannot become an Arrow string
                out[text_column][-1] = clean_text(obj.get(text_column))
                errors.append(None)
            except TextError as err:
                out[text_column][-1] = None
                errors.append(str(err))
    data = {c: arrow_array(vals, as_text=c in (id_column, text_column)) for c, vals in out.items()}
    data["_parse_error"] = pa.array(errors, pa.string())
    return pa.table(data)


def read_corpus(
    path: str,
    fmt: str | None,
    text_column: str,
    id_column: str | None = None,
    keep: Sequence[str] = (),
) -> Any:
    """A Ray Dataset of ``[id_column, text_column, *keep, error]``, ids as strings.

    ``keep`` columns are carried along when the input has them. Rows that cannot be used
    keep their place with the reason in ``error``. Sets this driver's Ray Data block size to
    :data:`BLOCK_BYTES` so every actor of a pool gets work.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = BLOCK_BYTES
    ctx.target_min_block_size = min(ctx.target_min_block_size, BLOCK_BYTES)
    fmt = detect_format(path, fmt)
    wanted = list(dict.fromkeys([c for c in (id_column, text_column, *keep) if c]))
    required = [c for c in (id_column, text_column) if c]
    opts = light()
    try:
        if fmt == "jsonl":
            ds = ray.data.read_binary_files(path, **opts)
            ds = ds.map_batches(
                _parse_jsonl,
                batch_format="pyarrow",
                fn_kwargs={"columns": wanted, "text_column": text_column, "id_column": id_column},
                **opts,
            )
            names = jsonl_fields(path)  # every line gives each wanted column (null where it has none)
        elif fmt == "parquet":
            ds = read_parquet(path, opts)
            names = ds.columns()  # from the files' metadata
        else:
            import pyarrow.csv

            # cells as written: Arrow would read the id "00123" as the number 123, and a text of digits as one
            strings = pyarrow.csv.ConvertOptions(column_types=dict.fromkeys(wanted, pa.string()))
            ds = ray.data.read_csv(path, convert_options=strings, **opts)
            names = ds.columns()  # reads the first file
    except FileNotFoundError:
        raise DataError(f"input not found: {path}") from None
    except Exception as err:  # unreadable file: Ray and pyarrow raise many types
        raise DataError(f"cannot read {path} as {fmt}: {_cause(err)}") from None
    missing = [] if names is None else [c for c in required if c not in names]  # None: the rows will say why
    if missing:
        has = "its first lines have" if fmt == "jsonl" else "it has"
        raise DataError(f"{path} has no column(s) {missing}; {has} {names}. Use --text-column / --id-column.")
    columns = wanted if fmt == "jsonl" else [c for c in wanted if c in names]
    return ds.map_batches(
        _validate,
        batch_format="pyarrow",
        fn_kwargs={"columns": columns, "text": text_column, "id": id_column, "clean": fmt != "jsonl"},
        **opts,
    )


def _cause(err: BaseException) -> str:
    """What went wrong, on one line: for a Ray task's error, its cause (its own first line names the task)."""
    cause = getattr(err, "cause", None) or err
    lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def jsonl_fields(path: str, lines: int = 100, enough: int = 10) -> list[str] | None:
    """The fields of the JSON objects among the first ``lines`` lines of a JSONL input (of its first file by
    name), read here on the driver: a column that not one of them has is misnamed, not a job of bad rows.
    None when fewer than ``enough`` lines are objects: too few to tell (each bad row says why it is bad)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(path)
    if fs.get_file_info(root).type == pafs.FileType.Directory:
        files = data_files(fs, root)
        if not files:
            return None
        root = files[0].path
    with fs.open_input_stream(root) as f:
        head = f.read(1 << 20)
    fields: dict[str, None] = {}
    objects = 0
    for raw in head.split(b"\n")[:lines]:
        try:
            fields.update(dict.fromkeys(load_json_object(raw)))
            objects += 1
        except ValueError:  # not an object (the row will say so); the last line may be cut short
            continue
    return list(fields) if objects >= enough else None


def read_parquet(path: str, opts: dict[str, Any] | None = None) -> Any:
    """``ray.data.read_parquet`` through Ray Data's V1 Parquet reader.

    The V2 reader (Ray's default since 2.5x) lists row groups with a fresh pool of up to 32
    ``FooterReader`` actors per read, each its own process: on 2 cores a one-file read took
    ~2 s and ~4 CPU-s more than with V1, which lists them in the driver or in reused task workers.
    ``opts``: the job's :func:`light` options where it has them (default: asked of the cluster)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False  # read_parquet picks its reader when called
    try:
        return ray.data.read_parquet(path, **(opts or light()))
    finally:
        ctx.use_datasource_v2 = v2


def _validate(batch: pa.Table, columns: list[str], text: str, id: str | None, clean: bool = True) -> pa.Table:
    """Ids and the error column; with ``clean``, the text rule (JSONL texts had it while parsing)."""
    texts = batch.column(text).to_pylist()
    ids = batch.column(id).to_pylist() if id else None
    earlier = next((c for c in ("_parse_error", "error") if c in batch.column_names), None)  # reader, or an earlier job
    parsed = batch.column(earlier).to_pylist() if earlier else None
    errors: list[str | None] = []
    kept: list[str | None] = []  # the cleaned text, or a bad row's text as it came (when it is a string)
    for i, t in enumerate(texts):
        missing_id = ids is not None and (ids[i] is None or ids[i] == "")
        if missing_id:  # a stable id of its own: the row is written once, and a resumed job recognises it
            ids[i] = "missing-id-" + hashlib.sha1(repr(t).encode("utf-8", "backslashreplace")).hexdigest()[:16]
        kept.append(t if isinstance(t, str) else None)
        if parsed and parsed[i]:
            errors.append(parsed[i])
        elif missing_id:
            errors.append(f"missing id in column {id!r}")
        elif not clean:
            errors.append(None)
        else:
            try:
                kept[-1] = clean_text(t)  # the one rule for texts (fusion.texts)
                errors.append(None)
            except TextError as err:
                errors.append(str(err))
    out = {c: batch.column(c) for c in columns}
    if id:
        out[id] = pa.array([None if v is None else str(v) for v in ids], pa.string())
    out[text] = pa.array(kept, pa.string())
    out["error"] = pa.array(errors, pa.string())
    return pa.table(out)


def ok_rows(batch: pa.Table) -> list[int]:
    return [i for i, e in enumerate(batch.column("error").to_pylist()) if e is None]


def with_errors(batch: pa.Table, failed: dict[int, str]) -> pa.Table:
    """``batch`` with the reasons of rows that failed alone in a model step put into ``error``."""
    if not failed:
        return batch
    errors = batch.column("error").to_pylist()
    for i, why in failed.items():
        errors[i] = why
    return batch.set_column(batch.column_names.index("error"), "error", pa.array(errors, pa.string()))


# -- output --------------------------------------------------------------------------------------------------
SIDECAR = "_labelfuse.json"  # readers skip files starting with "_"


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def check_output(output: str, input: str, *, replaced: bool) -> None:
    """Refuse, before any work, an ``--output`` the job cannot write or whose replacing would delete what is not
    the job's: a file; the input, a directory holding it or one inside it; with ``replaced`` (a job that writes
    its output anew), a directory holding files other than an earlier run's parquet parts and sidecar."""
    import pyarrow.fs as pafs

    fs, root = filesystem(output)
    try:
        kind = fs.get_file_info(root).type
    except OSError as err:
        raise DataError(f"cannot reach --output {output}: {err}") from None
    if kind == pafs.FileType.File:
        raise DataError(f"--output {output} is a file; give a directory")
    in_fs, in_root = filesystem(input)
    a, b = f"{root.rstrip('/')}/", f"{in_root.rstrip('/')}/"
    if type(in_fs) is type(fs) and (a.startswith(b) or b.startswith(a)):  # one would delete or read the other
        raise DataError(f"--output {output} and --input {input} overlap; write the output elsewhere")
    if replaced and kind == pafs.FileType.Directory:
        others = [i.path for i in data_files(fs, root) if not i.base_name.endswith(".parquet")]
        if others:
            shown = ", ".join(o.removeprefix(root).lstrip("/") for o in others[:3])
            raise DataError(
                f"--output {output} holds files that are not an earlier run's output ({shown}"
                f"{', ...' if len(others) > 3 else ''}), and the job replaces the whole directory: give a new or "
                "empty directory"
            )


def write_sidecar(output: str, info: dict[str, Any]) -> None:
    """What a later job needs to read ``output`` right (class order, LLM names), next to the data."""
    fs, root = filesystem(output)
    with fs.open_output_stream(f"{root}/{SIDECAR}") as f:
        f.write(json.dumps(info, indent=2).encode())


def read_sidecar(path: str) -> dict[str, Any]:
    fs, root = filesystem(path)
    try:
        with fs.open_input_stream(f"{root}/{SIDECAR}") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return {}


# -- sizing --------------------------------------------------------------------------------------------------
def pool(actors: int | None, default: int) -> Any:
    """An actor pool that starts with one actor and grows to ``actors`` (default ``default``).

    Starting small matters: Ray Data's file-listing task needs a whole CPU, and a pool that
    took every CPU up front would wait on it forever. Growing also lets two pools (encoder,
    LLM) share a small cluster."""
    import ray

    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors or default))


def fixed_size_list(rows: Any, dim: int, ok: Sequence[int], n: int) -> pa.Array:
    """(len(ok), dim) float32 rows placed at ``ok`` positions of an n-row list column; others null."""
    import numpy as np

    flat = np.zeros((n, dim), dtype=np.float32)
    mask = np.ones(n, dtype=bool)
    if len(ok):
        flat[list(ok)] = rows
        mask[list(ok)] = False
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), dim, mask=pa.array(mask))


def embeddings(batch: pa.Table, column: str = "embedding") -> Any:
    """The fixed-size-list column as an (n, dim) float32 array (zeros where null)."""
    import numpy as np

    col = batch.column(column).combine_chunks()
    dim = col.type.list_size
    flat = np.asarray(col.values, dtype=np.float32).reshape(-1, dim)
    return flat[col.offset : col.offset + len(col)]
