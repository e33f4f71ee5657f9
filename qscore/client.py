"""Client API for producers and consumers of the fleet.

    async with QueryProducer(settings, topics) as producer, \\
               ScoreConsumer(settings, topics) as consumer:
        sent = await producer.send_and_wait([QueryItem("q1", "red shoes", ("...",))])
        scores = await consumer.wait_for(sent.batch_id, sent.item_ids, timeout=10)

Delivery is at-least-once (DESIGN.md), so a ScoreBatch may arrive twice: the consumer drops
items it has already seen. The bookkeeping (`ScoreBook`) is pure, tested without a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Self

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import ConsumerStoppedError

from plumbing.kafka import KafkaSettings, Topics, make_consumer, make_producer
from schemas import (
    DEFAULT_LIMITS,
    EmbeddingFormat,
    ItemScore,
    Limits,
    Priority,
    QueryBatch,
    QueryItem,
    SchemaError,
    ScoreBatch,
    decode_score_batch,
    encode_query_batch,
)

# The settings a client needs are part of its API: `from qscore.client import KafkaSettings`.
__all__ = ["ConsumerStats", "KafkaSettings", "NotStarted", "PollHook", "QueryProducer", "ScoreBook",
           "ScoreConsumer", "ScoresHandedOut", "ScoresTimeout", "SentBatch", "Topics"]

log = structlog.get_logger(__name__)

DEFAULT_TOPICS = Topics()
# After each poll of a ScoreConsumer: (records received, partitions assigned).
PollHook = Callable[[int, frozenset[TopicPartition]], None]
_POLL_MS = 500  # longest a getmany waits; records end the wait as soon as they arrive


# -- pure bookkeeping ---------------------------------------------------------------------------

DEFAULT_MAX_UNREAD_BYTES = 64 << 20


@dataclass(slots=True)
class ConsumerStats:
    messages: int = 0  # Kafka records read (a deferred one again each time it is re-read)
    batches: int = 0  # ScoreBatches with at least one new item (or new and empty)
    items: int = 0  # new item scores
    duplicates: int = 0  # item scores dropped as already seen
    undecodable: int = 0  # records skipped: not a valid ScoreBatch
    deferred: int = 0  # records left to be read again: the iteration buffer was full


class Expectation:
    """Item ids wanted per batch id, and the scores found for them so far."""

    def __init__(self, expected: Mapping[str, Collection[str]]) -> None:
        self.missing: dict[str, set[str]] = {b: set(ids) for b, ids in expected.items()}
        self.scores: dict[str, dict[str, ItemScore]] = {b: {} for b in expected}

    def offer(self, batch_id: str, items: Iterable[ItemScore]) -> None:
        missing = self.missing.get(batch_id) or set()
        for item in items:
            if item.id in missing:
                missing.discard(item.id)
                self.scores[batch_id][item.id] = item

    @property
    def complete(self) -> bool:
        return not any(self.missing.values())


class ScoresTimeout(asyncio.TimeoutError):
    """Not every expected score arrived in time; `missing` and `received` say which did not."""

    def __init__(self, expectation: Expectation, timeout: float | None) -> None:
        self.missing = {b: ids for b, ids in expectation.missing.items() if ids}
        self.received = expectation.scores
        self.n_missing = sum(len(ids) for ids in self.missing.values())
        wanted = self.n_missing + sum(len(s) for s in self.received.values())
        example = next(iter(self.missing.items()))
        super().__init__(
            f"{self.n_missing} of {wanted} item scores missing after {timeout}s, in "
            f"{len(self.missing)} of {len(self.received)} batches; e.g. batch "
            f"{example[0]!r}: {sorted(example[1])[:5]}")


class ScoresHandedOut(LookupError):
    """A wait asked for item scores that this consumer already handed out: to iteration, or to
    an earlier wait (a timed-out one's `received` included). Handed-out scores are not kept and
    a redelivery is dropped as a duplicate, so the wait could only time out: it fails at once.
    `handed_out`: {batch_id: {item_id, ...}}."""

    def __init__(self, handed_out: dict[str, set[str]]) -> None:
        self.handed_out = handed_out
        batch_id, ids = next(iter(handed_out.items()))
        super().__init__(
            f"{sum(map(len, handed_out.values()))} item scores were already handed out, e.g. "
            f"batch {batch_id!r}: {sorted(ids)[:5]}; wait only for the ones still missing")


@dataclass(slots=True)
class _Unread:
    batch: ScoreBatch
    ref: tuple[Hashable, int] | None
    size: int


class ScoreBook:
    """What a consumer has seen, who waits for what, and what iteration still has to yield.

    - Dedupe: per batch id, a 64-bit hash of each item id seen (no scores), in an LRU bounded
      by `remember_items` items (a batch counts at least 1); an item seen again is a redelivery
      and is dropped. A redelivery older than the LRU passes through: they come soon after the
      original in practice. (A hash collision inside a batch of n items, odds ~n^2/2^65,
      would drop a score as a duplicate.)
    - Waits: an Expectation is served from batches still in the iteration buffer, then from
      new ones. Scores handed out (to iteration or a wait) are not kept: asking for them again
      raises ScoresHandedOut.
    - Iteration: a batch nobody waits for is buffered with its `ref` (partition, offset) until
      iteration takes it; at most `max_unread` batches and `max_unread_bytes` (encoded sizes,
      as given to `add`), though an empty buffer takes any one batch. Nothing is dropped: a
      batch that does not fit is *deferred*: not recorded at all, and its partition's offset
      kept so that `take_seeks` sends the reader back there once the buffer is empty (or at
      once, for the batch a new wait asks for). Later records of a deferred partition are
      deferred too, so iteration keeps each partition's order. `resume_offsets` is how far a
      commit may go. A batch without a ref cannot be read again, so it is always buffered.
    """

    def __init__(self, *, remember_items: int = 100_000, max_unread: int = 10_000,
                 max_unread_bytes: int = DEFAULT_MAX_UNREAD_BYTES) -> None:
        if remember_items < 1 or max_unread < 1 or max_unread_bytes < 1:
            raise ValueError("remember_items, max_unread and max_unread_bytes must be >= 1")
        self.stats = ConsumerStats()
        self._remember_items = remember_items
        self._max_unread = max_unread
        self._max_unread_bytes = max_unread_bytes
        self._seen: OrderedDict[str, set[int]] = OrderedDict()
        self._n_seen = 0
        self._waits: dict[str, list[Expectation]] = {}
        self._unread: deque[_Unread] = deque()
        self._unread_bytes = 0
        self._deferred: dict[Hashable, int] = {}  # partition -> first offset deferred
        # batch id -> where it was first deferred, so a wait for it can go back for it
        self._deferred_ids: OrderedDict[str, tuple[Hashable, int]] = OrderedDict()
        self._seeks: dict[Hashable, int] = {}

    def add(self, batch: ScoreBatch, ref: tuple[Hashable, int] | None = None,
            size: int = 0) -> ScoreBatch | None:
        """Record a decoded batch of `size` bytes read at `ref`; returns it less already-seen
        items, None if nothing new or deferred."""
        if batch.batch_id not in self._waits and ref is not None and self._full(ref[0], size):
            self._defer(batch.batch_id, *ref)
            return None
        keys = self._seen.pop(batch.batch_id, None)
        is_new = keys is None
        keys = self._seen[batch.batch_id] = set() if keys is None else keys  # now most recent
        fresh = tuple(it for it in batch.items if hash(it.id) not in keys)
        self.stats.duplicates += len(batch.items) - len(fresh)
        if not fresh and (batch.items or not is_new):
            return None  # wholly a redelivery (an empty batch counts once)
        weight = 0 if is_new else max(1, len(keys))
        keys.update(hash(it.id) for it in fresh)
        self._n_seen += max(1, len(keys)) - weight
        while self._n_seen > self._remember_items and len(self._seen) > 1:  # never the newest
            self._n_seen -= max(1, len(self._seen.popitem(last=False)[1]))
        if len(fresh) != len(batch.items):
            batch = replace(batch, items=fresh)
        self.stats.batches += 1
        self.stats.items += len(fresh)
        for wait in self._waits.get(batch.batch_id, ()):
            wait.offer(batch.batch_id, fresh)
        if batch.batch_id not in self._waits:
            self._unread.append(_Unread(batch, ref, size))
            self._unread_bytes += size
        return batch

    def _full(self, partition: Hashable, size: int) -> bool:
        if partition in self._deferred:
            return True  # nothing overtakes a deferred record of its partition
        if not self._unread:
            return False  # or a batch over the byte bound could never be iterated
        return (len(self._unread) >= self._max_unread
                or self._unread_bytes + size > self._max_unread_bytes)

    def _defer(self, batch_id: str, partition: Hashable, offset: int) -> None:
        self.stats.deferred += 1
        self._deferred.setdefault(partition, offset)
        self._deferred_ids.setdefault(batch_id, (partition, offset))
        while len(self._deferred_ids) > self._remember_items:
            self._deferred_ids.popitem(last=False)  # a wait for it waits for the buffer to empty

    def expect(self, expected: Mapping[str, Collection[str]]) -> Expectation:
        """Register a wait (call `release` when done). Buffered batches it covers leave the
        iteration buffer at once: the waiter gets them. Raises ScoresHandedOut, registering
        nothing, if some wanted scores were handed out already."""
        buffered: dict[str, set[str]] = {}
        for entry in self._unread:
            if entry.batch.batch_id in expected:
                buffered.setdefault(entry.batch.batch_id, set()).update(
                    it.id for it in entry.batch.items)
        handed_out: dict[str, set[str]] = {}
        for batch_id, ids in expected.items():
            if keys := self._seen.get(batch_id):
                gone = {i for i in ids if hash(i) in keys} - buffered.get(batch_id, set())
                if gone:
                    handed_out[batch_id] = gone
        if handed_out:
            raise ScoresHandedOut(handed_out)
        wait = Expectation(expected)
        for batch_id in wait.missing:
            self._waits.setdefault(batch_id, []).append(wait)
            if (where := self._deferred_ids.pop(batch_id, None)) is not None:
                partition, offset = where
                self._seeks[partition] = min(self._seeks.get(partition, offset), offset)
        if buffered:
            kept: deque[_Unread] = deque()
            for entry in self._unread:
                if entry.batch.batch_id in buffered:
                    wait.offer(entry.batch.batch_id, entry.batch.items)
                    self._unread_bytes -= entry.size
                else:
                    kept.append(entry)
            self._unread = kept
        return wait

    def release(self, wait: Expectation) -> None:
        for batch_id in wait.missing:
            if waits := [w for w in self._waits.pop(batch_id, []) if w is not wait]:
                self._waits[batch_id] = waits

    def pop_unread(self) -> tuple[ScoreBatch, tuple[Hashable, int] | None] | None:
        if not self._unread:
            return None
        entry = self._unread.popleft()
        self._unread_bytes -= entry.size
        return entry.batch, entry.ref

    @property
    def n_unread(self) -> int:
        return len(self._unread)

    @property
    def unread_bytes(self) -> int:
        return self._unread_bytes

    def unread_refs(self) -> list[tuple[Hashable, int] | None]:
        return [entry.ref for entry in self._unread]

    def fetch_limit(self) -> int | None:
        """Most records the next fetch should take: what the buffer has room for, unless
        someone waits (a wait reads on, deferring what does not fit)."""
        return None if self._waits else max(1, self._max_unread - len(self._unread))

    def take_seeks(self) -> dict[Hashable, int]:
        """Offsets to read again from, per partition, before the next fetch: where a batch a
        new wait wants was deferred and, once the iteration buffer is empty, every deferred
        partition's first deferred offset."""
        if not self._unread and self._deferred:
            for partition, offset in self._deferred.items():
                self._seeks[partition] = min(self._seeks.get(partition, offset), offset)
            self._deferred.clear()
            self._deferred_ids.clear()
        seeks, self._seeks = self._seeks, {}
        return seeks

    def resume_offsets(self) -> dict[Hashable, int]:
        """Per partition, the first offset not handed out yet (buffered or deferred): a commit
        must not go past it."""
        held = dict(self._deferred)
        for entry in self._unread:
            if entry.ref is not None:
                partition, offset = entry.ref
                held[partition] = min(held.get(partition, offset), offset)
        return held


# -- Kafka clients ------------------------------------------------------------------------------

class NotStarted(RuntimeError):
    """A client used before start() or after stop()."""


class _Lifecycle:
    """`async with` around start()/stop(), as aiokafka clients have."""

    start: Callable[[], Awaitable[None]]
    stop: Callable[[], Awaitable[None]]

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def _start_or_close(client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    """start(), or close what a failed start opened (no 'unclosed client' left behind)."""
    try:
        await client.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.stop()
        raise


@dataclass(frozen=True, slots=True)
class SentBatch:
    """A QueryBatch the broker acknowledged, and where it landed."""

    batch_id: str
    item_ids: tuple[str, ...]
    topic: str
    partition: int
    offset: int


class QueryProducer(_Lifecycle):
    """Publishes QueryBatches, keyed by batch id: online ones to `topics.queries`, offline
    ones to `topics.queries_offline`. `producer_options`: extra AIOKafkaProducer arguments."""

    def __init__(self, settings: KafkaSettings, topics: Topics = DEFAULT_TOPICS, *,
                 limits: Limits = DEFAULT_LIMITS,
                 producer_options: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self.topics = topics
        self.limits = limits
        self._options = dict(producer_options or {})
        self._producer: AIOKafkaProducer | None = None  # made in start(): it needs the loop

    async def start(self) -> None:
        producer = make_producer(self.settings, **self._options)
        await _start_or_close(producer)
        self._producer = producer

    async def stop(self) -> None:
        """Flush what was sent, then disconnect."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def send(self, items: Sequence[QueryItem], *, batch_id: str | None = None,
                   priority: Priority = "online", reply_topic: str | None = None,
                   embedding_format: EmbeddingFormat | None = None,
                   ) -> asyncio.Future[SentBatch]:
        """Validate, encode and enqueue one QueryBatch; the future resolves on the broker's ack.

        `embedding_format` ("float", "base64", "base64-f16"; None: the fleet's default) is how
        the scores' embeddings travel; ScoreConsumer decodes every format to floats.

        Raises SchemaError at once for bad input (no items, duplicate ids, over a limit, unknown
        priority, ...), and KafkaError if the batch cannot even be enqueued (e.g. no metadata for
        the topic within request_timeout_ms). A failed delivery fails the returned future.
        """
        batch = QueryBatch(batch_id=uuid.uuid4().hex if batch_id is None else batch_id,
                           items=tuple(items), submitted_at=time.time(),
                           reply_topic=reply_topic, priority=priority,
                           embedding_format=embedding_format)
        value = encode_query_batch(batch, self.limits)  # SchemaError goes to the caller
        if self._producer is None:
            raise NotStarted("QueryProducer is not started: call start() or use async with")
        topic = self.topics.queries_offline if priority == "offline" else self.topics.queries
        delivery = await self._producer.send(topic, value, key=batch.batch_id.encode())
        item_ids = tuple(it.id for it in batch.items)

        async def acked() -> SentBatch:
            meta = await delivery
            return SentBatch(batch.batch_id, item_ids, meta.topic, meta.partition, meta.offset)

        return asyncio.ensure_future(acked())

    async def send_and_wait(self, items: Sequence[QueryItem], *, batch_id: str | None = None,
                            priority: Priority = "online", reply_topic: str | None = None,
                            embedding_format: EmbeddingFormat | None = None) -> SentBatch:
        return await (await self.send(items, batch_id=batch_id, priority=priority,
                                      reply_topic=reply_topic,
                                      embedding_format=embedding_format))

    async def flush(self) -> None:
        """Wait until everything sent so far is acknowledged (or failed)."""
        if self._producer is not None:
            await self._producer.flush()


class ScoreConsumer(_Lifecycle):
    """Reads ScoreBatches from `topics.scores`, drops redelivered items, and serves both
    iteration (`async for batch in consumer`) and waits (`wait_for`, `collect`).

    group_id=None (default): every partition, no group (no join delay), no commits. With a
    group_id: the group's share, `from_beginning` only where it has no committed offset, and
    `commit()` saves progress. `consumer_options`: extra AIOKafkaConsumer arguments (e.g.
    short group sessions on the embedded broker). `on_poll`, if given, is called after every
    poll with the number of records it received (duplicates and undecodable ones included) and
    the partitions then assigned: activity for idle timers.

    Records are fetched only while someone iterates (and the iteration buffer is empty) or
    waits. A batch fetched by a wait but wanted by none is kept for iteration, up to
    `max_unread` batches or `max_unread_bytes` of messages; past that it is left unread and
    read again later (ScoreBook: deferred), never dropped. So a wait never stalls behind
    batches nobody iterates, memory stays bounded when nobody ever iterates, and `commit()`
    never passes a batch not handed out. A wait for a batch that was left unread before the
    wait began goes back for it (unless over `remember_items` batches were left unread since:
    then it comes once iteration has emptied the buffer). Scores handed out are not kept:
    waiting for them again raises ScoresHandedOut."""

    def __init__(self, settings: KafkaSettings, topics: Topics = DEFAULT_TOPICS, *,
                 group_id: str | None = None, from_beginning: bool = True,
                 consumer_options: Mapping[str, Any] | None = None,
                 limits: Limits = DEFAULT_LIMITS, remember_items: int = 100_000,
                 max_unread: int = 10_000, max_unread_bytes: int = DEFAULT_MAX_UNREAD_BYTES,
                 on_poll: PollHook | None = None) -> None:
        self.topic = topics.scores
        self.on_poll = on_poll
        self.limits = limits
        self.from_beginning = from_beginning
        self.book = ScoreBook(remember_items=remember_items, max_unread=max_unread,
                              max_unread_bytes=max_unread_bytes)
        self._settings = settings
        self._group_id = group_id
        self._options = {"auto_offset_reset": "earliest" if from_beginning else "latest",
                         **(consumer_options or {})}
        self._consumer: AIOKafkaConsumer | None = None  # made in start(): it needs the loop
        self._lock = asyncio.Lock()  # one fetcher at a time; the others wait for its records

    @property
    def stats(self) -> ConsumerStats:
        return self.book.stats

    async def start(self) -> None:
        consumer = make_consumer(self._settings, self.topic, group_id=self._group_id,
                                 **self._options)
        await _start_or_close(consumer)
        if not self.from_beginning:
            # Pin "latest" now: resolved lazily, it would skip scores that arrive between
            # start() and the first fetch (e.g. for a batch sent right after start()).
            for tp in consumer.assignment():
                await consumer.position(tp)
        self._consumer = consumer

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ScoreBatch:
        while True:
            if (entry := self.book.pop_unread()) is not None:
                return entry[0]
            try:
                await self._fetch(lambda: self.book.n_unread > 0)
            except (ConsumerStoppedError, NotStarted):
                raise StopAsyncIteration from None  # stopped, maybe by another task

    async def wait_for(self, batch_id: str, item_ids: Collection[str],
                       timeout: float | None) -> dict[str, ItemScore]:  # noqa: ASYNC109
        """Scores of `item_ids` in `batch_id`, by item id, once all have arrived (from the
        cache or an engine). Raises ScoresTimeout (an asyncio.TimeoutError) saying how many
        are missing. Scores that arrived before the call count unless handed out already
        (ScoresHandedOut: after a ScoresTimeout, wait only for its `missing`)."""
        return (await self.collect({batch_id: item_ids}, timeout))[batch_id]

    async def collect(self, expected: Mapping[str, Collection[str]],
                      timeout: float | None,  # noqa: ASYNC109 (reported in the error)
                      ) -> dict[str, dict[str, ItemScore]]:
        """Like wait_for, for many batches at once: {batch_id: {item_id: ItemScore}}."""
        wait = self.book.expect(expected)
        try:
            async with asyncio.timeout(timeout):
                while not wait.complete:
                    await self._fetch(lambda: wait.complete)
        except TimeoutError:
            if not wait.complete:
                raise ScoresTimeout(wait, timeout) from None
        finally:
            self.book.release(wait)
        return wait.scores

    async def commit(self) -> None:
        """Commit (group consumers) everything handed out: batches still in the iteration
        buffer, or left unread, hold their partition back, so they are read again after a
        restart."""
        if self._group_id is None:
            return
        consumer = self._running()
        positions = {tp: await consumer.position(tp) for tp in consumer.assignment()}
        for tp, offset in self.book.resume_offsets().items():
            if tp in positions:
                positions[tp] = min(positions[tp], offset)  # type: ignore[index]
        if positions:
            await consumer.commit(positions)

    async def _fetch(self, satisfied: Callable[[], bool]) -> None:
        """Fetch and ingest one round of records, unless `satisfied()` became true while
        another task held the fetch (it ingested what we wanted)."""
        async with self._lock:
            if satisfied():
                return
            consumer = self._running()
            assigned = consumer.assignment()
            for tp, offset in self.book.take_seeks().items():
                if tp in assigned:  # else its next owner starts at the commit, not past it
                    consumer.seek(tp, offset)  # type: ignore[arg-type]
            records = await consumer.getmany(timeout_ms=_POLL_MS,
                                             max_records=self.book.fetch_limit())
            for tp, messages in records.items():
                for message in messages:
                    self._ingest(tp, message.offset, message.value)
            if self.on_poll is not None:
                self.on_poll(sum(map(len, records.values())), frozenset(consumer.assignment()))

    def _running(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise NotStarted("ScoreConsumer is not started: call start() or use async with")
        return self._consumer

    def _ingest(self, tp: TopicPartition, offset: int, value: bytes | None) -> None:
        self.stats.messages += 1
        try:
            batch = decode_score_batch(value or b"", self.limits)
        except SchemaError as exc:
            self.stats.undecodable += 1
            log.warning("skipping undecodable score message", topic=tp.topic,
                        partition=tp.partition, offset=offset, error=str(exc))
            return
        self.book.add(batch, ref=(tp, offset), size=len(value or b""))
