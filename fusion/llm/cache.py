"""SQLite cache of LLM scores, shared by threads and processes on one machine.

Keys are the sha256 of everything that determines an answer: provider, endpoint, model,
prompt version, label set, scoring mode, generation parameters, few-shot examples and the
text. A row stores the per-class scores and the token usage of the call that produced
them, so cost can still be reported for cached texts.

WAL mode lets readers proceed while one writer commits; ``busy_timeout`` makes concurrent
writers (threads, processes, Ray actors on the same node) wait instead of failing. The
cache is per machine: Ray workers on different nodes each keep their own file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusion.config import cache_home
from fusion.errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    key TEXT PRIMARY KEY,
    scores TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
)
"""


def default_cache_path() -> Path:
    return cache_home() / "llm_cache.sqlite"


def cache_key(parts: Mapping[str, Any], text: str) -> str:
    blob = json.dumps(dict(parts), sort_keys=True, ensure_ascii=False) + "\x00" + text
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedScore:
    scores: np.ndarray
    prompt_tokens: int
    completion_tokens: int


class ScoreCache:
    """Thread-safe; open one per process (connections are not shared across processes)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_cache_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._conn.execute(SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise ConfigError(f"cannot open the LLM cache at {self.path}: {err} (set llm_limits.cache_path)") from None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedScore]:
        keys = list(keys)
        found: dict[str, CachedScore] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                rows = self._conn.execute(
                    f"SELECT key, scores, prompt_tokens, completion_tokens FROM scores WHERE key IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                for k, s, pt, ct in rows:
                    found[k] = CachedScore(np.asarray(json.loads(s), dtype=np.float32), int(pt), int(ct))
            self.hits += len(found)
            self.misses += len(keys) - len(found)
        return found

    def put(self, key: str, scores: np.ndarray, prompt_tokens: int, completion_tokens: int) -> None:
        row = (key, json.dumps([float(v) for v in scores]), int(prompt_tokens), int(completion_tokens), time.time())
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?)", row)

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
