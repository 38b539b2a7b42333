"""The labelfuse Ray Serve application: one deployment graph for HTTP and Kafka.

```
HTTP ─► Ingress (FastAPI) ─┐
                           ├─► Fusion ─► Embedder  (@serve.batch; GPU when the cluster has one)
Kafka ─► KafkaTagger ──────┘      └────► LLMScorer (gate, cache, the shared ledger actor)
```

- **Fusion** holds the model bundle, set through ``user_config`` (``{"bundle": path}``):
  a new bundle is loaded next to the old one and swapped in when ready, so a rollout
  drops no request. Each request runs entirely on the bundle it started with: Fusion
  names the bundle to Embedder and LLMScorer, which keep the encoders / LLM panels of
  the last two bundles.
- **Embedder** batches texts across requests (``@serve.batch``, sized by the number of
  texts, not requests) and runs the encoder with ``threads`` torch threads per replica,
  inline: Serve runs user code on its own event-loop thread, so the replica keeps taking
  requests meanwhile (they join the next batch). Handing each batch to a worker thread
  instead cost 30% of single-text HTTP throughput here (GIL hand-offs).
- **LLMScorer** asks the bundle's LLMs about the texts the gate lets through; every call
  is reserved with one named ledger actor (budget, concurrency, rates) shared by all
  replicas. When it fails, the answer degrades to the encoder-only path with the error
  reported, never a dropped request.
- **Ingress** reserves no CPU, so autoscaling can place a second replica of the model
  deployments on a small machine.

Deploy with ``serve run serve/config.yaml`` / ``serve deploy serve/config.yaml``, or
``labelfuse serve --model DIR``. Application args: :class:`serve.settings.AppSettings`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from fusion import __version__
from serve.metrics import HttpMetrics, KafkaMetrics, LLMMetrics, TextMetrics
from serve.settings import AppSettings, parse_settings

log = logging.getLogger("ray.serve")

# structured logs: one JSON object per line in the replica logs, with Serve's request_id, route and replica
LOGGING = {"encoding": "JSON"}
EMBED_BATCH = 64  # texts per encoder forward pass, summed over the requests batched together
KEEP_MODELS = 2  # bundles a replica keeps loaded: the current one and the one rolling out
LLMMode = Literal["auto", "off", "all"]


@dataclass(frozen=True)
class BundleRef:
    """Which bundle a request runs on: where it is, its content version, and its encoder's identity."""

    path: str
    version: str
    encoder_key: str


def _one_torch_thread() -> None:
    """For replicas whose torch work is tiny (the fusion head): idle OpenMP threads would spin on the
    cores the Embedder needs."""
    import torch

    torch.set_num_threads(1)


def _load(path: str, **kwargs: Any) -> Any:
    from fusion.classifier import AutoFusionClassifier

    return AutoFusionClassifier.load(path, **kwargs)


def _ref(path: str, clf: Any) -> BundleRef:
    # a fine-tuned encoder lives inside its bundle; a stock one is shared by every bundle that names it
    fine_tuned = clf.config.encoder.fine_tune
    key = f"{path}@{clf.version}" if fine_tuned else json.dumps(clf.encoder.reference(), sort_keys=True)
    return BundleRef(path, clf.version, key)


