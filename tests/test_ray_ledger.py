"""The shared ledger as one named Ray actor: several Ray workers scoring at once never overspend.

A real local Ray runtime; the LLM endpoint is tests/stub_llm.py, standing in for a
paid provider (whose prices make the budget bite) because none can be called here.
"""

import asyncio

import numpy as np
import pytest
import ray
from stub_llm import StubServer

from data_jobs.ledger import shared_ledger
from fusion.config import LLMLimitsConfig, LLMScorerConfig
from fusion.llm import LLMScorer
from fusion.llm.ledger import Grant

CLASSES = ["business", "sports", "tech"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_workers_share_one_budget_and_never_overspend(ray_local):
    cfg = LLMScorerConfig(name="stub", provider="custom", model="m", base_url="http://x/v1", price_input=2.0)
    probe = LLMScorer(cfg, CLASSES, False)
    texts = [f"text {i} about the match and the phone" for i in range(20)]
    worst = probe._worst_case(probe.messages(texts[0]))[1]
    limits = LLMLimitsConfig(budget_usd=12 * worst, max_concurrency=3, cache=False)
    ledger = shared_ledger("ledger-budget-test", limits)

    @ray.remote(num_cpus=0)
    def worker(base_url, shard):
        scorer = LLMScorer(cfg.model_copy(update={"base_url": base_url}), CLASSES, False, limits, ledger=ledger)
        batch = asyncio.run(scorer.score(shard))
        return int(batch.used.sum()), float(batch.cost_usd[batch.used].sum()), batch.stats.over_budget

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
