"""A durable journal for the cost ledger: spend and open reservations in one SQLite file.

A ledger that forgets its spend when its process restarts starts again from $0 and lets
every caller overspend. With a journal, :class:`fusion.llm.ledger.LocalLedger` writes each
reservation, settlement and expiry in one SQLite transaction before it answers, and a new
ledger opened on the same file resumes: the same spend, the same open reservations (still
counted against the budget), the same grant numbering.

Why SQLite: it ships with Python, a transaction makes "this grant" and "the totals" change
together or not at all, and ``synchronous=FULL`` in WAL mode keeps every answered call on
disk through a killed process or a lost machine. One process writes a journal at a time
(the ledger actor); keep the file on a local disk, not on NFS, where SQLite's locks are not
reliable.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fusion.errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    spent INTEGER NOT NULL,
    calls INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    denied_budget INTEGER NOT NULL,
    expired INTEGER NOT NULL,
    next_id INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0, 0, 0, 0, 0);
CREATE TABLE IF NOT EXISTS grants (
    id INTEGER PRIMARY KEY,
    key TEXT UNIQUE,
    reserved INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    opened REAL NOT NULL,
    state TEXT NOT NULL,
    cost INTEGER,
    closed REAL
);
CREATE INDEX IF NOT EXISTS grants_state ON grants (state);
"""

KEEP_CLOSED_S = 7 * 24 * 3600  # closed grants are kept a week, so a late or repeated settle is recognised


@dataclass(frozen=True)
class JournalGrant:
    id: int
    key: str | None
    reserved: int  # pico-dollars
    tokens: int
    opened: float  # wall clock, seconds since the epoch
    state: str  # "open" | "expired"


@dataclass(frozen=True)
class JournalState:
    spent: int
    calls: int
    tokens: int
    denied_budget: int
    expired: int
    next_id: int
    grants: list[JournalGrant]  # open and expired (an expired grant may still be settled late)


class LedgerJournal:
    """The ledger's state on disk. Every method is one transaction; the ledger calls them under its lock."""

    def __init__(self, path: str | Path, lock_wait_s: float = 10.0):
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lockfile = _exclusive(self.path.with_name(self.path.name + ".lock"), lock_wait_s)
            self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(SCHEMA)
            self._conn.execute(
                "DELETE FROM grants WHERE state != 'open' AND closed < ?", (time.time() - KEEP_CLOSED_S,)
            )
        except (OSError, sqlite3.Error) as err:
            raise ConfigError(
                f"cannot open the ledger journal at {self.path}: {err} (set llm_limits.ledger_journal)"
            ) from None
        self._lock = threading.Lock()
        self.closed = False

    def _tx(self, *statements: tuple[str, tuple]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._conn.execute(sql, args)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def load(self) -> JournalState:
        with self._lock:
            totals = self._conn.execute(
                "SELECT spent, calls, tokens, denied_budget, expired, next_id FROM totals WHERE id = 0"
            ).fetchone()
            rows = self._conn.execute(
                "SELECT id, key, reserved, tokens, opened, state FROM grants WHERE state != 'settled' ORDER BY id"
            ).fetchall()
        spent, calls, tokens, denied_budget, expired, next_id = totals
        return JournalState(spent, calls, tokens, denied_budget, expired, next_id, [JournalGrant(*row) for row in rows])

    def state_of(self, grant_id: int) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT state FROM grants WHERE id = ?", (grant_id,)).fetchone()
        return None if row is None else row[0]

    def reserved(self, grant: JournalGrant) -> None:
        self._tx(
            (
                "INSERT INTO grants (id, key, reserved, tokens, opened, state) VALUES (?, ?, ?, ?, ?, 'open')",
                (grant.id, grant.key, grant.reserved, grant.tokens, grant.opened),
            ),
            ("UPDATE totals SET next_id = ? WHERE id = 0", (grant.id,)),
        )

    def settled(self, grant_id: int, tokens: int, cost: int, spent_delta: int) -> None:
        """``spent_delta`` is ``cost`` for an open grant, ``cost - reserved`` for one already charged at expiry."""
        self._tx(
            ("UPDATE grants SET state = 'settled', cost = ?, closed = ? WHERE id = ?", (cost, time.time(), grant_id)),
            (
                "UPDATE totals SET spent = spent + ?, calls = calls + 1, tokens = tokens + ? WHERE id = 0",
                (spent_delta, tokens),
            ),
        )

    def expired(self, grant_id: int, charged: int) -> None:
        self._tx(
            (
                "UPDATE grants SET state = 'expired', cost = ?, closed = ? WHERE id = ?",
                (charged, time.time(), grant_id),
            ),
            ("UPDATE totals SET spent = spent + ?, expired = expired + 1 WHERE id = 0", (charged,)),
        )

    def denied(self) -> None:
        self._tx(("UPDATE totals SET denied_budget = denied_budget + 1 WHERE id = 0", ()))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            os.close(self._lockfile)
            self.closed = True


def _exclusive(lock_path: Path, wait_s: float) -> int:
    """Hold an exclusive lock on ``lock_path`` for this process's lifetime: two ledgers on one journal would each
    keep their own totals and overspend together. A killed process's lock is released by the OS; a restarted
    ledger waits ``wait_s`` for it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise ConfigError(
                    f"the ledger journal {lock_path.with_suffix('')} is in use by another ledger: give each ledger "
                    "its own journal (llm_limits.ledger_journal), or share one ledger (the Ray ledger actor)"
                ) from None
            time.sleep(0.1)
