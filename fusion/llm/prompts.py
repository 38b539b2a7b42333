"""Versioned prompt templates and the maths that turns an LLM answer into per-class scores.

Two ways to get scores for ALL classes from ONE call:

* ``logprobs`` (multiclass): the model is asked for the answer key of one class and the
  first answer token's ``top_logprobs`` become a distribution over classes. Keys are the
  class names when their lowercased names are told apart by the first token's prefix,
  else single letters A, B, C... (see :func:`answer_keys`).
* ``json``: the model returns ``{"<class>": <probability 0..1>, ...}`` validated with a
  pydantic model built for the label set (multilabel, or endpoints with no logprobs).

``PROMPT_VERSION`` is part of every cache key: change it whenever a template changes so
cached scores from the old wording are never reused.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

PROMPT_VERSION = "v1"


@dataclass(frozen=True)
class Example:
    """A labelled few-shot example."""

    text: str
    labels: tuple[str, ...]


CHARS_PER_WORD = 10  # the character cap per allowed word: texts without spaces (CJK, emoji) are bounded too


def truncate_words(text: str, max_words: int) -> str:
    """The first ``max_words`` words, and at most ``CHARS_PER_WORD * max_words`` characters of them."""
    words = text.split()
    cut = " ".join(words[:max_words])
    limit = CHARS_PER_WORD * max_words
    return cut[:limit] + (" ..." if len(words) > max_words or len(cut) > limit else "")


def _norm(token: str) -> str:
    return token.strip().strip("\"'*`.:()[]").lower()


def answer_keys(classes: Sequence[str]) -> list[str]:
    """What the model answers for each class: its name when every name is recognisable from
    any prefix of 2+ characters (so a first token like 'bus' maps to one class), else letters.
    """
    names = [_norm(c) for c in classes]
    distinct = len(set(names)) == len(names) and all(n and n.replace(" ", "").isalnum() for n in names)
    if distinct and all(not any(a != b and b.startswith(a[:2]) for b in names) for a in names):
        return list(classes)
    if len(classes) > len(string.ascii_uppercase):
        return []  # too many classes for single-letter codes: use JSON mode
    return list(string.ascii_uppercase[: len(classes)])


def _described(classes: Sequence[str], descriptions: Mapping[str, str] | None, sep: str = "\n") -> str:
    """The class list with each class's one-line description where the config gives one."""
    d = descriptions or {}
    return sep.join(f"- {c}: {d[c]}" if d.get(c) else f"- {c}" for c in classes)


def _question(classes: Sequence[str], keys: Sequence[str], descriptions: Mapping[str, str] | None = None) -> str:
    d = descriptions or {}
    if list(keys) == list(classes):
        if d:
            return f"Categories:\n{_described(classes, d)}\nWhich category fits this text best? Answer with one word."
        options = ", ".join(classes[:-1]) + f" or {classes[-1]}" if len(classes) > 1 else classes[0]
        return f"Which category fits this text best: {options}? Answer with one word."
    options = "\n".join(f"{k}: {c}" + (f" ({d[c]})" if d.get(c) else "") for k, c in zip(keys, classes, strict=True))
    return f"Which category fits this text best?\n{options}\nAnswer with the letter only."


