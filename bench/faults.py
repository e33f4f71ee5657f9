"""Fault injection: the local fleet under a steady load of real queries while services crash,
the broker freezes, the cache dies, the group rebalances and poison lands on the topics.

Run: .venv/bin/python bench/faults.py [--duration 240] [--rate 20] [--short] [--no-write]
The fleet is what `qscore up` starts (qscore.local): the embedded broker (tansu, `--fast-groups`
timings), redis-server, 2 tokenizer services and 2 scoring workers as OS processes. This
process offers QueryBatches at a fixed rate and, on a schedule, SIGKILLs and restarts a worker
and a tokenizer, SIGSTOPs the broker, kills and restarts redis-server (same port), adds a third
worker and SIGTERMs it (two rebalances), publishes large legitimate batches, and publishes every
kind of poison straight onto the query and token topics. Everything published is in a ledger;
an independent reader (no group, every partition from the beginning) reads the score and
dead-letter topics throughout. After a bounded drain it checks: every good item scored, never
dead-lettered, one distinct score set per item; every poison dead-lettered once with a reason
that blames the input. Exit status 1 if anything was lost or wrongly dead-lettered, or a poison
was not dead-lettered as bad input (`--strict`: any failed check). `--engine` picks the artifact.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import os
import re
import signal
import struct
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, load_queries, machine, markdown_table, percentiles, write_section

RELIABILITY_MD = ROOT / "docs" / "reliability.md"
FOREIGN_TOPIC = "__consumer_offsets"
TOLERANCE = 1e-5
# Words of an infrastructure failure: a dead letter saying these blames the fleet, not the input.
_NOT_INPUT = re.compile(r"(?i)kafka|timeout|timed out|enginedead|cancelled|connection|"
                        r"pipeline|broker|redis")


@dataclass(frozen=True, slots=True)
class Timing:
    """The schedule's knobs (seconds); --short shrinks them."""

    duration: float  # offered load
    first_fault: float  # quiet load before the first fault
    gap: float  # quiet load between faults
    down: float  # a killed service or redis-server stays down this long
    broker_pause: float  # SIGSTOP .. SIGCONT
    rebalance_hold: float  # the third worker serves this long once in the group
    settle: float  # a fault's window lasts this long past its end
    drain: float  # at most this long for the last scores after the load stops
    rejoin: float  # at most this long for a restarted service to get partitions (0: no wait)


FULL = Timing(duration=240, first_fault=15, gap=10, down=5, broker_pause=10,
              rebalance_hold=10, settle=5, drain=120, rejoin=90)
SHORT = Timing(duration=24, first_fault=2, gap=1, down=1, broker_pause=3,
               rebalance_hold=2, settle=3, drain=45, rejoin=0)


# -- the ledger ---------------------------------------------------------------------------------

@dataclass(slots=True)
class Good:
    published: float  # monotonic, just before the send
    kind: str  # warmup, load or large


@dataclass(slots=True)
class Poison:
    kind: str
    topic: str
    data: bytes
    published: float
    rules: frozenset[str]  # SchemaError rules that name this input's fault
    reason: re.Pattern[str] | None = None  # or a reason that does (no schema rule)


@dataclass(slots=True)
class Fault:
    kind: str
    start: float
    end: float = 0.0
    note: str = ""


@dataclass(slots=True)
class Copy:
    read_at: float
    values: np.ndarray  # scores then embedding
    error: str | None
    cached: bool


@dataclass(slots=True)
class Ledger:
    good: dict[tuple[str, str], Good] = field(default_factory=dict)
    batches: dict[str, tuple[str, ...]] = field(default_factory=dict)
    poison: list[Poison] = field(default_factory=list)
    send_failures: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Seen:
    """What the independent reader found on the score and dead-letter topics."""

    scores: dict[tuple[str, str], list[Copy]] = field(default_factory=dict)
    dead: list[tuple[float, Any]] = field(default_factory=list)  # (read_at, DeadLetter)
    records: dict[str, int] = field(default_factory=dict)  # per topic
    undecodable: int = 0


# -- messages -----------------------------------------------------------------------------------

