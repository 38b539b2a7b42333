"""Settings of the Serve application: the ``args`` of ``serve/config.yaml`` (validated with pydantic).

Deployment sizing (replicas, autoscaling, CPUs/GPUs) is not here: it is Serve's own
``deployments:`` section of the same file. What is here is what our code reads.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fusion.config import LLMMode
from fusion.errors import ConfigError

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpLimits(_Strict):
    """What one HTTP request may carry; more gives 422 (or 413 for the body size)."""

    max_texts: int = Field(64, ge=1, description="Texts per POST /v1/classify.")
    max_chars: int = Field(20_000, ge=1, description="Characters per text.")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Request body size; larger gives 413.")


# KafkaConsumer / KafkaProducer settings this app sets from its own fields (or never lets change)
MANAGED = {
    "bootstrap_servers": "kafka.bootstrap_servers",
    "group_id": "kafka.group_id",
    "auto_offset_reset": "kafka.auto_offset_reset",
    "max_poll_records": "kafka.batch_size",
    "session_timeout_ms": "kafka.session_timeout_ms",
    "heartbeat_interval_ms": "kafka.heartbeat_interval_ms",
    "max_poll_interval_ms": "kafka.max_poll_interval_ms",
    "acks": "kafka.producer.acks",
    "linger_ms": "kafka.producer.linger_ms",
    "batch_size": "kafka.producer.batch_size",
    "compression_type": "kafka.producer.compression_type",
    "enable_auto_commit": "",  # offsets are committed after the results are written: never automatically
    "key_deserializer": "",
    "value_deserializer": "",
    "key_serializer": "",
    "value_serializer": "",
    "transactional_id": "",
}
SECRETS = ("sasl_plain_password", "ssl_password")
IDLE_POLL_MS = 500  # how long a tagger's poll waits with no batch in flight (records end the wait as they arrive)


def _client_keys() -> tuple[set[str], set[str]]:
    from kafka import KafkaConsumer, KafkaProducer

    return set(KafkaConsumer.DEFAULT_CONFIG), set(KafkaProducer.DEFAULT_CONFIG)


def _check_options(where: str, options: dict[str, Any], allowed: set[str], hint: str) -> dict[str, Any]:
    """Every key a kafka-python setting of this kind (or ``<setting>_env``: an environment variable's name)."""
    import difflib

    consumer, producer = _client_keys()
    for key, value in options.items():
        name = key.removesuffix("_env")
        if name in MANAGED:
            raise ValueError(f"{where}.{key}: set by labelfuse" + (f"; use {MANAGED[name]}" if MANAGED[name] else ""))
        if name not in allowed:
            if name in consumer | producer:
                raise ValueError(f"{where}.{key}: {hint}")
            close = difflib.get_close_matches(name, allowed, n=1)
            raise ValueError(
                f"{where}.{key}: not a kafka-python setting" + (f"; did you mean {close[0]!r}?" if close else "")
            )
        if key != name and not (isinstance(value, str) and value):
            raise ValueError(f"{where}.{key}: the name of an environment variable holding {name}")
    return options


def _check_one_client(where: str, options: dict[str, Any], kind: Literal["consumer", "producer"]) -> dict[str, Any]:
    """Settings of one client only: a setting of both belongs in kafka.client."""
    consumer, producer = _client_keys()
    own = consumer - producer if kind == "consumer" else producer - consumer
    return _check_options(where, options, own, "a setting of both clients: put it in kafka.client")


def client_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """``options`` with every ``<setting>_env`` replaced by ``<setting>`` read from that environment variable
    (here: on the node where the client starts)."""
    import os

    out = {}
    for key, value in options.items():
        if key.endswith("_env"):
            if value not in os.environ:
                raise ConfigError(
                    f"{where}.{key} names the environment variable {value}, which is not set on this node: set it on "
                    "every node (e.g. the Serve config's runtime_env: {env_vars: ...})"
                )
            out[key.removesuffix("_env")] = os.environ[value]
        else:
            out[key] = value
    return out


class ProducerSettings(_Strict):
    """How results and dead letters are written."""

    acks: Literal["all", 1, 0] = Field(
        "all",
        description="'all': a result counts as written once every in-sync replica has it, and only then is its "
        "input committed. 1 or 0 trade that for latency: a result the leader alone had can be lost with it.",
    )
    linger_ms: int = Field(5, ge=0, description="How long the producer waits to fill a batch of results.")
    batch_size: int = Field(16_384, ge=0, description="Bytes per batch of results to one partition.")
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = Field(
        None, description="Compression of result batches; snappy, lz4 and zstd need their Python packages."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other KafkaProducer setting (enable_idempotence, delivery_timeout_ms, max_request_size, "
        "...); `<setting>_env` reads it from that environment variable.",
    )

    def check_codec(self) -> None:
        """Where the producer runs: is its compression codec installed?"""
        import kafka.codec

        v = self.compression_type
        if v is not None and not getattr(kafka.codec, f"has_{v}")():
            package = {"snappy": "python-snappy", "lz4": "lz4", "zstd": "zstandard"}[v]
            raise ConfigError(f"kafka.producer.compression_type {v} needs the Python package {package} on every node")

    @field_validator("options")
    @classmethod
    def _producer_only(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_one_client("kafka.producer.options", v, "producer")


class SchemaRegistrySettings(_Strict):
    """Where Avro and JSON Schema messages' schemas are (a Confluent-compatible schema registry)."""

    url: str = Field(description="The registry's URL, e.g. https://registry:8081.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="More settings of confluent-kafka's SchemaRegistryClient (basic.auth.user.info, "
        "ssl.ca.location, ...); `<setting>_env` reads it from that environment variable.",
    )


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
    value_format: Literal["json", "text", "avro", "json_schema"] = Field(
        "json",
        description="json: an object with text_field (and optionally id_field); text: the UTF-8 text itself; avro, "
        "json_schema: a record in a schema registry's wire format (needs schema_registry), then as json.",
    )
    schema_registry: SchemaRegistrySettings | None = Field(
        None,
        description="The schema registry of avro and json_schema messages (pip install labelfuse[schema-registry]).",
    )
    text_field: str = Field("text", description="JSON field holding the text.")
    id_field: str = Field("id", description="JSON field copied into the result as 'id' (optional in messages).")
    max_chars: int = Field(20_000, ge=1, description="Longer texts go to the dead-letter topic.")
    batch_size: int = Field(64, ge=1, le=64, description="Messages per batch through the graph (max_poll_records).")
    linger_ms: int = Field(
        50,
        ge=0,
        description="How long a poll waits for messages while batches are in flight (with none in flight, the "
        f"longer of this and {IDLE_POLL_MS} ms); a poll returns as soon as messages arrive.",
    )
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
        description="Settings of both the consumer and the producer, named as in kafka-python: security_protocol, "
        "sasl_mechanism, sasl_plain_username, ssl_cafile, ssl_certfile, ssl_keyfile, client_id, ... "
        "`<setting>_env` reads the value from that environment variable (sasl_plain_password_env: KAFKA_PASSWORD), "
        "so no secret sits in the file. An unknown name is an error.",
    )
    consumer: dict[str, Any] = Field(
        default_factory=dict,
        description="Consumer-only settings (fetch_max_bytes, isolation_level, ...; `<setting>_env` as in client). "
        "The ones this app sets (group_id, offsets, poll sizes and timeouts) have their own fields above.",
    )
    producer: ProducerSettings = Field(default_factory=ProducerSettings)

    @model_validator(mode="after")
    def _registry_formats(self) -> KafkaSettings:
        if self.value_format in ("avro", "json_schema") and self.schema_registry is None:
            raise ValueError(f"value_format {self.value_format} needs schema_registry: the registry's url")
        if self.schema_registry is not None and self.value_format not in ("avro", "json_schema"):
            raise ValueError("schema_registry is used by value_format avro or json_schema only")
        return self

    @field_validator("client")
    @classmethod
    def _common(cls, v: dict[str, Any]) -> dict[str, Any]:
        consumer, producer = _client_keys()
        hint = "not a setting of both clients: put it in kafka.consumer or kafka.producer.options"
        _check_options("kafka.client", v, consumer & producer, hint)
        for key in SECRETS:
            if key in v:
                log.warning("kafka.client.%s is in the settings file: use %s_env (an environment variable)", key, key)
        return v

    @field_validator("consumer")
    @classmethod
    def _consumer_only(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_one_client("kafka.consumer", v, "consumer")

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
    threads: int = Field(
        1, ge=1, description="CPU threads per Fusion replica: its encoder (ONNX Runtime or PyTorch, CPU)."
    )
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
