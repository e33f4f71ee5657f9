"""A reload during a rebalance loses nothing (issue 12).

Two ScoringWorkers share one consumer group on a four-partition token topic while TokenBatches
stream in. A second version is promoted; while worker A is loading it, checking it, or swapping
it in, worker B joins or leaves the group, so partitions move between them mid-reload. Then:
every item published is scored (a redelivery across the rebalance may score one twice, which
DESIGN.md's at-least-once allows: the copies must agree), nothing is dead-lettered and nothing
fails, every score is labelled with a version that was serving when it was computed, and
everything published after the swap is scored by the new version.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from engines.batch import PaddedBatch
from engines.loader import load_engine
from engines.protocol import Engine
from engines.tokenizer import QueryTokenizer
from plumbing.cache import CacheSettings
from plumbing.kafka import KafkaSettings, Topics, make_producer
from qscore.cli.services import follower
from schemas import QueryItem, ScoreBatch, decode_score_batch, encode_token_batch
from tests.integration.fleet_helpers import (
    CreateTopic,
    kafka_settings,
    make_topics,
    sample_batches,
)
from tests.integration.test_worker_follow import _registry
from tests.integration.test_worker_swap import Relabelled
from workers.microbatcher import BatcherSettings
from workers.reload import ReloadSettings
from workers.scoring import BatchLimits, run_token_batch
from workers.service import ScoringWorker, WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 4
TIMEOUT = 30.0  # seconds any one wait (a group join, a reload, the scores) may take
PACE_S = 0.02  # between two published TokenBatches: a steady stream of ~50 a second
AFTER_SWAP = 20  # TokenBatches published once the swap is done
# Reload at once: any traffic counts as quiet, no jitter, checksums verified at full speed.
RELOAD = ReloadSettings(poll_s=0.05, quiet_load=1.0, quiet_depth=1_000_000, quiet_s=0.05,
                        deadline_s=0.05, jitter_s=0, verify_mb_per_s=10_000)


class Held(Relabelled):
    """A serving engine whose calls can be held (they block until released), so that
    TokenBatches are in flight on it at a chosen moment."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, engine.manifest.version)
        self.running = threading.Event()  # cleared: calls wait
        self.running.set()
        self.waiting = threading.Event()  # a call is waiting for `running`

    def run(self, batch: PaddedBatch, lane: int = 0) -> np.ndarray:
        if not self.running.is_set():
            self.waiting.set()
        self.running.wait(TIMEOUT)
        return super().run(batch, lane)


class Member:
    """One in-process ScoringWorker of the group; its online partitions are watched."""

    def __init__(self, worker: ScoringWorker, changed: asyncio.Event) -> None:
        self.worker = worker
        self.assigned: set[TopicPartition] = set()
        self.before_revoke: Callable[[], Awaitable[None]] | None = None  # awaited first
        self.task: asyncio.Task[None] | None = None
        pipeline = worker.online
        on_assigned, on_revoked = pipeline.on_assigned, pipeline.on_revoked

        def assigned(tps: set[TopicPartition]) -> None:
            on_assigned(tps)
            self.assigned = set(tps)
            changed.set()

        async def revoked(tps: set[TopicPartition]) -> None:
            self.assigned = set()
            changed.set()
            if self.before_revoke is not None:
                await self.before_revoke()
            await on_revoked(tps)

        pipeline.on_assigned = assigned  # type: ignore[method-assign]
        pipeline.on_revoked = revoked  # type: ignore[method-assign]

    async def start(self) -> None:
        await self.worker.start()
        self.task = asyncio.create_task(self.worker.run())

    async def stop(self) -> None:
        """SIGTERM: drain, commit, leave the group."""
        self.worker.request_stop()
        try:
            if self.task is not None:
                await asyncio.wait_for(self.task, TIMEOUT)
        finally:
            await self.worker.stop()


