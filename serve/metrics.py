"""Prometheus metrics of the Serve application, through Ray's metrics API.

Each replica records into ``ray.serve.metrics`` objects, which add the ``application``,
``deployment`` and ``replica`` tags; Ray's metrics agent on every node serves them for
Prometheus (``ray start --metrics-export-port``) with a ``ray_`` prefix (counters also get
``_total``). docs/operations.md lists them all (tests/test_docs.py checks it).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ray.serve")

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
CONFIDENCE_BUCKETS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
DRIFT_WINDOW = 1000  # predictions per Fusion replica over which the label mix is compared with training
DRIFT_MIN = 100  # fewer than this: no drift figure (too noisy)


@dataclass(frozen=True)
class Metric:
    """One metric: what the replicas record, what docs/operations.md lists, what the dashboard plots."""

    name: str
    kind: str  # counter | gauge | histogram
    tags: tuple[tuple[str, str], ...]  # (tag, its values as documented, or "")
    help: str

    @property
    def series(self) -> str:
        """The name Prometheus sees: Ray adds ``ray_``, and ``_total`` to counters."""
        return f"ray_{self.name}_total" if self.kind == "counter" else f"ray_{self.name}"


def _m(name: str, kind: str, help: str, *tags: tuple[str, str]) -> Metric:
    return Metric(name, kind, tags, help)


METRICS = {
    m.name: m
    for m in [
        _m("labelfuse_http_requests", "counter", "HTTP requests answered (413s and 503s included).",
           ("route", ""), ("status", "")),
        _m("labelfuse_http_request_seconds", "histogram", "HTTP latency as the Fusion replica saw it (s).", ("route", "")),
        _m("labelfuse_texts", "counter", "Texts classified.", ("path", "http, kafka"), ("llm_used", "")),
        _m("labelfuse_texts_refused", "counter",
           "Texts answered 422: refused by the text rule (stage=input) or failed alone in the graph (stage=model).",
           ("path", "http"), ("stage", "input, model")),
        _m("labelfuse_predictions", "counter", "Predictions by predicted class (multi-label: every class predicted).",
           ("path", "http, kafka"), ("label", "")),
        _m("labelfuse_confidence", "histogram",
           "Probability of the predicted class (multi-label: the highest); a shift down means the model is unsure.",
           ("path", "http, kafka")),
        _m("labelfuse_label_drift_psi", "gauge",
           f"Population stability index of a Fusion replica's last {DRIFT_WINDOW:,} predicted labels against the "
           "training labels in the bundle: under 0.1 steady, 0.1-0.25 moving, over 0.25 shifted."),
        _m("labelfuse_llm_calls", "counter", "LLM requests made (cache hits excluded).", ("llm", "")),
        _m("labelfuse_llm_cache_hits", "counter", "LLM answers taken from the cache.", ("llm", "")),
        _m("labelfuse_llm_errors", "counter", "Texts an LLM failed on (answered by the encoder path).", ("llm", "")),
        _m("labelfuse_llm_spent_usd", "counter", "Dollars spent on LLM calls.", ("llm", "")),
        _m("labelfuse_llm_budget_left_usd", "gauge",
           "The shared ledger's budget not yet spent (only with budget_usd)."),
        _m("labelfuse_llm_call_rate", "gauge",
           "Share of a Fusion replica's last 1,000 texts its gate sent to the LLMs: falls as retrained models learn."),
        _m("labelfuse_kafka_messages", "counter",
           "Kafka tagger events: consumed, tagged, dead_lettered (of which failed_alone: failed alone in the graph), "
           "graph_failures (the loop stopped), retries, commits, commit_failures, pauses.", ("event", "")),
        _m("labelfuse_kafka_commit_lag", "gauge", "Messages a tagger consumed and has not committed yet."),
        _m("labelfuse_labels_kept", "counter", "Labels written to the label store: people's feedback and the LLM "
           "answers the app paid for.", ("source", "human, llm")),
        _m("labelfuse_labels_lost", "counter",
           "LLM answers the label store could not take (the answers were still given)."),
        _m("labelfuse_label_store_labels", "gauge",
           "Labels in the store, one per text (updated when GET /v1/model reads the store).", ("source", "human, llm")),
        _m("labelfuse_model_serving", "gauge",
           "1 for the model version a Fusion replica serves (0 for the one it replaced).", ("version", "")),
    ]
}  # fmt: skip


def _new(name: str) -> Any:
    """The Ray metric for ``METRICS[name]``."""
    from ray.serve import metrics

    m = METRICS[name]
    tags = tuple(t for t, _ in m.tags) or None
    if m.kind == "histogram":
        buckets = LATENCY_BUCKETS_S if name.endswith("_seconds") else CONFIDENCE_BUCKETS
        return metrics.Histogram(name, m.help, buckets, tags)
    return (metrics.Counter if m.kind == "counter" else metrics.Gauge)(name, m.help, tags)


@dataclass(frozen=True)
class Alert:
    """A Prometheus alert rule (deploy/prometheus-alerts.yaml) and its row in docs/operations.md."""

    name: str
    expr: str
    for_: str
    severity: str
    means: str
    do: str


def _sum_rate(series: str, window: str, match: str = "") -> str:
    return f"sum(rate({series}{match}[{window}]))"


def _increase(series: str, window: str, match: str = "") -> str:
    return f"(sum(increase({series}{match}[{window}])) or vector(0))"


_S = {name: m.series for name, m in METRICS.items()}
ALERTS = [
    Alert("LabelfuseOverCapacity", _sum_rate(_S["labelfuse_http_requests"], "5m", '{status="503"}') + " > 0.1",
          "10m", "warning", "over capacity: the queues are full and clients get 503",
          "raise `max_replicas` of Fusion, or the cluster's size; see [scaling](scaling.md)"),
    Alert("LabelfuseLLMFailing",
          f'{_sum_rate(_S["labelfuse_llm_errors"], "10m")} / ({_sum_rate(_S["labelfuse_llm_calls"], "10m")} + '
          f'{_sum_rate(_S["labelfuse_llm_errors"], "10m")}) > 0.2',
          "10m", "warning", "the LLM endpoint fails or is over budget; answers come from the encoder path",
          "read `llm_error` in answers or logs; check the provider, `llm_limits`, the budget"),
    Alert("LabelfuseLLMBudgetRunsOut", f'predict_linear(min({_S["labelfuse_llm_budget_left_usd"]})[6h:5m], 86400) < 0',
          "30m", "warning", "at the last 6 hours' pace the budget is spent within a day; then LLM calls stop and "
          "answers stay encoder-only",
          "raise `budget_usd` (the spend carries on), or lower the gate's call rate"),
    Alert("LabelfuseLabelDrift", f'max({_S["labelfuse_label_drift_psi"]}) > 0.25', "30m", "warning",
          "the predicted label mix has moved away from the training labels: the stream changed, or the model is "
          "wrong on new kinds of texts",
          "look at `labelfuse_predictions` by label; label a sample of recent texts and retrain "
          "([the learning loop](learning-loop.md))"),
    Alert("LabelfuseLowConfidence",
          f'sum(rate({_S["labelfuse_confidence"]}_bucket{{le="0.5"}}[1h])) / '
          f'sum(rate({_S["labelfuse_confidence"]}_count[1h])) > 0.3',
          "1h", "info", "more than 30% of predictions have a top probability under 0.5",
          "the same as for drift; with LLMs, a higher gate call rate buys accuracy on the unsure texts"),
    Alert("LabelfuseKafkaLag", f'sum({_S["labelfuse_kafka_commit_lag"]}) > 1000', "10m", "warning",
          "the taggers consume faster than the graph answers", "more Fusion replicas / GPUs; a lower `llm` use"),
    Alert("LabelfuseDeadLetters", _sum_rate(_S["labelfuse_kafka_messages"], "10m", '{event="dead_lettered"}') + " > 0",
          "10m", "info", "producers send malformed messages",
          "read the `labelfuse.error` header on the dead-letter topic"),
    Alert("LabelfuseTextsFailAlone",
          _increase(_S["labelfuse_kafka_messages"], "1h", '{event="failed_alone"}') + " + "
          + _increase(_S["labelfuse_texts_refused"], "1h", '{stage="model"}') + " > 0",
          "0m", "warning", "texts that pass the text rule yet fail in the encoder or head: a gap in the rule, or a "
          "model problem", "read the reasons (dead letters, 422 details, replica logs) and report them"),
    Alert("LabelfuseGraphFailures", _increase(_S["labelfuse_kafka_messages"], "15m", '{event="graph_failures"}') + " > 0",
          "0m", "warning", "the graph, not the messages, failed: a deployment down or too slow",
          "`serve status`, the Fusion and Scorer replica logs; taggers restart by themselves"),
    Alert("LabelfuseLabelsLost", _increase(_S["labelfuse_labels_lost"], "15m") + " > 0", "0m", "warning",
          "the label store cannot be written (disk full, permissions, object store down): the loop loses those LLM "
          "answers", "fix the store's path or credentials; feedback answers 503 meanwhile and clients retry with "
          "the same id"),
    Alert("LabelfuseLLMCallRateNotFalling",
          f'avg_over_time(max({_S["labelfuse_llm_call_rate"]})[1d:1h]) >= '
          f'avg_over_time(max({_S["labelfuse_llm_call_rate"]})[1d:1h] offset 14d)',
          "1d", "info", "the gate sends as many texts to the LLMs as two weeks ago: retrains are refused or not run",
          "`labelfuse registry show`: read the latest reports; see [the learning loop](learning-loop.md)"),
    Alert("LabelfuseCommitFailures",
          _increase(_S["labelfuse_kafka_messages"], "15m", '{event="commit_failures"}') + " > 5", "0m", "info",
          "rebalances during commits; those batches come again",
          "expected during rollouts and scaling; frequent ones mean `session_timeout_ms` is too short"),
]  # fmt: skip


def prometheus_rules() -> dict[str, Any]:
    """deploy/prometheus-alerts.yaml: one rule group of every alert."""
    rules = [
        {"alert": a.name, "expr": a.expr, "for": a.for_, "labels": {"severity": a.severity},
         "annotations": {"summary": a.means, "runbook": a.do}}
        for a in ALERTS
    ]  # fmt: skip
    return {"groups": [{"name": "labelfuse", "rules": rules}]}


def _queries(m: Metric) -> list[tuple[str, str]]:
    """(PromQL, legend) of a metric's dashboard panel."""
    by = ", ".join(t for t, _ in m.tags)
    grouped = f" by ({by})" if by else ""
    legend = " ".join("{{" + t + "}}" for t, _ in m.tags) or m.name
    if m.kind == "counter":
        return [(f"sum{grouped} (rate({m.series}[5m]))", legend)]
    if m.kind == "gauge":
        return [(f"max{grouped} ({m.series})", legend)]
    return [
        (f"histogram_quantile({q}, sum by (le) (rate({m.series}_bucket[5m])))", f"p{int(q * 100)}")
        for q in (0.5, 0.9, 0.99)
    ]


