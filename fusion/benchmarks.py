"""The paper's public benchmarks, from files the user already has (nothing is downloaded).

* **AG News** (Zhang et al., 2015): ``train.csv`` and ``test.csv`` without a header, one row per
  article as ``"class index","title","description"`` with class indices 1-4 (World, Sports,
  Business, Sci/Tech; a ``classes.txt`` next to them, one name per line, overrides the names).
  The paper's split: 4,000 / 500 / 500, balanced. Train and validation come from ``train.csv``,
  test from ``test.csv``.
* **Reuters-21578** (Lewis, 1997), the original SGML files ``reut2-000.sgm`` .. ``reut2-021.sgm``:
  the ModApte split (``LEWISSPLIT="TRAIN"`` / ``"TEST"`` with ``TOPICS="YES"``), the 10 most frequent
  topics of its training part, documents with at least one of them, multi-label. The paper's
  Reuters-10 split: 5,842 / 647 / 2,545 (the ModApte training documents split 90/10, seeded; the
  ModApte test documents as they are).

:func:`prepare` writes ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` (columns ``id``, ``text``,
``label``) for ``labelfuse train --train ... --val ...`` and ``labelfuse eval --data ...``.
"""

from __future__ import annotations

import csv
import html
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from fusion.errors import DataError

AG_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
AG_SIZES = (4000, 500, 500)  # the paper's train / val / test, balanced over the 4 classes


# -- AG News ------------------------------------------------------------------------------------------------
def _ag_text(s: str) -> str:
    # the CSVs escape newlines as a literal backslash-n and keep some HTML entities (#39; for ')
    s = s.replace("\\n", " ").replace("\\", " ").replace(" #39;", "'").replace("#39;", "'")
    return " ".join(html.unescape(s).split())


