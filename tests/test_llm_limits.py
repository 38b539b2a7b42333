"""Budget ledger, rate limits, cache, retries and provider errors.

The fault-injection tests use tests/stub_llm.py, a scripted OpenAI-compatible HTTP
server of our own: it stands in ONLY for a paid provider's failure modes (429 with
Retry-After, 5xx, invalid answers, a rejected key), which cannot be provoked on a real
paid API here. Scoring itself is tested against the real local model in test_llm_local.py.
"""

import asyncio
import math
import multiprocessing
import tempfile
import threading
import time

import numpy as np
import pytest
from fuzz import budget
from hypothesis import given
from hypothesis import strategies as st
from stub_llm import StubServer

from fusion.config import LLMLimitsConfig, LLMScorerConfig
from fusion.errors import ConfigError
from fusion.llm import LLMPanel, LLMScorer, LocalLedger
from fusion.llm.cache import ScoreCache, cache_key
from fusion.llm.journal import LedgerJournal
from fusion.llm.ledger import Denial, Grant, acquire, settle, to_pico

CLASSES = ["business", "sports", "tech"]


def _answer(text: str) -> int:
    return 1 if "match" in text else 2 if "phone" in text else 0


# -- ledger -------------------------------------------------------------------------------------------------


def test_64_concurrent_reservations_never_overspend_a_small_budget():
    """64 threads race to reserve $0.03 each against a $1.00 budget: exactly 33 get through and
    the ledger never holds more than the budget, reserved or spent (the check-then-spend race)."""
    ledger = LocalLedger(budget_usd=1.0)
    barrier = threading.Barrier(64)
    granted: list[Grant] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        d = ledger.try_reserve(100, 0.03)
        if isinstance(d, Grant):
            with lock:
                granted.append(d)
            assert ledger.snapshot()["reserved_usd"] + ledger.snapshot()["spent_usd"] <= 1.0 + 1e-12
            time.sleep(0.01)
            ledger.settle(d.id, 100, 0.03)  # the call cost exactly its reservation
        else:
            assert d.reason in ("budget", "budget_pending")

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = ledger.snapshot()
    assert len(granted) <= 33 and snap["spent_usd"] <= 1.0 + 1e-12
    assert ledger._spent == to_pico(0.03) * len(granted) and snap["reserved_usd"] == 0  # exact, no float drift
    # asyncio callers waiting on pending reservations end up using the budget exactly
    ledger2 = LocalLedger(budget_usd=1.0)

    async def caller() -> bool:
        g = await acquire(ledger2, 100, 0.03)
        if g is None:
            return False
        await asyncio.sleep(0.001)
        await settle(ledger2, g, 100, 0.03)
        return True

    async def main() -> list[bool]:
        return await asyncio.gather(*(caller() for _ in range(64)))

    results = asyncio.run(main())
    assert sum(results) == 33  # floor(1.00 / 0.03)
    assert ledger2.snapshot()["spent_usd"] == 0.99 and ledger2.snapshot()["denied_budget"] == 31


def test_settling_below_the_reservation_frees_budget_and_unknown_grants_fail():
    ledger = LocalLedger(budget_usd=0.10)
    g1 = ledger.try_reserve(10, 0.06)
    assert isinstance(g1, Grant)
    assert ledger.try_reserve(10, 0.06) == Denial("budget_pending", 0.02)  # could fit once g1 settles low
    ledger.settle(g1.id, 10, 0.01)
    g2 = ledger.try_reserve(10, 0.06)
    assert isinstance(g2, Grant)
    assert ledger.try_reserve(10, 0.06).reason == "budget_pending"
    ledger.settle(g2.id, 10, 0.06)
    assert ledger.try_reserve(10, 0.06).reason == "budget"  # 0.07 spent: 0.06 more can never fit
    with pytest.raises(KeyError):
        ledger.settle(g1.id, 10, 0.01)