class _Lru:
    """At most KEEP_MODELS objects by key, each loaded once (concurrent misses wait for one load)."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = asyncio.Lock()

    async def get(self, key: str, load: Callable[[], Any]) -> Any:
        if key not in self._items:
            async with self._lock:
                if key not in self._items:
                    self._items[key] = await asyncio.to_thread(load)
                    while len(self._items) > KEEP_MODELS:
                        self._items.popitem(last=False)
        self._items.move_to_end(key)
        return self._items[key]


def _n_texts(items: list[tuple[BundleRef, list[str]]]) -> int:
    return sum(len(texts) for _, texts in items)


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,
    # a request carries up to EMBED_BATCH texts and batches run one at a time: 2 waiting means a queue
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 5},
)
class Embedder:
    """The encoder; batches texts across concurrent requests. A text that fails fails alone (see
    ``TextEncoder.embed_each``); an encoder that fails on a known-good text fails its health check."""

    def __init__(self, threads: int = 1):
        import torch

        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1; say what we mean
        self._encoders = _Lru()
        self._broken: str | None = None

    async def _encoder(self, ref: BundleRef) -> Any:
        return await self._encoders.get(ref.encoder_key, lambda: _load(ref.path).encoder)

    async def warm(self, ref: BundleRef) -> None:
        await self._encoder(ref)

    def check_health(self) -> None:
        if self._broken:
            raise RuntimeError(self._broken)

    @serve.batch(max_batch_size=EMBED_BATCH, batch_wait_timeout_s=0.005, batch_size_fn=_n_texts)
    async def embed(self, items: list[tuple[BundleRef, list[str]]]) -> list[tuple[np.ndarray, list[str | None]]]:
        """Each item is (bundle, up to EMBED_BATCH texts); per item, (embeddings, per-text failure reasons)."""
        from fusion.errors import EncoderError

        out: list[Any] = [None] * len(items)
        for key in dict.fromkeys(ref.encoder_key for ref, _ in items):
            members = [i for i, (ref, _) in enumerate(items) if ref.encoder_key == key]
            encoder = await self._encoder(items[members[0]][0])
            texts = [t for i in members for t in items[i][1]]
            try:
                emb, reasons = encoder.embed_each(texts, batch_size=EMBED_BATCH)
            except EncoderError as err:  # not the texts' fault: Serve replaces this replica
                self._broken = str(err)
                raise
            start = 0
            for i in members:
                end = start + len(items[i][1])
                out[i] = (emb[start:end], reasons[start:end])
                start = end
        return out


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=32,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
)
class LLMScorer:
    """The bundle's LLMs (cache and few-shot examples included), bounded by one shared ledger actor."""

    def __init__(self, ledger_name: str):
        _one_torch_thread()
        self.ledger_name = ledger_name
        self._models = _Lru()
        self._ledger: Any = None
        self.metrics = LLMMetrics()

    def _load(self, ref: BundleRef) -> Any:
        from data_jobs.common import NAMESPACE
        from data_jobs.ledger import shared_ledger
        from fusion.bundle import read_bundle
        from fusion.config import parse_config

        config = parse_config(read_bundle(ref.path).manifest["config"], source=f"config stored in {ref.path}")
        ledger = shared_ledger(self.ledger_name, config.llm_limits, namespace=NAMESPACE)
        self._ledger = ledger.actor
        return _load(ref.path, ledger=ledger, device="cpu")

    async def warm(self, ref: BundleRef) -> None:
        await self._models.get(ref.version, lambda: self._load(ref))

    async def score(self, ref: BundleRef, texts: list[str], emb: np.ndarray) -> dict[str, Any]:
        """{name: ScoreBatch} for every LLM of the bundle."""
        clf = await self._models.get(ref.version, lambda: self._load(ref))
        _, batches = await clf.ascore_llms(texts, emb)
        ledger = None
        if clf.config.llm_limits.budget_usd is not None:  # the gauge needs it; skip the round trip otherwise
            try:
                ledger = await self._ledger.snapshot.remote()
            except Exception:  # the ledger actor is unreachable: no gauge this time (the LLM calls say why)
                pass
        self.metrics.observe(batches, ledger)
        return batches


