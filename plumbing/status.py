"""Live fleet status: every service publishes a heartbeat; `qscore status` reads the live ones.

Publishing: a StatusPublisher (its own small producer) sends one Heartbeat every `interval_s`
to the status topic (Topics.status), keyed by a stable instance id (kind/host/pid/name), and a
tombstone (null value) for that key when the service stops cleanly. A heartbeat that cannot be
sent is logged and tried again at the next beat: status never takes a service down.

The topic is compacted (STATUS_TOPIC_CONFIG: the broker keeps about the newest record of each
key, and forgets a key some time after its tombstone or last heartbeat). Reading does not rely
on it, since brokers may ignore it (tansu does): `read_status` reads a bounded tail, the last
`per_partition` records of each partition, keeps the newest record of each key, drops the
tombstoned ones and those whose newest heartbeat is older than the staleness limit (a service
that was killed sends no tombstone), and skips and counts any record that is not a valid
heartbeat.

Rates are computed here, from cumulative counters a service reports in each Sample (what
arrived, engine busy seconds), as the difference since the previous heartbeat: reading them
resets nothing in the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from plumbing.kafka import KafkaSettings, client_kwargs, make_consumer, make_producer
from schemas import SchemaError
from schemas.status import KINDS, Heartbeat, Kind, decode_heartbeat, instance_id

log = structlog.get_logger(__name__)

DEFAULT_INTERVAL_S = 5.0
# Without an explicit limit a heartbeat is stale after 3 of its service's intervals (at least
# this long): one lost or late heartbeat never hides a live service.
MIN_STALE_S = 15.0
DEFAULT_PER_PARTITION = 1000  # records read back from the end of each partition

# Compacted, and bounded anyway: a killed service's last heartbeat (every restart is a new key)
# goes after a day, a tombstone after an hour; hourly segments let compaction run.
STATUS_TOPIC_CONFIG = {"cleanup.policy": "compact,delete", "retention.ms": str(86_400_000),
                       "segment.ms": str(3_600_000), "delete.retention.ms": str(3_600_000)}
_INVALID_CONFIG = (40, 44)  # INVALID_CONFIG, POLICY_VIOLATION


# -- publishing ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Sample:
    """What a service reports at each beat. Counters are running totals since it started."""

    model_id: str
    serving: str
    pending: str | None = None
    reload_state: str = "pinned"
    last_refusal: str | None = None
    arrived: int = 0  # units received (see Heartbeat.arrival_per_s)
    queue_depth: int | None = None
    busy_s: float | None = None  # engine call seconds, summed over slots; None: no engine
    slots: int = 0  # engine slots serving now
    in_flight: int = 0
    items: int = 0
    dead_letters: int = 0


class RunningTotal:
    """One running total over counters that come and go (a worker's engine pools: a swap adds
    one that starts from zero, a retired one leaves): the sum of every counter's increments,
    so that a difference of two totals is what happened between them."""

    def __init__(self) -> None:
        self.total = 0.0
        self._seen: dict[Hashable, float] = {}

    def __call__(self, counters: Mapping[Hashable, float]) -> float:
        for name, value in counters.items():
            self.total += max(0.0, value - self._seen.get(name, 0.0))
        self._seen = dict(counters)
        return self.total


class StatusPublisher:
    """Heartbeats of one service: `start()` after the service started, `stop()` (tombstone)
    after it stopped; also `async with`. Neither raises for a broker problem."""

    def __init__(self, settings: KafkaSettings, topic: str, *, kind: Kind, name: str,
                 sample: Callable[[], Sample], interval_s: float = DEFAULT_INTERVAL_S,
                 send_timeout_s: float = 10.0, host: str | None = None,
                 pid: int | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.settings = replace(settings, client_id=f"{settings.client_id}-status")
        self.topic, self.kind, self.name, self.sample = topic, kind, name, sample
        self.interval_s, self.send_timeout_s = interval_s, send_timeout_s
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.clock, self.monotonic = clock, monotonic
        self.started_at = clock()
        self.instance = instance_id(kind, self.host, self.pid, name)
        self.sent = 0  # heartbeats the broker acknowledged
        self.failures = 0
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._last: tuple[float, int, float] | None = None  # (monotonic, arrived, busy_s)
        self._failing = False

    def heartbeat(self) -> Heartbeat:
        """The service's heartbeat now; rates are over the span since the previous call (the
        first one has none to measure: 0)."""
        s = self.sample()
        now = self.monotonic()
        busy_s = s.busy_s or 0.0
        then, arrived, busy_before = self._last or (now, s.arrived, busy_s)
        self._last = (now, s.arrived, busy_s)
        span = now - then
        rate = max(0, s.arrived - arrived) / span if span > 0 else 0.0
        busy = None
        if s.busy_s is not None:
            busy = (min(1.0, max(0.0, busy_s - busy_before) / (span * s.slots))
                    if span > 0 and s.slots else 0.0)
        reason = s.last_refusal[:1024] if s.last_refusal else None
        return Heartbeat(
            kind=self.kind, name=self.name, host=self.host, pid=self.pid,
            started_at=self.started_at, sent_at=self.clock(), interval_s=self.interval_s,
            model_id=s.model_id, serving=s.serving, pending=s.pending or None,
            reload_state=s.reload_state, last_refusal=reason, arrival_per_s=rate,
            queue_depth=s.queue_depth, busy=busy, in_flight=s.in_flight, items=s.items,
            dead_letters=s.dead_letters)

    async def start(self) -> None:
        """Start beating (the first heartbeat goes out at once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.name}-status")

    async def _run(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self.interval_s)

    async def beat(self) -> bool:
        """Send one heartbeat; True once the broker acknowledged it. Never raises (but for a
        cancellation)."""
        try:
            value = self.heartbeat().encode()
        except Exception as exc:  # a bug in a sample: say so, keep serving
            return self._failed("status_sample_failed", exc)
        return await self._send(value)

    async def _send(self, value: bytes | None) -> bool:
        try:
            producer = await self._connect()
            await asyncio.wait_for(producer.send_and_wait(
                self.topic, value, key=self.instance.encode()), self.send_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._failed("status_send_failed", exc)
        if value is not None:
            self.sent += 1
        if self._failing:
            self._failing = False
            log.info("status_recovered", topic=self.topic)
        return True

    def _failed(self, event: str, exc: Exception) -> bool:
        self.failures += 1
        # The first failure of a run of them is a warning; the rest would repeat it every beat.
        (log.debug if self._failing else log.warning)(
            event, topic=self.topic, error=f"{type(exc).__name__}: {exc}",
            failures=self.failures)
        self._failing = True
        return False

    async def _connect(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = make_producer(self.settings)
            try:
                await asyncio.wait_for(producer.start(), self.send_timeout_s)
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def stop(self) -> None:
        """Stop beating; a tombstone tells readers this service is gone (unless no heartbeat
        ever reached the broker: then there is nothing to remove)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._producer is None:
            return
        if self.sent:
            await self._send(None)
        producer, self._producer = self._producer, None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), self.send_timeout_s)

    async def __aenter__(self) -> StatusPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def ensure_status_topic(settings: KafkaSettings, topic: str, *, partitions: int = 1,
                              replication: int = 1) -> bool:
    """Create the status topic compacted (STATUS_TOPIC_CONFIG) unless it exists; a broker that
    refuses the retention settings gets compaction alone, one that refuses that, none.
    True when it was created."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        if topic in set(await admin.list_topics()):
            return False
        for config in (STATUS_TOPIC_CONFIG, {"cleanup.policy": "compact"}, {}):
            try:
                response = await admin.create_topics([NewTopic(
                    topic, num_partitions=partitions, replication_factor=replication,
                    topic_configs=config)])
            except TopicAlreadyExistsError:
                return False
            (_, code, *_) = response.topic_errors[0]
            if code == 0:
                return True
            if code == TopicAlreadyExistsError.errno:
                return False
            if code not in _INVALID_CONFIG:
                raise RuntimeError(f"creating topic {topic!r} failed with Kafka error {code}")
            log.info("status_topic_config_refused", topic=topic, config=config, code=code)
        raise RuntimeError(f"creating topic {topic!r} failed: its configuration was refused")
    finally:
        await admin.close()


# -- reading -------------------------------------------------------------------------------

class StatusRecord(Protocol):
    """What is read of a record (aiokafka's ConsumerRecord has these)."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...  # ms
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class FleetStatus:
    services: tuple[Heartbeat, ...]  # live, by kind, host, name, pid
    malformed: int = 0  # records skipped: no key, or not a valid heartbeat for it
    stale: int = 0  # services whose newest heartbeat is older than the limit
    stopped: int = 0  # services whose newest record is a tombstone (a clean stop)
    records: int = 0  # records read
    topic_found: bool = True


def stale_after_s(heartbeat: Heartbeat, stale_s: float | None = None) -> float:
    """How old `heartbeat` may be and still count as live."""
    return stale_s if stale_s is not None else max(MIN_STALE_S, 3 * heartbeat.interval_s)


def live_services(records: Iterable[StatusRecord], *, now: float,
                  stale_s: float | None = None) -> FleetStatus:
    """Fold status records into the live services: the newest valid record of each key wins
    (a key's later offset on its partition; across partitions, the later timestamp), a
    tombstone removes the key, and a heartbeat older than the limit (stale_after_s) is left
    out. An invalid record is skipped, as if it had not been read, and counted."""
    newest: dict[bytes, tuple[int, int, int, Heartbeat | None]] = {}
    malformed = read = 0
    for record in records:
        read += 1
        key = record.key
        heartbeat = None
        try:
            if not key:
                raise SchemaError("key", "required")
            if record.value is not None:
                heartbeat = decode_heartbeat(record.value)
                if heartbeat.instance.encode() != key:
                    raise SchemaError("key", "mismatch", "the key is not the instance id")
        except SchemaError as exc:
            malformed += 1
            log.debug("status_record_skipped", partition=record.partition,
                      offset=record.offset, error=str(exc))
            continue
        seen = newest.get(key)
        if seen is not None:
            partition, offset, timestamp, _ = seen
            if ((record.partition == partition and record.offset < offset)
                    or (record.partition != partition and record.timestamp < timestamp)):
                continue
        newest[key] = (record.partition, record.offset, record.timestamp, heartbeat)
    live: list[Heartbeat] = []
    stale = stopped = 0
    for *_, heartbeat in newest.values():
        if heartbeat is None:
            stopped += 1
        elif heartbeat.age_s(now) > stale_after_s(heartbeat, stale_s):
            stale += 1
        else:
            live.append(heartbeat)
    live.sort(key=lambda h: (h.kind, h.host, h.name, h.pid))
    return FleetStatus(tuple(live), malformed=malformed, stale=stale, stopped=stopped,
                       records=read)


async def read_status(settings: KafkaSettings, topic: str, *, stale_s: float | None = None,
                      per_partition: int = DEFAULT_PER_PARTITION, timeout_s: float = 15.0,
                      now: Callable[[], float] = time.time) -> FleetStatus:
    """The live services on `topic`, from the last `per_partition` records of each partition
    before its end offset when the read began. TimeoutError if it takes over `timeout_s`;
    aiokafka's errors if the broker cannot be reached."""
    if per_partition < 1:
        raise ValueError(f"per_partition must be >= 1, got {per_partition}")
    consumer = make_consumer(replace(settings, client_id=f"{settings.client_id}-status"),
                             group_id=None)
    try:
        async with asyncio.timeout(timeout_s):
            await consumer.start()
            if topic not in await consumer.topics():  # lists every topic: creates none
                return FleetStatus((), topic_found=False)
            records = await _read_tail(consumer, topic, per_partition)
    finally:
        await consumer.stop()
    return live_services(records, now=now(), stale_s=stale_s)


async def _read_tail(consumer: Any, topic: str, per_partition: int) -> list[Any]:
    partitions = [TopicPartition(topic, p)
                  for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(partitions)
    begin = await consumer.beginning_offsets(partitions)
    end = await consumer.end_offsets(partitions)
    for tp in partitions:
        consumer.seek(tp, max(begin[tp], end[tp] - per_partition))
    records: list[Any] = []
    empty = 0
    # Up to the end offsets read at the start (heartbeats keep arriving: reading on until none
    # comes might never end). A broker that reports an end short of the last record of a batch
    # (tansu) still hands out the whole batch; one that reports it past the last readable
    # record is read until a few polls in a row bring nothing.
    while empty < 5 and not all([await consumer.position(tp) >= end[tp] for tp in partitions]):
        fetched = await consumer.getmany(timeout_ms=200, max_records=10_000)
        for batch in fetched.values():
            records.extend(batch)
        empty = 0 if fetched else empty + 1
    return records