def test_concurrency_and_rate_buckets_with_a_controlled_clock():
    now = [0.0]
    ledger = LocalLedger(max_concurrency=2, requests_per_minute=60, tokens_per_minute=600, clock=lambda: now[0])
    a = ledger.try_reserve(100, 0)
    b = ledger.try_reserve(100, 0)
    assert isinstance(a, Grant) and isinstance(b, Grant)
    assert ledger.try_reserve(100, 0).reason == "concurrency"
    ledger.settle(a.id, 100, 0)
    ledger.settle(b.id, 100, 0)
    big = ledger.try_reserve(500, 0)  # 600 - 200 = 400 tokens left in the minute
    assert isinstance(big, Denial) and big.reason == "rate" and big.retry_after_s == pytest.approx(10.0)
    now[0] = 10.0
    assert isinstance(ledger.try_reserve(500, 0), Grant)
    # 60 requests/min: a burst of 60 drains the bucket, the next waits ~1 s
    burst = LocalLedger(requests_per_minute=60, clock=lambda: now[0])
    for _ in range(60):
        burst.settle(burst.try_reserve(1, 0).id, 1, 0)
    d = burst.try_reserve(1, 0)
    assert d.reason == "rate" and d.retry_after_s == pytest.approx(1.0)


def test_a_journaled_ledger_resumes_its_spend_and_open_reservations(tmp_path):
    """A ledger that restarts on its journal carries on: never $0 again, never a double count."""
    path = tmp_path / "ledger.sqlite"
    ledger = LocalLedger(budget_usd=1.0, journal=path)
    a, b = ledger.try_reserve(10, 0.3, key="req-a"), ledger.try_reserve(10, 0.3, key="req-b")
    ledger.settle(a.id, 10, 0.25)
    with pytest.raises(ConfigError, match="in use by another ledger"):  # two live ledgers would each spend it all
        LocalLedger(budget_usd=1.0, journal=LedgerJournal(path, lock_wait_s=0.2))
    ledger.journal.close()  # the process dies

    again = LocalLedger(budget_usd=1.0, journal=path)
    snap = again.snapshot()
    assert snap["spent_usd"] == 0.25 and snap["reserved_usd"] == 0.3 and snap["in_flight"] == 1 and snap["calls"] == 1
    assert again.try_reserve(10, 0.3, key="req-b") == b  # a request re-sent after the restart: the same grant
    assert again.try_reserve(10, 0.5).reason == "budget_pending"  # b still holds its reservation
    again.settle(b.id, 10, 0.2)
    again.settle(a.id, 10, 0.25)  # a settle re-sent after the restart: counted once
    c = again.try_reserve(10, 0.5)
    assert c.id == b.id + 1  # grant numbers carry on, never reused
    again.settle(c.id, 10, 0.5)
    assert again.snapshot()["spent_usd"] == 0.95 and again.snapshot()["calls"] == 3
    again.set_limits(2.0, None, None, None, None)  # a raised budget keeps what was spent (never a reset)
    assert again.snapshot()["spent_usd"] == 0.95 and isinstance(again.try_reserve(10, 1.0), Grant)
    with pytest.raises(KeyError):
        again.settle(999, 1, 0.1)


def test_ledgers_from_one_journal_in_one_process_share_its_books(tmp_path):
    """Every `fit` and scorer builds its ledger from `llm_limits`: with `ledger_journal` set, the second one in a
    process (`labelfuse eval --train-fractions`, a notebook's second fit) took 10 s to fail on the journal's lock."""
    limits = LLMLimitsConfig(budget_usd=1.0, ledger_journal=str(tmp_path / "spend.sqlite"))
    first = LocalLedger.from_limits(limits)
    first.settle(first.try_reserve(10, 0.4).id, 10, 0.4)
    start = time.perf_counter()
    second = LocalLedger.from_limits(limits.model_copy(update={"budget_usd": 2.0}))
    assert time.perf_counter() - start < 1 and second is first
    assert second.snapshot()["spent_usd"] == 0.4 and second.snapshot()["budget_usd"] == 2.0  # its limits, same books
    first.journal.close()  # the process ends; the next one resumes from the journal
    third = LocalLedger.from_limits(limits)
    assert third is not first and third.snapshot()["spent_usd"] == 0.4


def test_a_reservation_whose_caller_died_is_charged_then_corrected_by_a_late_settle(tmp_path):
    now = [1000.0]
    path = tmp_path / "ledger.sqlite"
    ledger = LocalLedger(budget_usd=1.0, journal=path, reservation_timeout_s=60, wall_clock=lambda: now[0])
    dead, slow = ledger.try_reserve(10, 0.4), ledger.try_reserve(10, 0.4)
    assert ledger.try_reserve(10, 0.4).reason == "budget_pending"  # both hold their worst case
    now[0] += 61
    snap = ledger.snapshot()  # both expired: charged at their worst case, their slots freed
    assert snap["expired"] == 2 and snap["in_flight"] == 0 and snap["spent_usd"] == 0.8 and snap["reserved_usd"] == 0
    ledger.journal.close()
    ledger = LocalLedger(budget_usd=1.0, journal=path, reservation_timeout_s=60, wall_clock=lambda: now[0])
    ledger.settle(slow.id, 10, 0.1)  # the slow caller was alive after all: its real cost replaces the charge
    assert ledger.snapshot()["spent_usd"] == 0.5 and ledger.snapshot()["calls"] == 1
    assert isinstance(ledger.try_reserve(10, 0.4), Grant) and dead.id not in ledger._held


