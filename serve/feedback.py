"""People's labels, from POST /v1/feedback and from a Kafka labels topic: one set of rules for both.

A feedback item (:class:`serve.schemas.FeedbackRequest`) names a text (``text``, or the ``text_id`` a
classification returned) and its right label(s). :func:`check` refuses, with the reason, an item
the model cannot learn from: neither or both of text and text_id, or of label and labels; a class
the model does not know; not exactly one label for a multi-class model; a text the text rule
refuses. Its ``id`` makes it idempotent: the label is kept as ``feedback:<id>``, so the same id sent
again (a client's retry, a re-delivered message, the same label over HTTP and Kafka) is one label.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fusion.errors import DataError
from fusion.labelstore import LabelRecord, human_label
from fusion.texts import TextError, clean_text
from serve.schemas import FeedbackRequest


def parse(obj: Any) -> FeedbackRequest:
    """A feedback item from a decoded JSON value, or DataError naming each problem."""
    from pydantic import ValidationError

    if not isinstance(obj, Mapping):
        raise DataError(f"a feedback item must be a JSON object, not a {type(obj).__name__}")
    try:
        return FeedbackRequest.model_validate(obj)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors())
        raise DataError(f"not a feedback item ({problems})") from None


def check(req: FeedbackRequest, classes: list[str], multilabel: bool, max_chars: int) -> tuple[str | None, list[str]]:
    """(the cleaned text, or None when the item names a text_id; the labels), or DataError with the reason."""
    if (req.text is None) == (req.text_id is None):
        raise DataError("give exactly one of 'text' or 'text_id'")
    if (req.label is None) == (req.labels is None):
        raise DataError("give exactly one of 'label' or 'labels'")
    given = [req.label] if req.label is not None else list(req.labels or [])
    unknown = sorted(set(given) - set(classes))
    if unknown:
        raise DataError(f"unknown class(es) {unknown}; this model knows {classes}")
    if not multilabel and len(given) != 1:
        raise DataError(f"a multi-class model needs exactly one label, got {len(given)}")
    if req.text is None:
        return None, given
    try:
        return clean_text(req.text, max_chars), given
    except TextError as err:
        raise DataError(str(err)) from None


def record(req: FeedbackRequest, text: str, labels: list[str], origin: str) -> LabelRecord:
    return human_label(text, labels, label_id=f"feedback:{req.id}", origin=origin)
