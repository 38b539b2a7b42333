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

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from serve.deployments import Fusion, KafkaTagger, Labels, Scorer
from serve.settings import AppSettings, parse_settings

log = logging.getLogger(__name__)

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


@contextmanager
def serving(
    settings: dict[str, Any], *, address: str | None, host: str, port: int, name: str, route_prefix: str = "/"
) -> Iterator[str]:
    """Deploy the application as ``name`` on the Ray at ``address`` (see :func:`data_jobs.common.connect`; the
    Ray this process is connected to, if any) and yield its URL. On exit, remove what this started and nothing
    else: the application, and Serve itself only where Serve was not running before (on a cluster, other
    people's applications go on serving). Joining a running Serve keeps its HTTP host and port."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from data_jobs.common import connect
    from fusion.errors import ConfigError

    connect(address)
    # Serve's own client is the one way to ask whether Serve runs here and on which port (no public call says)
    joined = _get_global_client(raise_if_no_controller_running=False) is not None
    if joined and name in serve.status().applications:
        raise ConfigError(f"an application named {name!r} is already running on this Ray cluster: choose another name")
    serve.start(http_options={"host": host, "port": port})
    http = _get_global_client().http_config
    if (http.host, http.port) != (host, port):
        log.warning(
            "Serve on this cluster listens on %s:%s; the host and port asked for are ignored", http.host, http.port
        )
    try:
        serve.run(build(settings), name=name, route_prefix=route_prefix, logging_config=LOGGING)
        yield f"http://{http.host}:{http.port}{route_prefix.rstrip('/')}"
    finally:
        if joined:
            serve.delete(name)
        else:
            serve.shutdown()
