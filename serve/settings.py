"""Settings of the Serve application: the ``args`` of ``serve/config.yaml`` (validated with pydantic).

Deployment sizing (replicas, autoscaling, CPUs/GPUs) is not here: it is Serve's own
``deployments:`` section of the same file. What is here is what our code reads.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fusion.errors import ConfigError
from fusion.head import LLMMode


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpLimits(_Strict):
    """What one HTTP request may carry; more gives 422 (or 413 for the body size)."""

    max_texts: int = Field(64, ge=1, description="Texts per POST /v1/classify.")
    max_chars: int = Field(20_000, ge=1, description="Characters per text.")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Request body size; larger gives 413.")


class KafkaSettings(_Strict):
    """Real-time tagging of Kafka topics: consume, classify, produce one result per message."""

    bootstrap_servers: list[str] = Field(description="Broker addresses, host:port.")
    input_topics: list[str] = Field(min_length=1, description="Topics to tag.")
    output_topic: str = Field(description="Where one JSON result per input message goes.")
    dead_letter_topic: str = Field(
        description="Where undecodable, malformed or over-long messages go, with the reason."
    )
    group_id: str = Field("labelfuse-tagger", description="Consumer group shared by all tagger replicas.")
    replicas: int = Field(1, ge=1, description="Tagger replicas; the group splits the partitions between them.")
    value_format: Literal["json", "text"] = Field(
        "json", description="json: an object with text_field (and optionally id_field); text: the UTF-8 text itself."
    )
    text_field: str = Field("text", description="JSON field holding the text.")
    id_field: str = Field("id", description="JSON field copied into the result as 'id' (optional in messages).")
    max_chars: int = Field(20_000, ge=1, description="Longer texts go to the dead-letter topic.")
    batch_size: int = Field(64, ge=1, le=64, description="Messages per batch through the graph (max_poll_records).")
    linger_ms: int = Field(50, ge=0, description="How long a poll waits for a batch to fill.")
    max_in_flight: int = Field(4, ge=1, description="Batches in the graph at once; beyond it, partitions are paused.")
    llm: LLMMode = Field("auto", description="LLM use per message (see POST /v1/classify).")
    labels_topic: str | None = Field(
        None,
        description="A topic of people's labels: JSON feedback items as POST /v1/feedback takes them, kept in the "
        "app's label_store (needed then); bad ones go to the dead-letter topic with the reason. Consumed by "
        "group `<group_id>-labels`.",
    )
    session_timeout_ms: int = Field(10_000, ge=1000, description="Consumer group session timeout.")
    heartbeat_interval_ms: int = Field(3_000, ge=100, description="Consumer heartbeat interval.")
    max_poll_interval_ms: int = Field(
        300_000, ge=1000, description="Kafka's poll deadline; also how long one batch may take in the graph."
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a group with no committed offset starts."
    )
    produce_timeout_s: float = Field(60.0, gt=0, description="Wait for results to be acknowledged before giving up.")
    max_retries: int = Field(3, ge=0, description="Retries of a batch whose classification failed (not bad input).")
    client: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to both KafkaConsumer and KafkaProducer: security_protocol, sasl_mechanism, "
        "sasl_plain_username, sasl_plain_password, ssl_cafile, ssl_certfile, ssl_keyfile, client_id, ...",
    )

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v


class AppSettings(_Strict):
    """``args`` of the labelfuse Serve application."""

    bundle: str = Field(
        description="Model bundle: a directory every node can read, a URI (s3://, gs://, hf://owner/repo@rev, "
        "http(s)://; each node fetches it once), or a model registry (`labelfuse registry`) whose champion is served and "
        "followed: a promotion or rollback rolls out by itself. Reachable from every node. Rolled out by user_config."
    )
    registry_poll_s: float = Field(
        5.0, gt=0, description="With a registry as `bundle`: how often each Fusion replica checks for a new champion."
    )
    label_store: str | None = Field(
        None,
        description="Label store directory or URI: POST /v1/feedback keeps people's labels there, and every LLM answer "
        "the app pays for is kept too (`labelfuse retrain` learns from both). None: /v1/feedback answers 404.",
    )
    threads: int = Field(1, ge=1, description="torch threads per Embedder replica (CPU).")
    limits: HttpLimits = Field(default_factory=HttpLimits)
    auth_token_env: str | None = Field(
        None,
        description="Name of an environment variable holding the API token; when set, /v1/* needs "
        "'Authorization: Bearer <token>' (401 without, 403 wrong). The variable must be set on every node.",
    )
    ledger_name: str = Field("labelfuse-serve-ledger", description="Named Ray actor holding the LLM budget/rates.")
    kafka: KafkaSettings | None = Field(None, description="Tag Kafka topics too; none: HTTP only.")

    @model_validator(mode="after")
    def _labels_need_a_store(self) -> AppSettings:
        if self.kafka is not None and self.kafka.labels_topic and not self.label_store:
            raise ValueError("kafka.labels_topic needs label_store: where the labels are kept")
        return self


def parse_settings(args: dict[str, Any] | AppSettings) -> AppSettings:
    from pydantic import ValidationError

    from fusion.config import format_validation_error

    if isinstance(args, AppSettings):
        return args
    try:
        return AppSettings.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "serve application args")) from None
