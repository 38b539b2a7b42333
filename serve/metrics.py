"""Prometheus metrics of the Serve application, through Ray's metrics API.

Each replica records into ``ray.serve.metrics`` objects, which add the ``application``,
``deployment`` and ``replica`` tags; Ray's metrics agent on every node serves them for
Prometheus (``ray start --metrics-export-port``) with a ``ray_`` prefix (counters also get
``_total``). docs/operations.md lists them all (tests/test_docs.py checks it).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ray.serve")

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


def _never_raises(fn: Callable[..., None]) -> Callable[..., None]:
    """Recording a metric must never fail the request or the Kafka loop that records it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("recording metrics failed in %s", fn.__qualname__)

    return wrapper


def _serve_metrics() -> Any:
    from ray.serve import metrics

    return metrics


class HttpMetrics:
    def __init__(self) -> None:
        m = _serve_metrics()
        self.requests = m.Counter("labelfuse_http_requests", "HTTP requests answered.", ("route", "status"))
        self.latency = m.Histogram(
            "labelfuse_http_request_seconds", "HTTP request latency (s).", LATENCY_BUCKETS_S, ("route",)
        )

    @_never_raises
    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(1, {"route": route, "status": str(status)})
        self.latency.observe(seconds, {"route": route})


class TextMetrics:
    def __init__(self) -> None:
        m = _serve_metrics()
        self.texts = m.Counter("labelfuse_texts", "Texts classified.", ("path", "llm_used"))
        self.bad = m.Counter(
            "labelfuse_texts_refused",
            "Texts not classified: refused at the edge (stage=input) or failed alone in the model (stage=model).",
            ("path", "stage"),
        )

    @_never_raises
    def refused(self, path: str, stage: str, n: int) -> None:
        if n > 0:  # Ray's Counter refuses 0
            self.bad.inc(n, {"path": path, "stage": stage})

    @_never_raises
    def observe(self, path: str, results: list[dict[str, Any]]) -> None:
        results = [r for r in results if not r.get("error")]
        used = sum(bool(r["llm_used"]) for r in results)
        if used:
            self.texts.inc(used, {"path": path, "llm_used": "true"})
        if len(results) - used:
            self.texts.inc(len(results) - used, {"path": path, "llm_used": "false"})


class LLMMetrics:
    def __init__(self) -> None:
        m = _serve_metrics()
        tags = ("llm",)
        self.calls = m.Counter("labelfuse_llm_calls", "LLM requests made (cache hits excluded).", tags)
        self.cache_hits = m.Counter("labelfuse_llm_cache_hits", "LLM answers taken from the cache.", tags)
        self.errors = m.Counter("labelfuse_llm_errors", "Texts an LLM failed on.", tags)
        self.spent = m.Counter("labelfuse_llm_spent_usd", "Dollars spent on LLM calls.", tags)
        self.budget_left = m.Gauge("labelfuse_llm_budget_left_usd", "Budget of the shared ledger not yet spent.")

    @_never_raises
    def observe(self, batches: dict[str, Any], ledger: dict[str, float] | None) -> None:
        for name, b in batches.items():
            s, tag = b.stats, {"llm": name}
            for counter, value in ((self.calls, s.calls), (self.cache_hits, s.cache_hits), (self.errors, s.errors)):
                if value:
                    counter.inc(value, tag)
            if s.spent_usd:
                self.spent.inc(s.spent_usd, tag)
        if ledger is not None and ledger["budget_usd"] != float("inf"):
            self.budget_left.set(max(0.0, ledger["budget_usd"] - ledger["spent_usd"]))


class KafkaMetrics:
    def __init__(self) -> None:
        m = _serve_metrics()
        self.events = m.Counter("labelfuse_kafka_messages", "Kafka tagger events, by kind.", ("event",))
        self.lag = m.Gauge("labelfuse_kafka_commit_lag", "Messages consumed and not yet committed.")

    @_never_raises
    def count(self, event: str, n: int) -> None:
        if n > 0:  # Ray's Counter refuses 0
            self.events.inc(n, {"event": event})

    @_never_raises
    def uncommitted(self, n: int) -> None:
        self.lag.set(n)


class LoopMetrics:
    """The learning loop: labels kept, the label store's size, the gate's recent call rate, the model served."""

    def __init__(self) -> None:
        m = _serve_metrics()
        self.kept = m.Counter("labelfuse_labels_kept", "Labels written to the label store, by source.", ("source",))
        self.lost = m.Counter("labelfuse_labels_lost", "LLM answers the label store could not take (store down).")
        self.size = m.Gauge(
            "labelfuse_label_store_labels", "Labels in the store (one per text), by source.", ("source",)
        )
        self.rate = m.Gauge("labelfuse_llm_call_rate", "Share of the last 1,000 texts the gate sent to the LLMs.")
        self.model = m.Gauge("labelfuse_model_serving", "1 for the model version this replica serves.", ("version",))

    @_never_raises
    def labels_kept(self, records: list[Any]) -> None:
        for source in ("human", "llm"):
            n = sum(r.source == source for r in records)
            if n:
                self.kept.inc(n, {"source": source})

    @_never_raises
    def labels_lost(self, n: int) -> None:
        if n > 0:
            self.lost.inc(n)

    @_never_raises
    def store_size(self, stats: dict[str, Any]) -> None:
        for source in ("human", "llm"):
            self.size.set(stats[source], {"source": source})

    @_never_raises
    def call_rate(self, rate: float) -> None:
        self.rate.set(rate)

    @_never_raises
    def serving(self, version: str, previous: str | None) -> None:
        if previous is not None and previous != version:
            self.model.set(0, {"version": previous})
        self.model.set(1, {"version": version})