@dataclass
class _Model:
    clf: Any
    ref: BundleRef
    loaded_at: float


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=128,  # cheap per request; the Embedder's batch queue is where work waits
    max_queued_requests=256,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
)
class Fusion:
    """Holds the bundle (user_config); gate → embed → LLM scores → fusion head → labels."""

    def __init__(self, embedder: DeploymentHandle, scorer: DeploymentHandle):
        _one_torch_thread()
        self.embedder, self.scorer = embedder, scorer
        self.model: _Model | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        from fusion.errors import ConfigError

        path = user_config.get("bundle")
        if not isinstance(path, str) or not path:
            raise ConfigError("Fusion's user_config needs 'bundle': the model bundle directory")
        clf = await asyncio.to_thread(_load, path, device="cpu")
        ref = _ref(path, clf)
        if self.model is not None and self.model.ref == ref:
            return
        # load the new encoder / LLM panel before the swap, so the first requests do not wait for it
        await self.embedder.warm.remote(ref)
        if clf.layout.n_llms:
            await self.scorer.warm.remote(ref)
        old, self.model = self.model, _Model(clf, ref, time.time())
        log.info("model %s from %s is live (was %s)", ref.version, path, old.ref.version if old else None)

    def _current(self) -> _Model:
        if self.model is None:
            raise RuntimeError("no model loaded yet")
        return self.model

    async def info(self) -> dict[str, Any]:
        m = self._current()
        clf = m.clf
        val = clf.metrics.get("validation", {})
        return {
            "model_version": m.ref.version,
            "bundle": m.ref.path,
            "loaded_at": m.loaded_at,
            "classes": clf.classes,
            "multilabel": clf.multilabel,
            "encoder": clf.encoder.reference(),
            "llms": [{"name": c.name, "provider": c.provider, "model": c.model} for c in clf.config.llms],
            "gating": {"enabled": clf.config.gating.enabled, "threshold": clf.gate_threshold},
            "validation": {k: val[k] for k in ("accuracy", "macro_f1", "micro_f1", "ece") if k in val},
        }

    async def classify(self, texts: list[str], llm: LLMMode = "auto") -> dict[str, Any]:
        """Labels, probabilities, LLM use and cost for ``texts``; ``llm``: auto (the model's gate), off, all.

        A text that fails alone (the encoder cannot embed it, the head gives no finite probabilities)
        gets ``{"error": reason}`` in its place, the reason completing "text ..."; the others are answered.
        """
        m = self._current()  # this request runs on one bundle even if a new one goes live meanwhile
        clf, ref = m.clf, m.ref
        start = time.perf_counter()
        chunks = [texts[i : i + EMBED_BATCH] for i in range(0, len(texts), EMBED_BATCH)]
        parts = await asyncio.gather(*(self.embedder.embed.remote((ref, c)) for c in chunks))
        reasons = [r for _, rs in parts for r in rs]
        ok = np.array([i for i, r in enumerate(reasons) if r is None], dtype=int)
        results: list[dict[str, Any]] = [{"error": r} for r in reasons]
        cost = 0.0
        if len(ok):
            emb = np.concatenate([e for e, _ in parts])[ok]
            for i, res in zip(ok, await self._answer(clf, ref, [texts[i] for i in ok], emb, llm), strict=True):
                results[i] = res
                cost += res.get("llm_cost_usd", 0.0)
        return {
            "model_version": ref.version,
            "results": results,
            "llm_cost_usd": cost,
            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
        }

    async def _answer(
        self, clf: Any, ref: BundleRef, texts: list[str], emb: np.ndarray, llm: LLMMode
    ) -> list[dict[str, Any]]:
        if llm == "off" or not clf.layout.n_llms:
            ask = np.zeros(len(texts), dtype=bool)
        else:
            ask = clf.ask_llms(emb, gate=False if llm == "all" else None)
        scores: dict[str, np.ndarray] = {}
        batches: dict[str, Any] = {}
        scorer_error = None
        if ask.any():
            idx = np.flatnonzero(ask)
            try:
                batches = await self.scorer.score.remote(ref, [texts[i] for i in idx], emb[idx])
                scores = {name: b.scores for name, b in batches.items()}
            except Exception as err:  # degrade to the encoder-only path, and say so
                scorer_error = f"LLM scorer unavailable: {type(err).__name__}: {err}"[:500]
                log.warning("%s", scorer_error)
        pred = clf.fuse(emb, ask, scores, batches)
        labels = clf.decide(pred.proba)
        finite = np.isfinite(pred.proba).all(axis=1)
        results = []
        for i in range(len(texts)):
            if not finite[i]:
                results.append({"error": "got no finite probabilities from the model"})
                continue
            errs = [f"{name}: {e[i]}" for name, e in pred.llm_errors.items() if e[i]]
            if scorer_error and ask[i]:
                errs.append(scorer_error)
            results.append(
                {
                    ("labels" if clf.multilabel else "label"): labels[i],
                    "probabilities": {c: round(float(p), 6) for c, p in zip(clf.classes, pred.proba[i], strict=True)},
                    "llm_used": bool(pred.llm_used[i].any()) if pred.llm_used.size else False,
                    "gated_out": bool(pred.gated_out[i]),
                    "llm_cost_usd": float(pred.llm_cost_usd[i]),
                    "llm_error": "; ".join(errs) or None,
                }
            )
        return results


# -- HTTP ---------------------------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(send)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _too_large(self, send: Any) -> None:
        detail = f"request body is larger than {self.limit} bytes; send fewer or shorter texts"
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="One text (or use 'texts').")
    texts: list[str] | None = Field(None, description="Several texts, classified together.")
    llm: LLMMode = Field(
        "auto",
        description="auto: the model's cost gate decides; off: encoder only, no LLM cost; all: ask the LLMs "
        "about every text.",
    )