@budget(60)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("reserve"), st.integers(1, 40)),
            st.tuples(st.just("settle"), st.integers(0, 10**6), st.floats(0, 1)),
            st.tuples(st.just("restart"), st.booleans()),
            st.tuples(st.just("wait"), st.integers(0, 90)),
        ),
        max_size=40,
    )
)
def test_any_sequence_of_calls_and_restarts_keeps_the_books_exact(ops):
    """Reservations, settles (some re-sent after a restart), restarts and expiries in any order: the journaled
    ledger's spend is exactly what the callers were billed plus the charges of grants that expired unsettled,
    and it never passes the budget."""
    budget_pico, now = to_pico(1.0), [0.0]
    with tempfile.TemporaryDirectory() as tmp:

        def start() -> LocalLedger:
            path = f"{tmp}/ledger.sqlite"
            return LocalLedger(budget_usd=1.0, journal=path, reservation_timeout_s=60, wall_clock=lambda: now[0])

        ledger, billed, open_grants, done = start(), 0, [], []
        for op in ops:
            if op[0] == "reserve":
                d = ledger.try_reserve(10, op[1] / 100)
                if isinstance(d, Grant):
                    open_grants.append(d)
            elif op[0] == "settle" and open_grants:
                g = open_grants.pop(op[1] % len(open_grants))
                cost = round(g.reserved_usd * op[2], 6)
                ledger.settle(g.id, 10, cost)
                billed += to_pico(cost)
                done.append((g, cost))
            elif op[0] == "restart":
                ledger.journal.close()
                ledger = start()
                if op[1] and done:  # the last settle is re-sent, as Ray does when the ledger died under it
                    ledger.settle(done[-1][0].id, 10, done[-1][1])
            elif op[0] == "wait":
                now[0] += op[1]
            snap = ledger.snapshot()
            charged = sum(ledger._expired.values())
            assert to_pico(snap["spent_usd"]) == billed + charged
            assert to_pico(snap["spent_usd"]) + to_pico(snap["reserved_usd"]) <= budget_pico
            assert snap["in_flight"] == len([g for g in open_grants if g.id in ledger._held])
        ledger.journal.close()


# -- cache --------------------------------------------------------------------------------------------------


def _writer(path: str, start: int) -> None:
    cache = ScoreCache(path)
    for i in range(start, start + 200):
        cache.put(f"k{i}", np.array([i, 0.5], np.float32), 10, 1)
    cache.close()


def test_cache_round_trip_counters_and_concurrent_writer_processes(tmp_path):
    path = tmp_path / "c.sqlite"
    procs = [multiprocessing.get_context("spawn").Process(target=_writer, args=(str(path), s)) for s in (0, 200)]
    for p in procs:
        p.start()
    _writer(str(path), 400)  # a third writer in this process at the same time
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = ScoreCache(path)
    assert len(cache) == 600
    got = cache.get_many([f"k{i}" for i in (0, 250, 599)] + ["absent"])
    assert got["k250"].scores.tolist() == [250.0, 0.5] and got["k599"].prompt_tokens == 10
    assert (cache.hits, cache.misses) == (3, 1)
    assert cache.path.with_name("c.sqlite-wal").exists()  # WAL journal mode


def test_cache_key_covers_everything_that_changes_an_answer():
    parts = {"provider": "openai", "model": "m", "prompt": "v1", "classes": ["a", "b"], "gen": {"max_tokens": 1}}
    k = cache_key(parts, "text")
    assert k == cache_key(dict(reversed(parts.items())), "text")  # order-independent
    for change in ({"model": "m2"}, {"prompt": "v2"}, {"classes": ["a", "c"]}, {"gen": {"max_tokens": 2}}):
        assert cache_key({**parts, **change}, "text") != k
    assert cache_key(parts, "text.") != k


# -- scorer against the scripted endpoint -------------------------------------------------------------------


