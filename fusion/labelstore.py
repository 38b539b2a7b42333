"""The label store: every label labelfuse learns from, human or LLM, in one place.

A store is a directory (or a URI pyarrow's filesystem layer understands: ``file://``,
``s3://``, ``gs://``) of append-only parquet parts. :meth:`LabelStore.append` writes one
part per call, atomically: on a local disk to a hidden temporary name, then renamed; on an
object store as one PUT, which is atomic by nature. A reader never sees half a part, and a
writer that dies loses only the part it had not finished (its caller was not told "kept").

Each record is one label for one text:

- ``source`` ``"human"`` (from ``POST /v1/feedback``, a Kafka labels topic, a file) or
  ``"llm"`` (an answer an LLM was paid for: its per-class ``scores``, which ``llm``, the
  ``prompt_version`` and the ``bundle_version`` that asked);
- ``label_id`` makes appends idempotent: a label written twice (a retried request, a Kafka
  message re-delivered after a crash) is one label; the later write wins;
- ``text_id`` (:func:`fusion.texts.text_id`) names the text; for the same text a human label
  wins over an LLM's, and the latest of the same source wins.

:meth:`LabelStore.labels` applies those rules and gives one row per text, with the LLM's
scores beside a human label when both exist (the fusion head learns from both).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fusion.errors import ConfigError, DataError
from fusion.texts import clean_text, text_id

log = logging.getLogger(__name__)

Source = Literal["human", "llm"]
SOURCES: tuple[str, ...] = ("human", "llm")

SCHEMA = pa.schema(
    [
        ("label_id", pa.string()),
        ("text_id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("scores", pa.map_(pa.string(), pa.float32())),
        ("llm", pa.string()),
        ("prompt_version", pa.string()),
        ("bundle_version", pa.string()),
        ("origin", pa.string()),
        ("created_at", pa.float64()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
SEGMENTS_KEY = b"labelfuse.segments"  # a compacted part's metadata: the parts it holds, [name, records] in order
# LabelStore.labels(): one row per text
LABEL_COLUMNS = (
    "text_id",
    "text",
    "source",
    "labels",
    "created_at",
    "label_id",
    "origin",
    "llm_scores",
    "llm",
    "prompt_version",
)


@dataclass
class LabelRecord:
    """One label for one text (see the module docstring); ``text_id`` and ``label_id`` default from the text."""

    text: str
    source: Source
    labels: list[str]
    scores: Mapping[str, float] | None = None  # llm: probability per class
    label_id: str | None = None
    text_id: str | None = None
    llm: str | None = None
    prompt_version: str | None = None
    bundle_version: str | None = None
    origin: str | None = None
    created_at: float = field(default_factory=time.time)

    @property
    def key(self) -> str:
        """The label id: the one given, else one per source, LLM and text."""
        return self.label_id or f"{self.source}:{self.llm or ''}:{self.text_id or text_id(self.text)}"

    def row(self) -> dict[str, Any]:
        if self.source not in SOURCES:
            raise DataError(f"label source must be one of {SOURCES}, got {self.source!r}")
        scores = None if self.scores is None else [(str(k), float(v)) for k, v in self.scores.items()]
        return {
            "label_id": self.key,
            "text_id": self.text_id or text_id(self.text),
            "text": self.text,
            "source": self.source,
            "labels": list(self.labels),
            "scores": scores,
            "llm": self.llm,
            "prompt_version": self.prompt_version,
            "bundle_version": self.bundle_version,
            "origin": self.origin,
            "created_at": float(self.created_at),
        }


def human_label(
    text: str, labels: str | Sequence[str], *, label_id: str | None = None, origin: str | None = None
) -> LabelRecord:
    """A person's label(s) for ``text`` (cleaned by the text rule)."""
    labels = [labels] if isinstance(labels, str) else [str(x) for x in labels]
    return LabelRecord(clean_text(text), "human", labels, label_id=label_id, origin=origin)