def read_ag_news_csv(path: str | Path, classes: tuple[str, ...] | list[str] = AG_CLASSES) -> pd.DataFrame:
    """One AG News CSV as ``id``, ``text`` (title + description) and ``label`` (the class name)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"AG News: no file {path} (expected train.csv / test.csv from the AG News CSV release)")
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for n, rec in enumerate(csv.reader(f), 1):
            if len(rec) < 3 or not rec[0].strip().isdigit():
                raise DataError(f'{path}:{n}: expected "class index","title","description", got {rec[:3]!r}')
            k = int(rec[0])
            if not 1 <= k <= len(classes):
                raise DataError(f"{path}:{n}: class index {k} outside 1..{len(classes)}")
            text = _ag_text(rec[1]).rstrip(".") + ". " + _ag_text(" ".join(rec[2:]))
            rows.append({"id": f"{path.stem}-{n}", "text": text.strip(), "label": classes[k - 1]})
    if not rows:
        raise DataError(f"{path}: no rows")
    return pd.DataFrame(rows)


def _ag_classes(source: Path) -> tuple[str, ...]:
    f = source / "classes.txt"
    if f.is_file():
        names = tuple(x.strip() for x in f.read_text(encoding="utf-8").splitlines() if x.strip())
        if names:
            return names
    return AG_CLASSES


def _balanced(df: pd.DataFrame, per_class: int, seed: int, what: str) -> pd.DataFrame:
    counts = df["label"].value_counts()
    short = counts[counts < per_class]
    if len(short):
        raise DataError(f"{what}: {per_class} rows per class needed, only {dict(short)} available")
    return df.groupby("label", group_keys=False).sample(n=per_class, random_state=seed)


def ag_news_splits(source: str | Path, seed: int = 42) -> dict[str, pd.DataFrame]:
    source = Path(source)
    classes = _ag_classes(source)
    k = len(classes)
    sizes = [n // k for n in AG_SIZES]
    train_all = read_ag_news_csv(source / "train.csv", classes)
    picked = _balanced(train_all, sizes[0] + sizes[1], seed, "AG News train.csv")
    val = picked.groupby("label", group_keys=False).sample(n=sizes[1], random_state=seed)
    train = picked.drop(val.index)
    test = _balanced(read_ag_news_csv(source / "test.csv", classes), sizes[2], seed, "AG News test.csv")
    return {"train": train, "val": val, "test": test}


# -- Reuters-21578 --------------------------------------------------------------------------------------------
_DOC = re.compile(r"<REUTERS\b([^>]*)>(.*?)</REUTERS>", re.S)
_ATTR = re.compile(r'(\w+)="([^"]*)"')


def _tag(body: str, name: str) -> str:
    m = re.search(rf"<{name}\b[^>]*>(.*?)</{name}>", body, re.S)
    return m.group(1) if m else ""


def _clean(s: str) -> str:
    s = re.sub(r"&#\d+;", " ", s)  # control characters (&#2;, &#3;) around the body
    return " ".join(html.unescape(s).split())


def read_reuters_sgml(source: str | Path) -> pd.DataFrame:
    """Every document of ``reut2-*.sgm`` under ``source``: ``id`` (NEWID), ``text`` (title + body),
    ``topics`` (list), ``lewissplit`` and ``has_topics`` (the TOPICS attribute is YES)."""
    source = Path(source)
    files = sorted(source.glob("reut2-*.sgm")) if source.is_dir() else [source]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"Reuters-21578: no reut2-*.sgm files in {source}")
    rows: list[dict[str, Any]] = []
    for f in files:
        raw = f.read_bytes().decode("latin-1")  # the collection is 8-bit text with a few stray bytes
        for attrs, body in _DOC.findall(raw):
            a = dict(_ATTR.findall(attrs))
            text_block = _tag(body, "TEXT")
            title, main = _clean(_tag(text_block, "TITLE")), _clean(_tag(text_block, "BODY"))
            if not title and not main:  # TYPE="UNPROC": the text is not split into parts
                main = _clean(re.sub(r"<[^>]+>", " ", text_block))
            topics = re.findall(r"<D>(.*?)</D>", _tag(body, "TOPICS"))
            rows.append(
                {
                    "id": int(a.get("NEWID", len(rows) + 1)),
                    "text": ". ".join(p for p in (title.rstrip("."), main) if p),
                    "topics": topics,
                    "lewissplit": a.get("LEWISSPLIT", ""),
                    "has_topics": a.get("TOPICS") == "YES",
                }
            )
    if not rows:
        raise DataError(f"Reuters-21578: no <REUTERS> documents in {files[0]}")
    return pd.DataFrame(rows)


def reuters_splits(
    source: str | Path, n_classes: int = 10, val_share: float = 0.1, seed: int = 42
) -> dict[str, pd.DataFrame]:
    """ModApte, the ``n_classes`` most frequent training topics, documents with at least one of them."""
    docs = read_reuters_sgml(source)
    modapte = docs[docs["has_topics"] & docs["lewissplit"].isin(["TRAIN", "TEST"])]
    train_all = modapte[modapte["lewissplit"] == "TRAIN"]
    counts = Counter(t for ts in train_all["topics"] for t in ts)
    if len(counts) < n_classes:
        raise DataError(f"Reuters-21578: the ModApte training documents have {len(counts)} topics, < {n_classes}")
    top = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_classes]]
    keep = set(top)
    out = modapte.assign(label=[[t for t in ts if t in keep] for ts in modapte["topics"]])
    out = out[out["label"].map(len) > 0][["id", "text", "label", "lewissplit"]]
    train_all, test = out[out["lewissplit"] == "TRAIN"], out[out["lewissplit"] == "TEST"]
    val = train_all.sample(n=round(val_share * len(train_all)), random_state=seed)
    parts = {"train": train_all.drop(val.index), "val": val.sort_index(), "test": test}
    return {k: v.drop(columns="lewissplit") for k, v in parts.items()}


# -- both -----------------------------------------------------------------------------------------------------
def prepare(name: str, source: str | Path, out: str | Path, seed: int = 42) -> dict[str, Path]:
    """Write the paper's train/val/test split of ``name`` as JSON lines under ``out``."""
    if name == "ag-news":
        parts = ag_news_splits(source, seed)
    elif name == "reuters-10":
        parts = reuters_splits(source, 10, seed=seed)
    else:
        raise DataError(f"unknown benchmark {name!r}; use ag-news or reuters-10")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, df in parts.items():
        paths[split] = out / f"{split}.jsonl"
        df.to_json(paths[split], orient="records", lines=True, force_ascii=False)
    return paths
