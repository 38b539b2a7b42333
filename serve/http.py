"""The FastAPI app of a Fusion replica: routes, bearer-token auth, body limit, error answers, metrics.

Every answer is JSON: a request the schema refuses gets 422 naming each problem (without echoing
the input), a text the text rule refuses 422 naming it by index, a body over the limit 413, full
queues 503 with ``Retry-After``, and a bug or a failed deployment 500 with the request id the
replica's log names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray.serve.handle import DeploymentHandle

from fusion import __version__
from fusion.config import LLMMode
from serve.metrics import HttpMetrics, TextMetrics
from serve.schemas import (
    AUTH_ERRORS,
    CLASSIFY_ERRORS,
    FEEDBACK_ERRORS,
    ClassifyRequest,
    ClassifyResponse,
    FeedbackRequest,
    FeedbackResponse,
    KafkaStats,
    ModelInfo,
    ModelStats,
    _errors,
)
from serve.settings import AppSettings

log = logging.getLogger("ray.serve")


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


class SafeJSON(JSONResponse):
    """JSON escaped to ASCII: a lone surrogate echoed from a request cannot break the response's encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


PAGE = (Path(__file__).with_name("page.html")).read_text(encoding="utf-8")
# declared in the OpenAPI schema, so /docs can send the token ("Authorize"); check_token decides, not FastAPI
BEARER = HTTPBearer(auto_error=False, description="The API token; needed only when the app sets auth_token_env.")


def _unavailable(detail: str, retry_after_s: int = 1) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(retry_after_s)})


class Model(Protocol):
    """What the API answers from: the Fusion replica it runs in (:class:`serve.deployments.Fusion`)."""

    async def classify(self, texts: list[str], llm: LLMMode = "auto", record: bool = True) -> dict[str, Any]: ...
    async def info(self) -> dict[str, Any]: ...
    async def stats(self) -> dict[str, Any]: ...


def http_api(
    fusion: Model,
    s: AppSettings,
    token: str | None,
    tagger: DeploymentHandle | None,
    labels: DeploymentHandle | None = None,
) -> Any:
    """The FastAPI app of one Fusion replica."""
    import hmac

    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError

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

    def check_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> None:
        if token is None:
            return
        given = credentials.credentials.strip() if credentials is not None else ""
        if not given:
            headers = {"WWW-Authenticate": "Bearer"}
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'", headers)
        if not hmac.compare_digest(given.encode(), token.encode()):
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
        out = await fusion.classify(texts, req.llm)
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

    @api.post(
        "/v1/feedback",
        response_model=FeedbackResponse,
        dependencies=auth,
        responses=FEEDBACK_ERRORS,
    )
    async def feedback(req: FeedbackRequest) -> Any:
        """A person's label for a text (or a text_id a classification returned), kept in the label store."""
        from fusion.errors import DataError
        from fusion.texts import text_id
        from serve import feedback as fb

        if labels is None:
            raise HTTPException(404, "this application keeps no labels (no 'label_store' in its args)")
        info = await fusion.info()
        try:
            text, given = fb.check(req, info["classes"], info["multilabel"], lim.max_chars)
        except DataError as err:
            raise HTTPException(422, str(err)) from None
        try:
            if text is None:
                text = await labels.text_of.remote(req.text_id)
                if text is None:
                    raise HTTPException(
                        422, f"text_id {req.text_id!r} is not in the label store; send the text instead"
                    )
            await labels.add.remote([fb.record(req, text, given, "http")])
        except HTTPException:
            raise
        except Exception as err:
            log.warning("feedback %r not kept: %s: %s", req.id, type(err).__name__, err)
            return _unavailable(f"the label store could not be used ({type(err).__name__}); retry with the same id")
        return {"kept": True, "label_id": req.id, "text_id": text_id(text)}

    @api.get("/v1/model", response_model=ModelInfo, dependencies=auth, responses=AUTH_ERRORS)
    async def model() -> Any:
        """The model being served: version, bundle, classes, encoder, LLMs, gate, validation metrics, and the loop:
        the registry followed, the recent LLM-call rate and the label store's counts."""
        info = await fusion.info()
        if labels is not None:
            try:
                info["label_store"] = await labels.stats.remote()
            except Exception as err:  # the model's description must not fail with the store
                info["label_store"] = {"error": f"{type(err).__name__}: {err}"[:300]}
        return info

    @api.get("/v1/stats", response_model=ModelStats, dependencies=auth, responses=AUTH_ERRORS)
    async def stats() -> Any:
        """What the model's recent predictions look like on one Fusion replica: the label mix beside the training
        labels' and their drift score, the gate's LLM-call rate, and the LLM budget left."""
        return await fusion.stats()

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

    @api.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        """A page to try the model and watch the Kafka tagging (serve/page.html; the token is entered there)."""
        return HTMLResponse(PAGE)

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
            probe = await asyncio.wait_for(fusion.classify(["readiness probe"], "off", record=False), 30)
        except Exception as err:
            return _unavailable(f"not ready: {type(err).__name__}: {err}"[:300], 5)
        return {"status": "ready", "model_version": probe["model_version"]}

    return api
