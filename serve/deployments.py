"""The deployments of the labelfuse Serve graph (wired together in :mod:`serve.app`).

Each loads only the part of the bundle it runs (:class:`fusion.bundle.Bundle`):

- **Fusion**: the HTTP API (:mod:`serve.http`) and the model's encoder-only path in one replica: the
  encoder and the fusion head. A text the gate keeps from the LLMs is answered without leaving the
  replica; every hop between Serve processes costs a short text more CPU than the model does
  (docs/scaling.md). Texts are batched across requests (``@serve.batch``, sized by the
  number of texts, not requests), and the encoder runs with ``threads`` CPU threads per replica,
  inline: Serve runs user code on its own event-loop thread, so the replica keeps taking requests
  meanwhile (they join the next batch). Handing each batch to a worker thread instead cost 30% of
  single-text HTTP throughput here (GIL hand-offs).
  The bundle is set through ``user_config`` (``{"bundle": path}``): a new bundle is loaded next to
  the old one and swapped in when ready, so a rollout drops no request; a bundle with the same encoder
  reuses the loaded one. When the path is a model registry (:mod:`fusion.registry`), Fusion serves
  its champion and checks it every ``registry_poll_s``: a promotion or rollback rolls out alone.
  Each request runs entirely on the bundle it started with: Fusion names the bundle to the Scorer,
  which keeps the LLM panels of the last two bundles. When the Scorer fails, the answer degrades to
  the encoder-only path with the error reported.
- **Scorer**: the LLM panel and its few-shot pool, called only for the texts the gate sends (or
  ``llm: all``). Every call is reserved with one named ledger actor (budget, concurrency, rates)
  shared by all replicas.
- **Labels** (with ``label_store``): writes people's labels (POST /v1/feedback, a Kafka labels
  topic) and the LLM answers Fusion paid for to the label store, many callers per part.
- **KafkaTagger**: tags Kafka topics through Fusion, and reads a labels topic into Labels
  (:mod:`serve.kafka`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from fusion.bundle import Bundle
from fusion.config import LLMMode
from fusion.texts import text_id
from serve.http import http_api
from serve.metrics import KafkaMetrics, LabelMix, LLMMetrics, LoopMetrics, TextMetrics
from serve.settings import parse_settings

if TYPE_CHECKING:
    from fusion.head import FusionHead

log = logging.getLogger("ray.serve")

EMBED_BATCH = 64  # texts per encoder call, summed over the requests batched together. The encoder sorts them by
# length and runs forward passes of its encoder.batch_size (32; raise it for GPUs): one pass over 64 short texts,
# all padded to the longest, ran 80 texts/s on one CPU thread where passes of 32 ran 105 (24-word bbc openings)
KEEP_MODELS = 2  # bundles a replica keeps loaded: the current one and the one rolling out
CALL_RATE_WINDOW = 1000  # texts over which a Fusion replica reports its gate's recent LLM-call rate
KEPT_IDS = 10_000  # LLM answers a Fusion replica remembers having kept (a repeated text is kept once)
# the encoder is the work, and a request carries 1 to EMBED_BATCH texts: 2 waiting means a queue
FUSION_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 5}


@dataclass(frozen=True)
class BundleRef:
    """Which bundle a request runs on: where it is, its content version, and its encoder's identity."""

    path: str
    version: str
    encoder_key: str


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


def _n_texts(items: list[tuple[Any, list[str]]]) -> int:
    return sum(len(texts) for _, texts in items)


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=32,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
)
class Scorer:
    """The bundle's LLM panel (cache and few-shot pool included), bounded by one shared ledger actor."""

    def __init__(self, ledger_name: str):
        self.ledger_name = ledger_name
        self._panels = _Lru()
        self._ledger: Any = None
        self.metrics = LLMMetrics()

    def _load(self, ref: BundleRef) -> Any:
        from data_jobs.common import NAMESPACE
        from data_jobs.ledger import shared_ledger

        bundle = Bundle.open(ref.path)
        # detached: the ledger must outlive the replica that happened to create it
        ledger = shared_ledger(self.ledger_name, bundle.config.llm_limits, namespace=NAMESPACE, detached=True)
        self._ledger = ledger.actor
        return bundle.panel(ledger)

    async def warm(self, ref: BundleRef) -> None:
        await self._panels.get(ref.version, lambda: self._load(ref))

    async def budget(self, ref: BundleRef) -> dict[str, float] | None:
        """The shared ledger's budget, spent and left (None without a budget)."""
        panel = await self._panels.get(ref.version, lambda: self._load(ref))
        if panel.limits.budget_usd is None:
            return None
        snap = await self._ledger.snapshot.remote()
        return {k: snap[k] for k in ("budget_usd", "spent_usd")} | {
            "left_usd": max(0.0, snap["budget_usd"] - snap["spent_usd"])
        }

    async def score(self, ref: BundleRef, texts: list[str], emb: np.ndarray) -> dict[str, Any]:
        """{name: ScoreBatch} for every LLM of the bundle."""
        panel = await self._panels.get(ref.version, lambda: self._load(ref))
        _, batches = await panel.ascore_missing(texts, emb)
        ledger = None
        if panel.limits.budget_usd is not None:  # the gauge needs it; skip the round trip otherwise
            try:
                ledger = await self._ledger.snapshot.remote()
            except Exception:  # the ledger actor is unreachable: no gauge this time (the LLM calls say why)
                pass
        self.metrics.observe(batches, ledger)
        return batches


