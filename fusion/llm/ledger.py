"""The cost ledger: dollar budget, concurrency and rate limits, shared by all callers.

Every LLM call does ``try_reserve`` before it starts and ``settle`` when it ends:

* ``try_reserve(tokens, max_cost_usd)`` either grants the call or says why not. The
  reservation is the call's worst-case cost (every prompt byte a token, the full
  completion-token cap), so the budget check ``spent + reserved + max_cost <= budget``
  holds for all callers together: concurrent callers can never overspend, because the
  check and the reservation happen under one lock (or inside one Ray actor).
* ``settle(grant_id, tokens, cost_usd)`` replaces the reservation with the real cost
  (0 for a call that failed without being billed) and returns unused rate tokens.

Money is kept in integer pico-dollars, so the accounting is exact: the sum of settled
costs is compared with the budget without floating-point drift.

A denial is final for ``budget`` (the call can never fit) and temporary otherwise
(``retry_after_s`` says when to ask again). :class:`LocalLedger` is the in-process
implementation; the Ray jobs and Serve share one ledger actor with the same methods.

A journal (:mod:`fusion.llm.journal`) makes the ledger durable: a restarted ledger resumes
its spend and open reservations. ``try_reserve`` takes the caller's request key, so a
request repeated after a restart gets the grant it already has, and a repeated ``settle``
counts once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from fusion.llm.journal import JournalGrant, JournalState, LedgerJournal

log = logging.getLogger(__name__)
_JOURNALED: dict[Path, LocalLedger] = {}  # LocalLedger.from_limits: this process's ledger of each journal file
_JOURNALED_LOCK = threading.Lock()


@dataclass(frozen=True)
class Grant:
    id: int
    reserved_usd: float
    tokens: int


@dataclass(frozen=True)
class Denial:
    reason: Literal["budget", "budget_pending", "concurrency", "rate"]
    retry_after_s: float

    @property
    def final(self) -> bool:
        return self.reason == "budget"


class Ledger(Protocol):
    """In-process (:class:`LocalLedger`) or a handle whose calls return awaitables (the shared Ray actor)."""

    def try_reserve(
        self, tokens: int, max_cost_usd: float, key: str | None = None
    ) -> Grant | Denial | Awaitable[Grant | Denial]: ...

    def settle(self, grant_id: int, tokens: int, cost_usd: float) -> Awaitable[None] | None: ...

    def snapshot(self) -> dict[str, float]: ...


class TokenBucket:
    """``capacity`` tokens, refilled at ``per_minute / 60`` per second; may go into debt after settling."""

    def __init__(self, per_minute: float, clock: Callable[[], float]):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, n: float) -> float:
        """Seconds until ``n`` tokens are available (a request bigger than the bucket waits for a full one)."""
        self._refill()
        need = min(n, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, n: float) -> None:
        self.level -= n


PICO = 10**12  # ledger money unit: 1e-12 dollars


def to_pico(usd: float) -> int:
    return round(usd * PICO)


@dataclass
class _Held:
    grant: Grant
    pico: int  # the reservation, exact
    opened: float  # wall clock
    key: str | None


class LocalLedger:
    """Thread-safe in-process ledger. ``None`` limits are off.

    With a ``journal`` (a :class:`fusion.llm.journal.LedgerJournal` or its file path), every change is on disk
    before the call returns, and a ledger opened on the same journal resumes its spend and open reservations.
    A reservation older than ``reservation_timeout_s`` (its caller died) is charged its reserved worst case and
    released; a late ``settle`` replaces that charge with the real cost.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> LocalLedger:
        # one budget is one ledger: a copy (scikit-learn's clone of a classifier) shares it, never splits it
        return self

    def __init__(
        self,
        budget_usd: float | None = None,
        max_concurrency: int | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        journal: LedgerJournal | str | Path | None = None,
        reservation_timeout_s: float | None = None,
        wall_clock: Callable[[], float] = time.time,
    ):
        self._clock, self._wall = clock, wall_clock
        self._lock = threading.Lock()
        self._rpm: TokenBucket | None = None
        self._tpm: TokenBucket | None = None
        self.set_limits(budget_usd, max_concurrency, requests_per_minute, tokens_per_minute, reservation_timeout_s)
        self._held: dict[int, _Held] = {}
        self._keys: dict[str, int] = {}
        self._expired: dict[int, int] = {}  # grant id -> pico charged at expiry, until a late settle corrects it
        self._next_id = 0
        self._spent = 0
        self._reserved = 0
        self.calls = 0
        self.tokens = 0
        self.denied_budget = 0
        self.expired = 0
        self.journal = LedgerJournal(journal) if isinstance(journal, (str, Path)) else journal
        if self.journal is not None:
            self._resume(self.journal.load())

    def _resume(self, state: JournalState) -> None:
        self._spent, self.calls, self.tokens = state.spent, state.calls, state.tokens
        self.denied_budget, self.expired, self._next_id = state.denied_budget, state.expired, state.next_id
        for g in state.grants:
            if g.state == "expired":
                self._expired[g.id] = g.reserved
                continue
            self._held[g.id] = _Held(Grant(g.id, g.reserved / PICO, g.tokens), g.reserved, g.opened, g.key)
            self._reserved += g.reserved
            if g.key is not None:
                self._keys[g.key] = g.id
        if state.grants or state.spent:
            log.info(
                "ledger resumed from %s: $%.6f spent, %d open reservations",
                self.journal and self.journal.path,
                state.spent / PICO,
                len(self._held),
            )

    def set_limits(
        self,
        budget_usd: float | None,
        max_concurrency: int | None,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        reservation_timeout_s: float | None,
    ) -> None:
        """New limits for the same books: what was spent and reserved stays; a rate bucket restarts only if its
        rate changed."""

        def bucket(old: TokenBucket | None, per_minute: float | None) -> TokenBucket | None:
            if not per_minute:
                return None
            return old if old is not None and old.capacity == per_minute else TokenBucket(per_minute, self._clock)

        with self._lock:
            self.budget_usd = budget_usd
            self._budget = None if budget_usd is None else to_pico(budget_usd)
            self.max_concurrency = max_concurrency
            self._rpm = bucket(self._rpm, requests_per_minute)
            self._tpm = bucket(self._tpm, tokens_per_minute)
            self.reservation_timeout_s = reservation_timeout_s

    @staticmethod
    def limit_args(limits: Any) -> tuple[Any, ...]:
        """``set_limits``' arguments from an ``LLMLimitsConfig``."""
        return (
            limits.budget_usd,
            limits.max_concurrency,
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.reservation_timeout_s,
        )

    @classmethod
    def from_limits(cls, limits: Any, journal: str | Path | None = None) -> LocalLedger:
        """From an ``LLMLimitsConfig``. ``journal`` is the default when ``limits.ledger_journal`` is unset.

        One ledger per journal file in a process (a second ``fit`` or scorer on the same journal gets the first
        one's books, with these limits): a journal is held by one ledger at a time."""
        path = limits.ledger_journal or journal
        budget, concurrency, rpm, tpm, timeout = cls.limit_args(limits)
        if path in (None, "memory"):
            return cls(budget, concurrency, rpm, tpm, reservation_timeout_s=timeout)
        with _JOURNALED_LOCK:
            ledger = _JOURNALED.get(key := Path(path).expanduser().resolve())
            if ledger is None or ledger.journal is None or ledger.journal.closed:
                ledger = cls(budget, concurrency, rpm, tpm, journal=path, reservation_timeout_s=timeout)
                _JOURNALED[key] = ledger
            else:
                ledger.set_limits(budget, concurrency, rpm, tpm, timeout)
            return ledger

    def try_reserve(self, tokens: int, max_cost_usd: float, key: str | None = None) -> Grant | Denial:
        """``key``: the caller's id for this request; asking again with it returns the same grant (a retry)."""
        cost = to_pico(max_cost_usd)
        with self._lock:
            if key is not None and key in self._keys:
                return self._held[self._keys[key]].grant
            self._expire_stale()
            if self._budget is not None:
                if self._spent + cost > self._budget:
                    if self.journal is not None:
                        self.journal.denied()
                    self.denied_budget += 1
                    return Denial("budget", math.inf)
                if self._spent + self._reserved + cost > self._budget:
                    return Denial("budget_pending", 0.02)  # may fit once in-flight calls settle below their cap
            if self.max_concurrency is not None and len(self._held) >= self.max_concurrency:
                return Denial("concurrency", 0.01)
            wait = max(
                self._rpm.wait_for(1) if self._rpm else 0.0,
                self._tpm.wait_for(tokens) if self._tpm else 0.0,
            )
            if wait > 0:
                return Denial("rate", wait)
            held = _Held(Grant(self._next_id + 1, max_cost_usd, tokens), cost, self._wall(), key)
            if self.journal is not None:  # on disk first: a crash after this line loses nothing
                self.journal.reserved(JournalGrant(held.grant.id, key, cost, tokens, held.opened, "open"))
            if self._rpm:
                self._rpm.take(1)
            if self._tpm:
                self._tpm.take(tokens)
            self._next_id += 1
            self._held[held.grant.id] = held
            if key is not None:
                self._keys[key] = held.grant.id
            self._reserved += cost
            return held.grant

    def settle(self, grant_id: int, tokens: int, cost_usd: float) -> None:
        cost = to_pico(cost_usd)
        with self._lock:
            held = self._held.get(grant_id)
            if held is not None:
                if self.journal is not None:
                    self.journal.settled(grant_id, tokens, cost, cost)
                del self._held[grant_id]
                self._keys.pop(held.key, None)  # type: ignore[arg-type]
                self._reserved -= held.pico
                self._spent += cost
                reserved_tokens = held.grant.tokens
            elif grant_id in self._expired:  # its caller outlived the timeout: the real cost replaces the charge
                charged = self._expired[grant_id]
                if self.journal is not None:
                    self.journal.settled(grant_id, tokens, cost, cost - charged)
                del self._expired[grant_id]
                self._spent += cost - charged
                reserved_tokens = tokens
            elif self.journal is not None and self.journal.state_of(grant_id) == "settled":
                return  # the same settle again (a retry after the ledger restarted): counted once
            else:
                raise KeyError(f"unknown or already settled grant {grant_id}")
            self.calls += 1
            self.tokens += tokens
            if self._tpm:
                self._tpm.take(tokens - reserved_tokens)

    def _expire_stale(self) -> None:
        if self.reservation_timeout_s is None:
            return
        cutoff = self._wall() - self.reservation_timeout_s
        for held in [h for h in self._held.values() if h.opened < cutoff]:
            gid = held.grant.id
            if self.journal is not None:
                self.journal.expired(gid, held.pico)
            log.warning(
                "ledger: grant %d was not settled within %.0f s (its caller died?): charged its reserved $%.6f",
                gid,
                self.reservation_timeout_s,
                held.pico / PICO,
            )
            del self._held[gid]
            self._keys.pop(held.key, None)  # type: ignore[arg-type]
            self._reserved -= held.pico
            self._spent += held.pico
            self._expired[gid] = held.pico
            self.expired += 1

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            self._expire_stale()
            return {
                "budget_usd": self.budget_usd if self.budget_usd is not None else math.inf,
                "spent_usd": self._spent / PICO,
                "reserved_usd": self._reserved / PICO,
                "in_flight": len(self._held),
                "calls": self.calls,
                "tokens": self.tokens,
                "denied_budget": self.denied_budget,
                "expired": self.expired,
            }


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def acquire(ledger: Ledger, tokens: int, max_cost_usd: float) -> Grant | None:
    """Wait until the ledger grants a call; ``None`` when the budget can never allow it."""
    while True:
        decision = await _maybe_await(ledger.try_reserve(tokens, max_cost_usd))
        if isinstance(decision, Grant):
            return decision
        if decision.final:
            return None
        await asyncio.sleep(decision.retry_after_s)


async def settle(ledger: Ledger, grant: Grant, tokens: int, cost_usd: float) -> None:
    await _maybe_await(ledger.settle(grant.id, tokens, cost_usd))