def _scorer(stub: StubServer, tmp_path, **limits) -> LLMScorer:
    cfg = LLMScorerConfig(name="stub", provider="custom", model="stub-1", base_url=stub.base_url, price_input=1.0)
    lim = LLMLimitsConfig(retry_base_s=0.01, cache_path=str(tmp_path / "cache.sqlite"), **limits)
    return LLMScorer(cfg, CLASSES, False, lim, cache=ScoreCache(lim.cache_path))


def test_429_with_retry_after_and_500_are_retried_then_succeed(tmp_path):
    with StubServer(CLASSES, _answer, script=["429", "500"]) as stub:
        scorer = _scorer(stub, tmp_path, max_concurrency=1)
        start = time.perf_counter()
        batch = asyncio.run(scorer.score(["the match ended 2-1"]))
        took = time.perf_counter() - start
    assert stub.requests == 3 and batch.stats.attempts == 3 and batch.stats.calls == 1
    assert took >= 1.0  # waited for Retry-After: 1 (the 500 backoff is only ~0.01 s)
    assert batch.errors == [None] and batch.scores[0].argmax() == 1


def test_a_cancelled_call_frees_its_slot_at_once_and_is_charged_its_reservation(tmp_path):
    """A caller that goes away mid-call (Serve cancels the request's task when its HTTP client hangs up) must
    not hold its concurrency slot until the reservation times out (15 minutes): the next call starts at once."""
    with StubServer(CLASSES, _answer, latency_s=30) as stub:
        scorer = _scorer(stub, tmp_path, max_concurrency=1)

        async def cancel_then_score():
            task = asyncio.create_task(scorer.score(["the match ended 2-1"]))
            while stub.in_flight == 0:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            after_cancel = scorer.ledger.snapshot()
            stub.latency_s = 0
            return after_cancel, await asyncio.wait_for(scorer.score(["shares fell"]), 10)

        after_cancel, batch = asyncio.run(cancel_then_score())
    assert after_cancel["in_flight"] == 0 and after_cancel["reserved_usd"] == 0
    assert after_cancel["spent_usd"] > 0  # the provider may bill a request it received
    assert batch.errors == [None] and batch.scores[0].argmax() == 0


def test_out_of_retries_marks_the_text_missing_and_keeps_going(tmp_path):
    with StubServer(CLASSES, _answer, script=["500", "500", "429ms"]) as stub:
        scorer = _scorer(stub, tmp_path, max_retries=2, max_concurrency=1)
        batch = asyncio.run(scorer.score(["shares fell", "new phone"]))
    assert "InternalServerError" in batch.errors[0] or "RateLimitError" in batch.errors[0]
    assert "after 3 attempts" in batch.errors[0]
    assert batch.used.tolist() == [False, True] and np.isnan(batch.scores[0]).all()
    assert batch.stats.errors == 1


def test_invalid_json_is_asked_once_more_then_recorded(tmp_path):
    cfg = dict(max_concurrency=1)
    with StubServer(CLASSES, _answer, script=["badjson"]) as stub:
        scorer = _scorer(stub, tmp_path, **cfg)
        scorer.mode = "json"
        ok = asyncio.run(scorer.score(["new phone"]))
    assert ok.errors == [None] and ok.scores[0].argmax() == 2 and stub.requests == 2
    with StubServer(CLASSES, _answer, script=["badjson", "badjson"]) as stub:
        scorer = _scorer(stub, tmp_path / "b", **cfg)
        scorer.mode = "json"
        bad = asyncio.run(scorer.score(["new phone"]))
    assert bad.errors[0].startswith("invalid answer twice: ") and not bad.used[0]
    # an off-label first token in logprobs mode is recorded, never guessed
    with StubServer(CLASSES, _answer, script=["badjson"]) as stub:
        off = asyncio.run(_scorer(stub, tmp_path / "c", **cfg).score(["x"]))
    assert "no class among the top answer tokens" in off.errors[0]


def test_endpoint_without_logprobs_falls_back_to_json(tmp_path):
    """One answer without logprobs fails its own text; answers without them in a row switch to JSON."""
    from fusion.llm.scorer import NO_LOGPROBS_SWITCH

    texts = ["the match", "a phone"] * 3
    with StubServer(CLASSES, _answer, logprobs=False) as stub:
        scorer = _scorer(stub, tmp_path)
        first = asyncio.run(scorer.score(texts))
        assert scorer.mode == "json"
        then = asyncio.run(scorer.score(["the match", "a phone"]))
    failed = [e for e in first.errors if e]
    assert len(failed) == NO_LOGPROBS_SWITCH - 1 and all("no logprobs" in e for e in failed)
    ok = [i for i, e in enumerate(first.errors) if e is None]
    assert [first.scores[i].argmax() for i in ok] == [[1, 2][i % 2] for i in ok]
    assert then.errors == [None, None] and then.scores.argmax(axis=1).tolist() == [1, 2]