def llm_labels(
    texts: Sequence[str],
    scores: np.ndarray,
    classes: Sequence[str],
    multilabel: bool,
    *,
    llm: str,
    prompt_version: str | None = None,
    bundle_version: str | None = None,
    origin: str | None = None,
) -> list[LabelRecord]:
    """Records of an LLM's answers (``scores``: (n, k) in ``classes`` order; NaN rows, no answer, are skipped)."""
    out = []
    for text, row in zip(texts, np.asarray(scores, dtype=np.float64), strict=True):
        if not np.isfinite(row).all():
            continue
        labels = [c for c, p in zip(classes, row, strict=True) if p >= 0.5] if multilabel else [classes[row.argmax()]]
        out.append(
            LabelRecord(
                text,
                "llm",
                labels,
                dict(zip(classes, row.tolist(), strict=True)),
                llm=llm,
                prompt_version=prompt_version,
                bundle_version=bundle_version,
                origin=origin,
            )
        )
    return out


def _filesystem(uri: str) -> tuple[Any, str, bool]:
    """(pyarrow filesystem, path in it, is local) for a directory path or URI."""
    from pyarrow import fs

    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as err:
        raise ConfigError(f"label store {uri!r}: {err}") from None
    local = isinstance(filesystem, fs.LocalFileSystem)
    if local and os.path.isfile(path):
        raise ConfigError(f"label store {uri!r} is a file: give a directory or URI")
    return filesystem, path.rstrip("/"), local


