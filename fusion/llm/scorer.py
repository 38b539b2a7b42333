"""LLM scorers: per-class scores for many texts, concurrent, cached, budgeted and retried.

:class:`LLMScorer` scores texts with one configured LLM; :class:`LLMPanel` runs every
configured LLM over the same texts with one shared ledger and cache. A text whose call
fails (out of retries, over budget, an answer that is not a valid score) gets a NaN score
row and an error string: the fusion model then answers from the encoder alone for that
text and reports ``llm_used=false``. Nothing is ever filled in with made-up scores.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fusion.config import LLMLimitsConfig, LLMScorerConfig
from fusion.errors import ConfigError, LabelfuseError
from fusion.llm import prompts
from fusion.llm.cache import ScoreCache, cache_key
from fusion.llm.ledger import Ledger, LocalLedger, acquire, settle
from fusion.llm.prompts import Example, InvalidAnswer
from fusion.llm.providers import Endpoint, resolve_endpoint

if TYPE_CHECKING:
    from fusion.fewshot import ExamplePool

log = logging.getLogger(__name__)

TOP_LOGPROBS = 20
NO_LOGPROBS_SWITCH = 3  # answers in a row without logprobs after which mode "auto" asks for JSON instead
MESSAGE_OVERHEAD_TOKENS = 8  # chat-template tokens per message, for the worst-case estimate


class LLMCallError(LabelfuseError):
    """One text could not be scored (recorded per text, not raised to the caller)."""


@dataclass
class UsageStats:
    texts: int = 0
    calls: int = 0  # HTTP requests that returned an answer (retried attempts not counted)
    attempts: int = 0
    cache_hits: int = 0
    errors: int = 0
    over_budget: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spent_usd: float = 0.0  # for calls made in this run (cache hits cost nothing now)
    latencies: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies) if self.latencies else None
        return {
            "texts": self.texts,
            "llm_calls": self.calls,
            "attempts": self.attempts,
            "cache_hits": self.cache_hits,
            "errors": self.errors,
            "over_budget": self.over_budget,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "spent_usd": round(self.spent_usd, 6),
            "latency_mean_s": None if lat is None else round(float(lat.mean()), 4),
            "latency_p95_s": None if lat is None else round(float(np.percentile(lat, 95)), 4),
        }


@dataclass
class ScoreBatch:
    """Scores of one LLM for a list of texts."""

    name: str
    scores: np.ndarray  # (n, n_classes) float32, NaN rows where the LLM gave no score
    cost_usd: np.ndarray  # (n,) list-price cost of each text's answer (also for cache hits)
    errors: list[str | None]
    stats: UsageStats

    @property
    def used(self) -> np.ndarray:
        return ~np.isnan(self.scores).any(axis=1)


def _retry_after(err: Exception) -> float | None:
    """Seconds from a ``retry-after-ms`` / ``Retry-After`` header (seconds or an HTTP date)."""
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    if ms := headers.get("retry-after-ms"):
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # unparseable: fall back to our own backoff
    return max(0.0, when.timestamp() - time.time())


def _is_retryable(err: Exception) -> bool:
    import openai

    if isinstance(err, (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError)):
        return True
    return isinstance(err, openai.APIStatusError) and (err.status_code >= 500 or err.status_code in (408, 409))


class LLMScorer:
    """Scores texts with one LLM. Construct it at startup: a missing API key fails here."""

    def __init__(
        self,
        cfg: LLMScorerConfig,
        classes: Sequence[str],
        multilabel: bool,
        limits: LLMLimitsConfig | None = None,
        *,
        ledger: Ledger | None = None,
        cache: ScoreCache | None = None,
        descriptions: Mapping[str, str] | None = None,
    ):
        """``descriptions``: a one-line description per class name, told to the LLM with the classes."""
        self.cfg = cfg
        self.name = cfg.name
        self.classes = list(classes)
        self.descriptions = {c: descriptions[c] for c in self.classes if c in descriptions} if descriptions else {}
        self.multilabel = multilabel
        self.limits = limits or LLMLimitsConfig()
        self.endpoint: Endpoint = resolve_endpoint(cfg)
        self.keys = prompts.answer_keys(self.classes)
        if cfg.mode == "logprobs" and (multilabel or not self.keys):
            why = "multilabel tasks" if multilabel else f"{len(self.classes)} classes (more than 26)"
            raise ConfigError(f"LLM {cfg.name!r}: mode 'logprobs' does not support {why}; use 'json' or 'auto'")
        self.mode = (
            "logprobs" if cfg.mode == "logprobs" or (cfg.mode == "auto" and not multilabel and self.keys) else "json"
        )
        self.answer_model = prompts.answer_model(self.classes)
        self.ledger = ledger or LocalLedger.from_limits(self.limits)
        self.cache = cache
        self._local: Any = None
        self._no_logprobs = 0  # answers in a row without logprobs (mode auto)

    # -- request shape --------------------------------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        return 1 if self.mode == "logprobs" else (self.cfg.json_max_tokens or 12 * len(self.classes) + 16)

    def messages(self, text: str, examples: Sequence[Example] = ()) -> list[dict[str, str]]:
        if self.mode == "logprobs":
            return prompts.multiclass_messages(
                text, self.classes, self.keys, self.cfg.max_words, examples, self.descriptions
            )
        return prompts.json_messages(
            text, self.classes, self.multilabel, self.cfg.max_words, examples, self.descriptions
        )

    def _request(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        req: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        if self.mode == "logprobs":
            req.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        else:
            req["response_format"] = prompts.json_schema(self.classes)
        return req

    def _key_parts(self, examples: Sequence[Example]) -> dict[str, Any]:
        return {
            "provider": self.cfg.provider,
            "endpoint": self.endpoint.base_url if self.cfg.provider != "local" else "in-process",
            "model": self.cfg.model,
            "prompt": prompts.PROMPT_VERSION,
            "classes": self.classes,
            "multilabel": self.multilabel,
            "mode": self.mode,
            "max_words": self.cfg.max_words,
            "gen": {"max_tokens": self.max_tokens, "temperature": 0.0, "top_logprobs": TOP_LOGPROBS},
            "examples": [[e.text, list(e.labels)] for e in examples],
        } | ({"descriptions": self.descriptions} if self.descriptions else {})

    def _worst_case(self, messages: list[dict[str, str]]) -> tuple[int, float]:
        """(estimated tokens for rate limits, upper-bound cost in $ for the budget).

        A BPE token covers at least one byte, so prompt bytes bound prompt tokens."""
        prompt_bytes = sum(len(m["content"].encode("utf-8")) + MESSAGE_OVERHEAD_TOKENS for m in messages)
        return prompt_bytes // 4 + self.max_tokens, self.endpoint.cost(prompt_bytes, self.max_tokens)

    # -- calls ----------------------------------------------------------------------------------------------
    def _base_url(self) -> str:
        if self.endpoint.base_url is not None:
            return self.endpoint.base_url
        from fusion.llm.local import shared_server

        if self._local is None:
            self._local = shared_server(self.cfg.model, parallel=min(self.limits.max_concurrency, 4))
        return self._local.base_url

    def _client(self) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(
            base_url=self._base_url(), api_key=self.endpoint.api_key, max_retries=0, timeout=self.limits.timeout_s
        )

    def _backoff(self, attempt: int, err: Exception) -> float:
        hinted = _retry_after(err)
        if hinted is not None:
            return min(hinted, self.limits.retry_max_s) + random.uniform(0, 0.1)
        cap = min(self.limits.retry_max_s, self.limits.retry_base_s * 2**attempt)
        return random.uniform(cap / 2, cap)  # exponential backoff with jitter

    async def _call(self, client: Any, messages: list[dict[str, str]], stats: UsageStats) -> tuple[Any, int, int]:
        """One answered request, retried on 429/5xx/timeouts. Returns (response, prompt, completion tokens)."""
        import openai

        est, max_cost = self._worst_case(messages)
        for attempt in range(self.limits.max_retries + 1):
            grant = await acquire(self.ledger, est, max_cost)
            if grant is None:
                stats.over_budget += 1
                raise LLMCallError("over budget: the LLM budget cannot cover this call")
            stats.attempts += 1
            start = time.perf_counter()
            try:
                resp = await client.chat.completions.create(**self._request(messages))
            except asyncio.CancelledError:
                # The caller went away (an HTTP client hung up, a job was stopped) with the request sent: the
                # provider may bill it, so charge the reservation, and free the slot now rather than after
                # `reservation_timeout_s`. Not awaited: a cancelled task must not wait on the ledger.
                self.ledger.settle(grant.id, grant.tokens, max_cost)
                raise
            except Exception as err:
                await settle(self.ledger, grant, 0, 0.0)  # failed requests are not billed
                if isinstance(err, (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)):
                    raise ConfigError(
                        f"LLM {self.name!r} at {self._base_url()} refused the request "
                        f"({type(err).__name__}): check the API key, model name and base_url"
                    ) from None
                if not _is_retryable(err) or attempt == self.limits.max_retries:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise LLMCallError(f"{type(err).__name__}{tries}: {err}") from None
                delay = self._backoff(attempt, err)
                log.info("LLM %s: %s, retry %d in %.2fs", self.name, type(err).__name__, attempt + 1, delay)
                await asyncio.sleep(delay)
                continue
            latency = time.perf_counter() - start
            usage = resp.usage
            pt = int(getattr(usage, "prompt_tokens", 0) or 0)
            ct = int(getattr(usage, "completion_tokens", 0) or 0)
            cost = self.endpoint.cost(pt, ct)
            if cost > max_cost:
                log.warning(
                    "LLM %s reported %d+%d tokens, more than the reserved bound ($%.6f > $%.6f): "
                    "the budget can be exceeded by the difference",
                    self.name,
                    pt,
                    ct,
                    cost,
                    max_cost,
                )
            await settle(self.ledger, grant, pt + ct, cost)
            stats.calls += 1
            stats.prompt_tokens += pt
            stats.completion_tokens += ct
            stats.spent_usd += cost
            stats.latencies.append(latency)
            return resp, pt, ct
        raise AssertionError("unreachable")

    def _parse(self, resp: Any) -> np.ndarray:
        choice = resp.choices[0]
        if self.mode == "logprobs":
            content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
            if not content:
                raise InvalidAnswer("the endpoint returned no logprobs")
            top = [(t.token, t.logprob) for t in content[0].top_logprobs]
            return prompts.logprobs_to_distribution(top, self.classes, self.keys)
        return prompts.parse_json_answer(choice.message.content, self.classes, self.answer_model)

    async def _score_one(
        self, client: Any, text: str, examples: Sequence[Example], stats: UsageStats
    ) -> tuple[np.ndarray, int, int]:
        """Scores for one text and the tokens it took (both calls, if JSON was asked twice)."""
        messages = self.messages(text, examples)
        resp, pt, ct = await self._call(client, messages, stats)
        try:
            scores = self._parse(resp)
            self._no_logprobs = 0
            return scores, pt, ct
        except InvalidAnswer as err:
            if self.mode == "logprobs" and "no logprobs" in str(err) and self.cfg.mode == "auto":
                # one text can get no logprobs (a first token that is half an emoji): it fails alone. Only an
                # endpoint that gives none several times in a row switches the scorer to JSON answers.
                self._no_logprobs += 1
                if self._no_logprobs < NO_LOGPROBS_SWITCH:
                    raise LLMCallError(f"invalid answer: {err}") from None
                log.warning("LLM %s gives no logprobs; switching to JSON answers", self.name)
                self.mode = "json"
                scores, pt2, ct2 = await self._score_one(client, text, examples, stats)
                return scores, pt + pt2, ct + ct2
            if self.mode != "json":
                raise LLMCallError(f"invalid answer: {err}") from None
            log.info("LLM %s: invalid JSON answer (%s), asking once more", self.name, err)
        resp, pt2, ct2 = await self._call(client, messages, stats)  # JSON mode: one retry on an invalid answer
        try:
            return self._parse(resp), pt + pt2, ct + ct2
        except InvalidAnswer as err:
            raise LLMCallError(f"invalid answer twice: {err}") from None

    async def score(
        self,
        texts: Sequence[str],
        examples: Sequence[Sequence[Example]] | None = None,
        progress: bool = False,
    ) -> ScoreBatch:
        """Score every text; texts already in the cache make no call."""
        n, k = len(texts), len(self.classes)
        scores = np.full((n, k), np.nan, dtype=np.float32)
        cost = np.zeros(n, dtype=np.float64)
        errors: list[str | None] = [None] * n
        stats = UsageStats(texts=n)
        k_shot = self.cfg.few_shot
        ex = [tuple(examples[i][-k_shot:]) if examples and k_shot else () for i in range(n)]  # the nearest
        keys = [cache_key(self._key_parts(ex[i]), texts[i]) for i in range(n)]
        cached = self.cache.get_many(set(keys)) if self.cache is not None and self.limits.cache else {}
        todo = []
        for i, key in enumerate(keys):
            hit = cached.get(key)
            if hit is not None and hit.scores.shape == (k,):
                scores[i] = hit.scores
                cost[i] = self.endpoint.cost(hit.prompt_tokens, hit.completion_tokens)
                stats.cache_hits += 1
            else:
                todo.append(i)
        if not todo:
            return ScoreBatch(self.name, scores, cost, errors, stats)

        sem = asyncio.Semaphore(self.limits.max_concurrency)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"LLM {self.name}", unit="text")

        async def one(i: int, client: Any) -> None:
            async with sem:
                try:
                    scores[i], pt, ct = await self._score_one(client, texts[i], ex[i], stats)
                    cost[i] = self.endpoint.cost(pt, ct)
                    if self.cache is not None and self.limits.cache:
                        self.cache.put(keys[i], scores[i], pt, ct)
                except LLMCallError as err:
                    errors[i] = str(err)
                    stats.errors += 1
                except ConfigError:
                    raise  # the LLM refused the key or model: not this text's doing
                except Exception as err:  # anything else fails this text alone, said in its llm_error
                    log.warning("LLM %s: unexpected error on one text", self.name, exc_info=True)
                    errors[i] = f"unexpected {type(err).__name__}: {err}"[:300]
                    stats.errors += 1
                finally:
                    if bar is not None:
                        bar.update(1)

        try:
            async with self._client() as client:
                await asyncio.gather(*(one(i, client) for i in todo))
        finally:
            if bar is not None:
                bar.close()
        if stats.errors:
            first = next(e for e in errors if e)
            log.warning("LLM %s: %d of %d texts got no score (first: %s)", self.name, stats.errors, n, first)
        return ScoreBatch(self.name, scores, cost, errors, stats)


def run_sync(coro: Any) -> Any:
    """Run a coroutine from sync code, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class LLMPanel:
    """Every configured LLM, sharing one ledger (budget, concurrency, rates) and one cache.

    With a few-shot ``pool``, :meth:`ascore_missing` picks each text's examples by its embedding."""

    def __init__(
        self,
        configs: Sequence[LLMScorerConfig],
        classes: Sequence[str],
        multilabel: bool,
        limits: LLMLimitsConfig | None = None,
        *,
        ledger: Ledger | None = None,
        cache: ScoreCache | None = None,
        pool: ExamplePool | None = None,
        descriptions: Mapping[str, str] | None = None,
    ):
        self.pool = pool
        self.few_shot = max((c.few_shot for c in configs), default=0)
        self.limits = limits or LLMLimitsConfig()
        self.ledger = ledger or LocalLedger.from_limits(self.limits)
        if cache is None and self.limits.cache:
            cache = ScoreCache(self.limits.cache_path)
        self.cache = cache
        self.scorers = [
            LLMScorer(c, classes, multilabel, self.limits, ledger=self.ledger, cache=cache, descriptions=descriptions)
            for c in configs
        ]

    async def ascore(
        self,
        texts: Sequence[str],
        examples: Sequence[Sequence[Example]] | None = None,
        progress: bool = False,
        only: Sequence[str] | None = None,
    ) -> dict[str, ScoreBatch]:
        """Score ``texts`` with every LLM (or those named in ``only``) at once.

        ``examples`` are few-shot candidates per text, nearest last; each LLM takes its
        ``few_shot`` nearest."""
        chosen = [s for s in self.scorers if only is None or s.name in only]
        batches = await asyncio.gather(*(s.score(texts, examples, progress) for s in chosen))
        return {b.name: b for b in batches}

    def score(
        self,
        texts: Sequence[str],
        examples: Sequence[Sequence[Example]] | None = None,
        progress: bool = False,
        only: Sequence[str] | None = None,
    ) -> dict[str, ScoreBatch]:
        return run_sync(self.ascore(texts, examples, progress, only))

    async def ascore_missing(
        self,
        texts: Sequence[str],
        emb: np.ndarray,
        given: Mapping[str, np.ndarray] | None = None,
        *,
        exclude: np.ndarray | None = None,
        progress: bool = False,
    ) -> tuple[dict[str, np.ndarray], dict[str, ScoreBatch]]:
        """Scores of every LLM not already ``given``: ({name: (n, k) scores}, {name: ScoreBatch}).

        ``emb`` (the texts' embeddings) picks the few-shot examples; ``exclude``: the pool row each
        text is, when the texts come from the pool itself (training)."""
        out = {k: np.asarray(v, dtype=np.float32) for k, v in (given or {}).items()}
        todo = [s.name for s in self.scorers if s.name not in out]
        if not todo or not len(texts):
            return out, {}
        examples = None
        if self.few_shot and self.pool is not None:
            examples = self.pool.neighbours(emb, self.few_shot, exclude)
        batches = await self.ascore(texts, examples, progress=progress, only=todo)
        out.update({name: b.scores for name, b in batches.items()})
        return out, batches

    def score_missing(
        self,
        texts: Sequence[str],
        emb: np.ndarray,
        given: Mapping[str, np.ndarray] | None = None,
        *,
        exclude: np.ndarray | None = None,
        progress: bool = False,
    ) -> tuple[dict[str, np.ndarray], dict[str, ScoreBatch]]:
        """:meth:`ascore_missing` for synchronous callers."""
        return run_sync(self.ascore_missing(texts, emb, given, exclude=exclude, progress=progress))