def test_rejected_key_is_a_config_error_not_a_silent_gap(tmp_path):
    with StubServer(CLASSES, _answer, script=["401"]) as stub:
        with pytest.raises(ConfigError, match="refused the request"):
            asyncio.run(_scorer(stub, tmp_path).score(["x"]))


def test_missing_api_key_fails_at_startup(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
        LLMScorer(LLMScorerConfig(name="gpt", provider="openai", model="gpt-4o-mini"), CLASSES, False)
    monkeypatch.setenv("MY_KEY", "sk-test")
    cfg = LLMScorerConfig(name="gpt", provider="openai", model="gpt-4o-mini", api_key_env="MY_KEY")
    s = LLMScorer(cfg, CLASSES, False)
    assert s.endpoint.api_key == "sk-test" and s.endpoint.price_input == 0.15
    with pytest.raises(ConfigError, match="no price known"):
        LLMScorer(cfg.model_copy(update={"model": "gpt-99"}), CLASSES, False)
    with pytest.raises(ConfigError, match="needs base_url"):
        LLMScorer(LLMScorerConfig(name="c", provider="custom", model="m"), CLASSES, False)
    with pytest.raises(ConfigError, match="does not support multilabel"):
        LLMScorer(LLMScorerConfig(name="c", provider="vllm", model="m", mode="logprobs"), CLASSES, True)


def test_cache_rerun_makes_zero_calls_and_budget_gaps_are_flagged(tmp_path):
    texts = [f"story {i} about a match" for i in range(12)]
    with StubServer(CLASSES, _answer) as stub:
        first = asyncio.run(_scorer(stub, tmp_path).score(texts))
        n_first = stub.requests
        again = asyncio.run(_scorer(stub, tmp_path).score(texts))
        assert stub.requests == n_first == 12
        assert again.stats.calls == 0 and again.stats.cache_hits == 12
        np.testing.assert_array_equal(first.scores, again.scores)
        np.testing.assert_allclose(again.cost_usd, first.cost_usd)  # cached answers keep their price
        assert first.cost_usd[0] == pytest.approx((first.stats.prompt_tokens / 12 + 1) * 1.0 / 1e6)
        # a budget for 3.5 worst-case calls: some texts are scored, the rest are missing and say why
        limited = _scorer(stub, tmp_path / "new", max_concurrency=4)
        worst = limited._worst_case(limited.messages(texts[0]))[1]
        limited = _scorer(stub, tmp_path / "new", budget_usd=3.5 * worst, max_concurrency=4)
        batch = asyncio.run(limited.score(texts))
    used = int(batch.used.sum())
    assert 3 <= used < 12 and batch.stats.over_budget == 12 - used
    assert all(
        e == "over budget: the LLM budget cannot cover this call"
        for e, u in zip(batch.errors, batch.used, strict=True)
        if not u
    )
    spent = limited.ledger.snapshot()["spent_usd"]
    assert spent <= 3.5 * worst and spent == pytest.approx(batch.cost_usd[batch.used].sum())


def test_panel_fuses_several_llms_under_one_ledger_with_bounded_concurrency(tmp_path):
    lim = LLMLimitsConfig(max_concurrency=4, cache=False)
    with StubServer(CLASSES, _answer, latency_s=0.05) as a, StubServer(CLASSES, lambda t: 0, latency_s=0.05) as b:
        cfgs = [
            LLMScorerConfig(name="a", provider="custom", model="m", base_url=a.base_url),
            LLMScorerConfig(name="b", provider="custom", model="m", base_url=b.base_url),
        ]
        panel = LLMPanel(cfgs, CLASSES, False, lim)
        out = panel.score([f"match {i}" for i in range(20)])
    assert set(out) == {"a", "b"}
    assert out["a"].scores.argmax(axis=1).tolist() == [1] * 20 and out["b"].scores.argmax(axis=1).tolist() == [0] * 20
    assert a.max_in_flight + b.max_in_flight <= 4 + 4 and max(a.max_in_flight, b.max_in_flight) <= 4
    assert panel.ledger.snapshot()["calls"] == 40 and math.isinf(panel.ledger.snapshot()["budget_usd"])
