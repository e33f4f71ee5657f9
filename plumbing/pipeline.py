"""The consume -> work -> produce -> commit skeleton every fleet service runs on.

A `RecordPipeline` owns the consumer, the offset bookkeeping, backpressure, dead letters,
rebalances and shutdown, so that a service only says what to do with one record: its handler
returns once everything the record produced is acknowledged by the broker, or raises, and then
the record becomes a DeadLetter. Either way the record is finished, and only finished offsets
are ever committed (at-least-once; a poison message never stalls its partition).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
)

from plumbing.kafka import KafkaSettings, check_reply_topic, make_consumer, make_producer
from plumbing.metrics import Labelled
from plumbing.offsets import OffsetTracker
from schemas import DeadLetter, Limits, SourceRef, Stage, encode_dead_letter

log = structlog.get_logger(__name__)

Handler = Callable[[ConsumerRecord], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    group_id: str
    max_in_flight: int = 256  # records being worked on; fetching pauses beyond this
    commit_interval_s: float = 0.5
    revoke_grace_s: float = 5.0  # how long a revoked partition's in-flight work may finish
    poll_timeout_ms: int = 100
    fetch_max_records: int = 500
    # While every slot is busy, fetching is paused but the consumer still polls this often,
    # so it never exceeds max_poll_interval_ms and leaves its group.
    paused_poll_s: float = 1.0
    # Every wait at shutdown is bounded: a broker that is down must not turn a stop into a
    # hang. Work still running after drain_timeout_s is abandoned (never committed past).
    drain_timeout_s: float = 30.0
    commit_timeout_s: float = 10.0
    close_timeout_s: float = 10.0
    # How often the consumer lag (stats.lag) is sampled while running: one ListOffsets
    # request for the assigned partitions (0: never).
    lag_interval_s: float = 5.0


@dataclass(slots=True)
class PipelineStats:
    records: int = 0
    finished: int = 0
    dead_letters: int = 0
    commits: int = 0
    pauses: int = 0
    rebalances: int = 0
    stale_dropped: int = 0  # fetched before a revoke, never started: redelivered instead
    # Exported labelled by consumer group (consumer_metrics), not as flat numbers:
    # topic -> records of the assigned partitions not committed yet (sample_lag) ...
    lag: dict[str, int] = field(default_factory=dict)
    # ... and (stage, reason class) -> dead letters published (a SchemaError's rule, else
    # the exception's type name: a small set, unlike the reason text).
    dead_letter_reasons: Counter[tuple[str, str]] = field(default_factory=Counter)


class PipelineError(RuntimeError):
    """The pipeline stopped: a record could be neither finished nor dead-lettered."""


class UndeliverableError(Exception):
    """A record's output can never be delivered as it is (its topic does not exist, it is too
    large, the topic is forbidden): a redelivery would fail the same way, so the record is
    dead-lettered instead of stopping the service into a crash loop."""


# Broker and client errors that a redelivery of the same record would repeat.
_REPEATS = (MessageSizeTooLargeError, RecordTooLargeError, InvalidTopicError,
            TopicAuthorizationFailedError)
_MISSING_TOPIC_RECHECK_S = 10.0  # a missing topic is looked up again at most this often


class RecordPipeline:
    """Runs `handler` for every record of `topics`, committing only finished offsets."""

    def __init__(self, kafka: KafkaSettings, topics: Sequence[str], settings: PipelineSettings,
                 *, stage: Stage, dead_letter_topic: str, limits: Limits,
                 name: str = "pipeline",
                 fatal: tuple[type[BaseException], ...] = (),
                 reply_patterns: Sequence[str] = ()) -> None:
        self.kafka = kafka
        self.topics = tuple(topics)
        self.settings = settings
        self.stage: Stage = stage
        self.dead_letter_topic = dead_letter_topic
        self.limits = limits
        self.name = name
        # Where a record may ask for its outputs (check_reply): shell-style patterns.
        self.reply_patterns = tuple(reply_patterns)
        # Errors that say this service, not the record, is broken (e.g. no engine left):
        # such a record is neither dead-lettered nor committed, so a restart redelivers it.
        self.fatal = (KafkaError, *fatal)
        self.stats = PipelineStats()
        self.tracker = OffsetTracker()
        self.producer: AIOKafkaProducer = make_producer(kafka, client_id=f"{kafka.client_id}-"
                                                        f"{name}")
        self.consumer: AIOKafkaConsumer = make_consumer(kafka, group_id=settings.group_id,
                                                        client_id=f"{kafka.client_id}-{name}")
        self._tasks: dict[asyncio.Task[None], TopicPartition] = {}
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()  # set whenever nothing is in flight
        self._idle.set()
        self._last_record = time.monotonic()
        self._in_group = False  # joined, and no rebalance since: burst mode may count idle time
        # Readiness (plumbing.health): joined its group and received an assignment, possibly
        # empty (a member beyond the partition count gets none and stands by, ready), since
        # start. Unlike _in_group, a later rebalance does not clear it: a rebalance is the
        # group's routine, and flagging every member unready at each one would count the whole
        # group unavailable at once (rollouts, disruption budgets).
        self.assigned = False
        self.failure: Exception | None = None  # set when a record could not even dead-letter
        self._paused = False
        self._started = False
        # Bumped by every revoke: records fetched before it belong to an assignment that was
        # committed and forgotten, so they must not start after it.
        self._generation = 0
        # Fetched records waiting for a slot, tagged with the generation they were fetched in.
        self._backlog: deque[tuple[int, TopicPartition, ConsumerRecord]] = deque()
        self._topics: set[str] = set()  # known to exist (check_topic)
        self._missing: dict[str, float] = {}  # topic -> when it was last seen missing
        self._slot_freed = asyncio.Event()
        self._committed: dict[TopicPartition, int] = {}  # the group's offsets, for sample_lag

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.producer.start()
        try:
            self.consumer.subscribe(list(self.topics), listener=_Listener(self))
            await self.consumer.start()
        except BaseException:
            await self.producer.stop()
            raise
        self._started = True

    def request_stop(self) -> None:
        """Stop fetching; `run` then drains in-flight work, commits and returns."""
        self._stopping.set()

    @property
    def draining(self) -> bool:
        """No more fetching (request_stop, a failure or stop): finishing what is in flight."""
        return self._stopping.is_set()

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._stopping.set()  # draining, as `draining` reports (also after a burst-mode run)
        try:
            await self._drain(grace_s=self.settings.drain_timeout_s, abandon=True)
            await self._commit()
        finally:
            for client in (self.consumer, self.producer):
                try:
                    await asyncio.wait_for(client.stop(), self.settings.close_timeout_s)
                except (Exception, asyncio.CancelledError) as exc:  # the broker is down
                    # aiokafka's stop can raise its own tasks' CancelledError; ours being
                    # cancelled must still propagate.
                    task = asyncio.current_task()
                    if isinstance(exc, asyncio.CancelledError) and task and task.cancelling():
                        raise
                    log.warning("close_failed", service=self.name, client=type(client).__name__,
                                error=f"{type(exc).__name__}: {exc}")

    # -- main loop -------------------------------------------------------------------------
    async def run(self, handler: Handler, *, idle_exit_s: float | None = None) -> None:
        """Consume until `request_stop()`, or (burst mode) until nothing arrived for
        `idle_exit_s` and nothing is in flight: a whole run is then one awaitable."""
        commit_task = asyncio.create_task(self._commit_loop(), name=f"{self.name}-commits")
        lag_task = asyncio.create_task(self._lag_loop(), name=f"{self.name}-lag")
        # Idle time counts from now (not from construction) and only while settled in the
        # group: a group join can take longer than idle_exit_s, and nothing arrives during it.
        self._last_record = time.monotonic()
        try:
            while not self._stopping.is_set():
                if idle_exit_s is not None and self._idle.is_set() and self._in_group and (
                        time.monotonic() - self._last_record >= idle_exit_s):
                    break
                await self._fetch_once(handler)
        finally:
            commit_task.cancel()
            lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await commit_task
            with contextlib.suppress(asyncio.CancelledError):
                await lag_task
            await self._drain(grace_s=self.settings.drain_timeout_s, abandon=True)
            await self._commit()
        if self.failure is not None:
            raise PipelineError(f"{self.name}: a record could neither be finished nor "
                                "dead-lettered; stopped so that a restart redelivers it "
                                "(see the cause below)") from self.failure

    def _fail(self, exc: Exception) -> None:
        if self.failure is None:
            self.failure = exc
            log.error("pipeline_failed", service=self.name, error=f"{type(exc).__name__}: {exc}")
        self._stopping.set()

    async def _fetch_once(self, handler: Handler) -> None:
        if not self._backlog:
            self._take(await self.consumer.getmany(
                timeout_ms=self.settings.poll_timeout_ms,
                max_records=self.settings.fetch_max_records))
        while self._backlog and not self._stopping.is_set():
            generation, tp, record = self._backlog[0]
            if generation != self._generation:
                # Fetched before a rebalance, which committed and forgot its partition;
                # whoever owns it now (maybe us again) fetches it anew from the committed
                # offset. Starting it here would let commits pass offsets still running.
                self._backlog.popleft()
                self.stats.stale_dropped += 1
                continue
            if self._slots.locked():
                await self._wait_for_slot()
                continue
            await self._slots.acquire()  # free: returns at once
            if self._paused:
                self.consumer.resume(*self.consumer.paused())
                self._paused = False
            self._backlog.popleft()
            self._last_record = time.monotonic()
            self.stats.records += 1
            self.tracker.start(tp, record.offset)
            self._idle.clear()
            task = asyncio.create_task(self._process(handler, tp, record))
            self._tasks[task] = tp

    def _take(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        self._backlog.extend((self._generation, tp, record)
                             for tp, records in batches.items() for record in records)

    async def _wait_for_slot(self) -> None:
        """Backpressure: every slot is busy. Pause fetching (so the consumer's buffers stop
        filling) but keep polling, or the consumer would exceed max_poll_interval_ms and leave
        its group; a poll while paused returns records only from partitions a rebalance has
        just assigned (not paused yet), which join the backlog."""
        self.consumer.pause(*self.consumer.assignment())  # new partitions after a rebalance too
        if not self._paused:
            self._paused = True
            self.stats.pauses += 1
        self._slot_freed.clear()
        if self._slots.locked():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), self.settings.paused_poll_s)
        self._take(await self.consumer.getmany(timeout_ms=0,
                                               max_records=self.settings.fetch_max_records))

    async def _process(self, handler: Handler, tp: TopicPartition,
                       record: ConsumerRecord) -> None:
        try:
            try:
                await handler(record)
            except asyncio.CancelledError:
                raise
            except _REPEATS as exc:
                await self._dead_letter_or_fail(record, UndeliverableError(
                    f"its output cannot be delivered: {type(exc).__name__}: {exc}"))
                if self.failure is not None:
                    return
            except self.fatal as exc:
                # The broker did not take this record's outputs (aiokafka has retried already),
                # or no engine is left to score it (every GPU lost): not the record's fault, so
                # no dead letter. It stays unfinished, nothing is committed past it, and the
                # service stops; a restart redelivers it.
                self._fail(exc)
                return
            except Exception as exc:  # any failure of one record: dead-letter it, move on
                await self._dead_letter_or_fail(record, exc)
                if self.failure is not None:
                    return
            self.tracker.finish(tp, record.offset)
            self.stats.finished += 1
        finally:
            self._slots.release()
            self._slot_freed.set()
            self._tasks.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            if not self._tasks:
                self._idle.set()

    async def _dead_letter_or_fail(self, record: ConsumerRecord, exc: Exception) -> None:
        try:
            await self.dead_letter(record, exc)
        except Exception as fatal:
            # Neither its outputs nor its dead letter were acknowledged: the record cannot
            # finish, so no offset past it may be committed, ever. Stop rather than consume on
            # with commits stalled; a restart redelivers it.
            self._fail(fatal)

    async def check_reply(self, topic: str | None) -> None:
        """A record's reply topic, if it names one, must match `reply_patterns`
        (ReplyTopicError) and exist (UndeliverableError): only the fleet chooses where it
        writes, and nothing a redelivery would repeat may stop the service."""
        if topic is not None:
            check_reply_topic(topic, self.reply_patterns)
            await self.check_topic(topic)

    async def check_topic(self, topic: str) -> None:
        """Raise UndeliverableError unless `topic` exists. Producing to a missing topic either
        creates it (brokers with auto-create) or waits out the metadata timeout and fails the
        same way on every redelivery; so outputs only go to topics someone created."""
        if topic in self._topics:
            return
        now = time.monotonic()
        if now - self._missing.get(topic, -_MISSING_TOPIC_RECHECK_S) >= _MISSING_TOPIC_RECHECK_S:
            cluster = await self.producer.client.fetch_all_metadata()  # never creates topics
            self._topics = set(cluster.topics())
            if topic in self._topics:
                self._missing.pop(topic, None)
                return
            self._missing[topic] = now
        raise UndeliverableError(f"topic {topic!r} does not exist: create it (qscore topics "
                                 "create, or your Kafka tooling) before asking for it")

    async def send(self, topic: str, value: bytes, *,
                   key: bytes | None = None) -> asyncio.Future[Any]:
        """Queue one output record; the returned future resolves on the broker's ack. A
        handler awaits every such future before it returns, so its record is finished only
        once all it produced is acknowledged."""
        return await self.producer.send(topic, value, key=key)

    async def publish(self, topic: str, value: bytes, *, key: bytes | None = None) -> None:
        """Produce one output record and wait for the broker's ack."""
        await (await self.send(topic, value, key=key))

    async def dead_letter(self, record: ConsumerRecord, exc: BaseException,
                          stage: Stage | None = None) -> None:
        """Publish a DeadLetter for `record` and wait for the broker's ack."""
        letter = DeadLetter.from_error(
            stage or self.stage, exc if isinstance(exc, Exception) else RuntimeError(str(exc)),
            record.value or b"",
            SourceRef(topic=record.topic, partition=record.partition, offset=record.offset),
            limits=self.limits)
        log.warning("dead_letter", service=self.name, topic=record.topic,
                    partition=record.partition, offset=record.offset, reason=letter.reason)
        await self.publish(self.dead_letter_topic, encode_dead_letter(letter, self.limits),
                           key=record.key)
        self.stats.dead_letters += 1  # published ones only
        self.stats.dead_letter_reasons[letter.stage, letter.error_rule
                                       or type(exc).__name__] += 1

    # -- commits, drain, rebalance ---------------------------------------------------------
    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.commit_interval_s)
            await self._commit()

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        positions = self.tracker.committable()
        assigned = self.consumer.assignment()
        positions = {tp: pos for tp, pos in positions.items()
                     if tp in assigned and (only is None or tp in only)}
        if not positions:
            return
        try:
            await asyncio.wait_for(self.consumer.commit(positions),
                                   self.settings.commit_timeout_s)
        except Exception as exc:  # a rebalance in progress, or the broker is down: the next
            # commit catches up, and an unacknowledged commit only means a redelivery
            log.warning("commit_failed", service=self.name, error=str(exc))
            return
        self.tracker.mark_committed(positions)
        self._committed.update(positions)
        self.stats.commits += 1

    async def _lag_loop(self) -> None:
        if self.settings.lag_interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self.settings.lag_interval_s)
            try:
                await self.sample_lag()
            except Exception as exc:  # a rebalance or a broker hiccup: the next sample
                log.debug("lag_sample_failed", service=self.name,
                          error=f"{type(exc).__name__}: {exc}")

    async def sample_lag(self) -> None:
        """Set stats.lag: per topic, the records of this consumer's partitions that its group
        has not committed (end offset - committed offset, as Kafka lag exporters and KEDA
        count it). The end is the newer of a ListOffsets answer and the last fetch's
        highwater (a paused partition is not fetched; some brokers list stale ends)."""
        assigned = list(self.consumer.assignment())
        lag = dict.fromkeys(self.topics, 0)
        timeout = self.settings.commit_timeout_s
        ends = (await asyncio.wait_for(self.consumer.end_offsets(assigned), timeout)
                if assigned else {})
        for tp in assigned:
            if tp not in self.consumer.assignment():  # revoked meanwhile
                continue
            base = self._committed.get(tp)
            if base is None:  # nothing committed by us since the assignment: ask the group
                base = await asyncio.wait_for(self.consumer.committed(tp), timeout)
                if base is None:  # the group never committed: where the consumer starts
                    base = await asyncio.wait_for(self.consumer.position(tp), timeout)
                if tp not in self.consumer.assignment():
                    continue
                self._committed.setdefault(tp, base)
            end = max(ends.get(tp) or 0, self.consumer.highwater(tp) or 0)
            lag[tp.topic] = lag.get(tp.topic, 0) + max(0, end - base)
        self.stats.lag = lag  # one assignment: a scrape never sees a half-built dict

    async def _drain(self, tps: set[TopicPartition] | None = None,
                     grace_s: float | None = None, *, abandon: bool = False) -> None:
        """Wait up to `grace_s` for in-flight work (of `tps`); with `abandon`, cancel what is
        still running then: its offsets stay unfinished, so they are redelivered, never
        committed past."""
        tasks = [t for t, tp in self._tasks.items() if tps is None or tp in tps]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        if pending and abandon:
            log.warning("drain_timeout", service=self.name, abandoned=len(pending))
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=self.settings.close_timeout_s)

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._in_group = True
        self.assigned = True
        self._last_record = time.monotonic()
        log.info("partitions_assigned", service=self.name, partitions=len(assigned))

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        self._in_group = False
        self._generation += 1
        self.stats.rebalances += 1
        # Let work already running for these partitions finish, so its offsets can be
        # committed now; whatever is still running after the grace period is abandoned to
        # the partition's next owner (redelivered, never committed past).
        await self._drain(revoked, grace_s=self.settings.revoke_grace_s)
        await self._commit(only=revoked)
        self.tracker.forget(revoked)
        for tp in revoked:
            self._committed.pop(tp, None)
        log.info("partitions_revoked", service=self.name, partitions=len(revoked),
                 still_running=sum(1 for tp in self._tasks.values() if tp in revoked))


class _Listener(ConsumerRebalanceListener):
    def __init__(self, pipeline: RecordPipeline) -> None:
        self.pipeline = pipeline

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.pipeline.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.pipeline.on_assigned(set(assigned))


def consumer_metrics(pipelines: Iterable[RecordPipeline]) -> dict[str, Labelled]:
    """A service's "consumer" metrics group over its pipelines, labelled by consumer group:
    `lag` (per topic; summed over a group's members it is the group's lag) and `dead_letters`
    (per stage and reason class)."""
    lag = Labelled(("group", "topic"), gauge=True)
    dead = Labelled(("group", "stage", "reason"))
    for p in pipelines:
        group = p.settings.group_id
        sampled = p.stats.lag
        for topic in p.topics:
            lag.values[group, topic] = sampled.get(topic, 0)
        for (stage, reason), n in list(p.stats.dead_letter_reasons.items()):
            dead.values[group, stage, reason] = n
    return {"lag": lag, "dead_letters": dead}
