"""The labelfuse Ray Serve application: one deployment graph for HTTP and Kafka.

```
HTTP ──────────────────────► Fusion ─► Scorer  (LLM panel: cache, few-shot pool, the shared ledger actor;
Kafka ─► KafkaTagger ─────►  (HTTP API,         called only for the texts the gate sends)
                              encoder, head) ─► Labels  (label store: the LLM answers paid for; people's
                                                         labels from POST /v1/feedback and a labels topic)
```

Fusion answers a text the gate keeps from the LLMs in one replica: the HTTP API, the encoder and the
fusion head live together, because each hop between Serve processes costs a short text more CPU than
the encoder does. Each deployment loads only its part of the bundle (:mod:`serve.deployments`). The
HTTP API is in :mod:`serve.http`, its schemas in :mod:`serve.schemas`, the Kafka loop in :mod:`serve.kafka`.

Deploy with ``serve run serve/config.yaml`` / ``serve deploy serve/config.yaml``, or
``labelfuse serve --bundle DIR``. Application args: :class:`serve.settings.AppSettings`.
"""

from __future__ import annotations

from typing import Any

from serve.deployments import Fusion, KafkaTagger, Labels, Scorer
from serve.settings import AppSettings, parse_settings

# structured logs: one JSON object per line in the replica logs, with Serve's request_id, route and replica
LOGGING = {"encoding": "JSON"}


def build(settings: AppSettings | dict[str, Any], options: dict[str, dict[str, Any]] | None = None) -> Any:
    """The graph as a Serve application; ``options`` overrides deployment options by name (tests, tuning)."""
    s = parse_settings(settings)
    opts = options or {}

    def bind(dep: Any, *args: Any, **extra: Any) -> Any:
        return dep.options(**{**extra, **opts.get(dep.name, {})}).bind(*args)

    scorer = bind(Scorer, s.ledger_name)
    labels = bind(Labels, s.label_store) if s.label_store else None
    # the tagger reaches Fusion by name; Fusion serves the tagger's counters at GET /v1/kafka
    tagger = None
    if s.kafka is not None:
        tagger = bind(KafkaTagger, s.kafka.model_dump(), labels, num_replicas=s.kafka.replicas)
    user_config = {"bundle": s.bundle, "registry_poll_s": s.registry_poll_s}
    return bind(Fusion, scorer, s.model_dump(exclude={"kafka"}), labels, tagger, user_config=user_config)


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for ``serve run serve.app:build_app bundle=...`` and serve/config.yaml."""
    return build(args)