def multiclass_messages(
    text: str,
    classes: Sequence[str],
    keys: Sequence[str],
    max_words: int,
    examples: Sequence[Example] = (),
    descriptions: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    """The text first, then the question and its lettered options, so the answer's letter follows them directly.
    (SmolLM2-135M, the test suite's model, answers bbc-news at about chance with it.)"""
    question = _question(classes, keys, descriptions)
    key_of = dict(zip(classes, keys, strict=True))
    msgs: list[dict[str, str]] = []
    for ex in examples:
        msgs.append({"role": "user", "content": f"Text:\n{truncate_words(ex.text, max_words)}\n\n{question}"})
        msgs.append({"role": "assistant", "content": key_of[ex.labels[0]]})
    msgs.append({"role": "user", "content": f"Text:\n{truncate_words(text, max_words)}\n\n{question}"})
    return msgs


def json_messages(
    text: str,
    classes: Sequence[str],
    multilabel: bool,
    max_words: int,
    examples: Sequence[Example] = (),
    descriptions: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    what = (
        "For each category, give the probability (0 to 1) that it applies to the text; several or none may apply."
        if multilabel
        else "Give the probability (0 to 1) that the text belongs to each category; exactly one applies."
    )
    listed = f"\n{_described(classes, descriptions)}" if descriptions else f" {', '.join(classes)}."
    question = (
        f"Categories:{listed}\n{what}\n"
        "Answer with a JSON object only, with every category as a key and its probability as the value."
    )
    msgs: list[dict[str, str]] = []
    for ex in examples:
        msgs.append({"role": "user", "content": f"Text:\n{truncate_words(ex.text, max_words)}\n\n{question}"})
        msgs.append({"role": "assistant", "content": json.dumps({c: float(c in ex.labels) for c in classes})})
    msgs.append({"role": "user", "content": f"Text:\n{truncate_words(text, max_words)}\n\n{question}"})
    return msgs


def json_schema(classes: Sequence[str]) -> dict[str, Any]:
    """``response_format`` asking for one probability per class (OpenAI structured outputs)."""
    props = {c: {"type": "number", "minimum": 0, "maximum": 1} for c in classes}
    schema = {"type": "object", "properties": props, "required": list(classes), "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": "class_probabilities", "schema": schema, "strict": True}}


def answer_model(classes: Sequence[str]) -> type[BaseModel]:
    """A pydantic model for ``{class: probability}`` (extra keys forbidden, every class required)."""
    fields: dict[str, Any] = {f"c{i}": (float, Field(alias=c, ge=0.0, le=1.0)) for i, c in enumerate(classes)}
    return create_model("ClassProbabilities", __config__=ConfigDict(extra="forbid"), **fields)


class InvalidAnswer(ValueError):
    """The LLM's answer could not be turned into class scores."""


def parse_json_answer(content: str | None, classes: Sequence[str], model: type[BaseModel]) -> np.ndarray:
    """Validate a JSON answer; raise :class:`InvalidAnswer` with the reason if it does not fit."""
    if not content:
        raise InvalidAnswer("empty answer")
    text = content.strip()
    if text.startswith("```"):  # tolerate a fenced block
        text = text.strip("`").removeprefix("json").strip()
    try:
        parsed = model.model_validate_json(text)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "answer"
        raise InvalidAnswer(f"{where}: {first['msg']} ({err.error_count()} problem(s))") from None
    return np.array([getattr(parsed, f"c{i}") for i in range(len(classes))], dtype=np.float32)


def logprobs_to_distribution(
    top_logprobs: Sequence[tuple[str, float]], classes: Sequence[str], keys: Sequence[str]
) -> np.ndarray:
    """Turn the first answer token's ``(token, logprob)`` alternatives into ``P(class)``.

    A token counts for a class when, normalised (case, spaces and quotes dropped), it is
    the class key or a prefix of at least two characters of exactly one key (a single
    letter for letter keys). Classes that no listed token names get a floor: each is
    less likely than the least likely listed token, and together they cannot exceed the
    probability mass the listing leaves out, so each gets
    ``min(exp(min logprob), (1 - listed mass) / n_unseen)``. The result is renormalised.
    Raises :class:`InvalidAnswer` if no listed token names any class.
    """
    if not top_logprobs:
        raise InvalidAnswer("no logprobs in the answer")
    norm_keys = [_norm(k) for k in keys]
    letters = all(len(k) == 1 for k in norm_keys)
    p = np.zeros(len(classes), dtype=np.float64)
    for token, lp in top_logprobs:
        t = _norm(token)
        if not t:
            continue
        if letters:
            hits = [i for i, k in enumerate(norm_keys) if t == k]
        else:
            hits = [i for i, k in enumerate(norm_keys) if t == k or (len(t) >= 2 and k.startswith(t))]
        if len(hits) == 1:
            p[hits[0]] += math.exp(lp)
    if p.sum() <= 0:
        shown = ", ".join(repr(t) for t, _ in top_logprobs[:5])
        raise InvalidAnswer(f"no class among the top answer tokens ({shown})")
    listed_mass = min(1.0, sum(math.exp(lp) for _, lp in top_logprobs))
    unseen = p == 0
    if unseen.any():
        floor = min(math.exp(min(lp for _, lp in top_logprobs)), max(1.0 - listed_mass, 0.0) / unseen.sum())
        p[unseen] = max(floor, 1e-6)
    return (p / p.sum()).astype(np.float32)
