"""The tokenizer service: QueryBatches in; cached scores, or TokenBatches for the rest, out.

Per QueryBatch record (online and offline query topics, one consumer group):

    prepare (process pool: decode, validate, hash cache keys)   SchemaError -> DeadLetter "ingest"
      -> one cache lookup for every unit of the batch
      -> fully cached items: one ScoreBatch (cached=True) to the reply/score topic
      -> the rest: tokenize + pack in the pool -> TokenBatch(es) with cache_keys to the online
         or offline token topic
      -> returns once the broker acknowledged every message; only then is the offset committed

Without Redis nothing can hit, so the prepare call also tokenizes and packs (one pool round
trip per record, no lookup). The records' items stay in the pool processes: this process sees
header fields, item ids and digests, and moves encoded TokenBatches (see tokenizer_svc.pool).

A record from the offline query topic, or with priority "offline", goes to the offline token
topic (as priority "offline"), so that re-scoring backlogs never queue in front of online work;
offline tokenizing is also limited to `processes` calls at a time, so online records always
find a free tokenizer process soon. (When prepare also tokenizes, the limit applies to records
of the offline topic only: a record's priority is known once it is decoded.)

Following promotions (`follow`): the service switches the version its keys, look-ups and
cached scores are for at the promotion, as the workers start reloading onto it. A version with
the same tokenizer and max length is switched to in place. One with another tokenizer or max
length gets a pool of its own, started beside the serving one (which keeps tokenizing); then
the switch is one assignment: each record takes a snapshot of the serving version (manifest,
artifact, pool) when it starts and keeps it to the end, so records from the switch on use the
new pool, those in flight finish on the old, and the old pool is closed once the last of them
is done. A version with another head (pairs vs separate texts), a tokenizer that does not match
its manifest, or one that does not load, is refused: the old version keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import structlog
from aiokafka import ConsumerRecord

from engines.errors import ArtifactError
from engines.manifest import Manifest, read_manifest, swap_blockers
from engines.tokenizer import check_artifact_tokenizer
from plumbing.cache import CacheSettings, ResultCache
from plumbing.health import Health
from plumbing.kafka import KafkaSettings, ReplyTopicError, Topics
from plumbing.metrics import LATENCY_BUCKETS_S, Histogram, Labelled
from plumbing.pipeline import (
    PipelineSettings,
    RecordPipeline,
    UndeliverableError,
    consumer_metrics,
)
from schemas import (
    DEFAULT_LIMITS,
    EMBEDDING_FORMATS,
    EmbeddingFormat,
    ItemScore,
    Limits,
    SchemaError,
    ScoreBatch,
    Timings,
    encode_scores_to_fit,
)
from tokenizer_svc.pool import (
    Prepared,
    ServingPools,
    ServingVersion,
    Tokenized,
    TokenizerPool,
    TokenizerSpec,
)
from tokenizer_svc.units import cached_score

log = structlog.get_logger(__name__)


class TokenizerServiceError(RuntimeError):
    """The service cannot start: its artifact or tokenizer is missing or inconsistent."""


@dataclass(frozen=True, slots=True)
class TokenizerServiceSettings:
    kafka: KafkaSettings
    topics: Topics
    cache: CacheSettings
    artifact: Path  # engine artifact: only its manifest and tokenizer are used here
    limits: Limits = DEFAULT_LIMITS
    processes: int = 2  # tokenizer processes
    group_id: str = "qscore-tokenizer"
    max_in_flight: int = 256  # QueryBatch records being worked on; fetching pauses beyond
    # Items per tokenizer call: a big batch is cut into chunks that run in parallel processes
    # (and bound each call's memory); every chunk's TokenBatches share the batch_id.
    tokenize_chunk: int = 256
    # Shell-style patterns a QueryBatch's reply_topic must match; (): topics.reply_patterns().
    reply_topics: tuple[str, ...] = ()
    # How scores carry embeddings for QueryBatches that do not say (schemas.scores).
    embedding_format: EmbeddingFormat = "float"

    def __post_init__(self) -> None:
        for name in ("processes", "max_in_flight", "tokenize_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embedding_format not in EMBEDDING_FORMATS:
            raise ValueError(f"embedding_format must be one of {EMBEDDING_FORMATS}, "
                             f"not {self.embedding_format!r}")


@dataclass(slots=True)
class TokenizerStats:
    batches: int = 0  # QueryBatches handled (decoded)
    items: int = 0
    cached_items: int = 0
    tokenized_items: int = 0
    sequences: int = 0
    truncated: int = 0
    token_batches: int = 0
    score_batches: int = 0
    dead_letters: int = 0  # any stage, as the pipeline published them
    tokenize_seconds: float = 0.0  # in tokenizer processes: tokenize + pack (per-stage time)
    # Per record with cache hits: from its submitted_at (the producer's clock) until its
    # outputs, cached scores first, were acknowledged (the workers time the scored rest).
    cached_e2e_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))


@dataclass(slots=True)
class FollowStats:
    """The "follow" metrics group (the text fields are for `metrics()` readers and logs; the
    Prometheus collector exports the numbers)."""

    follows: int = 0  # promotions switched to
    new_pools: int = 0  # ... of which with another tokenizer or max length: a new pool
    follows_refused: int = 0  # promotions refused (the old version kept serving)
    last_refusal: str = ""  # "<version>: <why>"
    serving_version: str = ""
    tokenizer_id: str = ""
    retiring_pools: int = 0  # replaced pools still finishing their records


class TokenizerService:
    """Runs the tokenizer stage: `start()`, `run()` (or burst: `run(idle_exit_s=...)`),
    `request_stop()` to drain, `stop()`; also `async with`."""

    def __init__(self, settings: TokenizerServiceSettings, *, name: str = "tokenizer") -> None:
        self.settings = settings
        self.name = name
        manifest = read_manifest(settings.artifact)
        try:
            tokenizer_json = check_artifact_tokenizer(settings.artifact, manifest)
        except ArtifactError as exc:
            raise TokenizerServiceError(str(exc)) from None
        # Where new records go; switched by a followed promotion (see the module docstring).
        self.pools = ServingPools(ServingVersion(manifest, settings.artifact,
                                                 self._new_pool(tokenizer_json, manifest)))
        self.cache = ResultCache(settings.cache, manifest.version)
        t = settings.topics
        self.pipeline = RecordPipeline(
            settings.kafka, [t.queries, t.queries_offline],
            PipelineSettings(group_id=settings.group_id, max_in_flight=settings.max_in_flight),
            stage="tokenize", dead_letter_topic=t.dead_letter, limits=settings.limits, name=name,
            reply_patterns=settings.reply_topics or t.reply_patterns())
        self._stats = TokenizerStats()
        self._offline_calls = asyncio.Semaphore(settings.processes)
        self._lookups = settings.cache.redis_url is not None  # else nothing can hit
        # Set before start() to follow the model's promoted version (the registry's pointer,
        # polled every `follow_poll_s`): cache look-ups and cached scores switch to it at the
        # promotion, as the workers start reloading onto it.
        self.follow: Callable[[], Path | None] | None = None
        self.follow_poll_s = 5.0
        self._follow_task: asyncio.Task[None] | None = None
        self._refused_version: str | None = None
        self._following = asyncio.Lock()  # one follow at a time: one new pool at a time
        self._follow_stats = FollowStats()

    @property
    def serving(self) -> ServingVersion:
        return self.pools.serving

    @property
    def manifest(self) -> Manifest:
        """The serving version's manifest: what records that start now are handled for."""
        return self.serving.manifest

    @property
    def pool(self) -> TokenizerPool:
        """The serving version's pool: where records that start now are tokenized."""
        return self.serving.pool

    def _new_pool(self, tokenizer_json: Path, manifest: Manifest) -> TokenizerPool:
        s = self.settings
        return TokenizerPool(TokenizerSpec(
            tokenizer_json=tokenizer_json, max_length=manifest.max_length,
            pairs=manifest.head == "classifier", model_version=manifest.version,
            limits=s.limits, embedding_format=s.embedding_format), s.processes)

    def metrics(self) -> dict[str, Callable[[], object]]:
        """Sources of the service's Prometheus metrics (plumbing.metrics.serve_metrics)."""
        return {
            "tokenizer": lambda: self.stats,
            "pipeline": lambda: self.pipeline.stats,
            "cache": lambda: self.cache.stats,
            "pool": lambda: {"restarts": self.pools.restarts,
                             "in_flight": self.pipeline.tracker.in_flight()},
            "follow": lambda: self.follow_stats,
            "consumer": lambda: consumer_metrics((self.pipeline,)),
            "version": self._version_info,
        }

    def _version_info(self) -> dict[str, Labelled]:
        """An info gauge (1): the version whose keys and cached scores this service serves;
        state "pinned" without `follow`."""
        m = self.manifest
        labels = (m.model_id, m.version, "serving" if self.follow is not None else "pinned")
        return {"info": Labelled(("model_id", "serving", "state"), {labels: 1}, gauge=True)}

    @property
    def follow_stats(self) -> FollowStats:
        f = self._follow_stats
        f.serving_version, f.tokenizer_id = self.manifest.version, self.manifest.tokenizer_id
        f.retiring_pools = self.pools.retiring
        return f

    @property
    def stats(self) -> TokenizerStats:
        self._stats.dead_letters = self.pipeline.stats.dead_letters
        return self._stats

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.pool.start()
        try:
            await self.cache.start()
            await self.pipeline.start()
        except BaseException:
            await self.cache.close()
            await self.pool.close()
            raise
        if self.follow is not None:
            self._follow_task = asyncio.create_task(self._follow_loop(),
                                                    name=f"{self.name}-follow")
        m = self.manifest
        log.info("tokenizer.started", model_id=m.model_id, version=m.version, head=m.head,
                 max_length=m.max_length, tokenizer_id=m.tokenizer_id,
                 processes=self.settings.processes,
                 topics=list(self.pipeline.topics), group_id=self.settings.group_id)

    def request_stop(self) -> None:
        """Stop fetching; `run` finishes what is in flight, commits and returns."""
        self.pipeline.request_stop()

    def health(self) -> Health:
        """For /healthz and /readyz (plumbing.health), asked on the loop: not live once the
        pipeline failed; ready once the tokenizer processes are up and the consumer joined
        with an assignment (an empty one counts), until it drains."""
        p = self.pipeline
        if p.failure is not None:
            return Health(False, False, f"failed: {type(p.failure).__name__}: {p.failure}")
        if self.pool.tokenizer_id is None:
            return Health(True, False, "starting the tokenizer processes")
        if p.draining:
            return Health(True, False, "draining")
        if not p.assigned:
            return Health(True, False, f"waiting for a partition assignment: {p.name}")
        return Health(True, True, "ok")

    async def run(self, *, idle_exit_s: float | None = None) -> None:
        """Serve until `request_stop()`, or in burst mode until nothing arrived for
        `idle_exit_s` and nothing is in flight."""
        await self.pipeline.run(self._handle, idle_exit_s=idle_exit_s)

    async def stop(self) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow_task
        try:
            await self.pipeline.stop()
        finally:
            await self.cache.close()
            await self.pools.close()
        log.info("tokenizer.stopped", version=self.manifest.version,
                 follows=self._follow_stats.follows, **_public(self.stats))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def retired(self) -> None:
        """Wait until every pool a switch replaced is closed (its last record done)."""
        await self.pools.retired()

    # -- following promotions --------------------------------------------------------------
    async def _follow_loop(self) -> None:
        while True:
            try:
                await self.follow_once()
            except Exception as exc:  # a registry hiccup: try again next poll
                log.warning("tokenizer.follow_error", error=f"{type(exc).__name__}: {exc}",
                            hint=f"tried again in {self.follow_poll_s} s")
            await asyncio.sleep(self.follow_poll_s)

    async def follow_once(self) -> bool:
        """Switch to the promoted version if it is another one this service can serve; True
        when it switched. Another tokenizer or max length: a new pool is started first, beside
        the serving one. Another head, a tokenizer that does not match its manifest or does not
        load: refused (the old version keeps serving, and this version is not tried again
        until another is promoted)."""
        assert self.follow is not None
        async with self._following:
            return await self._follow(self.follow)

    async def _follow(self, current: Callable[[], Path | None]) -> bool:
        path = await asyncio.to_thread(current)
        old = self.serving
        if path is None or path.name in (old.manifest.version, self._refused_version):
            return False
        try:
            new = await asyncio.to_thread(read_manifest, path)
            tokenizer_json = await asyncio.to_thread(check_artifact_tokenizer, path, new)
        except ArtifactError as exc:
            return self._refuse(path.name, str(exc), "rebuild or re-copy the artifact")
        if new.head != old.manifest.head:
            return self._refuse(path.name, f"its head is {new.head}, the serving version's "
                                f"{old.manifest.head}: its TokenBatches differ in kind",
                                "restart the tokenizer (and workers) onto this version")
        pool = old.pool
        if swap_blockers(old.manifest, new):  # another tokenizer or max length
            pool = self._new_pool(tokenizer_json, new)
            log.info("tokenizer.follow_starting_pool", serving=old.manifest.version,
                     promoted=new.version, tokenizer_id=new.tokenizer_id,
                     max_length=new.max_length)
            try:
                await pool.start()  # cancelled (stop): it closes its processes itself
            except Exception as exc:
                return self._refuse(path.name, f"its tokenizer does not load: {exc}",
                                    "rebuild the artifact")
        self._switch(ServingVersion(new, path, pool))
        return True

    def _refuse(self, version: str, reason: str, hint: str) -> bool:
        self._refused_version = version
        f = self._follow_stats
        f.follows_refused += 1
        f.last_refusal = f"{version}: {reason}"
        log.error("tokenizer.follow_refused", serving=self.manifest.version, promoted=version,
                  reason=reason, hint=hint)
        return False

    def _switch(self, new: ServingVersion) -> None:
        old = self.serving
        self._refused_version = None
        self._follow_stats.follows += 1
        replaced = new.pool is not old.pool
        self._follow_stats.new_pools += replaced
        log.info("tokenizer.follow", old=old.manifest.version, new=new.manifest.version,
                 new_pool=replaced, tokenizer_id=new.manifest.tokenizer_id,
                 max_length=new.manifest.max_length,
                 old_records_in_flight=self.pools.records(old.pool))
        self.pools.switch(new)

    # -- per record ------------------------------------------------------------------------
    async def _handle(self, record: ConsumerRecord) -> None:
        with self.pools.use() as serving:  # one version for the whole record
            await self._handle_with(record, serving)

    async def _handle_with(self, record: ConsumerRecord, serving: ServingVersion) -> None:
        started = time.perf_counter()
        m, pool = serving.manifest, serving.pool
        data = record.value or b""
        offline_topic = record.topic == self.settings.topics.queries_offline
        # Without Redis the cache cannot hit (its in-process LRU is filled only by what Redis
        # returned; this service never writes it), so the prepare call tokenizes too: one
        # round trip per record. With Redis, only the misses are tokenized, by a second call.
        upto = 0 if self._lookups else self.settings.tokenize_chunk
        limit = self._offline_calls if upto and offline_topic else contextlib.nullcontext()
        try:
            async with limit:
                prepared = await pool.prepare(data, offline_topic=offline_topic,
                                              tokenize_upto=upto, model_version=m.version)
        except SchemaError as exc:
            await self.pipeline.dead_letter(record, exc, "ingest")
            return
        try:
            await self.pipeline.check_reply(prepared.reply_topic)
        except (ReplyTopicError, UndeliverableError) as exc:
            await self.pipeline.dead_letter(record, exc, "ingest")
            return
        offline = offline_topic or prepared.priority == "offline"
        if prepared.tokenize_error is not None:
            raise prepared.tokenize_error
        n_items = prepared.n_items
        if prepared.tokenized is not None:
            hits: list[ItemScore] = []
            misses: np.ndarray | None = None  # all
        else:
            values = await self.cache.get_many(prepared.keys.lookup(), version=m.version)
            hits, misses = _split_hits(prepared, values, m)
        n_misses = n_items if misses is None else len(misses)
        self._stats.batches += 1
        self._stats.items += n_items
        self._stats.cached_items += len(hits)
        self._stats.tokenized_items += n_misses
        key = prepared.batch_id.encode()
        sends: list[asyncio.Future[object]] = []
        try:
            if hits:  # first, and not waiting for the misses: the point of the cache is latency
                sends += await self._publish_cached(prepared, hits, started, key, m)
            if n_misses:
                sends += await self._publish_tokens(pool, data, prepared, misses, offline,
                                                    offline_topic, key)
            await asyncio.gather(*sends)
            if hits:
                self._stats.cached_e2e_seconds.observe(
                    max(0.0, time.time() - prepared.submitted_at))
        except BaseException:
            # Whatever was already sent is still awaited, so no ack is left unobserved.
            with contextlib.suppress(BaseException):
                await asyncio.gather(*sends, return_exceptions=True)
            raise
        log.debug("tokenizer.batch", batch_id=prepared.batch_id, items=n_items,
                  cached=len(hits), tokenized=n_misses, offline=offline,
                  ms=round((time.perf_counter() - started) * 1000, 2))

    async def _publish_cached(self, prepared: Prepared, hits: list[ItemScore], started: float,
                              key: bytes, m: Manifest) -> list[asyncio.Future[object]]:
        now = time.time()
        scores = ScoreBatch(
            batch_id=prepared.batch_id, items=tuple(hits), model_id=m.model_id,
            produced_at=now,
            timings=Timings(tokenize_ms=(time.perf_counter() - started) * 1000,
                            total_ms=max(0.0, (now - prepared.submitted_at) * 1000)),
            embedding_format=prepared.embedding_format)
        topic = prepared.reply_topic or self.settings.topics.scores
        sends = []
        for message in encode_scores_to_fit(scores, self.settings.limits):
            sends.append(await self.pipeline.send(topic, message, key=key))
            self._stats.score_batches += 1
        return sends

    async def _publish_tokens(self, pool: TokenizerPool, data: bytes, prepared: Prepared,
                              misses: np.ndarray | None, offline: bool, offline_topic: bool,
                              key: bytes) -> list[asyncio.Future[object]]:
        if prepared.tokenized is not None:
            results: Sequence[Tokenized] = (prepared.tokenized,)
        else:
            chunk = self.settings.tokenize_chunk
            n = prepared.n_items if misses is None else len(misses)
            parts: list[np.ndarray | None] = [misses] if n <= chunk else [
                (np.arange(n) if misses is None else misses)[i:i + chunk]
                for i in range(0, n, chunk)]
            results = await asyncio.gather(*(
                self._tokenize(pool, data, prepared, part, offline, offline_topic)
                for part in parts))
        topics = self.settings.topics
        topic = topics.tokens_offline if offline else topics.tokens
        sends = []
        for result in results:
            self._stats.sequences += result.sequences
            self._stats.truncated += result.truncated
            self._stats.tokenize_seconds += result.tokenize_ms / 1000
            for message in result.messages:
                sends.append(await self.pipeline.send(topic, message, key=key))
                self._stats.token_batches += 1
        return sends

    async def _tokenize(self, pool: TokenizerPool, data: bytes, prepared: Prepared,
                        items: np.ndarray | None, offline: bool,
                        offline_topic: bool) -> Tokenized:
        limit = self._offline_calls if offline else contextlib.nullcontext()
        async with limit:
            return await pool.tokenize(data, prepared.keys, items, offline_topic=offline_topic)


def _split_hits(prepared: Prepared, values: list[bytes | None],
                manifest: Manifest) -> tuple[list[ItemScore], np.ndarray | None]:
    """Cached ItemScores, and the indices of the items that must be tokenized (None: all)."""
    if values.count(None) == len(values):  # nothing hit: no per-item work
        return [], None
    hits: list[ItemScore] = []
    misses: list[int] = []
    at = 0
    for index, (item_id, n_docs) in enumerate(zip(prepared.item_ids,
                                                  prepared.keys.n_docs.tolist(), strict=True)):
        units = max(n_docs, 1)  # every doc, or the query alone
        score = cached_score(item_id, n_docs, values[at:at + units], manifest.head,
                             manifest.version)
        at += units
        if score is None:
            misses.append(index)
        else:
            hits.append(score)
    return hits, np.asarray(misses, dtype=np.int64)


def _public(stats: TokenizerStats) -> dict[str, float]:
    return {f: v for f in stats.__dataclass_fields__
            if isinstance(v := getattr(stats, f), int | float)}  # not the histograms
