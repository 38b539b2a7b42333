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
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol


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

    def try_reserve(self, tokens: int, max_cost_usd: float) -> Grant | Denial | Awaitable[Grant | Denial]: ...

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


class LocalLedger:
    """Thread-safe in-process ledger. ``None`` limits are off."""

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
    ):
        self.budget_usd = budget_usd
        self._budget = None if budget_usd is None else to_pico(budget_usd)
        self.max_concurrency = max_concurrency
        self._rpm = TokenBucket(requests_per_minute, clock) if requests_per_minute else None
        self._tpm = TokenBucket(tokens_per_minute, clock) if tokens_per_minute else None
        self._lock = threading.Lock()
        self._grants: dict[int, Grant] = {}
        self._next_id = 0
        self._spent = 0
        self._reserved = 0
        self.calls = 0
        self.tokens = 0
        self.denied_budget = 0

    @classmethod
    def from_limits(cls, limits: Any) -> LocalLedger:
        """From an ``LLMLimitsConfig`` (budget, concurrency, request and token rates)."""
        return cls(limits.budget_usd, limits.max_concurrency, limits.requests_per_minute, limits.tokens_per_minute)

    def try_reserve(self, tokens: int, max_cost_usd: float) -> Grant | Denial:
        cost = to_pico(max_cost_usd)
        with self._lock:
            if self._budget is not None:
                if self._spent + cost > self._budget:
                    self.denied_budget += 1
                    return Denial("budget", math.inf)
                if self._spent + self._reserved + cost > self._budget:
                    return Denial("budget_pending", 0.02)  # may fit once in-flight calls settle below their cap
            if self.max_concurrency is not None and len(self._grants) >= self.max_concurrency:
                return Denial("concurrency", 0.01)
            wait = max(
                self._rpm.wait_for(1) if self._rpm else 0.0,
                self._tpm.wait_for(tokens) if self._tpm else 0.0,
            )
            if wait > 0:
                return Denial("rate", wait)
            if self._rpm:
                self._rpm.take(1)
            if self._tpm:
                self._tpm.take(tokens)
            self._next_id += 1
            grant = Grant(self._next_id, max_cost_usd, tokens)
            self._grants[grant.id] = grant
            self._reserved += cost
            return grant

    def settle(self, grant_id: int, tokens: int, cost_usd: float) -> None:
        with self._lock:
            grant = self._grants.pop(grant_id, None)
            if grant is None:
                raise KeyError(f"unknown or already settled grant {grant_id}")
            self._reserved -= to_pico(grant.reserved_usd)
            self._spent += to_pico(cost_usd)
            self.calls += 1
            self.tokens += tokens
            if self._tpm:
                self._tpm.take(tokens - grant.tokens)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {
                "budget_usd": self.budget_usd if self.budget_usd is not None else math.inf,
                "spent_usd": self._spent / PICO,
                "reserved_usd": self._reserved / PICO,
                "in_flight": len(self._grants),
                "calls": self.calls,
                "tokens": self.tokens,
                "denied_budget": self.denied_budget,
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