class ClassifyResult(BaseModel):
    label: str | None = Field(None, description="The class (multi-class models).")
    labels: list[str] | None = Field(None, description="The classes (multi-label models).")
    probabilities: dict[str, float] = Field(description="Calibrated probability per class.")
    llm_used: bool = Field(description="An LLM's scores went into this answer.")
    gated_out: bool = Field(description="The encoder was confident enough; no LLM was asked.")
    llm_cost_usd: float = Field(description="List-price cost of the LLM answers used (cache hits included).")
    llm_error: str | None = Field(None, description="Why an LLM asked gave no answer (the encoder path answered).")


class ClassifyResponse(BaseModel):
    model_version: str = Field(description="The bundle that answered (a hash of its files).")
    results: list[ClassifyResult] = Field(description="One per text, in request order.")
    llm_cost_usd: float = Field(description="Sum of the results' llm_cost_usd.")
    latency_ms: float = Field(description="Time in the graph (embed, gate, LLMs, fusion).")


class ModelInfo(BaseModel):
    model_version: str = Field(description="A hash of the bundle's files; every classification names it.")
    bundle: str = Field(description="The bundle directory (the app's `bundle` arg).")
    loaded_at: float = Field(description="When this replica loaded it (Unix time).")
    classes: list[str] = Field(description="Class names, in the order of every probability vector.")
    multilabel: bool = Field(description="Results carry `labels` (a list) instead of `label`.")
    encoder: dict[str, Any] = Field(description="model, dim, max_length, pooling, normalize.")
    llms: list[dict[str, str]] = Field(description="name, provider and model of each fused LLM.")
    gating: dict[str, Any] = Field(description="enabled, and threshold: encoder confidence below which LLMs are asked.")
    validation: dict[str, float] = Field(description="accuracy, macro_f1, micro_f1, ece on the validation split.")


class KafkaStats(BaseModel):
    replica: str = Field(description="The tagger replica that answered (one of kafka.replicas).")
    consumed: int = Field(description="Messages polled.")
    tagged: int = Field(description="Results produced and acknowledged.")
    dead_lettered: int = Field(description="Messages sent to the dead-letter topic (bad input, or failed alone).")
    failed_alone: int = Field(description="Of those, messages that passed decoding but failed alone in the model.")
    graph_failures: int = Field(description="Batches the graph failed as a whole after their retries (the loop stops).")
    batches: int = Field(description="Batches finished (results and dead letters acknowledged).")
    commits: int = Field(description="Offset commits (each after its batch's results were acknowledged).")
    commit_failures: int = Field(description="Commits refused (e.g. by a rebalance); those messages come again.")
    retries: int = Field(description="Batches classified again after a failure.")
    pauses: int = Field(description="Times the partitions were paused because max_in_flight batches were busy.")
    uncommitted: int = Field(description="Messages consumed and not yet committed (commit lag).")
    assignment: list[str] = Field(description="topic:partition this replica owns now.")
    alive: bool = Field(description="The tagger loop runs; false makes the health check fail and Serve replace it.")
    error: str | None = Field(None, description="Why the loop stopped, if it did.")


class ErrorDetail(BaseModel):
    detail: Any = Field(
        description="What went wrong and what to do: a sentence, or for a request that does not match the schema "
        "FastAPI's list of problems (`loc`, `msg`, `type`)."
    )
    request_id: str | None = Field(None, description="500 only: the request id the replica's log names.")


