"""Real-time Kafka tagging: consume input topics, classify through the graph, produce results.

One :class:`TaggerLoop` runs in a background thread of each ``KafkaTagger`` replica (see
:mod:`serve.app`); all replicas share one consumer group, so the partitions are split
between them. Per batch of polled messages:

1. decode each message; an undecodable or malformed one, or a text the text rule refuses
   (:mod:`fusion.texts`: empty, a lone surrogate, over-long), is routed to the dead-letter
   topic (original key and bytes, the reason in the ``labelfuse.error`` header) and never
   blocks its partition;
2. classify the rest through the Fusion deployment; a text that fails alone in the graph
   comes back with its reason and is dead-lettered too;
3. produce one JSON result per message to the output topic and wait for the acks;
4. commit the batch's offsets, in the order the batches were polled.

Offsets are committed only after every result (and dead letter) of the batch is
acknowledged, so a crash anywhere re-delivers instead of losing (at-least-once). At most
``max_in_flight`` batches are in the graph; beyond that the assigned partitions are paused
while the loop keeps polling, so a slow LLM never exceeds ``max.poll.interval.ms``.

A batch whose call fails is retried. If it still fails, each message is classified alone:
one that fails alone is dead-lettered (``failed_alone``), the others are tagged. Only a
failure of the whole graph stops the loop (``graph_failures``): a deployment that cannot be
reached or does not answer in time (:class:`GraphUnavailable`), or every message failing
alone while a known-good probe text fails too. The loop then stops without committing:
the replica reports unhealthy, Serve replaces it, and the new consumer starts from the
last commit.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fusion.texts import PROBE_TEXT, TextError, clean_text, load_json
from serve.settings import IDLE_POLL_MS, KafkaSettings

log = logging.getLogger("labelfuse.kafka")

ERROR_HEADER = "labelfuse.error"
SOURCE_HEADER = "labelfuse.source"
DROPPED_HEADER = "labelfuse.dropped"
Classify = Callable[[list[str]], dict[str, Any]]  # texts -> Fusion.classify's answer
COUNTERS = ("consumed", "tagged", "dead_lettered", "failed_alone", "graph_failures", "batches", "commits",
            "commit_failures", "retries", "pauses")  # fmt: skip
LABEL_COUNTERS = ("consumed", "kept", "dead_lettered", "batches", "commits", "commit_failures", "pauses")


class DeadLetter:
    """One dead letter on its way: whole, or, when the dead-letter topic cannot take it whole, without its key
    and value (the ``labelfuse.dropped`` header gives their size; ``labelfuse.source`` still points at the
    original). A dead letter that could never be sent would stop its partition for good, as the loop re-reads
    a batch whose acks failed. ``get`` waits for the ack, like the producer's futures."""

    def __init__(self, send: Callable[..., Any], record: Any, headers: list[tuple[str, bytes]]):
        self.send, self.record, self.headers = send, record, headers
        self.future = self._send(whole=True)

    def _send(self, whole: bool) -> Any:
        from kafka.errors import MessageSizeTooLargeError

        key, value = self.record.key, self.record.value
        if whole and (key is not None or value is not None):  # Kafka clients refuse a message with neither
            try:
                return self.send(key=key, value=value, headers=self.headers)
            except MessageSizeTooLargeError:  # over the producer's max_request_size
                pass
        dropped = str(len(key or b"") + len(value or b"")).encode()
        return self.send(key=None, value=b"", headers=[*self.headers, (DROPPED_HEADER, dropped)])

    def get(self, timeout: float) -> Any:
        from kafka.errors import MessageSizeTooLargeError

        try:
            return self.future.get(timeout=timeout)
        except MessageSizeTooLargeError:  # the broker refused it: over the topic's max.message.bytes
            return self._send(whole=False).get(timeout=timeout)


class GraphUnavailable(Exception):
    """The graph could not be asked at all (a deployment down, a timeout): never a message's fault."""