async def _settled(members: list[Member], changed: asyncio.Event) -> None:
    """Until the group's rebalance is over: `members` share every partition, each has some."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            held = [m.assigned for m in members]
            if all(held) and sum(map(len, held)) == len(set().union(*held)) == PARTITIONS:
                return
            changed.clear()
            await changed.wait()


class ScoreLog:
    """Every message of the score topic, read as it arrives (no group: all partitions)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                         auto_offset_reset="earliest", fetch_max_wait_ms=50)
        self.batches: list[ScoreBatch] = []
        self._grew = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ScoreLog:
        await self.consumer.start()
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.consumer.stop()

    async def _read(self) -> None:
        while True:
            got = await self.consumer.getmany(timeout_ms=100)
            for records in got.values():
                self.batches.extend(decode_score_batch(r.value) for r in records)
            if got:
                self._grew.set()

    async def until(self, done: Callable[[], bool], what: str) -> None:
        """Until `done()`, checked whenever scores arrive (they arrive while work flows)."""
        try:
            async with asyncio.timeout(TIMEOUT):
                while not done():
                    assert self._task is not None
                    if self._task.done():  # the reader died: say why
                        self._task.result()
                    self._grew.clear()
                    await self._grew.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None


def _settings(kafka: KafkaSettings, topics: Topics, group: str) -> WorkerSettings:
    return WorkerSettings(kafka=kafka, topics=topics, group_id=group,
                          batcher=BatcherSettings(max_wait_ms=2))


def _scored(batches: list[ScoreBatch]) -> set[tuple[str, str]]:
    return {(b.batch_id, it.id) for b in batches for it in b.items}


@dataclass
class Timeline:
    """time.time() of the moments the version checks compare scores' produced_at with."""

    v2_from: float = float("inf")  # v2 could serve from here (B started on it, or A swapped)
    v1_until: float = 0.0  # v1 served nothing after here (A's old engines closed, B left)
    state_at_gate: str = ""  # A's reload state when the move began
    in_flight_at_swap: int = -1  # TokenBatches A was still scoring on v1 when it swapped
    rebalances: dict[str, int] = field(default_factory=dict)


@pytest.mark.parametrize(("phase", "move"), [
    ("loading", "join"),
    ("checking", "leave"),
    ("swapping", "join"),
    ("swapping", "leave"),
])
async def test_a_reload_during_a_rebalance_loses_nothing(
        phase: str, move: str, kafka_bootstrap: str, create_topic: CreateTopic,
        topic_name: str, classifier_engine: Engine, tmp_path: Path) -> None:
    """B joins (starting on the promoted version) or leaves (draining on the old one) while
    A's reload is held at `phase`; at "swapping", A's swap lands inside A's revoke, with
    TokenBatches still in flight on the old engine. The engine is the tiny classifier: the
    host's cores go to the workers and the broker, not to a model."""
    await _reload_during_rebalance(phase, move, kafka_bootstrap, create_topic, topic_name,
                                   classifier_engine.path, tmp_path)