class Queries:
    """Real queries, cycled; every 4th item gets two other queries as its docs."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self._next = itertools.count()

    def take(self) -> str:
        return self.texts[next(self._next) % len(self.texts)]

    def items(self, n: int, prefix: str) -> list[Any]:
        from schemas import QueryItem

        out = []
        for i in range(n):
            docs = (self.take(), self.take()) if i % 4 == 3 else None
            out.append(QueryItem(id=f"{prefix}{i}", query=self.take(), docs=docs))
        return out


def poison_messages(tag: str, tok: Any, topics: Any, limits: Any) -> list[Poison]:
    """One message of every poison kind, unique to `tag`: (kind, topic, bytes, expected)."""
    from schemas import QueryBatch, QueryItem, encode_token_batch

    now = time.time()

    def query_json(batch_id: str, n_items: int, reply_topic: str | None = None) -> bytes:
        items = [QueryItem(id=f"p{i}", query=f"poison {tag} {i}") for i in range(n_items)]
        return orjson.dumps(QueryBatch(batch_id, tuple(items), now, reply_topic).to_obj())

    def token_batch(batch_id: str, reply_topic: str | None = None) -> Any:
        items = [QueryItem(id="p0", query=f"poison {tag} a"),
                 QueryItem(id="p1", query=f"poison {tag} b", docs=("a doc",))]
        return tok.token_batch(batch_id, items, submitted_at=now, reply_topic=reply_topic)

    oversize = query_json(f"poison-{tag}-oversize", 1)
    oversize += b" " * (limits.max_message_bytes + 1024 - len(oversize))  # still valid JSON
    valid = encode_token_batch(token_batch(f"poison-{tag}-truncated"))
    ids = token_batch(f"poison-{tag}-vocab")
    vocab = encode_token_batch(replace(ids, input_ids=np.where(
        np.arange(len(ids.input_ids)) == 1, 10**6, ids.input_ids).astype(np.uint32)))
    # seq_item is the first array after the header: point the last sequence past the items.
    bad = bytearray(encode_token_batch(token_batch(f"poison-{tag}-inconsistent")))
    _, _, header_len = struct.unpack_from("<4sHI", bad)
    n_seq = orjson.loads(bytes(bad[10:10 + header_len]))["n_seq"]
    struct.pack_into("<I", bad, 10 + header_len + 4 * (n_seq - 1), 7)
    q, t = topics.queries, topics.tokens
    specs: list[tuple[str, str, bytes, set[str], str | None]] = [
        ("garbage bytes", q, b"\xff\xfe\x00" + f"garbage {tag} ".encode() + os.urandom(64),
         {"utf-8", "json"}, None),
        ("oversize QueryBatch", q, oversize, {"max_bytes"}, None),
        ("QueryBatch with too many items",
         q, query_json(f"poison-{tag}-many", limits.max_items + 1), {"max_items"}, None),
        ("QueryBatch with a foreign reply_topic", q,
         query_json(f"poison-{tag}-reply", 1, FOREIGN_TOPIC), {"forbidden_topic"}, None),
        ("truncated TokenBatch", t, valid[: len(valid) // 2], {"length"}, None),
        ("TokenBatch with token ids outside the vocabulary", t, vocab, {"range", "vocab"},
         r"(?i)vocab|out of range|token id"),
        ("inconsistent TokenBatch (seq_item past the items)", t, bytes(bad),
         {"range", "seq_layout"}, None),
        ("TokenBatch with a foreign reply_topic", t,
         encode_token_batch(token_batch(f"poison-{tag}-treply", FOREIGN_TOPIC)),
         {"forbidden_topic"}, None),
    ]
    return [Poison(kind, topic, data, 0.0, frozenset(rules), re.compile(r) if r else None)
            for kind, topic, data, rules, r in specs]


def original_ids(data: bytes) -> tuple[str | None, list[str]]:
    """(batch_id, item ids) of a QueryBatch or TokenBatch, read leniently (a dead letter's
    original may be clipped or broken); (None, []) if neither."""
    try:
        if data[:4] == b"QSTB":
            _, _, n = struct.unpack_from("<4sHI", data)
            header = orjson.loads(data[10:10 + n])
            return str(header["batch_id"]), [str(i) for i in header["item_ids"]]
        obj = orjson.loads(data)
        return str(obj["batch_id"]), [str(it["id"]) for it in obj.get("items") or ()]
    except Exception:
        return None, []


# -- the run ------------------------------------------------------------------------------------

class FaultRun:
    def __init__(self, fleet: Any, timing: Timing, queries: Queries, artifact: Path,
                 rate: float, per_batch: int) -> None:
        from engines.manifest import read_manifest
        from engines.tokenizer import artifact_tokenizer
        from plumbing.kafka import KafkaSettings, Topics
        from schemas import DEFAULT_LIMITS

        self.fleet = fleet
        self.timing = timing
        self.queries = queries
        self.rate = rate
        self.per_batch = per_batch
        self.kafka = KafkaSettings(bootstrap_servers=fleet.bootstrap_servers)
        self.topics = Topics.with_prefix(fleet.spec.topic_prefix)
        self.limits = DEFAULT_LIMITS
        self.manifest = read_manifest(artifact)
        self.tok = artifact_tokenizer(artifact, self.manifest)
        self.run_id = uuid.uuid4().hex[:6]
        self.ledger = Ledger()
        self.seen = Seen()
        self.faults: list[Fault] = []
        self.skipped: list[str] = []
        self.unexpected_exits: list[str] = []
        self.stop_codes: dict[str, int | None] = {}
        self._batches = itertools.count()
        self._acks: set[asyncio.Future[Any]] = set()
        self._busy: set[str] = set()  # services a fault has taken down on purpose
        self.killed_sessions: set[int] = set()
        self.orphans: list[str] = []  # processes a SIGKILLed service left behind
        self.producer: Any = None
        self.started = 0.0
        self.load_s = self.drain_s = 0.0
        self.ended_at = 0.0
        self._progress = asyncio.Event()

    # -- publishing ------------------------------------------------------------------------
    async def _send(self, topic: str, data: bytes, key: bytes, what: str) -> None:
        fut = await self.producer.send(topic, data, key=key)
        self._acks.add(fut)

        def done(f: asyncio.Future[Any]) -> None:
            self._acks.discard(f)
            if f.cancelled() or f.exception() is not None:
                self.ledger.send_failures.append(f"{what}: {f.exception()!r}")

        fut.add_done_callback(done)

    async def publish_good(self, items: list[Any], kind: str) -> None:
        from schemas import QueryBatch, encode_query_batch

        batch_id = f"{self.run_id}-{kind[0]}{next(self._batches):06d}"
        data = encode_query_batch(QueryBatch(batch_id, tuple(items), time.time()), self.limits)
        now = time.monotonic()
        for it in items:
            self.ledger.good[(batch_id, it.id)] = Good(now, kind)
        self.ledger.batches[batch_id] = tuple(it.id for it in items)
        await self._send(self.topics.queries, data, batch_id.encode(), batch_id)

    async def offer_load(self, until: float) -> None:
        """A QueryBatch every per_batch/rate seconds; a producer held up (broker stopped)
        catches up afterwards, as a real one with a buffer would."""
        interval = self.per_batch / self.rate
        due = time.monotonic()
        while due < until:
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            await self.publish_good(self.queries.items(self.per_batch, "i"), "load")
            due += interval

    # -- reading ---------------------------------------------------------------------------
    async def read(self, stop: asyncio.Event) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from schemas import SchemaError, decode_dead_letter, decode_score_batch

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.fleet.bootstrap_servers, group_id=None,
            enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=10,
            max_partition_fetch_bytes=4 << 20, fetch_max_bytes=64 << 20)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for topic in (self.topics.scores,
                                                          self.topics.dead_letter)
                   for p in sorted(await _partitions(consumer, topic))]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=200)
                now = time.monotonic()
                if batches:
                    self._progress.set()
                for tp, records in batches.items():
                    self.seen.records[tp.topic] = self.seen.records.get(tp.topic, 0) + len(
                        records)
                    for r in records:
                        try:
                            if tp.topic == self.topics.dead_letter:
                                self.seen.dead.append((now, decode_dead_letter(r.value)))
                                continue
                            scores = decode_score_batch(r.value)
                        except SchemaError:
                            self.seen.undecodable += 1
                            continue
                        for it in scores.items:
                            values = np.asarray(it.scores + (it.embedding or ()), np.float64)
                            self.seen.scores.setdefault((scores.batch_id, it.id), []).append(
                                Copy(now, values, it.error, it.cached))
        finally:
            await consumer.stop()

    # -- faults ----------------------------------------------------------------------------
    async def _fault(self, kind: str, action: Callable[[Fault], Awaitable[None]]) -> None:
        fault = Fault(kind, time.monotonic())
        self.faults.append(fault)
        try:
            await action(fault)
        finally:
            fault.end = time.monotonic()

    async def _rejoined(self, proc: Any, before: int, within_s: float) -> bool:
        """Wait until `proc` logs a new partition assignment (back in its group)."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if _assignments(proc) > before:
                return True
            if proc.poll() is not None:
                return False
            await asyncio.sleep(0.2)
        return False

    async def kill_restart(self, proc: Any) -> None:
        async def action(fault: Fault) -> None:
            self._busy.add(proc.name)
            try:
                self.killed_sessions.add(proc.pid)  # a session leader (start_new_session)
                proc.kill()
                await asyncio.sleep(self.timing.down)
                before = _assignments(proc)
                proc.start()
            finally:
                self._busy.discard(proc.name)
            rejoin = self.timing.rejoin
            if rejoin and not await self._rejoined(proc, before, rejoin):
                fault.note = f"{proc.name} not back in its group within {rejoin:g} s"
        await self._fault(f"{proc.name.split('-')[0]} SIGKILL + restart", action)

    async def pause_broker(self) -> None:
        pid = self.fleet.broker.pid

        async def action(fault: Fault) -> None:
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(self.timing.broker_pause)
            finally:
                os.kill(pid, signal.SIGCONT)
        await self._fault(f"broker SIGSTOP {self.timing.broker_pause:g} s + SIGCONT", action)

    async def kill_redis(self) -> None:
        redis = self.fleet.redis

        async def action(fault: Fault) -> None:
            port = redis.port
            redis.kill()
            await asyncio.sleep(self.timing.down)
            await asyncio.to_thread(redis.start)
            if redis.port != port:
                fault.note = f"redis-server came back on port {redis.port}, not {port}"
        await self._fault("redis-server SIGKILL + restart", action)

    async def rebalance(self) -> None:
        extra = self.fleet.service("worker", len(self.fleet.workers))

        async def action(fault: Fault) -> None:
            self._busy.add(extra.name)
            before = _assignments(extra)  # its log lives on from an earlier round
            try:
                extra.start()
                if not await self._rejoined(extra, before, max(self.timing.rejoin, 60)):
                    fault.note = f"{extra.name} never joined: {extra.log_tail(5)}"
                await asyncio.sleep(self.timing.rebalance_hold)
                code = await asyncio.to_thread(extra.stop)
                self.stop_codes[extra.name] = code
            finally:
                extra.kill()  # only if still running
                self._busy.discard(extra.name)
        await self._fault("rebalance: third worker added, then SIGTERM", action)

    async def inject_poison(self) -> None:
        for poison in poison_messages(f"{self.run_id}-{len(self.ledger.poison)}", self.tok,
                                      self.topics, self.limits):
            async def action(fault: Fault, p: Poison = poison) -> None:
                p.published = time.monotonic()
                self.ledger.poison.append(p)
                await self._send(p.topic, p.data, os.urandom(8).hex().encode(), p.kind)
            await self._fault(f"poison: {poison.kind}", action)
            await asyncio.sleep(0.1)

    async def large_batches(self) -> None:
        from schemas import QueryItem

        async def many(fault: Fault) -> None:
            await self.publish_good([QueryItem(id=f"x{i}", query=self.queries.take())
                                     for i in range(256)], "large")

        async def docs(fault: Fault) -> None:
            await self.publish_good([QueryItem(id="d0", query=self.queries.take(), docs=tuple(
                self.queries.take() for _ in range(256)))], "large")
        await self._fault("large batch: 256 items without docs", many)
        await self._fault("large batch: 1 item with 256 docs", docs)

    def steps(self) -> list[tuple[str, float, Callable[[], Awaitable[None]]]]:
        """One round of the schedule: (what, seconds it may take, run it)."""
        t = self.timing
        f = self.fleet
        restart = t.down + (12 if t.rejoin else 1)  # + loading its engine and joining
        return [
            ("poison", 2, self.inject_poison),
            ("worker-0 kill", restart, lambda: self.kill_restart(f.workers[0])),
            ("broker pause", t.broker_pause + 1, self.pause_broker),
            ("large batches", 1, self.large_batches),
            ("redis kill", t.down + 1, self.kill_redis),
            ("tokenizer-0 kill", restart, lambda: self.kill_restart(f.tokenizers[0])),
            ("rebalance", t.rebalance_hold + 16, self.rebalance),
            ("worker-1 kill", restart, lambda: self.kill_restart(f.workers[1])),
            ("tokenizer-1 kill", restart, lambda: self.kill_restart(f.tokenizers[1])),
        ]

    async def schedule(self, until: float) -> None:
        """Steps in order, round after round, each only if it fits before `until`."""
        await asyncio.sleep(self.timing.first_fault)
        steps = self.steps()
        ran: set[str] = set()
        for name, estimate, step in itertools.cycle(steps):
            if time.monotonic() + estimate > until:
                break
            await step()
            ran.add(name)
            await asyncio.sleep(self.timing.gap)
        self.skipped = [name for name, _, _ in steps if name not in ran]

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart a service that exited without being told to (an orchestrator would); each
        such exit is reported."""
        while not stop.is_set():
            for proc in self.fleet.processes():
                if proc.name not in self._busy and proc.poll() is not None:
                    self.unexpected_exits.append(
                        f"{proc.name} exited with {proc.poll()} at "
                        f"{time.monotonic() - self.started:.0f} s: {proc.log_tail(3)}")
                    proc.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    # -- the whole run ---------------------------------------------------------------------
    def complete(self) -> bool:
        if any(k not in self.seen.scores for k in self.ledger.good):
            return False
        return all(any(_matches(p, dl) for _, dl in self.seen.dead) for p in self.ledger.poison)

    async def run(self) -> None:
        from plumbing.kafka import make_producer

        self.producer = make_producer(self.kafka, max_request_size=8 << 20)
        await self.producer.start()
        stop_reading, stop_supervising = asyncio.Event(), asyncio.Event()
        reader = asyncio.create_task(self.read(stop_reading))
        supervisor = asyncio.create_task(self.supervise(stop_supervising))
        try:
            await self.warm_up()
            self.started = time.monotonic()
            until = self.started + self.timing.duration
            await asyncio.gather(self.offer_load(until), self.schedule(until))
            await asyncio.wait_for(asyncio.gather(*self._acks, return_exceptions=True), 60)
            self.load_s = time.monotonic() - self.started
            await self._until(self.complete, self.timing.drain)
            self.drain_s = time.monotonic() - self.started - self.load_s
            self.ended_at = time.monotonic()
            stop_supervising.set()
            await supervisor
            procs = self.fleet.processes()  # SIGTERM: they drain into a live broker
            codes = await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
            self.stop_codes.update((p.name, c) for p, c in zip(procs, codes, strict=True))
            await asyncio.sleep(2)  # whatever the drains published
        finally:
            stop_supervising.set()
            stop_reading.set()
            await asyncio.gather(reader, supervisor, return_exceptions=True)
            await self.producer.stop()
        if reader.done() and reader.exception():
            raise reader.exception()  # type: ignore[misc]

    async def warm_up(self) -> None:
        """Every service in its group, then one batch scored end to end."""
        deadline = time.monotonic() + 180
        while any(_assignments(p) == 0 for p in self.fleet.processes()):
            if time.monotonic() > deadline:
                raise RuntimeError("the fleet did not come up:\n" + "\n".join(
                    f"{p.name}: {p.log_tail(5)}" for p in self.fleet.processes()))
            await asyncio.sleep(0.3)
        for _ in range(3):
            await self.publish_good(self.queries.items(self.per_batch, "w"), "warmup")
        if not await self._until(lambda: all(k in self.seen.scores for k in self.ledger.good),
                                 deadline - time.monotonic()):
            raise RuntimeError("warm-up batches were never scored")

    async def _until(self, done: Callable[[], bool], within_s: float) -> bool:
        """Wait (re-checking whenever the reader got records) until `done()`, at most `within_s`."""
        deadline = time.monotonic() + within_s
        while not done():
            if (left := deadline - time.monotonic()) <= 0:
                return False
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), min(left, 1.0))
        return True


async def _partitions(consumer: Any, topic: str) -> set[int]:
    for _ in range(50):
        await consumer.topics()  # refreshes the metadata
        if parts := consumer.partitions_for_topic(topic):
            return set(parts)
        await asyncio.sleep(0.1)
    raise RuntimeError(f"topic {topic} has no partitions")


def _assignments(proc: Any) -> int:
    """How many partition assignments `proc` has logged (its online pipeline, for a worker)."""
    try:
        text = proc.log_path.read_text(errors="replace")
    except OSError:
        return 0
    online = proc.name.startswith("worker")
    return sum(1 for line in text.splitlines() if "partitions_assigned" in line
               and (not online or "online" in line))


def _matches(p: Poison, dl: Any) -> bool:
    """`dl` carries `p`: its bytes, or their beginning where the dead letter clipped them."""
    return dl.original == p.data or (dl.original_truncated and p.data.startswith(dl.original))


def reap_orphans(run: FaultRun) -> None:
    """Find the processes that SIGKILLed services left running (children outlive a killed
    parent unless they watch it), note them, and end them: the run leaves nothing behind."""
    if not Path("/proc").is_dir():
        return
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            sid = os.getsid(pid)
            if sid not in run.killed_sessions:
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not cmd.startswith(sys.executable):  # a service's child runs our Python
                continue
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone meanwhile
            continue
        run.orphans.append(f"pid {pid} of killed service {sid}: {cmd[:90].strip()}")


# -- checks -------------------------------------------------------------------------------------

@dataclass(slots=True)
class Results:
    items: int = 0
    batches: int = 0
    lost: list[tuple[str, str]] = field(default_factory=list)
    errored: list[tuple[str, str]] = field(default_factory=list)
    wrongly_dead: set[tuple[str, str]] = field(default_factory=set)
    poison_missing: list[str] = field(default_factory=list)
    poison_repeated: list[str] = field(default_factory=list)
    poison_wrong_reason: list[str] = field(default_factory=list)
    poison_rules: dict[str, str] = field(default_factory=dict)
    poison_scored: int = 0
    orphans: int = 0  # processes SIGKILLed services left behind
    unattributed_dead: list[str] = field(default_factory=list)
    duplicates: int = 0
    drifting: int = 0
    max_drift: float = 0.0
    drift_cached: int = 0  # drifting items with a copy from the cache
    batch_dependence: float | None = None  # measured when copies drift
    cached_copies: int = 0
    lat_in: list[float] = field(default_factory=list)
    lat_out: list[float] = field(default_factory=list)

    def failed(self, strict: bool) -> bool:
        hard = bool(self.lost or self.wrongly_dead or self.poison_missing
                    or self.poison_wrong_reason)
        soft = bool(self.errored or self.drifting or self.poison_repeated
                    or self.unattributed_dead or self.poison_scored or self.orphans)
        return hard or (strict and soft)


def check(run: FaultRun) -> Results:
    ledger, seen, res = run.ledger, run.seen, Results(orphans=len(run.orphans))
    windows = [(f.start, f.end + run.timing.settle) for f in run.faults]
    res.items, res.batches = len(ledger.good), len(ledger.batches)
    for key, good in ledger.good.items():
        copies = seen.scores.get(key)
        if not copies:
            res.lost.append(key)
            continue
        res.duplicates += len(copies) - 1
        res.cached_copies += sum(c.cached for c in copies)
        if any(c.error for c in copies):
            res.errored.append(key)
        first = copies[0].values
        drifts = [float(np.max(np.abs(c.values - first))) if c.values.shape == first.shape
                  else float("inf") for c in copies[1:]]
        if drifts and max(drifts) > TOLERANCE:
            res.drifting += 1
            res.max_drift = max(res.max_drift, *drifts)
            res.drift_cached += any(c.cached for c in copies)
        if good.kind == "warmup":
            continue
        scored = min(c.read_at for c in copies)
        ms = (scored - good.published) * 1000
        # In flight at any time of a window: published before its end, scored after its start.
        inside = any(good.published <= b and scored >= a for a, b in windows)
        (res.lat_in if inside else res.lat_out).append(ms)
    poison_batches = {original_ids(p.data)[0] for p in ledger.poison}
    res.poison_scored = sum(len(v) for (b, _), v in seen.scores.items() if b in poison_batches)
    hits: dict[int, list[Any]] = {i: [] for i in range(len(ledger.poison))}
    for _, dl in seen.dead:
        owner = next((i for i, p in enumerate(ledger.poison) if _matches(p, dl)), None)
        if owner is not None:
            hits[owner].append(dl)
            continue
        batch_id, item_ids = original_ids(dl.original)
        if batch_id in ledger.batches:
            for item in item_ids or ledger.batches[batch_id]:
                res.wrongly_dead.add((batch_id, item))
        else:
            res.unattributed_dead.append(f"{dl.stage} {dl.source.topic}: {dl.reason[:120]}")
    for i, p in enumerate(ledger.poison):
        letters = hits[i]
        if not letters:
            res.poison_missing.append(p.kind)
            continue
        if len(letters) > 1:
            res.poison_repeated.append(p.kind)
        dl = letters[0]
        res.poison_rules.setdefault(p.kind, f"{dl.stage}: {dl.error_rule or dl.reason[:80]}")
        blames_input = (dl.error_rule in p.rules or (
            p.reason is not None and bool(p.reason.search(dl.reason))
            and not _NOT_INPUT.search(dl.reason)))
        if not blames_input or dl.source.topic != p.topic:
            res.poison_wrong_reason.append(f"{p.kind}: {dl.stage} from {dl.source.topic}, "
                                           f"rule {dl.error_rule}: {dl.reason[:160]}")
    return res


def cross_check(run: FaultRun) -> str:
    """Read both topics again with confluent-kafka (librdkafka), if installed: the same record
    counts, and the same scored items, as the aiokafka reader saw."""
    try:
        from confluent_kafka import Consumer, TopicPartition
    except ImportError:
        return "confluent-kafka is not installed: no second reader"
    from schemas import SchemaError, decode_score_batch

    consumer = Consumer({"bootstrap.servers": run.fleet.bootstrap_servers,
                         "group.id": f"faults-{run.run_id}", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    counts: dict[str, int] = {}
    keys: set[tuple[str, str]] = set()
    try:
        for topic in (run.topics.scores, run.topics.dead_letter):
            parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in parts}
            consumer.assign([TopicPartition(topic, p, 0) for p in parts])
            counts[topic], deadline = 0, time.monotonic() + 60
            pending = {p for p, end in ends.items() if end > 0}
            while pending and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None or msg.error():
                    continue
                counts[topic] += 1
                if msg.offset() + 1 >= ends[msg.partition()]:
                    pending.discard(msg.partition())
                if topic == run.topics.scores:
                    with contextlib.suppress(SchemaError):
                        batch = decode_score_batch(msg.value())
                        keys.update((batch.batch_id, it.id) for it in batch.items)
            consumer.unassign()
    finally:
        consumer.close()
    same = counts == {t: run.seen.records.get(t, 0) for t in counts}
    same_keys = keys == set(run.seen.scores)
    return (f"confluent-kafka, reading both topics again at the end, found {counts} records "
            f"and {len(keys):,} scored items: "
            + ("the same as the aiokafka reader" if same and same_keys else
               f"DIFFERENT from the aiokafka reader ({run.seen.records}, "
               f"{len(run.seen.scores):,} items)"))


def batch_dependence(artifact: Path, texts: list[str]) -> float:
    """How far the engine's output for one query moves when it runs alone vs in a batch of 33:
    what separates two copies of an item scored in different micro-batches."""
    from engines.batch import pad_sequences
    from engines.loader import load_engine
    from engines.tokenizer import artifact_tokenizer
    from schemas import QueryItem

    engine = load_engine(artifact, threads=1)
    try:
        tok = artifact_tokenizer(artifact, engine.manifest)
        enc = tok.encode([QueryItem(str(i), t) for i, t in enumerate(texts[:33])])
        seqs = [enc.input_ids[a:b].astype(np.int64)
                for a, b in itertools.pairwise(enc.offsets.tolist())]
        alone = engine.run(pad_sequences(seqs[:1]))[0]
        batched = engine.run(pad_sequences(seqs))[0]
    finally:
        engine.close()
    return float(np.max(np.abs(alone - batched)))


# -- report -------------------------------------------------------------------------------------

def _lat(ms: list[float]) -> str:
    if not ms:
        return "n/a (0 items)"
    p50, p99 = percentiles(ms)
    return f"{p50:,.0f} / {p99:,.0f} ms ({len(ms):,} items)"


def report(run: FaultRun, res: Results, command: str, source: str, cross: str) -> str:
    kinds: dict[str, list[Fault]] = {}
    for f in run.faults:
        kinds.setdefault(f.kind, []).append(f)
    fault_rows = [[kind, str(len(fs)), f"{np.mean([f.end - f.start for f in fs]):.1f}",
                   run_rules(res, kind)] for kind, fs in kinds.items()]
    faults_table = markdown_table(["fault", "count", "mean length s", "dead letter (stage: rule)"],
                                  fault_rows)
    n_poison = len(run.ledger.poison)
    rows = [
        ["good items published", f"{res.items:,} in {res.batches:,} QueryBatches"],
        ["faults injected", f"{len(run.faults)} ({len(kinds)} kinds, below)"
         + (f"; did not fit: {', '.join(run.skipped)}" if run.skipped else "")],
        ["lost", str(len(res.lost))],
        ["wrongly dead-lettered", str(len(res.wrongly_dead))],
        ["scored with an error", str(len(res.errored))],
        ["poison not dead-lettered", f"{len(res.poison_missing)} of {n_poison}"],
        ["poison dead-lettered more than once", str(len(res.poison_repeated))],
        ["poison dead-lettered for a reason not naming its input",
         str(len(res.poison_wrong_reason))],
        ["dead letters of unknown origin", str(len(res.unattributed_dead))],
        ["duplicates delivered (copies beyond the first)", f"{res.duplicates:,}"],
        [f"items with more than one distinct score set (tolerance {TOLERANCE:g})",
         f"{res.drifting:,}" + (f" (max difference {res.max_drift:.4f})" if res.drifting
                                else "")],
        *([["engine output for one query alone vs in a batch of 33 (max difference)",
            f"{res.batch_dependence:.2g}"]] if res.batch_dependence is not None else []),
        ["copies served from the cache", f"{res.cached_copies:,}"],
        ["unexpected service exits (restarted)", str(len(run.unexpected_exits))],
        ["processes left running by SIGKILLed services", str(len(run.orphans))],
        ["p50 / p99 latency in fault windows", _lat(res.lat_in)],
        ["p50 / p99 latency outside them", _lat(res.lat_out)],
    ]
    t, m = run.timing, run.manifest
    engine = f"{m.precision.upper()} {m.model_id.split('/')[-1]} engine {m.version}"
    today = dt.date.today().isoformat()
    body = (
        "## Fault injection (`bench/faults.py`)\n\n"
        f"Run on {today}; machine: {machine()}. Command: `{command}`\n\n"
        "The local fleet as `qscore up` starts it (embedded tansu broker with `--fast-groups`, "
        "redis-server, 2 tokenizer services with 1 tokenizer process each, 2 scoring workers "
        f"with 1 engine thread each, {engine}) served a steady "
        f"{run.rate:g} items/s of real queries ({source}; QueryBatches of {run.per_batch}, every "
        f"4th item with 2 docs; unique ids) for {run.load_s:.0f} s, while faults ran one after "
        f"another ({t.gap:g} s apart): services SIGKILLed and restarted after {t.down:g} s, the "
        f"broker SIGSTOPped for {t.broker_pause:g} s, redis-server killed and restarted on its "
        "port, a third worker added and SIGTERMed (two rebalances), large legitimate batches, "
        "and every poison kind published straight onto the query and token topics. A reader "
        "outside any group read the score and dead-letter topics from the beginning throughout; "
        f"the drain took {run.drain_s:.0f} s.\n\n"
        f"{markdown_table(['check', 'result'], rows)}\n\n{faults_table}\n\n"
        "Checked per good item (by batch id and item id): at least one score arrived, it was "
        f"never dead-lettered, and every copy equals the first within {TOLERANCE:g} (one distinct "
        "score set); duplicates are copies beyond the first. Per poison message: exactly one "
        "dead letter whose original bytes match it (a prefix when clipped), from the topic it "
        "was published to, with a rule (or reason) that blames the input. Latency: first score "
        "read minus publish; an item counts as in a fault window when it was in flight (published, "
        "not yet scored) at any time from a fault's start to "
        f"{t.settle:g} s after its end; warm-up excluded. {cross}."
        + (" Copies drifted, so the engine was also run on one query alone and in a batch of 33 "
           "(the same query first): the difference is how far two copies of an item scored in "
           "different micro-batches (a redelivery, or a cache entry written from another "
           "batch) can be apart." if res.batch_dependence is not None else "") + "\n")
    return body


def run_rules(res: Results, kind: str) -> str:
    return res.poison_rules.get(kind.removeprefix("poison: "), "")


def details(run: FaultRun, res: Results) -> str:
    """What failed, for the terminal (not the docs)."""
    out = []

    def show(title: str, entries: list[Any]) -> None:
        if entries:
            out.append(f"{title} ({len(entries)}): " + "; ".join(map(str, entries[:10])))

    def active(key: tuple[str, str]) -> str:
        t = run.ledger.good[key].published
        kinds = [f.kind for f in run.faults if f.start <= t <= f.end + run.timing.settle]
        return f"{key} at {t - run.started:.1f} s during {kinds or 'no fault'}"

    show("LOST", [active(k) for k in res.lost])
    show("WRONGLY DEAD-LETTERED", [active(k) for k in sorted(res.wrongly_dead)])
    show("SCORED WITH AN ERROR", [active(k) for k in res.errored])
    show("POISON NOT DEAD-LETTERED", res.poison_missing)
    show("POISON DEAD-LETTERED MORE THAN ONCE", res.poison_repeated)
    show("POISON WITH A WRONG REASON", res.poison_wrong_reason)
    show("DEAD LETTERS OF UNKNOWN ORIGIN", res.unattributed_dead)
    show("UNEXPECTED SERVICE EXITS", run.unexpected_exits)
    show("ORPHANS OF SIGKILLED SERVICES (now killed)", run.orphans)
    show("SEND FAILURES", run.ledger.send_failures)
    show("UNDECODABLE RECORDS ON THE SCORE/DEAD-LETTER TOPICS", [run.seen.undecodable]
         if run.seen.undecodable else [])
    show("FAULT NOTES", [f"{f.kind}: {f.note}" for f in run.faults if f.note])
    show("NON-ZERO EXIT ON SIGTERM", [f"{n}: {c}" for n, c in run.stop_codes.items() if c])
    if res.drifting:
        out.append(f"SCORE DRIFT: {res.drifting} items have copies that differ by up to "
                   f"{res.max_drift:.4f}; {res.drift_cached} of them have a cached copy")
    out.append(f"service logs: {run.fleet.workdir}; per-item timeline: "
               f"{run.fleet.workdir / 'faults-timeline.json'}")
    return "\n".join(out)


def dump_timeline(run: FaultRun) -> None:
    """Per item: published (s into the load), first score after (ms), copies; and the faults."""
    t0 = run.started
    items = [[b, i, round(g.published - t0, 3), g.kind,
              round((min(c.read_at for c in cs) - g.published) * 1000, 1) if cs else None,
              len(cs)]
             for (b, i), g in run.ledger.good.items() for cs in [run.seen.scores.get((b, i), [])]]
    faults = [[f.kind, round(f.start - t0, 3), round(f.end - t0, 3), f.note] for f in run.faults]
    (run.fleet.workdir / "faults-timeline.json").write_bytes(orjson.dumps(
        {"items": items, "faults": faults, "load_s": run.load_s,
         "unexpected_exits": run.unexpected_exits}))


# -- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=None,
                        help=f"seconds of offered load (default {FULL.duration:g}; "
                             f"--short: {SHORT.duration:g})")
    parser.add_argument("--short", action="store_true", help="CI: under a minute in all")
    parser.add_argument("--rate", type=float, default=20.0, help="offered items/s")
    parser.add_argument("--per-batch", type=int, default=4, help="items per QueryBatch")
    parser.add_argument("--queries", type=Path, default=None)
    parser.add_argument("--engine", type=Path, default=None,
                        help="engine artifact (default: the default model's current engine)")
    parser.add_argument("--strict", action="store_true",
                        help="also fail on duplicated dead letters, score drift, item errors")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    timing = SHORT if args.short else FULL
    if args.duration is not None:
        timing = replace(timing, duration=args.duration)

    from engines.select import EngineSettings, find_artifact
    from plumbing.aio import run as run_loop
    from qscore.cli.options import DEFAULT_ENGINE_DIR
    from qscore.local.fleet import FleetSpec, LocalFleet

    texts, source = load_queries(args.queries)
    artifact = args.engine or find_artifact(EngineSettings(engine_dir=DEFAULT_ENGINE_DIR))
    spec = FleetSpec(artifact=artifact, tokenizers=2, workers=2,
                     tokenizer_args=("--processes", "1"), worker_args=("--threads", "1"))
    began = time.monotonic()
    with LocalFleet(spec) as fleet:
        print(f"fleet started; logs: {fleet.workdir}", flush=True)
        fault_run = FaultRun(fleet, timing, Queries(texts), artifact, args.rate, args.per_batch)
        run_loop(fault_run.run())
        reap_orphans(fault_run)
        r = fault_run
        print(f"warm-up {r.started - began:.0f} s, load {r.load_s:.0f} s, drain "
              f"{r.drain_s:.0f} s, stop {time.monotonic() - r.ended_at:.0f} s", flush=True)
        cross = cross_check(fault_run)
    res = check(fault_run)
    if res.drifting:
        res.batch_dependence = batch_dependence(artifact, texts)
    dump_timeline(fault_run)
    command = " ".join([".venv/bin/python bench/faults.py",
                        *(a for a in (argv if argv is not None else sys.argv[1:])
                          if a != "--no-write")])
    body = report(fault_run, res, command, source, cross)
    print(body)
    print(details(fault_run, res))
    print(f"total {time.monotonic() - began:.0f} s")
    if not args.no_write:
        if not RELIABILITY_MD.exists():
            RELIABILITY_MD.write_text("# Reliability\n\nMeasured by scripts under `bench/`; each "
                                      "rewrites its own section between markers.\n")
        write_section("faults", body, RELIABILITY_MD)
    return 1 if res.failed(args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
