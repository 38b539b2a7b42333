"""The HTTP API's request and response models, and its documented error statuses.

docs/http-api.md and docs/openapi.json are generated from these (``make docs``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fusion.config import LLMMode


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
    text_id: str = Field(description="The text's id (POST /v1/feedback can name the text by it).")


class ClassifyResponse(BaseModel):
    model_version: str = Field(description="The bundle that answered (a hash of its files).")
    results: list[ClassifyResult] = Field(description="One per text, in request order.")
    llm_cost_usd: float = Field(description="Sum of the results' llm_cost_usd.")
    latency_ms: float = Field(description="Time in the graph (embed, gate, LLMs, fusion).")


class ModelInfo(BaseModel):
    model_version: str = Field(description="A hash of the bundle's files; every classification names it.")
    bundle: str = Field(description="The bundle directory or URI (the app's `bundle` arg).")
    loaded_at: float = Field(description="When this replica loaded it (Unix time).")
    classes: list[str] = Field(description="Class names, in the order of every probability vector.")
    multilabel: bool = Field(description="Results carry `labels` (a list) instead of `label`.")
    encoder: dict[str, Any] = Field(description="model, dim, max_length, pooling, normalize.")
    llms: list[dict[str, str]] = Field(description="name, provider and model of each fused LLM.")
    gating: dict[str, Any] = Field(description="enabled, and threshold: encoder confidence below which LLMs are asked.")
    validation: dict[str, float] = Field(description="accuracy, macro_f1, micro_f1, ece on the validation split.")
    registry: str | None = Field(None, description="The model registry followed (its champion is served), if any.")
    llm_call_rate: float | None = Field(
        None, description="Share of this replica's last 1,000 texts its gate sent to the LLMs (None: no LLM)."
    )
    label_store: dict[str, Any] | None = Field(
        None, description="The label store's uri and counts: parts, records, labels (one per text), human, llm."
    )


class ModelStats(BaseModel):
    model_version: str = Field(description="The model these figures are about.")
    window: int = Field(description="Predictions counted: this Fusion replica's last ones, up to 1,000.")
    label_mix: dict[str, float] = Field(description="Each class's share of those predictions.")
    training_label_mix: dict[str, float] | None = Field(
        None, description="Each class's share of the training labels (None: a bundle saved before it was recorded)."
    )
    drift_psi: float | None = Field(
        None,
        description="Population stability index of label_mix against training_label_mix: under 0.1 steady, 0.1 to "
        "0.25 moving, over 0.25 shifted. None under 100 predictions.",
    )
    llm_call_rate: float | None = Field(None, description="Share of the window the gate sent to the LLMs.")
    budget: dict[str, float] | None = Field(
        None, description="The shared LLM budget: budget_usd, spent_usd, left_usd (None without a budget or LLM)."
    )


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        min_length=1,
        max_length=200,
        description="Your id for this label: sending the same id again (a retry) keeps it once; the later one wins.",
    )
    text: str | None = Field(None, description="The text labelled (or use 'text_id').")
    text_id: str | None = Field(
        None, min_length=1, max_length=64, description="Instead of 'text': the text_id a classification returned."
    )
    label: str | None = Field(None, description="The right class (multi-class models).")
    labels: list[str] | None = Field(None, description="The right classes, possibly none (multi-label models).")


class FeedbackResponse(BaseModel):
    kept: bool = Field(description="True: the label is in the label store (on disk) and retraining will see it.")
    label_id: str = Field(description="The id given.")
    text_id: str = Field(description="The text's id.")


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
        500: "A bug or a failed deployment; `request_id` finds the traceback in the replica's log. When the Fusion "
        "replica itself dies mid-request, Serve's proxy answers `Internal Server Error` in plain text: retry.",
        503: "Over capacity: the queues are full. Retry after the `Retry-After` seconds.",
    }
)
FEEDBACK_ERRORS = AUTH_ERRORS | _errors(
    {
        404: "The application keeps no labels (no `label_store` in its args).",
        413: "The body is larger than `limits.max_body_bytes`.",
        422: "The body does not match the schema; neither or both of `text` and `text_id`, or of `label` and `labels`; "
        "a class the model does not know; not exactly one label for a multi-class model; a text the text rule "
        "refuses; a `text_id` the store has not seen (send the text).",
        503: "The label store could not be read or written; nothing was kept. Retry with the same `id`.",
    }
)
