"""The labelfuse Ray Serve application: one deployment graph for HTTP and Kafka.

```
HTTP ─► Ingress (FastAPI) ─┐
                           ├─► Fusion ─► Embedder  (@serve.batch; GPU when the cluster has one)
Kafka ─► KafkaTagger ──────┘  (head) ├─► Scorer    (LLM panel: gate, cache, the shared ledger actor)
                                     └─► Labels    (label store: the LLM answers paid for; people's
                                                    labels from Ingress' POST /v1/feedback)
```

Each deployment loads only its part of the bundle: Embedder the encoder, Scorer the LLM panel
and few-shot pool, Fusion the fusion head (:mod:`serve.deployments`). The HTTP API is in
:mod:`serve.http`, its schemas in :mod:`serve.schemas`, the Kafka loop in :mod:`serve.kafka`.

Deploy with ``serve run serve/config.yaml`` / ``serve deploy serve/config.yaml``, or
``labelfuse serve --bundle DIR``. Application args: :class:`serve.settings.AppSettings`.
"""

from __future__ import annotations

from typing import Any

from serve.deployments import Embedder, Fusion, Ingress, KafkaTagger, Labels, Scorer
from serve.settings import AppSettings, parse_settings

# structured logs: one JSON object per line in the replica logs, with Serve's request_id, route and replica
LOGGING = {"encoding": "JSON"}


def build(settings: AppSettings | dict[str, Any], options: dict[str, dict[str, Any]] | None = None) -> Any:
    """The graph as a Serve application; ``options`` overrides deployment options by name (tests, tuning)."""
    s = parse_settings(settings)
    opts = options or {}

    def bind(dep: Any, *args: Any, **extra: Any) -> Any:
        return dep.options(**{**extra, **opts.get(dep.name, {})}).bind(*args)

    embedder = bind(Embedder, s.threads)
    scorer = bind(Scorer, s.ledger_name)
    labels = bind(Labels, s.label_store) if s.label_store else None
    user_config = {"bundle": s.bundle, "registry_poll_s": s.registry_poll_s}
    fusion = bind(Fusion, embedder, scorer, labels, user_config=user_config)
    # the tagger is bound into the graph through Ingress, which serves its counters at GET /v1/kafka
    tagger = None
    if s.kafka is not None:
        tagger = bind(KafkaTagger, fusion, s.kafka.model_dump(), labels, num_replicas=s.kafka.replicas)
    return bind(Ingress, fusion, s.model_dump(exclude={"kafka"}), tagger, labels)


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for ``serve run serve.app:build_app bundle=...`` and serve/config.yaml."""
    return build(args)
