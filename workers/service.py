"""The scoring worker: TokenBatches in, ScoreBatches out, cache written, then offsets committed.

Two record pipelines (online and offline token topics, separate consumer groups so an offline
backlog can neither hold online fetches nor their in-flight slots) feed one MicroBatcher; a
dispatcher hands batches to free EnginePool slots. A record's handler waits for its scores,
writes the cache and publishes them; only then does its pipeline count the offset as finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NoReturn

import numpy as np
import structlog
from aiokafka import ConsumerRecord

from engines.errors import EngineDead
from engines.manifest import Manifest, swap_blockers
from engines.protocol import Engine
from engines.tokenizer import artifact_tokenizer_json, artifact_vocab_size
from plumbing.cache import CacheSettings, ResultCache
from plumbing.health import Health
from plumbing.kafka import KafkaSettings, Topics
from plumbing.metrics import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS_S, Histogram, Labelled
from plumbing.pipeline import PipelineSettings, RecordPipeline, consumer_metrics
from schemas import (
    DEFAULT_LIMITS,
    KEY_BYTES,
    Limits,
    ScoreArrays,
    Timings,
    TokenBatch,
    decode_token_batch,
    encode_score_arrays,
)
from workers.assemble import score_arrays
from workers.microbatcher import BatcherSettings, MicroBatch, MicroBatcher, Priority
from workers.pool import EnginePool, Slot, SlotRetired
from workers.reload import Reloader

log = structlog.get_logger(__name__)


class WorkerInputError(ValueError):
    """A TokenBatch this worker's engine cannot score (another tokenizer or head, too long,
    token ids outside the vocabulary)."""


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    kafka: KafkaSettings
    topics: Topics = field(default_factory=Topics)
    batcher: BatcherSettings = field(default_factory=BatcherSettings)
    limits: Limits = DEFAULT_LIMITS
    group_id: str = "qscore-worker"
    max_in_flight: int = 256  # online TokenBatches being worked on
    max_in_flight_offline: int = 32
    # Where scores are written through for the tokenizer to find (Redis); None, or settings
    # without a redis_url: no cache writes (nothing else would read them).
    cache: CacheSettings | None = None
    # Shell-style patterns a TokenBatch's reply_topic must match; (): topics.reply_patterns().
    reply_topics: tuple[str, ...] = ()
    # An engine call that takes longer is stuck (a hung GPU): the engine is declared dead.
    # Generous: a CPU engine on an oversubscribed host can be very slow without being stuck.
    engine_timeout_s: float = 300.0
    # After a swap onto another tokenizer, the old engines keep scoring the old tokenizer's
    # TokenBatches (those still in the topics) until none has arrived for this long.
    transition_idle_s: float = 120.0


@dataclass(slots=True)
class WorkerStats:
    messages: int = 0
    items: int = 0
    batches: int = 0  # engine calls
    sequences: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    score_batches: int = 0
    cache_writes: int = 0
    engine_errors: int = 0
    engine_retries: int = 0  # batches run again after their engine died
    bisections: int = 0  # failed batches split in two and run again
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))
    # Per TokenBatch: from its QueryBatch's submitted_at (the producer's clock) until all of
    # its scores were acknowledged by the broker.
    e2e_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))

    @property
    def mean_batch_size(self) -> float:
        return self.sequences / self.batches if self.batches else 0.0


class ScoringWorker:
    def __init__(self, settings: WorkerSettings, engines: Sequence[Engine], *,
                 name: str = "worker") -> None:
        self.settings = settings
        # Engine generations: a reload (swap) adds one. Each TokenBatch is checked against,
        # scored by and labelled with the generation serving when it arrived; an old
        # generation's pool is closed once its last batch is done.
        self.generation = 0
        self.pools: dict[int, EnginePool] = {
            0: EnginePool(engines, call_timeout_s=settings.engine_timeout_s)}
        self._open: Counter[int] = Counter()  # records in flight per generation
        self._retired: dict[int, asyncio.Event] = {}  # old generations still draining
        # Old generations kept for another tokenizer's TokenBatches: when one last arrived.
        self._legacy: dict[int, float] = {}
        self._legacy_task: asyncio.Task[None] | None = None
        self.swaps = 0
        # The worker only writes the cache (the tokenizer reads it): without Redis there is no
        # reader, and with it an in-process LRU here would hold entries nobody asks for.
        self.cache = (None if settings.cache is None or settings.cache.redis_url is None
                      else ResultCache(replace(settings.cache, local_entries=0),
                                       self.manifest.version))
        # Token ids are checked against the generation's vocabulary before any engine call,
        # on every backend (None: engines without an artifact on disk, as in tests).
        self._vocab: dict[int, int | None] = {0: _vocab_size(engines)}
        self.batcher = MicroBatcher(settings.batcher)
        self.stats = WorkerStats()
        self.name = name
        # A dead engine pool is the worker's failure, not the record's: no dead letter.
        common = {"stage": "score", "dead_letter_topic": settings.topics.dead_letter,
                  "limits": settings.limits, "fatal": (EngineDead,),
                  "reply_patterns": settings.reply_topics or settings.topics.reply_patterns()}
        self.online = RecordPipeline(
            settings.kafka, [settings.topics.tokens],
            PipelineSettings(group_id=settings.group_id, max_in_flight=settings.max_in_flight),
            name=f"{name}-online", **common)  # type: ignore[arg-type]
        # Offline work is not latency-bound: poll its idle topic gently (a short fetch wait
        # is pure broker CPU when nothing is there).
        offline_kafka = replace(settings.kafka, fetch_max_wait_ms=max(
            settings.kafka.fetch_max_wait_ms, 100))
        self.offline = RecordPipeline(
            offline_kafka, [settings.topics.tokens_offline],
            PipelineSettings(group_id=f"{settings.group_id}.offline",
                             max_in_flight=settings.max_in_flight_offline),
            name=f"{name}-offline", **common)  # type: ignore[arg-type]
        self._dispatcher: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # retired pools being closed
        # Set before start() to follow the registry's promotions (workers.reload).
        self.reloader: Reloader | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._sample = (time.monotonic(), 0)  # (when, batcher.submitted) of the last sample
        self._running: set[asyncio.Task[None]] = set()
        self.failure: EngineDead | None = None  # set when no engine is left

    def load_sample(self) -> tuple[float, int]:
        """(arrival rate / capacity since the last sample, queued sequences): what a reload
        waits on. Capacity is measured: sequences per busy second of the serving pool's
        slots, times its slots (none measured yet: an idle worker counts as 0 load)."""
        now, submitted = time.monotonic(), self.batcher.submitted
        then, before = self._sample
        self._sample = (now, submitted)
        rate = (submitted - before) / (now - then) if now > then else 0.0
        stats = self.pool.slot_stats
        busy = sum(s.busy_s for s in stats)
        capacity = sum(s.sequences for s in stats) / busy * self.pool.size if busy else 0.0
        load = rate / capacity if capacity else (0.0 if rate == 0 else 1.0)
        return load, self.batcher.depth()

    @property
    def pool(self) -> EnginePool:
        """The serving generation's pool: where new TokenBatches are scored."""
        return self.pools[self.generation]

    @property
    def manifest(self) -> Manifest:
        return self.pool.manifest

    @property
    def vocab_size(self) -> int | None:
        return self._vocab[self.generation]

    async def swap(self, engines: Sequence[Engine]) -> int:
        """Serve `engines` from now on (a loaded, checked new version): TokenBatches that
        arrive from here are scored by them; those already queued or running finish on the
        old engines, which are closed once the last of them is done. Returns the new
        generation.

        A version with another tokenizer or max length is a transition: the old engines stay
        (for the old tokenizer's TokenBatches still in the topics) until none has arrived for
        `transition_idle_s`. Raises ValueError for another head (its scores mean something
        else: restart the worker onto it)."""
        new = EnginePool(engines, call_timeout_s=self.settings.engine_timeout_s)
        old = self.manifest
        m = new.manifest
        clash = swap_blockers(old, m)
        if "head" in clash:
            await new.close()
            raise ValueError(f"version {m.version} differs from the serving {old.version} in "
                             f"{', '.join(clash)}: its scores differ in kind, so it cannot be "
                             "swapped in while serving (restart the worker onto it)")
        previous = self.generation
        self.generation += 1
        self.pools[self.generation] = new
        self._vocab[self.generation] = _vocab_size(engines)
        self.swaps += 1
        if clash:  # another tokenizer: both are served for a while
            self._legacy[previous] = time.monotonic()
            if self._legacy_task is None or self._legacy_task.done():
                self._legacy_task = asyncio.create_task(self._retire_legacy(),
                                                        name=f"{self.name}-legacy")
        else:
            self._retired[previous] = asyncio.Event()
        log.info("engine_swapped", old=old.version, new=m.version, generation=self.generation,
                 old_records_in_flight=self._open[previous], differs=clash or None)
        self._maybe_close(previous)
        return self.generation

    async def _retire_legacy(self) -> None:
        """Retire old-tokenizer generations once none of their TokenBatches came for a while."""
        idle = self.settings.transition_idle_s
        while self._legacy:
            await asyncio.sleep(min(idle / 4, 5.0))
            now = time.monotonic()
            for generation, seen in list(self._legacy.items()):
                if now - seen >= idle:
                    del self._legacy[generation]
                    self._retired[generation] = asyncio.Event()
                    log.info("engine_transition_done", version=self.pools[generation].manifest
                             .version, idle_s=round(now - seen, 1))
                    self._maybe_close(generation)

    def _generation_of(self, tb: TokenBatch) -> int | None:
        """The live generation that scores this TokenBatch's tokenizer: the serving one, else
        one kept for an older tokenizer."""
        if tb.tokenizer_id == self.manifest.tokenizer_id:
            return self.generation
        for generation in sorted(self._legacy, reverse=True):
            if self.pools[generation].manifest.tokenizer_id == tb.tokenizer_id:
                self._legacy[generation] = time.monotonic()
                return generation
        return None

    async def _generation_for(self, tb: TokenBatch) -> int:
        """As _generation_of; a TokenBatch of a version being loaded (the tokenizers switched
        first) waits for it to be swapped in or refused."""
        while (generation := self._generation_of(tb)) is None:
            r = self.reloader
            if r is None or not await r.expecting(tb.tokenizer_id):
                return self._generation_of(tb) or self.generation  # checked (and refused) next
            waiting = asyncio.ensure_future(r.outcomes.wait())
            try:
                await waiting
            finally:
                waiting.cancel()
        return generation

    # -- a rolling reload, one device at a time (workers.reload) -----------------------------
    def devices(self) -> list[str]:
        """The devices the serving engines run on."""
        return self.pool.devices()

    def serving_path(self) -> Path | None:
        """The serving version's artifact directory (None: engines without one, in tests)."""
        return next((e.path for e in self.pool.engines if getattr(e, "path", None)), None)

    async def remove_device(self, device: str) -> None:
        """Take the serving engine on `device` out of service once its batches are done, and
        close it (its memory freed); the other devices keep serving."""
        pool = self.pool
        index = next((i for i, e in enumerate(pool.engines) if i not in pool.dead
                      and getattr(e, "device", "cpu") == device), None)
        if index is None:
            raise ValueError(f"no serving engine on {device}")
        if pool.size <= getattr(pool.engines[index], "lanes", 1):
            raise ValueError("the last serving engine cannot be removed")
        await pool.remove(index)

    def add_engines(self, engines: Sequence[Engine]) -> None:
        """Put more engines of the serving version in service (on other devices)."""
        self.pool.add(engines)

    async def retired(self) -> None:
        """Wait until every retired generation's engines are closed."""
        for done in list(self._retired.values()):
            await done.wait()

    def _maybe_close(self, generation: int) -> None:
        """Close a retired generation's pool once no record of it is in flight."""
        if generation not in self._retired or self._open[generation]:
            return
        pool = self.pools.pop(generation)
        self._vocab.pop(generation, None)
        done = self._retired[generation]

        async def close() -> None:
            try:
                await pool.close()
            finally:
                done.set()
                self._retired.pop(generation, None)

        task = asyncio.ensure_future(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        log.info("engine_retired", version=pool.manifest.version, generation=generation)

    async def start(self) -> None:
        if self.cache is not None:
            await self.cache.start()
        try:
            await self.online.start()
            try:
                await self.offline.start()
            except BaseException:
                await self.online.stop()
                raise
        except BaseException:
            if self.cache is not None:
                await self.cache.close()
            raise
        self._dispatcher = asyncio.create_task(self._dispatch(), name=f"{self.name}-dispatch")
        if self.reloader is not None:
            self._reload_task = asyncio.create_task(self.reloader.run(),
                                                    name=f"{self.name}-reload")

    def metrics(self) -> dict[str, Callable[[], object]]:
        """Sources of the worker's Prometheus metrics (plumbing.metrics.serve_metrics)."""
        return {
            "worker": lambda: self.stats,
            "online": lambda: self.online.stats,
            "offline": lambda: self.offline.stats,
            "cache": lambda: self.cache.stats if self.cache is not None else {},
            "queue": lambda: {"queue_depth": self.batcher.depth(),
                              "busy_slots": self.pool.busy(),
                              "engine_generation": self.generation, "engine_swaps": self.swaps},
            "pool": lambda: self.pool.device_counters(),  # flat names, kept for old readers
            "device": lambda: _device_metrics(self.pool),
            "reload": lambda: self.reloader.stats.metrics() if self.reloader else {},
            "consumer": lambda: consumer_metrics((self.online, self.offline)),
            "version": self._version_info,
        }

    def _version_info(self) -> dict[str, Labelled]:
        """An info gauge (1): the version serving, the one pending and the reload state
        ("pinned": no reloader, the worker serves its --engine)."""
        m, r = self.manifest, self.reloader
        labels = (m.model_id, m.version, r.stats.pending if r else "",
                  r.stats.state if r else "pinned")
        return {"info": Labelled(("model_id", "serving", "pending", "state"), {labels: 1},
                                 gauge=True)}

    def health(self) -> Health:
        """For /healthz and /readyz (plumbing.health), asked on the loop: not live once no
        engine is left or a pipeline failed; ready once started with its engines loaded and
        both consumers joined with an assignment (an empty one counts), until it drains."""
        failure = self.failure or self.online.failure or self.offline.failure
        if failure is not None:
            return Health(False, False, f"failed: {type(failure).__name__}: {failure}")
        if not self.pool.size:
            return Health(False, False, "no engine left in service")
        if self._dispatcher is None:
            return Health(True, False, "starting")
        if self.online.draining or self.offline.draining:
            return Health(True, False, "draining")
        if waiting := [p.name for p in (self.online, self.offline) if not p.assigned]:
            return Health(True, False, f"waiting for a partition assignment: {', '.join(waiting)}")
        return Health(True, True, "ok")

    def request_stop(self) -> None:
        self.online.request_stop()
        self.offline.request_stop()

    async def run(self, *, idle_exit_s: float | None = None) -> None:
        """Serve until request_stop() (then drain and commit), or in burst mode until both
        topics were idle for `idle_exit_s` with nothing in flight. Raises EngineDead, after
        draining, if every engine died (a restart on a healthy host takes over)."""
        await asyncio.gather(
            self.online.run(lambda r: self._handle(r, "online"), idle_exit_s=idle_exit_s),
            self.offline.run(lambda r: self._handle(r, "offline"), idle_exit_s=idle_exit_s))
        if self.failure is not None:
            raise self.failure

    async def stop(self) -> None:
        if self._reload_task is not None:  # no reload starts while draining
            self._reload_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reload_task
        if self.reloader is not None:
            await self.reloader.close()
        if self._legacy_task is not None:
            self._legacy_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._legacy_task
        try:
            await asyncio.gather(self.online.stop(), self.offline.stop())
        finally:
            if self._dispatcher is not None:
                self._dispatcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._dispatcher
            if self._running:
                await asyncio.wait(self._running)
            if self._closing:
                await asyncio.wait(self._closing)
            await asyncio.gather(*(pool.close() for pool in self.pools.values()))
            if self.cache is not None:
                await self.cache.close()

    async def __aenter__(self) -> ScoringWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- per record ------------------------------------------------------------------------
    async def _handle(self, record: ConsumerRecord, priority: Priority) -> None:
        received = time.time()
        tb = decode_token_batch(record.value or b"", self.settings.limits)
        # Checked against, scored by and labelled with the generation chosen now.
        generation = (self.generation if tb.tokenizer_id == self.manifest.tokenizer_id
                      else await self._generation_for(tb))
        self._open[generation] += 1
        try:
            await self._score_record(tb, priority, generation, received)
        finally:
            self._open[generation] -= 1
            self._maybe_close(generation)

    async def _score_record(self, tb: TokenBatch, priority: Priority, generation: int,
                            received: float) -> None:
        m = self.pools[generation].manifest
        if tb.tokenizer_id != m.tokenizer_id:
            refused = ""
            if self.reloader is not None and self.reloader.stats.last_reason:
                refused = f"; the last version refused: {self.reloader.stats.last_reason}"
            raise WorkerInputError(f"TokenBatch tokenizer {tb.tokenizer_id} differs from the "
                                   f"engine's {m.tokenizer_id} (model {m.model_id} "
                                   f"{m.version}){refused}")
        if tb.head != m.head:  # same tokenizer, other head: pairs vs separate texts
            raise WorkerInputError(f"TokenBatch tokenized for the {tb.head} head; the engine "
                                   f"is {m.head} (model {m.model_id} {m.version})")
        pipeline = self.online if priority == "online" else self.offline
        # The tokenizer checked it too, but a TokenBatch may come from elsewhere; checked
        # before any engine work is spent on it.
        if tb.reply_topic is not None:
            await pipeline.check_reply(tb.reply_topic)
        if tb.max_length > m.max_length:
            raise WorkerInputError(f"TokenBatch max_length {tb.max_length} exceeds the "
                                   f"engine's {m.max_length}")
        vocab = self._vocab[generation]
        if vocab is not None and tb.input_ids.size and (
                (top := int(tb.input_ids.max())) >= vocab):
            raise WorkerInputError(f"token id {top} is outside the vocabulary of "
                                   f"{vocab} ids (model {m.model_id} {m.version})")
        queued = time.perf_counter()
        outputs = await (await self.batcher.submit(tb, priority, generation=generation))
        inference_done = time.perf_counter()
        # Arrays from here to the wire: no ItemScore or float object per score.
        scores, offsets, embeddings, has_embedding = score_arrays(tb, outputs, head=m.head)
        batch = ScoreArrays(
            batch_id=tb.batch_id, item_ids=tb.item_ids, model_id=m.model_id,
            model_version=m.version, produced_at=time.time(),
            timings=Timings(queue_ms=(inference_done - queued) * 1000,
                            total_ms=max(0.0, (time.time() - tb.submitted_at) * 1000)),
            scores=scores, score_offsets=offsets, embeddings=embeddings,
            has_embedding=has_embedding, embedding_format=tb.embedding_format)
        # Cache first: once a score is visible, asking again is a hit (and the write costs one
        # pipelined round trip). Never fails: the cache bypasses a Redis outage.
        await self._write_cache(tb, outputs, scores, m)
        # Split to fit: 200 query embeddings as JSON floats outgrow one message, and the
        # input was fine. Every part is acknowledged before the record counts as finished.
        topic, key = tb.reply_topic or self.settings.topics.scores, tb.batch_id.encode()
        acks = [await pipeline.send(topic, message, key=key)
                for message in encode_score_arrays(batch, self.settings.limits)]
        for ack in acks:  # all were queued already; awaiting in turn waits for all
            await ack
        self.stats.e2e_seconds.observe(max(0.0, time.time() - tb.submitted_at))
        self.stats.score_batches += len(acks)
        self.stats.messages += 1
        self.stats.items += len(tb.item_ids)
        log.debug("scored", batch_id=tb.batch_id, items=len(tb.item_ids),
                  wait_ms=round((time.time() - received) * 1000, 2))

    async def _write_cache(self, tb: TokenBatch, outputs: np.ndarray, scores: np.ndarray,
                           m: Manifest) -> None:
        """Write-through under the per-sequence digests the tokenizer computed from text:
        a similarity doc's value is its cosine with the query (`scores`, in doc-row order),
        any other sequence's its own output row."""
        if self.cache is None or tb.cache_keys is None:
            return
        n = tb.n_sequences
        rows = outputs.reshape(n, -1).astype("<f4", copy=False)
        if m.head == "similarity":
            docs = tb.seq_doc >= 0
            if docs.any():
                rows = np.where(docs[:, None], 0.0, rows).astype("<f4")
                width = np.where(docs, 1, rows.shape[1])
                rows[docs, 0] = scores
            else:
                width = np.full(n, rows.shape[1])
        else:
            width = np.full(n, rows.shape[1])
        blob, stride = rows.tobytes(), rows.shape[1] * 4
        keys = tb.cache_keys.tobytes()
        entries = [(keys[i * KEY_BYTES:(i + 1) * KEY_BYTES],
                    blob[i * stride:i * stride + 4 * w])
                   for i, w in enumerate(width.tolist())]
        await self.cache.put_many(entries, version=m.version)
        self.stats.cache_writes += len(entries)

    # -- dispatch --------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        while True:
            # The slot comes first, so a batch is formed when an engine is free (as large as
            # the queue allows then). It comes from the pool of the generation at the head of
            # the queue; a batch of another generation (around a swap) trades it for one of
            # its own pool.
            head = self.batcher.head_generation()
            pool = self.pools.get(self.generation if head is None else head, self.pool)
            slot = await self._acquire(pool)
            try:
                batch = await self.batcher.next_batch()
            except BaseException:
                pool.release(slot)
                raise
            # Another generation's batch, or the slot's engine taken out meanwhile (a rolling
            # reload): a slot that can run it.
            if self.pools.get(batch.generation) is not pool or slot.engine in pool.dead:
                pool.release(slot)
                pool = self.pools[batch.generation]
                slot = await self._acquire(pool)
            task = asyncio.create_task(self._run_batch(pool, slot, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _acquire(self, pool: EnginePool) -> Slot:
        try:
            return await pool.acquire()
        except EngineDead as exc:
            await self._no_engines(exc)

    async def _no_engines(self, exc: EngineDead) -> NoReturn:
        """Every engine died: stop consuming, and fail what is queued or still arrives so
        the pipelines can drain. They neither dead-letter nor commit those records (the
        input was fine), so a restart on a healthy host redelivers them; `run` then raises."""
        log.error("worker_has_no_engines", error=str(exc))
        self.failure = exc
        self.request_stop()
        while True:
            self.batcher.fail(await self.batcher.next_batch(), exc)

    async def _run_batch(self, pool: EnginePool, slot: Slot, batch: MicroBatch) -> None:
        """Score `batch` on `slot` of `pool`, then release the slot. Every sequence of the
        batch ends delivered or failed, whatever happens (no waiter is left hanging)."""
        try:
            await self._score(pool, slot, batch)
        except BaseException as exc:  # a bug or a cancellation: fail the waiters, not hang them
            self.batcher.fail(batch, exc if isinstance(exc, Exception) else EngineDead(
                "the worker stopped while this batch ran"))
            raise
        finally:
            pool.release(slot)

    async def _score(self, pool: EnginePool, slot: Slot, batch: MicroBatch) -> None:
        try:
            outputs = await pool.run(slot, batch)
        except SlotRetired:  # its engine was taken out (a rolling reload): another slot
            other = await self._acquire(pool)
            try:
                await self._score(pool, other, batch)
            finally:
                pool.release(other)
            return
        except EngineDead as exc:
            if not pool.size:
                self.stats.engine_errors += 1
                self.batcher.fail(batch, exc)
                return
            # The pool took that engine out of service: run the batch on another one.
            log.warning("engine_dead_retry", slot=slot.index, device=slot.device,
                        size=batch.size, error=str(exc))
            self.stats.engine_retries += 1
            try:
                retry = await pool.acquire()
            except EngineDead as none_left:
                self.batcher.fail(batch, none_left)
                return
            try:
                await self._score(pool, retry, batch)
            finally:
                pool.release(retry)
            return
        except Exception as exc:
            self.stats.engine_errors += 1
            log.error("engine_failed", slot=slot.index, device=slot.device, size=batch.size,
                      error=str(exc))
            if batch.size == 1:
                self.batcher.fail(batch, exc)
                return
            # One bad input fails only itself: run each half again on this slot (bisect), so
            # a culprit sequence (or a batch too big for the device right now) fails alone
            # and its neighbours are scored.
            self.stats.bisections += 1
            for half in batch.split():
                await self._score(pool, slot, half)
            return
        try:
            lengths = batch.lengths
            self.stats.batches += 1
            self.stats.sequences += len(lengths)
            self.stats.batch_size.observe(len(lengths))
            self.stats.padded_tokens += int(lengths.max()) * len(lengths)
            self.stats.real_tokens += int(lengths.sum())
            self.batcher.complete(batch, outputs)
        except Exception as exc:  # e.g. outputs of the wrong shape from an engine
            log.error("batch_results_failed", size=batch.size, error=f"{type(exc).__name__}: "
                                                                     f"{exc}")
            self.batcher.fail(batch, exc)


def _device_metrics(pool: EnginePool) -> dict[str, Labelled]:
    """The serving pool's engine counters labelled by device. busy_seconds counts
    lane-seconds (two streams busy for a second: 2.0), so its rate over `lanes` is the
    device's busy fraction."""
    lanes = Counter(s.device for s in pool.slots if s.engine not in pool.dead)
    stats = list(pool.device_stats.items())

    def per_device(values: dict[str, float], *, gauge: bool = False) -> Labelled:
        return Labelled(("device",), {(d,): v for d, v in values.items()}, gauge=gauge)

    return {"lanes": per_device(dict(lanes), gauge=True),
            "busy_seconds": per_device({d: s.busy_s for d, s in stats}),
            "batches": per_device({d: s.batches for d, s in stats}),
            "sequences": per_device({d: s.sequences for d, s in stats})}


def _vocab_size(engines: Sequence[Engine]) -> int | None:
    path = getattr(engines[0], "path", None)
    return (artifact_vocab_size(path) if path is not None
            and artifact_tokenizer_json(path).is_file() else None)