def _errors(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses: the docs/http-api.md error tables are generated from these."""
    return {code: {"model": ErrorDetail, "description": text} for code, text in described.items()}


AUTH_ERRORS = _errors(
    {
        401: "Only with `auth_token_env`: no `Authorization: Bearer <token>` header (`WWW-Authenticate: Bearer`).",
        403: "Only with `auth_token_env`: the token is not the one in that environment variable.",
    }
)
CLASSIFY_ERRORS = AUTH_ERRORS | _errors(
    {
        400: "The body could not be read as JSON text (e.g. invalid UTF-8).",
        413: "The body is larger than `limits.max_body_bytes` (declared or streamed).",
        422: "The body does not match the schema; neither or both of `text` and `texts`; an empty list; more than "
        "`limits.max_texts` texts; a text the text rule refuses (empty, a lone surrogate, longer than "
        "`limits.max_chars`) or that failed alone in the model. The detail names each such text by its index.",
        500: "A bug or a failed deployment; `request_id` finds the traceback in the replica's log.",
        503: "Over capacity: the queues are full. Retry after the `Retry-After` seconds.",
    }
)


class SafeJSON(JSONResponse):
    """JSON escaped to ASCII: a lone surrogate echoed from a request cannot break the response's encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _unavailable(detail: str, retry_after_s: int = 1) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(retry_after_s)})


def http_api(fusion: DeploymentHandle, s: AppSettings, token: str | None, tagger: DeploymentHandle | None) -> Any:
    """The FastAPI app of one Ingress replica."""
    import hmac

    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from ray.serve.exceptions import BackPressureError

    from fusion.texts import clean_texts

    api = FastAPI(
        title="labelfuse",
        version=__version__,
        description="Text classification fusing a transformer encoder with LLM class scores (LabelFusion).",
    )
    api.add_middleware(BodyLimit, limit=s.limits.max_body_bytes)
    lim = s.limits
    http_metrics, text_metrics = HttpMetrics(), TextMetrics()

    @api.middleware("http")  # added last, so outermost: it also sees BodyLimit's 413s
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        start, status = time.perf_counter(), 500
        try:
            response = await call_next(request)
        except Exception as err:  # a bug or a failed deployment: JSON with the request id, never a bare page
            request_id = request.headers.get("x-request-id")
            log.exception("unexpected error answering %s", request.url.path)
            detail = f"internal error ({type(err).__name__}); the replica's log has it under this request_id"
            response = SafeJSON({"detail": detail, "request_id": request_id}, status_code=500)
        status = response.status_code
        route = request.scope.get("route")  # the route template: bounded label values
        http_metrics.observe(getattr(route, "path", "unmatched"), status, time.perf_counter() - start)
        return response

    @api.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> Any:
        # FastAPI's own handler echoes each bad input, which JSON may not carry back (a lone surrogate, 1e999)
        problems = [{k: v for k, v in e.items() if k != "input"} for e in err.errors()]
        return SafeJSON({"detail": jsonable_encoder(problems)}, status_code=422)

    def refuse(reasons: list[str | None], stage: str) -> None:
        """422 naming every text that cannot be classified (``reasons`` complete "text ...")."""
        bad = [f"text {i} {r}" for i, r in enumerate(reasons) if r]
        if bad:
            text_metrics.refused("http", stage, len(bad))
            raise HTTPException(422, "; ".join(bad))

    def check_token(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            headers = {"WWW-Authenticate": "Bearer"}
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'", headers)
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(403, "invalid API token")

    auth = [Depends(check_token)]

    @api.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        response_model_exclude_none=True,
        dependencies=auth,
        responses=CLASSIFY_ERRORS,
    )
    async def classify(req: ClassifyRequest) -> Any:
        """Classify one text or many: labels, calibrated probabilities, LLM use and cost per text."""
        if (req.text is None) == (req.texts is None):
            raise HTTPException(422, "give exactly one of 'text' or 'texts'")
        texts = [req.text] if req.text is not None else req.texts or []
        if not texts:
            raise HTTPException(422, "'texts' is empty")
        if len(texts) > lim.max_texts:
            raise HTTPException(422, f"{len(texts)} texts in one request; the limit is {lim.max_texts}")
        texts, reasons = clean_texts(texts, lim.max_chars)  # the one rule for texts (fusion.texts)
        refuse(reasons, "input")
        try:
            out = await fusion.classify.remote(texts, req.llm)
        except BackPressureError:
            return _unavailable("over capacity: too many requests queued; retry later")
        results = out["results"]
        refuse([r.get("error") for r in results], "model")  # texts that failed alone in the graph
        text_metrics.observe("http", results)
        log.info(  # Serve adds request_id, route, replica; JSON logs keep these fields
            "classified %d texts",
            len(texts),
            extra={
                "texts": len(texts),
                "llm": req.llm,
                "llm_used": sum(bool(r["llm_used"]) for r in results),
                "llm_cost_usd": out["llm_cost_usd"],
                "model_version": out["model_version"],
                "latency_ms": out["latency_ms"],
            },
        )
        return out

    @api.get("/v1/model", response_model=ModelInfo, dependencies=auth, responses=AUTH_ERRORS)
    async def model() -> Any:
        """The model being served: version, bundle, classes, encoder, LLMs, gate, validation metrics."""
        return await fusion.info.remote()

    @api.get(
        "/v1/kafka",
        response_model=KafkaStats,
        dependencies=auth,
        responses=AUTH_ERRORS | _errors({404: "The application tags no Kafka topics (no `kafka` in its args)."}),
    )
    async def kafka() -> Any:
        """Counters of one Kafka tagger replica (consumed, tagged, dead-lettered, commits, its partitions)."""
        if tagger is None:
            raise HTTPException(404, "this application tags no Kafka topics (no 'kafka' in its args)")
        return await tagger.stats.remote()

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: this process answers."""
        return {"status": "ok"}

    @api.get(
        "/readyz", responses=_errors({503: "Not ready: no model loaded yet, or the probe failed (`Retry-After: 5`)."})
    )
    async def readyz() -> Any:
        """Readiness: a model is loaded and the graph answers a probe end to end."""
        try:
            probe = await asyncio.wait_for(fusion.classify.remote(["readiness probe"], "off"), 30)
        except Exception as err:
            return _unavailable(f"not ready: {type(err).__name__}: {err}"[:300], 5)
        return {"status": "ready", "model_version": probe["model_version"]}

    return api


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=128,
    max_queued_requests=256,  # at the HTTP proxy; beyond it: 503 with Retry-After
    backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
)
@serve.ingress()
class Ingress:
    """HTTP API: POST /v1/classify, GET /v1/model, GET /v1/kafka, GET /healthz, GET /readyz, /docs."""

    def __init__(self, fusion: DeploymentHandle, settings: dict[str, Any], tagger: DeploymentHandle | None = None):
        import os

        from fusion.errors import ConfigError

        self.fusion, self.tagger, self.settings = fusion, tagger, parse_settings(settings)
        self.token = None
        if env := self.settings.auth_token_env:
            self.token = os.environ.get(env, "").strip()
            if not self.token:
                raise ConfigError(f"auth_token_env is {env!r} but that environment variable is empty on this node")

    def __serve_build_asgi_app__(self) -> Any:
        return http_api(self.fusion, self.settings, self.token, self.tagger)


# -- Kafka --------------------------------------------------------------------------------------------------
@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    num_replicas=1,
    health_check_period_s=5,
    graceful_shutdown_timeout_s=60,
)
class KafkaTagger:
    """Tags Kafka messages in real time through Fusion; replicas share one consumer group."""

    def __init__(self, fusion: DeploymentHandle, settings: dict[str, Any]):
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        from serve.kafka import GraphUnavailable, TaggerLoop
        from serve.settings import KafkaSettings

        s = KafkaSettings.model_validate(settings)
        timeout = s.max_poll_interval_ms / 1000
        text_metrics = TextMetrics()
        down = (RayActorError, DeploymentUnavailableError, BackPressureError, TimeoutError)

        def classify(texts: list[str]) -> dict[str, Any]:
            try:
                out = fusion.classify.remote(texts, s.llm).result(timeout_s=timeout)
            except down as err:  # the graph was not there to ask: never the messages' fault
                raise GraphUnavailable(f"{type(err).__name__}: {err}") from err
            text_metrics.observe("kafka", out["results"])
            return out

        name = f"tagger-{serve.get_replica_context().replica_id.unique_id}"
        self.loop = TaggerLoop(s, classify, name=name, metrics=KafkaMetrics())
        self.loop.start()

    def check_health(self) -> None:
        if not self.loop.alive:
            raise RuntimeError(f"the Kafka loop stopped: {self.loop.stats()['error']}")

    def stats(self) -> dict[str, Any]:
        return self.loop.stats()

    async def __del__(self) -> None:
        await asyncio.to_thread(self.loop.stop)


# -- the application ------------------------------------------------------------------------------------------
def build(settings: AppSettings | dict[str, Any], options: dict[str, dict[str, Any]] | None = None) -> Any:
    """The graph as a Serve application; ``options`` overrides deployment options by name (tests, tuning)."""
    s = parse_settings(settings)
    opts = options or {}

    def bind(dep: Any, *args: Any, **extra: Any) -> Any:
        return dep.options(**{**extra, **opts.get(dep.name, {})}).bind(*args)

    embedder = bind(Embedder, s.threads)
    scorer = bind(LLMScorer, s.ledger_name)
    fusion = bind(Fusion, embedder, scorer, user_config={"bundle": s.bundle})
    # the tagger is bound into the graph through Ingress, which serves its counters at GET /v1/kafka
    tagger = None
    if s.kafka is not None:
        tagger = bind(KafkaTagger, fusion, s.kafka.model_dump(), num_replicas=s.kafka.replicas)
    return bind(Ingress, fusion, s.model_dump(exclude={"kafka"}), tagger)


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for ``serve run serve.app:build_app bundle=...`` and serve/config.yaml."""
    return build(args)
