"""The shared ledger as one named Ray actor: several Ray workers scoring at once never overspend.

A real local Ray runtime; the LLM endpoint is tests/stub_llm.py, standing in for a
paid provider (whose prices make the budget bite) because none can be called here.
"""

import asyncio
import os
import time

import numpy as np
import pytest
import ray
from conftest import report
from stub_llm import StubServer

from data_jobs.ledger import shared_ledger
from fusion.config import LLMLimitsConfig, LLMScorerConfig
from fusion.llm import LLMScorer
from fusion.llm.ledger import Grant, to_pico

CLASSES = ["business", "sports", "tech"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def scoring_worker(cfg, limits, ledger):
    """A Ray task scoring a shard under the shared ledger: (texts answered, dollars billed, refused for budget)."""

    @ray.remote(num_cpus=0)
    def worker(base_url, shard):
        scorer = LLMScorer(cfg.model_copy(update={"base_url": base_url}), CLASSES, False, limits, ledger=ledger)
        batch = asyncio.run(scorer.score(shard))
        return int(batch.used.sum()), float(batch.cost_usd[batch.used].sum()), batch.stats.over_budget

    return worker


def test_workers_share_one_budget_and_never_overspend(ray_local):
    cfg = LLMScorerConfig(name="stub", provider="custom", model="m", base_url="http://x/v1", price_input=2.0)
    probe = LLMScorer(cfg, CLASSES, False)
    texts = [f"text {i} about the match and the phone" for i in range(20)]
    worst = probe._worst_case(probe.messages(texts[0]))[1]
    limits = LLMLimitsConfig(budget_usd=12 * worst, max_concurrency=3, cache=False)
    ledger = shared_ledger("ledger-budget-test", limits)

    worker = scoring_worker(cfg, limits, ledger)
    with StubServer(CLASSES, latency_s=0.02) as stub:
        results = ray.get([worker.remote(stub.base_url, [f"w{w} {t}" for t in texts]) for w in range(4)])
        max_in_flight = stub.max_in_flight
    used = sum(r[0] for r in results)
    snap = ledger.snapshot()
    assert snap["spent_usd"] <= 12 * worst  # never past the budget, across 4 processes
    assert snap["spent_usd"] == pytest.approx(sum(r[1] for r in results))  # every answer settled
    assert snap["calls"] == used and snap["reserved_usd"] == 0 and snap["in_flight"] == 0
    assert 12 <= used < 80 and sum(r[2] for r in results) == 80 - used  # the rest flagged over budget
    assert max_in_flight <= 3  # the global concurrency cap, not 3 per worker


def test_the_named_ledger_is_shared_not_duplicated(ray_local):
    a = shared_ledger("ledger-shared-test", LLMLimitsConfig(budget_usd=1.0))
    b = shared_ledger("ledger-shared-test", LLMLimitsConfig(budget_usd=99.0))  # attaches; first limits win
    g = ray.get(a.try_reserve(10, 0.4))
    assert isinstance(g, Grant) and b.snapshot()["in_flight"] == 1
    ray.get(b.settle(g.id, 10, 0.4))
    assert a.snapshot()["spent_usd"] == 0.4 and np.isclose(b.snapshot()["budget_usd"], 1.0)
    assert ray.get(b.try_reserve(10, 0.7)).reason == "budget"


def test_a_killed_ledger_restarts_from_its_journal_in_the_middle_of_64_calls(ray_local, tmp_path, capsys):
    """The ledger actor is killed while 64 calls (8 workers x 8 concurrent texts) reserve against a budget that
    covers about 16 of them. Ray restarts it, it resumes from its journal, and the calls Ray re-sends count once:
    the settled spend stays within the budget and equals, to the pico-dollar, what the callers were billed.
    (A call's worst case, which the ledger reserves, is about 4x what the stub bills.)"""
    cfg = LLMScorerConfig(name="stub", provider="custom", model="m", base_url="http://x/v1", price_input=2.0)
    probe = LLMScorer(cfg, CLASSES, False)
    worst = probe._worst_case(probe.messages("w0 text 0 about the match and the phone"))[1]
    budget = 4 * worst
    journal = tmp_path / "ledger.sqlite"
    limits = LLMLimitsConfig(budget_usd=budget, max_concurrency=16, cache=False, ledger_journal=str(journal))
    ledger = shared_ledger("ledger-kill-test", limits)
    pid = ray.get(ledger.actor.__ray_call__.remote(lambda actor: os.getpid()))

    worker = scoring_worker(cfg, limits, ledger)
    with StubServer(CLASSES, latency_s=0.3) as stub:
        refs = [worker.remote(stub.base_url, [f"w{w} text {i} about the match and the phone" for i in range(8)])
                for w in range(8)]  # fmt: skip
        deadline = time.monotonic() + 60
        while stub.requests < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        before = stub.requests
        ray.kill(ledger.actor, no_restart=False)  # mid-flight: grants held, calls in the air, settles to come
        results = ray.get(refs, timeout=120)
    snap = ledger.snapshot()  # answered by the restarted actor
    used, billed, over = sum(r[0] for r in results), sum(r[1] for r in results), sum(r[2] for r in results)
    assert 0 < before < used  # the kill came after the first calls and before the last
    assert snap["spent_usd"] <= budget
    assert to_pico(snap["spent_usd"]) == sum(to_pico(r[1]) for r in results)  # nothing lost, nothing twice
    assert snap["calls"] == used and snap["in_flight"] == 0 and snap["reserved_usd"] == 0
    assert used + over == 64 and used >= 10 and over > 0  # each text answered or refused for budget
    assert ray.get(ledger.actor.journal.remote()) == str(journal)
    assert ray.get(ledger.actor.__ray_call__.remote(lambda actor: os.getpid())) != pid  # a new process
    report(capsys, f"ledger kill: budget ${budget:.6f}, spent ${snap['spent_usd']:.6f}, billed ${billed:.6f}, "
          f"{used} answered, {over} refused for budget, killed after {before} requests", "ledger")  # fmt: skip