class LabelStore:
    """Append-only parquet parts under ``uri`` (created on first use); see the module docstring."""

    def __init__(self, uri: str | os.PathLike[str]):
        self.uri = str(uri)
        self.fs, self.path, self.local = _filesystem(self.uri)

    def __repr__(self) -> str:
        return f"LabelStore({self.uri!r})"

    # -- writing --------------------------------------------------------------------------------------------
    def append(self, records: Iterable[LabelRecord]) -> str | None:
        """Write ``records`` as one part; returns its name (None when there was nothing to write).

        The part is complete or absent: on return, every record is kept."""
        rows = [r.row() for r in records]
        if not rows:
            return None
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        self._write(name, pa.Table.from_pylist(rows, schema=SCHEMA))
        return name

    def _write(self, name: str, table: pa.Table) -> None:
        """One part, whole or not at all."""
        self.fs.create_dir(self.path, recursive=True)
        final = f"{self.path}/{name}"
        if self.local:  # write aside, flush to disk, then rename
            tmp = f"{self.path}/.{name}.tmp"
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        else:  # one PUT: object stores make a key visible only once it is complete
            with self.fs.open_output_stream(final) as out:
                pq.write_table(table, out)

    # -- reading --------------------------------------------------------------------------------------------
    def parts(self) -> list[str]:
        """Part names, oldest first (names start with their write time)."""
        from pyarrow import fs

        info = self.fs.get_file_info(fs.FileSelector(self.path, allow_not_found=True))
        names = [i.base_name for i in info if i.type == fs.FileType.File]
        return sorted(n for n in names if n.startswith("part-") and n.endswith(".parquet"))

    def records(
        self, columns: Sequence[str] | None = None, after: str | None = None, parts: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """Every record as written (duplicates included), oldest part first; ``after``: only parts newer than
        it; ``parts``: only these."""
        cols = list(columns or COLUMNS)
        tables = []
        for name in self.parts() if parts is None else parts:
            if after is not None and name <= after:
                continue
            with self.fs.open_input_file(f"{self.path}/{name}") as f:
                tables.append(pq.read_table(f, columns=cols))
        if not tables:
            return SCHEMA.empty_table().select(cols).to_pandas()
        return pa.concat_tables(tables).to_pandas()

    def labels(self, records: pd.DataFrame | None = None) -> pd.DataFrame:
        """One row per text: the winning label (human over LLM, then the latest), see the module docstring.

        Columns: LABEL_COLUMNS; ``llm_scores`` ({class: p}), ``llm`` and ``prompt_version`` are the LLM's latest
        answer for the text, beside a human label too (None when no LLM answered it). ``records``: what
        :meth:`records` returned, when the caller has read it already."""
        df = self.records() if records is None else records
        df = df.assign(order=np.arange(len(df))).drop_duplicates("label_id", keep="last")  # written twice: once
        answers = df[df["source"] == "llm"].drop_duplicates("text_id", keep="last")
        answers = answers[["text_id", "scores", "llm", "prompt_version"]].rename(columns={"scores": "llm_scores"})
        win = df.assign(human=df["source"] == "human").sort_values(["human", "order"])
        win = win.drop_duplicates("text_id", keep="last").sort_values("order")
        out = win[["text_id", "text", "source", "labels", "created_at", "label_id", "origin"]]
        out = out.merge(answers, on="text_id", how="left").reset_index(drop=True)
        out["labels"] = out["labels"].map(list)
        out["llm_scores"] = out["llm_scores"].map(lambda s: dict(s) if isinstance(s, list) else None)
        return out[list(LABEL_COLUMNS)]

    def stats(self) -> dict[str, Any]:
        """Counts: parts, records written, labels kept (after the rules), of them human and LLM, and the newest part."""
        parts = self.parts()
        if not parts:
            return {"parts": 0, "records": 0, "labels": 0, "human": 0, "llm": 0, "newest_part": None}
        raw = self.records(parts=parts)  # one read for both counts
        labels = self.labels(raw)
        human = int((labels["source"] == "human").sum())
        return {
            "parts": len(parts),
            "records": len(raw),
            "labels": len(labels),
            "human": human,
            "llm": len(labels) - human,
            "newest_part": self._segments(parts[-1])[-1][0],  # as written: a compacted part keeps the names
        }

    # -- what was sent to people -----------------------------------------------------------------------------
    def log_export(self, text_ids: Sequence[str], day: str | None = None) -> None:
        """Remember that these texts were sent to people for a label (``exports/<day>-*.json``)."""
        if not text_ids:
            return
        day = day or time.strftime("%Y-%m-%d", time.gmtime())
        directory = f"{self.path}/exports"
        self.fs.create_dir(directory, recursive=True)
        name = f"{day}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.json"
        with self.fs.open_output_stream(f"{directory}/{name}") as out:
            out.write(json.dumps(list(text_ids)).encode())

    def exported(self) -> dict[str, str]:
        """{text_id: the day it was sent to people} for every text ever exported."""
        from pyarrow import fs

        out: dict[str, str] = {}
        for info in self.fs.get_file_info(fs.FileSelector(f"{self.path}/exports", allow_not_found=True)):
            if info.type == fs.FileType.File and info.base_name.endswith(".json"):
                with self.fs.open_input_stream(info.path) as f:
                    out.update(dict.fromkeys(json.loads(f.read()), info.base_name[:10]))
        return out

    def _segments(self, name: str) -> list[tuple[str, int]]:
        """(written part, records) for each part a part holds, in order: itself, or those it compacted."""
        with self.fs.open_input_file(f"{self.path}/{name}") as f:
            meta = pq.ParquetFile(f).metadata
            held = (meta.metadata or {}).get(SEGMENTS_KEY)
            return [tuple(s) for s in json.loads(held)] if held else [(name, meta.num_rows)]

    def count_after(self, part: str | None) -> int:
        """Records written in parts newer than ``part`` (every record for None), compacted ones included: a
        compacted part keeps the names of the parts it holds."""
        return sum(n for p in self.parts() for name, n in self._segments(p) if part is None or name > part)

    def compact(self) -> int:
        """Rewrite every part as one (records kept as written, duplicates included); returns parts removed.

        Safe beside writers: the new part is written first, and only the parts it holds are deleted."""
        parts = self.parts()
        if len(parts) < 2:
            return 0
        table = pa.Table.from_pandas(self.records(parts=parts), schema=SCHEMA, preserve_index=False)
        segments = [s for p in parts for s in self._segments(p)]
        table = table.replace_schema_metadata({SEGMENTS_KEY: json.dumps(segments)})
        name = f"{parts[-1][: -len('.parquet')]}-compacted.parquet"  # sorts with the newest part it holds
        self._write(name, table)
        for p in parts:
            self.fs.delete_file(f"{self.path}/{p}")
        log.info("compacted %d parts of %s into %s", len(parts), self.uri, name)
        return len(parts)