def grafana_dashboard() -> dict[str, Any]:
    """deploy/grafana-dashboard.json: one time series panel per metric, in the order of METRICS."""
    ds = {"type": "prometheus", "uid": "${datasource}"}
    panels = []
    for i, m in enumerate(METRICS.values()):
        targets = [{"datasource": ds, "expr": q, "legendFormat": legend, "refId": chr(65 + j)}
                   for j, (q, legend) in enumerate(_queries(m))]  # fmt: skip
        unit = {"counter": "ops", "gauge": "short", "histogram": "s" if m.name.endswith("_seconds") else "short"}
        panels.append({
            "id": i + 1, "type": "timeseries", "title": m.name.removeprefix("labelfuse_").replace("_", " "),
            "description": m.help, "datasource": ds, "targets": targets,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit[m.kind]}, "overrides": []}, "options": {},
        })  # fmt: skip
    return {
        "title": "labelfuse",
        "uid": "labelfuse",
        "tags": ["labelfuse", "ray-serve"],
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"}]
        },
        "panels": panels,
    }


def metrics_table() -> str:
    rows = ["| metric | type | tags | what |", "|---|---|---|---|"]
    for m in METRICS.values():
        tags = ", ".join(f"{t} ({v})" if v else t for t, v in m.tags)
        rows.append(f"| `{m.name}` | {m.kind} | {tags} | {m.help} |")
    return "\n".join(rows)