async def _reload_during_rebalance(phase: str, move: str, bootstrap: str,
                                   create_topic: CreateTopic, topic_name: str,
                                   artifact: Path, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    registry, model = _registry(artifact, root)
    v1 = registry.get(model)
    kafka = kafka_settings(bootstrap)
    topics = await make_topics(create_topic, topic_name, partitions=PARTITIONS)
    group = f"{topic_name}-w"
    changed = asyncio.Event()
    timeline = Timeline()
    at_gate, go_on = threading.Event(), threading.Event()  # A's reload reached `phase`; resume
    moving = asyncio.Event()  # B is joining or leaving now
    revoke_began, swapped = asyncio.Event(), asyncio.Event()

    def member(engine: Engine, name: str) -> Member:
        return Member(ScoringWorker(_settings(kafka, topics, group), [engine], name=name),
                      changed)

    old = Held(await asyncio.to_thread(load_engine, v1, threads=1))
    a = member(old, "a")
    new_engines: list[Relabelled] = []

    def load(path: Path, threads: int) -> list[Engine]:
        engines = [Relabelled(load_engine(path, threads=threads), path.name)]
        new_engines.extend(engines)
        if phase == "loading":  # loaded, not yet returned: both versions resident
            at_gate.set()
            go_on.wait(TIMEOUT)
        return engines  # type: ignore[return-value]

    reloader = a.worker.reloader = follower(a.worker, RELOAD, root, model, CacheSettings(),
                                            load)

    golden = reloader.check  # the worker's own golden check, gated at "checking"
    assert golden is not None

    def check(engine: Engine) -> object:
        if phase == "checking":
            at_gate.set()
            go_on.wait(TIMEOUT)
        return golden(engine)

    reloader.check = check
    original_swap = a.worker.swap

    async def swap(engines: list[Engine]) -> int:
        if phase == "swapping":
            # Hold the old engine until a batch waits on it, so that TokenBatches are still
            # in flight on it when the swap comes; start the move; swap once A's revoke has
            # begun.
            old.running.clear()
            await asyncio.to_thread(old.waiting.wait, TIMEOUT)
            at_gate.set()
            await asyncio.wait_for(revoke_began.wait(), TIMEOUT)
            timeline.in_flight_at_swap = a.worker.online.tracker.in_flight()  # all on v1
        timeline.v2_from = min(timeline.v2_from, time.time())
        try:
            return await original_swap(engines)
        finally:
            swapped.set()
            old.running.set()

    a.worker.swap = swap  # type: ignore[method-assign]

    async def hold_revoke() -> None:
        # At the swap: A's revoke (from B's move) waits until the swap is done, so the swap
        # lands in the middle of the rebalance, before A drains and commits what it gives up.
        if phase == "swapping" and moving.is_set() and not revoke_began.is_set():
            revoke_began.set()
            await asyncio.wait_for(swapped.wait(), TIMEOUT)

    a.before_revoke = hold_revoke
    b: Member | None = None
    if move == "leave":  # B serves v1 from the start and leaves mid-reload
        b = member(Relabelled(await asyncio.to_thread(load_engine, v1, threads=1), "v1"), "b")

    tokenizer = QueryTokenizer(v1 / "tokenizer" / "tokenizer.json", old.manifest.max_length,
                               pairs=old.manifest.head == "classifier")
    batches = list(sample_batches(1500, 4, max_docs=1, tag="r").items())  # ~30 s of stream
    sent: list[tuple[str, list[QueryItem], bool]] = []  # (batch id, items, after the swap)
    producer = make_producer(kafka)

    async def stream() -> None:
        """A steady stream of TokenBatches until AFTER_SWAP were published after the swap."""
        after = 0
        for batch_id, items in batches:
            if after >= AFTER_SWAP:
                return
            post = swapped.is_set()
            tb = tokenizer.token_batch(batch_id, items, submitted_at=time.time())
            await (await producer.send(topics.tokens, encode_token_batch(tb),
                                       key=batch_id.encode()))
            sent.append((batch_id, items, post))
            after += post
            await asyncio.sleep(PACE_S)  # pacing, not synchronisation
        raise AssertionError(f"the stream ran out of batches before the swap ({phase}, {move})")

    running: list[Member] = []
    async with contextlib.AsyncExitStack() as stack:
        log = await stack.enter_async_context(ScoreLog(bootstrap, topics.scores))
        await producer.start()
        stack.push_async_callback(producer.stop)

        async def stop_all() -> None:
            go_on.set()
            old.running.set()
            for m in running:
                with contextlib.suppress(Exception):
                    await m.stop()

        stack.push_async_callback(stop_all)
        for m in (a, b):  # one after the other: joining together takes tansu longer
            if m is not None:
                running.append(m)
                await m.start()  # returns once it is in the group
        await _settled(running, changed)
        streaming = asyncio.create_task(stream())
        stack.callback(streaming.cancel)
        await log.until(lambda: all(m.worker.stats.messages >= 3 for m in running),
                        "every member to serve")

        registry.promote(model, "v2", smoke=False)
        assert await asyncio.to_thread(at_gate.wait, TIMEOUT), f"the reload never got to {phase}"
        timeline.state_at_gate = reloader.stats.state
        assert a.worker.manifest.version == "v1"
        moving.set()
        if move == "join":  # a new worker starts on what is promoted now: v2
            timeline.v2_from = min(timeline.v2_from, time.time())
            b = member(Relabelled(await asyncio.to_thread(
                load_engine, registry.get(model), threads=1), "v2"), "b")
            running.append(b)
            await b.start()  # returns once B is in the group
        else:
            assert b is not None
            running.remove(b)
            await b.stop()
            timeline.v1_until = time.time()
        if phase != "swapping":  # the rebalance is over while the reload is still held
            await _settled(running, changed)
            assert reloader.stats.state == phase and a.worker.manifest.version == "v1"
            go_on.set()
        await asyncio.wait_for(swapped.wait(), TIMEOUT)
        await _settled(running, changed)
        await asyncio.wait_for(a.worker.retired(), TIMEOUT)  # v1's engines closed on A
        timeline.v1_until = max(timeline.v1_until, time.time())
        await asyncio.wait_for(streaming, TIMEOUT)

        expected = {(batch_id, it.id) for batch_id, items, _ in sent for it in items}
        await log.until(lambda: expected <= _scored(log.batches), "every item's score")
        stopping, running[:] = list(running), []
        await asyncio.gather(*(m.stop() for m in stopping))  # together: no last rebalance
        assert b is not None
        members = (a, b)
        published = sum(m.worker.stats.score_batches for m in members)
        await log.until(lambda: len(log.batches) >= published, "every score published")
        timeline.rebalances = {m.worker.name: m.worker.online.stats.rebalances for m in members}

    # -- what came out ---------------------------------------------------------------------
    assert timeline.state_at_gate == phase
    assert len(log.batches) == published  # every ScoreBatch the workers sent, none more
    for m in members:
        w = m.worker
        assert w.failure is None and w.online.failure is None and w.offline.failure is None
        assert w.online.stats.dead_letters == 0 and w.offline.stats.dead_letters == 0
        assert w.stats.engine_errors == 0 and w.stats.engine_retries == 0, w.stats
        assert w.stats.bisections == 0
    assert reloader.stats.reloads == 1 and reloader.stats.refused == 0, reloader.stats
    assert a.worker.swaps == 1 and a.worker.manifest.version == "v2"
    # v1 served on A and was closed once its last batch was done (a call after that would
    # have been an engine error: Relabelled refuses it).
    assert old.closed and old.calls
    assert [e.closed for e in new_engines] == [True]  # closed by A's stop, not before
    if phase == "swapping":
        assert timeline.in_flight_at_swap > 0  # the swap did come with work in flight on v1
    assert timeline.rebalances["a"] >= 2  # its own join, then B's move
    assert b.worker.stats.messages > 0  # B served its share before leaving, or after joining

    scores: dict[tuple[str, str], list[tuple[str, tuple[float, ...], float]]] = defaultdict(list)
    for sb in log.batches:
        versions = {it.model_version for it in sb.items}
        assert len(versions) == 1, (sb.batch_id, versions)  # wholly on one engine
        for it in sb.items:
            assert it.error is None and not it.cached, (sb.batch_id, it)
            scores[(sb.batch_id, it.id)].append((it.model_version, it.scores, sb.produced_at))
    missing, extra = expected - set(scores), set(scores) - expected
    assert not missing and not extra, (sorted(missing)[:10], sorted(extra)[:10])
    # A redelivery across the rebalance may score an item again: the same scores, whatever
    # version computed them (v2 is a copy of v1's artifact), never another result.
    duplicates = {k: v for k, v in scores.items() if len(v) > 1}
    for key, copies in duplicates.items():
        for _, values, _ in copies[1:]:
            np.testing.assert_allclose(values, copies[0][1], atol=1e-5, err_msg=str(key))
    for key, copies in scores.items():
        for version, _, produced_at in copies:
            assert version in ("v1", "v2"), (key, version)
            if version == "v2":  # computed once v2 served somewhere
                assert produced_at >= timeline.v2_from, (key, produced_at, timeline)
            else:  # computed before v1 was retired everywhere
                assert produced_at <= timeline.v1_until, (key, produced_at, timeline)
    after = {batch_id for batch_id, _, post in sent if post}
    assert len(after) == AFTER_SWAP
    late = {k: c for k, c in scores.items() if k[0] in after and {v for v, *_ in c} != {"v2"}}
    assert not late, late  # everything published after the swap: the new version only
    before = {batch_id for batch_id, _, post in sent if not post}
    assert any(v == "v1" for k, c in scores.items() if k[0] in before for v, *_ in c)

    # Against a plain engine, for a sample of batches of every phase of the run.
    reference = await asyncio.to_thread(load_engine, v1, threads=2)
    try:
        sample = sent[::10] + [s for s in sent if s[2]][:3]
        for batch_id, items, _ in sample:
            tb = tokenizer.token_batch(batch_id, items, submitted_at=time.time())
            want = await asyncio.to_thread(run_token_batch, reference, tb, BatchLimits())
            for item in want.items:
                for _, values, _ in scores[(batch_id, item.id)]:
                    np.testing.assert_allclose(values, item.scores, atol=1e-5)
    finally:
        reference.close()