@dataclass
class _Model:
    encoder: Any  # fusion.encoder.TextEncoder
    head: FusionHead
    ref: BundleRef
    info: dict[str, Any]
    mix: LabelMix  # this model's recent predictions beside its training labels (drift)


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    num_replicas=1,
    max_ongoing_requests=512,
)
class Labels:
    """Writes the label store (:mod:`fusion.labelstore`): people's labels from POST /v1/feedback and the LLM
    answers the app paid for. Concurrent writes are grouped into one parquet part (``@serve.batch``), and a
    caller hears "kept" only once its part is on disk, so a replica that dies loses nothing it acknowledged;
    a retried label (same id) is counted once by the store."""

    def __init__(self, store: str):
        from fusion.labelstore import LabelStore

        self.store = LabelStore(store)
        self._texts: dict[str, str] = {}  # text_id -> text: what feedback may refer to by id
        self._indexed: str | None = None  # the newest part read into _texts
        self._stats: tuple[float, dict[str, Any]] | None = None
        self.metrics = LoopMetrics()

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.02)
    async def add(self, items: list[list[Any]]) -> list[int]:
        """Each item is a list of LabelRecords; one part for the whole batch."""
        records = [r for item in items for r in item]
        await asyncio.to_thread(self.store.append, records)
        self._stats = None
        for r in records:
            if r.text_id:
                self._texts[r.text_id] = r.text
        self.metrics.labels_kept(records)
        return [len(item) for item in items]

    async def text_of(self, text_id: str) -> str | None:
        """The text the store has seen under ``text_id`` (None when none)."""
        if text_id not in self._texts:
            parts = await asyncio.to_thread(self.store.parts)
            if parts and parts[-1] != self._indexed:
                df = await asyncio.to_thread(self.store.records, ["text_id", "text"], self._indexed)
                self._texts.update(zip(df["text_id"], df["text"], strict=True))
                self._indexed = parts[-1]
        return self._texts.get(text_id)

    async def stats(self) -> dict[str, Any]:
        """The store's counts (:meth:`LabelStore.stats`): this replica's writes at once, others' within 10 s."""
        if self._stats is None or time.monotonic() - self._stats[0] > 10:
            stats = await asyncio.to_thread(self.store.stats)
            self._stats = (time.monotonic(), {"uri": self.store.uri, **stats})
            self.metrics.store_size(stats)
        return self._stats[1]