def alerts_table() -> str:
    rows = ["| alert | fires when | means | do |", "|---|---|---|---|"]
    for a in ALERTS:
        when = f"`{a.expr}`" + (f" for {a.for_}" if a.for_ != "0m" else "")
        rows.append(f"| {a.name} ({a.severity}) | {when.replace('|', '&#124;')} | {a.means} | {a.do} |")
    return "\n".join(rows)


def _never_raises(fn: Callable[..., None]) -> Callable[..., None]:
    """Recording a metric must never fail the request or the Kafka loop that records it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("recording metrics failed in %s", fn.__qualname__)

    return wrapper


class HttpMetrics:
    def __init__(self) -> None:
        self.requests = _new("labelfuse_http_requests")
        self.latency = _new("labelfuse_http_request_seconds")

    @_never_raises
    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(1, {"route": route, "status": str(status)})
        self.latency.observe(seconds, {"route": route})


class TextMetrics:
    def __init__(self) -> None:
        self.texts = _new("labelfuse_texts")
        self.bad = _new("labelfuse_texts_refused")
        self.predictions = _new("labelfuse_predictions")
        self.confidence = _new("labelfuse_confidence")

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
        labels: Counter[str] = Counter()
        for r in results:
            labels.update(predicted(r))
            self.confidence.observe(max(r["probabilities"].values()), {"path": path})
        for label, n in labels.items():
            self.predictions.inc(n, {"path": path, "label": label})


def predicted(result: dict[str, Any]) -> list[str]:
    """The classes an answer predicts: its ``label``, or its ``labels`` (multi-label)."""
    return list(result["labels"]) if "labels" in result else [result["label"]]


class LabelMix:
    """The last ``window`` predictions' label mix beside the training labels' (``training.label_share`` in the
    manifest), and their population stability index: sum over classes of (now - train) * ln(now / train)."""

    def __init__(self, classes: list[str], train_share: dict[str, float] | None, window: int = DRIFT_WINDOW):
        self.classes = list(classes)
        self.train = None if not train_share else [float(train_share.get(c, 0.0)) for c in self.classes]
        self.window: deque[list[str]] = deque(maxlen=window)
        self.counts: Counter[str] = Counter()

    def add(self, results: list[dict[str, Any]]) -> None:
        for r in results:
            if r.get("error"):
                continue
            if len(self.window) == self.window.maxlen:
                self.counts.subtract(self.window[0])
            labels = predicted(r)
            self.window.append(labels)
            self.counts.update(labels)

    def share(self) -> dict[str, float]:
        total = sum(self.counts[c] for c in self.classes)
        return {c: round(self.counts[c] / total, 4) for c in self.classes} if total else {}

    def psi(self) -> float | None:
        if self.train is None or len(self.window) < DRIFT_MIN:
            return None
        now = self.share()
        eps = 1e-4  # a class never seen on one side counts as rare, not impossible
        return round(
            sum(
                (now[c] - t) * math.log((now[c] + eps) / (t + eps))
                for c, t in zip(self.classes, self.train, strict=True)
            ),
            4,
        )


class LLMMetrics:
    def __init__(self) -> None:
        self.calls = _new("labelfuse_llm_calls")
        self.cache_hits = _new("labelfuse_llm_cache_hits")
        self.errors = _new("labelfuse_llm_errors")
        self.spent = _new("labelfuse_llm_spent_usd")
        self.budget_left = _new("labelfuse_llm_budget_left_usd")

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
        self.events = _new("labelfuse_kafka_messages")
        self.lag = _new("labelfuse_kafka_commit_lag")

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
        self.kept = _new("labelfuse_labels_kept")
        self.lost = _new("labelfuse_labels_lost")
        self.size = _new("labelfuse_label_store_labels")
        self.rate = _new("labelfuse_llm_call_rate")
        self.model = _new("labelfuse_model_serving")
        self.psi = _new("labelfuse_label_drift_psi")

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
    def drift(self, psi: float | None) -> None:
        if psi is not None:
            self.psi.set(psi)

    @_never_raises
    def serving(self, version: str, previous: str | None) -> None:
        if previous is not None and previous != version:
            self.model.set(0, {"version": previous})
        self.model.set(1, {"version": version})