@dataclass
class Decoded:
    record: Any
    text: str | None = None
    id: Any = None
    error: str | None = None


class BadMessage(ValueError):
    """Why a message cannot be used (the dead letter's ``labelfuse.error`` header)."""


def message_text(raw: bytes | None) -> str:
    if raw is None:
        raise BadMessage("empty message (null value)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadMessage(f"value is not valid UTF-8 ({err.reason} at byte {err.start})") from None


def message_json(raw: bytes | None) -> Any:
    value = message_text(raw)
    try:
        return load_json(value)
    except json.JSONDecodeError as err:
        raise BadMessage(f"value is not valid JSON ({err.msg} at char {err.pos})") from None
    except ValueError as err:  # too deep, or an integer of over 4,300 digits
        raise BadMessage(f"value is not valid JSON ({str(err)[:100]})") from None


class RegistryUnavailable(GraphUnavailable):
    """The schema registry could not be asked: never a message's fault (the loop stops, uncommitted)."""


class RegistryDecoder:
    """Avro or JSON Schema values in a schema registry's wire format (a 0 byte, the 4-byte schema id, the
    payload), decoded by confluent-kafka's deserializers with the writer's schema fetched by id (and cached)."""

    def __init__(self, s: KafkaSettings):
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer
        from confluent_kafka.schema_registry.json_schema import JSONDeserializer

        from serve.settings import client_options

        reg = s.schema_registry
        assert reg is not None  # the settings' validator
        conf = {"url": reg.url, **client_options(reg.options, "kafka.schema_registry.options")}
        client = SchemaRegistryClient(conf)
        self._decode = (
            AvroDeserializer(client)
            if s.value_format == "avro"
            else JSONDeserializer(None, schema_registry_client=client)
        )

    def __call__(self, topic: str, raw: bytes | None) -> Any:
        from confluent_kafka.schema_registry.error import SchemaRegistryError
        from confluent_kafka.serialization import MessageField, SerializationContext

        if raw is None:
            raise BadMessage("empty message (null value)")
        if len(raw) < 5 or raw[0] != 0:
            raise BadMessage("value is not in the schema registry's wire format (a 0 byte, then a 4-byte schema id)")
        schema_id = int.from_bytes(raw[1:5], "big")
        try:
            return self._decode(raw, SerializationContext(topic, MessageField.VALUE))
        except SchemaRegistryError as err:
            if err.http_status_code == 404:  # the message names a schema the registry does not have
                raise BadMessage(f"schema id {schema_id}: {err.error_message}"[:500]) from None
            # down, or refusing the loop (401, 403, 429, ...): never the message's fault
            raise RegistryUnavailable(f"schema registry: HTTP {err.http_status_code}: {err}") from err
        except Exception as err:
            # the registry cannot be reached: a socket error, or the HTTP client's (httpx, or httpx2 in newer
            # confluent-kafka); anything else is the payload not matching its schema
            if isinstance(err, OSError) or type(err).__module__.startswith(("httpx", "httpcore")):
                raise RegistryUnavailable(f"schema registry unreachable: {type(err).__name__}: {err}") from err
            raise BadMessage(
                f"value does not decode with schema id {schema_id} ({type(err).__name__}: {err})"[:500]
            ) from None


def decode(record: Any, s: KafkaSettings, registry: RegistryDecoder | None = None) -> Decoded:
    """The text (and id) of one message, or why it cannot be classified."""
    msg_id = None
    try:
        if registry is not None:
            value = registry(record.topic, record.value)
        else:
            value = message_json(record.value) if s.value_format == "json" else message_text(record.value)
    except BadMessage as err:
        return Decoded(record, error=str(err))
    if s.value_format == "json" or not isinstance(value, str):  # an object (a registry record may be a string)
        if not isinstance(value, dict):
            return Decoded(record, error=f"JSON value is a {type(value).__name__}, expected an object")
        text, msg_id = value.get(s.text_field), value.get(s.id_field)
        if not isinstance(msg_id, str | int | float | bool | None):  # a registry record's bytes, dates, decimals
            msg_id = str(msg_id)
        if not isinstance(text, str):
            what = "missing" if text is None else f"a {type(text).__name__}, not a string"
            return Decoded(record, id=msg_id, error=f"field {s.text_field!r} is {what}")
    else:
        text = value
    try:
        return Decoded(record, text=clean_text(text, s.max_chars), id=msg_id)
    except TextError as err:
        return Decoded(record, id=msg_id, error=str(err))


def _key(record: Any) -> str | None:
    return None if record.key is None else record.key.decode("utf-8", errors="replace")


class TaggerLoop:
    """The consume → classify → produce → commit loop of one replica (runs in its own thread)."""

    def __init__(self, settings: KafkaSettings, classify: Classify, name: str = "tagger", metrics: Any = None):
        self.s = settings
        self.classify = classify
        self.name = name
        self.metrics = metrics  # serve.metrics.KafkaMetrics, or None
        self.registry = RegistryDecoder(settings) if settings.schema_registry is not None else None
        self.uncommitted = 0  # messages consumed whose offsets are not committed yet
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.assignment: list[str] = []
        self.topics, self.group_id = list(settings.input_topics), settings.group_id

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> TaggerLoop:
        self._thread = threading.Thread(target=self._run, name=f"labelfuse-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop polling, finish the batches in flight, commit, leave the group."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "replica": self.name,
                **self.counts,
                "uncommitted": self.uncommitted,
                "assignment": list(self.assignment),
                "alive": self.alive,
                "error": _str(self.error),
            }

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n
        if self.metrics is not None:
            self.metrics.count(key, n)

    def _uncommitted(self, delta: int) -> None:
        with self._lock:
            self.uncommitted += delta
        if self.metrics is not None:
            self.metrics.uncommitted(self.uncommitted)

    # -- clients -----------------------------------------------------------------------------------------
    def _clients(self) -> tuple[Any, Any]:
        from kafka import KafkaConsumer, KafkaProducer

        from serve.settings import client_options

        s = self.s
        common = client_options(s.client, "kafka.client")
        consumer = KafkaConsumer(
            *self.topics,
            bootstrap_servers=s.bootstrap_servers,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            max_poll_records=s.batch_size,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_interval_ms=s.max_poll_interval_ms,
            **common,
            **client_options(s.consumer, "kafka.consumer"),
        )
        p = s.producer
        producer = KafkaProducer(
            bootstrap_servers=s.bootstrap_servers,
            acks=p.acks,
            linger_ms=p.linger_ms,
            batch_size=p.batch_size,
            compression_type=p.compression_type,
            **common,
            **client_options(p.options, "kafka.producer.options"),
        )
        return consumer, producer

    # -- the loop ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        consumer = producer = None
        inflight: deque[tuple[Future[None], dict[Any, int], int]] = deque()
        pool = ThreadPoolExecutor(self.s.max_in_flight, thread_name_prefix=f"labelfuse-{self.name}-batch")
        try:
            consumer, producer = self._clients()
            log.info("%s: consuming %s as group %r", self.name, self.topics, self.group_id)
            while not self._stop.is_set():
                self._finish_done(consumer, inflight, block=False)
                full = len(inflight) >= self.s.max_in_flight
                if full:
                    if set(consumer.assignment()) - set(consumer.paused()):
                        self._count("pauses")
                    consumer.pause(*consumer.assignment())  # keep polling (group membership), fetch nothing
                elif consumer.paused():
                    consumer.resume(*consumer.paused())
                if full:
                    wait_ms = 100
                elif inflight:
                    wait_ms = self.s.linger_ms or 1
                else:  # nothing to commit: wait longer (records end a poll as they arrive) than waking 20 times a second
                    wait_ms = max(self.s.linger_ms, IDLE_POLL_MS)
                polled = consumer.poll(timeout_ms=wait_ms)
                with self._lock:
                    self.assignment = sorted(f"{tp.topic}:{tp.partition}" for tp in consumer.assignment())
                records = [r for batch in polled.values() for r in batch]
                if records:
                    self._count("consumed", len(records))
                    self._uncommitted(len(records))
                    offsets = {tp: batch[-1].offset + 1 for tp, batch in polled.items()}
                    inflight.append((pool.submit(self._process, records, producer), offsets, len(records)))
                elif full:
                    self._finish_done(consumer, inflight, block=True, timeout_s=0.1)
            # clean shutdown: no new polls; finish what is in flight, commit it, leave the group
            while inflight:
                self._finish_done(consumer, inflight, block=True, timeout_s=None)
        except BaseException as err:  # reported by check_health; Serve replaces the replica
            self.error = err
            log.exception("%s: stopped without committing the batches in flight", self.name)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            if consumer is not None:
                consumer.close(autocommit=False)  # leaves the group: its partitions move at once
            if producer is not None:
                producer.close(timeout=10)

    def _finish_done(self, consumer: Any, inflight: deque[Any], block: bool, timeout_s: float | None = 0.1) -> None:
        """Commit the oldest batches that are done, in poll order (offsets only move forward)."""
        from kafka.errors import CommitFailedError, KafkaError
        from kafka.structs import OffsetAndMetadata

        while inflight:
            fut, offsets, n = inflight[0]
            if not fut.done():
                if not block:
                    return
                try:
                    fut.result(timeout_s)
                except TimeoutError:
                    return
            inflight.popleft()
            fut.result()  # a batch that failed after its retries: stop here, nothing more is committed
            try:
                consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
                self._count("commits")
            except (CommitFailedError, KafkaError) as err:
                # the partitions moved to another replica (rebalance): it re-reads from the last commit,
                # so these results may appear twice; nothing is lost
                self._count("commit_failures")
                log.warning("%s: commit failed after a rebalance (%s); the batch may be re-delivered", self.name, err)
            self._uncommitted(-n)  # committed, or now another replica's to commit
            block = False

    def _process(self, records: list[Any], producer: Any) -> None:
        """Classify one batch and produce its results and dead letters; returns once all are acked."""
        s = self.s
        decoded = [decode(r, s, self.registry) for r in records]
        good = [d for d in decoded if d.error is None]
        answers = self._classify_each([d.text for d in good]) if good else []
        futures = []
        tagged = alone = 0
        for d, (res, version) in zip(good, answers, strict=True):
            if res.get("error"):
                d.error = f"text {res['error']}"
                alone += 1
                continue
            r = d.record
            out = {
                "key": _key(r),
                "id": d.id,
                "topic": r.topic,
                "partition": r.partition,
                "offset": r.offset,
                "model_version": version,
                **res,
            }
            futures.append(producer.send(s.output_topic, key=r.key, value=json.dumps(out).encode()))
            tagged += 1
        futures += self._dead_letters(producer, [(d.record, d.error) for d in decoded if d.error is not None])
        self._wait(futures)
        self._count("tagged", tagged)
        self._count("dead_lettered", len(decoded) - tagged)
        self._count("failed_alone", alone)
        self._count("batches")

    def _dead_letters(self, producer: Any, bad: list[tuple[Any, str]]) -> list[DeadLetter]:
        """Send each (message, reason) to the dead-letter topic: original key and bytes, the reason in a header."""
        out = []
        for r, reason in bad:
            headers = [(ERROR_HEADER, reason.encode()), (SOURCE_HEADER, f"{r.topic}:{r.partition}:{r.offset}".encode())]
            out.append(DeadLetter(lambda **m: producer.send(self.s.dead_letter_topic, **m), r, headers))
        return out

    def _wait(self, futures: list[Any]) -> None:
        deadline = time.monotonic() + self.s.produce_timeout_s
        for f in futures:
            f.get(timeout=max(0.1, deadline - time.monotonic()))  # raises if a message was not acknowledged

    def _classify_each(self, texts: list[str]) -> list[tuple[dict[str, Any], str | None]]:
        """(result, model version) per text; a result with ``error`` failed alone (see the module doc)."""
        try:
            answer = self._classify(texts)
            return [(r, answer["model_version"]) for r in answer["results"]]
        except GraphUnavailable:
            self._count("graph_failures")
            raise
        except Exception as err:
            log.warning("%s: a batch of %d failed after its retries (%s); classifying each alone", self.name,
                        len(texts), err)  # fmt: skip
            batch_err = err
        out: list[tuple[dict[str, Any], str | None]] = []
        for t in texts:
            try:
                answer = self.classify([t])
                out.append((answer["results"][0], answer["model_version"]))
            except GraphUnavailable:
                self._count("graph_failures")
                raise
            except Exception as err:
                out.append(({"error": f"failed alone in the model ({type(err).__name__}: {err})"[:500]}, None))
        if all(r.get("error") for r, _ in out):
            try:
                self.classify([PROBE_TEXT])  # a known-good text: if it fails too, the graph is at fault
            except Exception:
                self._count("graph_failures")
                raise batch_err from None
        return out

    def _classify(self, texts: list[str]) -> dict[str, Any]:
        for attempt in range(self.s.max_retries + 1):
            try:
                return self.classify(texts)
            except Exception as err:
                if attempt == self.s.max_retries:
                    raise
                self._count("retries")
                delay = min(0.5 * 2**attempt, 10.0)
                log.warning("%s: classifying a batch failed (%s); retry in %.1f s", self.name, err, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


class LabelsLoop(TaggerLoop):
    """People's labels from ``labels_topic`` into the label store (:mod:`serve.feedback`'s rules).

    The same consume → process → commit loop as the tagger, in its own consumer group: a batch's
    labels are written to the store (one part) and its bad messages dead-lettered with the reason
    before its offsets are committed. A store that cannot be written stops the loop without
    committing (the replica is replaced and the batch re-read); labels are idempotent by their id
    (``feedback:<id>``), so a re-read batch is kept once."""

    def __init__(
        self,
        settings: KafkaSettings,
        keep: Callable[[list[Any]], None],
        text_of: Callable[[str], str | None],
        model: Callable[[], dict[str, Any]],
        name: str = "labels",
    ):
        super().__init__(settings, classify=lambda texts: {}, name=name)
        assert settings.labels_topic is not None
        self.topics, self.group_id = [settings.labels_topic], f"{settings.group_id}-labels"
        self.keep, self.text_of, self.model = keep, text_of, model
        self.counts = dict.fromkeys(LABEL_COUNTERS, 0)

    def _process(self, records: list[Any], producer: Any) -> None:
        from fusion.errors import DataError
        from serve import feedback as fb

        info = self.model()
        kept, bad = [], []
        for r in records:
            try:
                req = fb.parse(message_json(r.value))
                text, labels = fb.check(req, info["classes"], info["multilabel"], self.s.max_chars)
                if text is None:
                    text = self.text_of(req.text_id or "")
                    if text is None:
                        raise DataError(f"text_id {req.text_id!r} is not in the label store; send the text")
                kept.append(fb.record(req, text, labels, f"kafka:{r.topic}"))
            except (DataError, BadMessage) as err:
                bad.append((r, str(err)[:500]))
        if kept:
            self.keep(kept)  # raises when the store cannot be written: nothing is committed
        self._wait(self._dead_letters(producer, bad))
        self._count("kept", len(kept))
        self._count("dead_lettered", len(bad))
        self._count("batches")


def _str(err: BaseException | None) -> str | None:
    return None if err is None else f"{type(err).__name__}: {err}"
