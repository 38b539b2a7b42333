"""Label spaces for multi-class and multi-label tasks.

Labels arrive in one of three shapes and are normalised to one form first:

* a column of strings, one label per row (multilabel: optionally ``"a|b"`` split on a separator);
* a list of strings per row (multilabel; an empty list is a row with no labels);
* one 0/1 column per class (a DataFrame or a 2-D array with known class names).

Multi-class targets encode to class indices ``(n,)``; multi-label targets to a 0/1
matrix ``(n, n_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from fusion.errors import DataError

LABEL_SEPARATOR = "|"  # a label set in one text cell (CSV): "business|politics"

RawLabels = Sequence[Any]


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(isinstance(v, float) and np.isnan(v))
    except TypeError:
        return False


def is_listlike(v: Any) -> bool:
    return isinstance(v, (list, tuple, set, frozenset, np.ndarray))


def indicator_to_lists(matrix: Any, classes: Sequence[str]) -> list[list[str]]:
    """Turn a 0/1 matrix (n, len(classes)) into a list of label lists."""
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[1] != len(classes):
        raise DataError(
            f"label matrix has shape {m.shape}; expected (rows, {len(classes)}) for classes {list(classes)}"
        )
    try:
        mf = m.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError("label indicator columns must hold only 0/1 values") from None
    bad = ~np.isin(mf, (0.0, 1.0))
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(f"label column {classes[c]!r} must hold only 0/1 values; row {r} has {m[r, c]!r}")
    return [[classes[int(j)] for j in np.flatnonzero(row)] for row in mf]


def normalize_labels(values: Any, multilabel: bool, separator: str | None = None) -> list[str] | list[list[str]]:
    """Normalise raw per-row labels to ``list[str]`` (multiclass) or ``list[list[str]]`` (multilabel)."""
    if hasattr(values, "columns"):  # DataFrame of 0/1 columns
        lists = indicator_to_lists(values.to_numpy(), [str(c) for c in values.columns])
        return lists if multilabel else _single_per_row(lists)
    vals = list(values.tolist() if hasattr(values, "tolist") else values)
    out: list[Any] = []
    for i, v in enumerate(vals):
        if _is_missing(v):
            if not multilabel:
                raise DataError(f"row {i} has no label; every row needs a label in multiclass mode")
            out.append([])
        elif is_listlike(v):
            labels = [str(x) for x in v]
            if multilabel:
                out.append(sorted(set(labels)))
            elif len(labels) == 1:
                out.append(labels[0])
            else:
                raise DataError(
                    f"row {i} has {len(labels)} labels {labels}; multiclass mode needs exactly one "
                    "(set labels.mode: multilabel for label sets)"
                )
        else:
            s = str(v)
            if multilabel:
                parts = s.split(separator) if separator else [s]
                out.append(sorted({p.strip() for p in parts if p.strip()}))
            else:
                out.append(s)
    return out


def _single_per_row(lists: list[list[str]]) -> list[str]:
    for i, row in enumerate(lists):
        if len(row) != 1:
            raise DataError(f"row {i} has {len(row)} labels set in the 0/1 columns; multiclass mode needs exactly one")
    return [row[0] for row in lists]


class LabelSpace:
    """An ordered set of class names and the task type."""

    def __init__(self, classes: Sequence[str], multilabel: bool = False):
        classes = [str(c) for c in classes]
        if not classes:
            raise DataError("a label space needs at least one class")
        if len(set(classes)) != len(classes):
            raise DataError(f"duplicate class names in {classes}")
        if not multilabel and len(classes) < 2:
            raise DataError(f"multiclass needs at least 2 classes, got {classes}")
        self.classes: list[str] = classes
        self.multilabel = multilabel
        self._index = {c: i for i, c in enumerate(classes)}

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def infer(cls, normalized: list[str] | list[list[str]], multilabel: bool) -> LabelSpace:
        seen: set[str] = set()
        for v in normalized:
            seen.update([v] if isinstance(v, str) else v)
        return cls(sorted(seen), multilabel)

    def encode(self, normalized: list[str] | list[list[str]]) -> np.ndarray:
        """Class indices ``(n,)`` for multiclass; a 0/1 float32 matrix ``(n, k)`` for multilabel."""
        unknown: set[str] = set()
        y: np.ndarray
        if self.multilabel:
            y = np.zeros((len(normalized), self.n_classes), dtype=np.float32)
            for i, row in enumerate(normalized):
                for label in row:
                    j = self._index.get(label)
                    if j is None:
                        unknown.add(label)
                    else:
                        y[i, j] = 1.0
        else:
            y = np.zeros(len(normalized), dtype=np.int64)
            for i, label in enumerate(cast(list[str], normalized)):
                j = self._index.get(label)
                if j is None:
                    unknown.add(label)
                else:
                    y[i] = j
        if unknown:
            shown = sorted(unknown)[:10]
            raise DataError(
                f"unknown label(s) {shown}{' ...' if len(unknown) > 10 else ''}; this model knows {self.classes}"
            )
        return y

    def decode(self, y: np.ndarray) -> list[str] | list[list[str]]:
        if self.multilabel:
            return [[self.classes[j] for j in np.flatnonzero(row)] for row in np.asarray(y)]
        return [self.classes[int(i)] for i in np.asarray(y)]

    def to_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "multilabel": self.multilabel}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelSpace:
        return cls(d["classes"], bool(d["multilabel"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSpace) and (self.classes, self.multilabel) == (other.classes, other.multilabel)

    def __repr__(self) -> str:
        kind = "multilabel" if self.multilabel else "multiclass"
        return f"LabelSpace({kind}, {self.classes})"
