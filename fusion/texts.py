"""The one rule for texts, applied at every edge: HTTP, Kafka, the batch jobs, the CLI and the Python API.

:func:`clean_text` gives the text the encoder and the LLMs will see, or refuses it with a
:class:`TextError` whose ``reason`` completes the sentence "text ...":

1. It must be a string (``is missing`` / ``is of type int, not a string``).
2. Longer than the edge's ``max_chars`` (counted before cleaning): refused
   (``has N characters; the limit is M``).
3. Surrogates: a pair written as two code points (UTF-16 data decoded without joining) is
   joined into the character it encodes; a lone surrogate is refused
   (``contains a lone surrogate (U+D800) at character K ...``). It is not Unicode: UTF-8,
   the tokenizer and the LLM clients cannot carry it. JSON can (``"\\ud800"``), and a
   JavaScript string cut in the middle of an emoji leaves one.
4. Control characters (Unicode category Cc) other than tab, line feed and carriage return
   (NUL, escape, DEL, the C1 range) are removed: the encoder's tokenizer drops them anyway,
   and the LLM must see the same text (NUL ends a C string in llama.cpp).
5. A text left with nothing but whitespace and invisible format characters (category Cf:
   zero-width space, byte-order mark, bidi marks) is refused (``is empty``): the encoder
   would see no token.

Everything else passes unchanged: any script, emoji, combining marks, private-use and
non-characters. Found by the property tests in tests/test_texts.py, run against the real
tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from fusion.errors import DataError

# a known-good text: bundles record its embedding; a part that fails on it is broken, not the text it was given
PROBE_TEXT = "labelfuse encoder probe: markets rallied after the election while the striker scored twice."
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# a high surrogate not followed by a low one, or a low one not preceded by a high one
_LONE_SURROGATE = re.compile(r"[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]")


class TextError(DataError):
    """A text the encoder and the LLMs cannot take. ``reason`` completes "text ..." (``str`` is that sentence)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"text {reason}")


def clean_text(text: Any, max_chars: int | None = None) -> str:
    """The cleaned text, or :class:`TextError` with why it is refused (see the module's rule)."""
    if not isinstance(text, str):
        raise TextError("is missing" if text is None else f"is of type {type(text).__name__}, not a string")
    if max_chars is not None and len(text) > max_chars:
        raise TextError(f"has {len(text)} characters; the limit is {max_chars}")
    if not text.isascii() and _SURROGATE.search(text):
        text = _join_surrogates(text)
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    stripped = text.strip()
    if not stripped or (
        not stripped.isascii() and all(unicodedata.category(c) == "Cf" or c.isspace() for c in stripped)
    ):
        raise TextError("is empty")
    return text


def _join_surrogates(text: str) -> str:
    lone = _LONE_SURROGATE.search(text)
    if lone:
        raise TextError(
            f"contains a lone surrogate (U+{ord(lone.group()):04X}) at character {lone.start()}: not valid Unicode "
            "(an emoji cut in half leaves one); send UTF-8 text"
        )
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le")


def text_id(text: str) -> str:
    """A text's id: the first 16 hex digits of the sha256 of its UTF-8 (after :func:`clean_text`). Answers name
    their texts by it, and feedback can refer to a text already seen by it instead of sending it again."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def escape_surrogates(value: str) -> str:
    """``value`` with each lone surrogate written as its escape (``\\ud800``): for echoing input into UTF-8
    output (Arrow, parquet, CSV), never for a text the model sees."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def load_json(raw: bytes | str) -> Any:
    """``json.loads`` whose every failure is a ValueError saying why: bad JSON, invalid UTF-8, an integer of over
    4,300 digits (Python's limit), or nesting deeper than the parser's recursion allows."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deep") from None


def load_json_object(raw: bytes | str) -> dict[str, Any]:
    """One JSON Lines record: :func:`load_json`, and a ValueError unless it is an object."""
    obj = load_json(raw)
    if not isinstance(obj, dict):
        raise ValueError(f"a JSON {type(obj).__name__}, not an object")
    return obj


def json_plain(value: Any) -> Any:
    """``default=`` for json.dumps: numpy scalars and arrays as JSON can hold them, anything else as text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def arrow_array(values: list[Any], as_text: bool = False) -> Any:
    """A pyarrow array of values echoed from input (JSON, pandas): as they are when Arrow can type and encode
    them; otherwise, or with ``as_text``, strings: lone surrogates escaped, other values as JSON text."""
    import pyarrow as pa

    if not as_text:
        try:
            return pa.array(values, from_pandas=True)
        except (pa.ArrowException, UnicodeEncodeError, OverflowError):
            pass
    return pa.array(
        [v if v is None else escape_surrogates(v) if isinstance(v, str) else json.dumps(v, default=json_plain)
         for v in values],
        pa.string(),
    )  # fmt: skip


def clean_texts(texts: Iterable[Any], max_chars: int | None = None) -> tuple[list[str | None], list[str | None]]:
    """(cleaned texts, reasons): per text, the cleaned text and None, or None and why it is refused."""
    cleaned: list[str | None] = []
    reasons: list[str | None] = []
    for t in texts:
        try:
            cleaned.append(clean_text(t, max_chars))
            reasons.append(None)
        except TextError as err:
            cleaned.append(None)
            reasons.append(err.reason)
    return cleaned, reasons


def check_texts(texts: Any) -> list[str]:
    """The Python API's input check: a list of cleaned texts, or DataError naming the first bad row."""
    if isinstance(texts, str):
        raise DataError("expected a list of texts, got a single string; wrap it in a list")
    if texts is None or isinstance(texts, (bytes, Mapping)) or not isinstance(texts, Iterable):
        raise DataError(f"expected a list of texts or a DataFrame, got {type(texts).__name__}")
    out = list(texts)
    for i, t in enumerate(out):
        try:
            out[i] = clean_text(t)
        except TextError as err:
            shown = f" ({t!r:.60})" if not isinstance(t, str) and t is not None else ""
            raise DataError(f"text at row {i} {err.reason}{shown}") from None
    return out
