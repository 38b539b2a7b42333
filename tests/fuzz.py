"""Hypothesis strategies for fuzzing every edge (HTTP, Kafka, the batch jobs, the CLI, the library).

Budgets: each test asks ``budget(n)`` examples. ``make test`` runs the small budget with a
fixed seed (the ``ci`` profile, derandomized); ``make fuzz`` runs 20 times as many, random.
"""

import json
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

SCALE = int(os.environ.get("LABELFUSE_FUZZ_SCALE", "1"))
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile("fuzz", parent=settings.get_profile("ci"), derandomize=False)
settings.load_profile("fuzz" if SCALE > 1 else "ci")


def budget(n: int) -> settings:
    """``n`` examples under ``make test``, ``n * LABELFUSE_FUZZ_SCALE`` under ``make fuzz``."""
    return settings(max_examples=n * SCALE)


# characters the encoder, the LLM clients, JSON, Arrow or Kafka may choke on, besides all of Unicode
SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
SPECIAL = st.sampled_from(
    ["\x00", "\x01", "\x1b", "\x7f", "\x85", "\x9f", "\t", "\n", "\r", "\u2028", "\u200b", "\u200d", "\ufeff",
     "\u202e", "\ufffd", "\uffff", "\U0010ffff", "\u0301", "🙂", "漢", "\\", '"', "{"]
)  # fmt: skip
CHARS = st.one_of(st.characters(), SURROGATES, SPECIAL)
PIECES = st.one_of(
    st.sampled_from(["👍🏽", "\ud83d\ude00", "<|im_end|>", "</s>", "{{ x }}", "\\u0000"]),
    st.integers(100, 400).map(lambda n: "a" * n),
    st.integers(50, 200).map(lambda n: "漢字" * n),  # long, and no spaces to cut at
)
WORDS = st.sampled_from(["Shares", "fell", "the", "election", "striker", "scored", "film", "chip", "vote"])

# texts: random unicode, good words with bad characters among them, and a few whole edge cases
NASTY_TEXT = st.one_of(
    st.text(CHARS, max_size=40),
    st.lists(st.one_of(WORDS, PIECES, st.text(CHARS, max_size=3)), max_size=12).map(" ".join),
    st.sampled_from(["", " ", "\x00", "\u200b\ufeff", "\ud800 abc", "abc \udfff", "\ud83d\ude00 ok"]),
    st.integers(1000, 6000).map(lambda n: "word " * (n // 5)),  # over the edges' max_chars
)
GOOD_TEXT = st.lists(WORDS, min_size=1, max_size=12).map(" ".join)

# any JSON value, with the numbers and nesting that break parsers
JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=False, allow_infinity=False),
        NASTY_TEXT,
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def dumps(value) -> bytes:
    """JSON as a client would send it: non-ASCII and lone surrogates as \\u escapes (valid JSON)."""
    return json.dumps(value, ensure_ascii=True).encode()


# raw bodies / message values: JSON bytes, random bytes (invalid UTF-8), deep nesting, huge numbers
RAW = st.one_of(
    JSON.map(dumps),
    st.binary(max_size=60),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"text": ' + b"[" * n),
    st.just(b'{"text": 1e999999}'),
    st.integers(4000, 6000).map(lambda n: b'{"text": ' + b"9" * n + b"}"),  # past Python's 4,300-digit int limit
)
