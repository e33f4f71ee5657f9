"""A revoke while fetched records wait for a slot: they must not start after it (pure logic,
a fake consumer in place of aiokafka's)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aiokafka import TopicPartition

from plumbing.kafka import KafkaSettings
from plumbing.pipeline import PipelineSettings, RecordPipeline
from schemas import DEFAULT_LIMITS

TP = TopicPartition("in", 0)


class FakeConsumer:
    def __init__(self, offsets: list[int]) -> None:
        self.records = [SimpleNamespace(topic=TP.topic, partition=0, offset=o, value=b"x",
                                        key=None) for o in offsets]
        self.assigned = {TP}
        self.committed: list[dict[TopicPartition, int]] = []

    async def getmany(self, timeout_ms: int, max_records: int) -> dict:
        records, self.records = self.records, []
        return {TP: records} if records else {}

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None: ...
    def resume(self, *tps: TopicPartition) -> None: ...
    def paused(self) -> set[TopicPartition]:
        return set()

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.append(dict(offsets))


async def test_records_fetched_before_a_revoke_are_not_started_after_it() -> None:
    pipeline = RecordPipeline(
        KafkaSettings(), ["in"], PipelineSettings(group_id="g", max_in_flight=2,
                                                  revoke_grace_s=0.01),
        stage="score", dead_letter_topic="dl", limits=DEFAULT_LIMITS)
    await pipeline.consumer.stop()
    await pipeline.producer.stop()
    fake = FakeConsumer([0, 1, 2, 3])
    pipeline.consumer = fake  # type: ignore[assignment]
    gates = {0: asyncio.Event(), 1: asyncio.Event()}
    running = {0: asyncio.Event(), 1: asyncio.Event()}
    handled: list[int] = []

    async def handler(record: SimpleNamespace) -> None:
        if record.offset in gates:
            running[record.offset].set()
            await gates[record.offset].wait()
        handled.append(record.offset)

    fetch = asyncio.create_task(pipeline._fetch_once(handler))
    await running[0].wait()
    await running[1].wait()  # both slots taken; the fetch waits for one, holding 2 and 3
    await pipeline.on_revoked({TP})  # offsets 0 and 1 outlive the grace: abandoned
    pipeline.on_assigned({TP})  # the same partition comes back (eager rebalance)
    gates[1].set()  # a slot frees up
    await fetch
    for _ in range(10):  # let anything the fetch started run to its end
        await asyncio.sleep(0)

    # Offset 0 is still running: nothing may be committed past it, now or later.
    assert handled == [1]
    assert pipeline.tracker.committable() == {}
    assert pipeline.stats.stale_dropped == 2 and pipeline.stats.records == 2
    await pipeline._commit()
    assert all(pos.get(TP, 0) <= 0 for pos in fake.committed)
    gates[0].set()
    await asyncio.gather(*pipeline._tasks)