def _info(bundle: Bundle, head: FusionHead) -> dict[str, Any]:
    """GET /v1/model's answer (serve.schemas.ModelInfo) for a bundle."""
    cfg, val = bundle.config, bundle.manifest.get("metrics", {}).get("validation", {})
    return {
        "model_version": bundle.version,
        "bundle": bundle.path,
        "loaded_at": time.time(),
        "classes": head.classes,
        "multilabel": head.multilabel,
        "encoder": bundle.encoder_reference,
        "llms": [{"name": c.name, "provider": c.provider, "model": c.model} for c in cfg.llms],
        "gating": {"enabled": cfg.gating.enabled, "threshold": head.gate_threshold},
        "validation": {k: val[k] for k in ("accuracy", "macro_f1", "micro_f1", "ece") if k in val},
    }


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=128,  # a request waits in the replica's batch queue, where texts join the next batch
    max_queued_requests=256,  # at the HTTP proxy; beyond it: 503 with Retry-After
    backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
    autoscaling_config=FUSION_AUTOSCALING,
)
@serve.ingress()
class Fusion:
    """The HTTP API and the model: embed → gate → LLM scores (the Scorer) → head → results.

    A text the encoder cannot embed, or the head gives no finite probabilities, fails alone; an encoder
    that fails on a known-good text fails the replica's health check."""

    def __init__(
        self,
        scorer: DeploymentHandle,
        settings: dict[str, Any],
        labels: DeploymentHandle | None = None,
        tagger: DeploymentHandle | None = None,
    ):
        import os

        from fusion.errors import ConfigError

        self.scorer, self.labels, self.tagger = scorer, labels, tagger
        self.settings = parse_settings(settings)  # its encoder runs `threads` threads (Ray sets OMP_NUM_THREADS=1)
        self.token = None
        if env := self.settings.auth_token_env:
            self.token = os.environ.get(env, "").strip()
            if not self.token:
                raise ConfigError(f"auth_token_env is {env!r} but that environment variable is empty on this node")
        self.model: _Model | None = None
        self._broken: str | None = None
        self._registry: str | None = None
        self._poll_s = 5.0
        self._follower: asyncio.Task | None = None
        self._swap = asyncio.Lock()
        self._asked: deque[bool] = deque(maxlen=CALL_RATE_WINDOW)  # the gate's recent decisions
        self._n_asked = 0  # how many of them asked the LLMs
        self._kept: OrderedDict[str, None] = OrderedDict()  # LLM answers recently kept (label ids)
        self.metrics = LoopMetrics()

    def __serve_build_asgi_app__(self) -> Any:
        return http_api(self, self.settings, self.token, self.tagger, self.labels)

    def check_health(self) -> None:
        if self._broken:
            raise RuntimeError(self._broken)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        from fusion.errors import ConfigError
        from fusion.registry import is_registry

        path = user_config.get("bundle")
        if not isinstance(path, str) or not path:
            raise ConfigError("Fusion's user_config needs 'bundle': the model bundle directory or URI, or a registry")
        self._poll_s = float(user_config.get("registry_poll_s", 5.0))
        self._registry = path if await asyncio.to_thread(is_registry, path) else None
        await self._load(path)
        if self._registry and self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _load(self, path: str, if_moved: bool = False) -> None:
        """Load the bundle at ``path`` (or the registry's champion) and swap it in once its parts are warm;
        ``if_moved``: only if that is another directory than the live model's (a registry's version directories
        never change, and opening one checks every file's checksum: seconds for a fine-tuned encoder)."""
        from fusion.registry import resolve_bundle

        async with self._swap:
            bundle_dir = str(await asyncio.to_thread(resolve_bundle, path))
            if if_moved and self.model is not None and self.model.ref.path == bundle_dir:
                return
            bundle = await asyncio.to_thread(Bundle.open, bundle_dir)
            ref = BundleRef(bundle_dir, bundle.version, bundle.encoder_key)
            if self.model is not None and self.model.ref == ref:
                return
            head = bundle.head()
            # load the new encoder / LLM panel before the swap, so the first requests do not wait for it
            old = self.model
            if old is not None and old.ref.encoder_key == ref.encoder_key:
                encoder = old.encoder  # a retrained head on the same encoder
            else:
                encoder = await asyncio.to_thread(bundle.encoder, threads=self.settings.threads)
            if head.layout.n_llms:
                await self.scorer.warm.remote(ref)
            share = bundle.manifest.get("training", {}).get("label_share")
            mix = LabelMix(head.classes, share)
            self.model = _Model(encoder, head, ref, _info(bundle, head), mix)
            self.metrics.serving(ref.version, old.ref.version if old else None)
            log.info("model %s from %s is live (was %s)", ref.version, bundle_dir, old.ref.version if old else None)

    async def _follow(self) -> None:
        """Roll out the registry's champion whenever it changes (a promotion or a rollback)."""
        while True:
            await asyncio.sleep(self._poll_s)
            if self._registry is None:
                continue
            try:
                await self._load(self._registry, if_moved=True)
            except Exception:  # a half-copied or broken champion: keep serving the current one
                log.exception("could not roll out the champion of %s; still serving the current model", self._registry)

    def _current(self) -> _Model:
        if self.model is None:
            raise RuntimeError("no model loaded yet")
        return self.model

    def _call_rate(self) -> float | None:
        return round(self._n_asked / len(self._asked), 4) if self._asked else None

    async def info(self) -> dict[str, Any]:
        """The model's description, the registry it follows and its gate's recent LLM-call rate."""
        return {**self._current().info, "registry": self._registry, "llm_call_rate": self._call_rate()}

    async def stats(self) -> dict[str, Any]:
        """What this replica's recent predictions look like (GET /v1/stats): label mix, drift, LLM use, budget."""
        m = self._current()
        budget = None
        if m.head.layout.n_llms:
            try:
                budget = await self.scorer.budget.remote(m.ref)
            except Exception as err:  # the figures must not fail with the Scorer
                log.warning("no budget figures: %s: %s", type(err).__name__, err)
        train = m.mix.train
        return {
            "model_version": m.ref.version,
            "window": len(m.mix.window),
            "label_mix": m.mix.share(),
            "training_label_mix": dict(zip(m.mix.classes, train, strict=True)) if train else None,
            "drift_psi": m.mix.psi(),
            "llm_call_rate": self._call_rate(),
            "budget": budget,
        }

    async def classify(self, texts: list[str], llm: LLMMode = "auto", record: bool = True) -> dict[str, Any]:
        """Labels, probabilities, LLM use and cost for ``texts``; ``llm``: auto (the model's gate), off, all.
        ``record=False`` (readiness probes) keeps the texts out of the call rate and the label mix.

        A text that fails alone (the encoder cannot embed it, the head gives no finite probabilities)
        gets ``{"error": reason}`` in its place, the reason completing "text ..."; the others are answered.
        """
        m = self._current()  # this request runs on one bundle even if a new one goes live meanwhile
        start = time.perf_counter()
        chunks = [texts[i : i + EMBED_BATCH] for i in range(0, len(texts), EMBED_BATCH)]
        parts = await asyncio.gather(*(self._embed((m, c)) for c in chunks))
        reasons = [r for _, rs in parts for r in rs]
        ok = np.array([i for i, r in enumerate(reasons) if r is None], dtype=int)
        results: list[dict[str, Any]] = [{"error": r} for r in reasons]
        cost = 0.0
        if len(ok):
            emb = np.concatenate([e for e, _ in parts])[ok]
            answers = await self._answer(m, [texts[i] for i in ok], emb, llm, record)
            for i, res in zip(ok, answers, strict=True):
                results[i] = res if "error" in res else {**res, "text_id": text_id(texts[i])}
                cost += res.get("llm_cost_usd", 0.0)
        return {
            "model_version": m.ref.version,
            "results": results,
            "llm_cost_usd": cost,
            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
        }

    @serve.batch(max_batch_size=EMBED_BATCH, batch_wait_timeout_s=0.005, batch_size_fn=_n_texts)
    async def _embed(self, items: list[tuple[_Model, list[str]]]) -> list[tuple[np.ndarray, list[str | None]]]:
        """Each item is (model, up to EMBED_BATCH texts); per item, (embeddings, per-text failure reasons).
        Texts of concurrent requests share one encoder call per encoder (two during a rollout)."""
        from fusion.errors import EncoderError

        out: list[Any] = [None] * len(items)
        for key in dict.fromkeys(m.ref.encoder_key for m, _ in items):
            members = [i for i, (m, _) in enumerate(items) if m.ref.encoder_key == key]
            texts = [t for i in members for t in items[i][1]]
            try:
                emb, reasons = items[members[0]][0].encoder.embed_each(texts)
            except EncoderError as err:  # not the texts' fault: Serve replaces this replica
                self._broken = str(err)
                raise
            start = 0
            for i in members:
                end = start + len(items[i][1])
                out[i] = (emb[start:end], reasons[start:end])
                start = end
        return out

    async def _answer(
        self, m: _Model, texts: list[str], emb: np.ndarray, llm: LLMMode, record: bool = True
    ) -> list[dict[str, Any]]:
        ask = m.head.ask(emb, llm)
        idx = np.flatnonzero(ask)
        scores: dict[str, np.ndarray] = {}
        batches: dict[str, Any] = {}
        scorer_error = None
        if len(idx):
            try:
                batches = await self.scorer.score.remote(m.ref, [texts[i] for i in idx], emb[idx])
                scores = {name: b.scores for name, b in batches.items()}
            except Exception as err:  # degrade to the encoder-only path, and say so
                scorer_error = f"LLM scorer unavailable: {type(err).__name__}: {err}"[:500]
                log.warning("%s", scorer_error)
        if record and m.head.layout.n_llms:
            for a in ask:  # keep the window's count as texts come and go: no sum over the window per request
                if len(self._asked) == self._asked.maxlen:
                    self._n_asked -= self._asked[0]
                self._asked.append(bool(a))
                self._n_asked += bool(a)
            self.metrics.call_rate(self._n_asked / len(self._asked))
        results = m.head.fuse(emb, ask, scores, batches).results()
        if record:
            m.mix.add(results)
            self.metrics.drift(m.mix.psi())
        if batches and self.labels is not None:
            await self._keep_answers(m, [texts[i] for i in idx], batches)
        if scorer_error:
            for i in idx:
                if "error" not in results[i]:
                    results[i]["llm_error"] = "; ".join(filter(None, [results[i]["llm_error"], scorer_error]))
        return results

    async def _keep_answers(self, m: _Model, texts: list[str], batches: dict[str, Any]) -> None:
        """Every LLM answer this request used goes to the label store once (the loop learns from them).
        A store that fails costs the loop those answers, never the request its answer."""
        from fusion.labelstore import llm_labels
        from fusion.llm.prompts import PROMPT_VERSION

        records = []
        for name, b in batches.items():
            for r in llm_labels(
                texts,
                b.scores,
                m.head.classes,
                m.head.multilabel,
                llm=name,
                prompt_version=PROMPT_VERSION,
                bundle_version=m.ref.version,
                origin="serve",
            ):
                if r.key not in self._kept:
                    records.append(r)
                    self._kept[r.key] = None
        while len(self._kept) > KEPT_IDS:
            self._kept.popitem(last=False)
        if not records:
            return
        try:
            await self.labels.add.remote(records)  # type: ignore[union-attr]
        except Exception as err:
            for r in records:
                self._kept.pop(r.key, None)  # not kept: try again when they come back
            self.metrics.labels_lost(len(records))
            log.warning(
                "could not keep %d LLM answers in the label store: %s: %s", len(records), type(err).__name__, err
            )


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    num_replicas=1,
    health_check_period_s=5,
    graceful_shutdown_timeout_s=60,
)
class KafkaTagger:
    """Tags Kafka messages in real time through Fusion; replicas share one consumer group."""

    def __init__(self, settings: dict[str, Any], labels: DeploymentHandle | None = None):
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        from serve.kafka import GraphUnavailable, LabelsLoop, TaggerLoop
        from serve.settings import KafkaSettings, client_options

        # by name: Fusion serves GET /v1/kafka from this deployment, so it cannot also be bound in here
        context = serve.get_replica_context()
        fusion = serve.get_deployment_handle(Fusion.name, app_name=context.app_name)
        s = KafkaSettings.model_validate(settings)
        for where, options in (
            ("client", s.client),
            ("consumer", s.consumer),
            ("producer.options", s.producer.options),
        ):
            client_options(options, f"kafka.{where}")  # an unset secret variable fails the deployment, saying which
        s.producer.check_codec()
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

        replica = context.replica_id.unique_id
        self.loop = TaggerLoop(s, classify, name=f"tagger-{replica}", metrics=KafkaMetrics())
        self.loops = [self.loop]
        if s.labels_topic and labels is not None:
            self._labels_loop = lambda: LabelsLoop(
                s,
                keep=lambda records: labels.add.remote(records).result(timeout_s=timeout),
                text_of=lambda tid: labels.text_of.remote(tid).result(timeout_s=timeout),
                model=lambda: fusion.info.remote().result(timeout_s=timeout),
                name=f"labels-{replica}",
            )
            self.loops.append(self._labels_loop())
        for loop in self.loops:
            loop.start()

    def check_health(self) -> None:
        if not self.loop.alive:
            raise RuntimeError(f"the Kafka loop {self.loop.name} stopped: {self.loop.stats()['error']}")
        if len(self.loops) > 1 and not self.loops[1].alive:
            # the label store or the labels topic failed, not the tagging: start that loop again (it resumes
            # from its last commit) at the next health check, rather than replacing the replica and its tagger
            log.warning("the Kafka loop %s stopped (%s); starting it again", self.loops[1].name,
                        self.loops[1].stats()["error"])  # fmt: skip
            self.loops[1] = self._labels_loop()
            self.loops[1].start()

    def stats(self) -> dict[str, Any]:
        return self.loop.stats()

    async def __del__(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(loop.stop) for loop in self.loops))
