"""RecordPipeline on a real broker: broker trouble stops it, bad records dead-letter,
backpressure pauses fetching, rebalances are counted."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from engines.errors import EngineDead
from plumbing.kafka import KafkaSettings, ensure_topics, make_consumer, make_producer
from plumbing.pipeline import PipelineError, PipelineSettings, RecordPipeline
from qscore.local.servers import EmbeddedBroker
from schemas import DEFAULT_LIMITS
from tests.integration.fleet_helpers import CreateTopic, kafka_settings

pytestmark = pytest.mark.integration

TIMEOUT = 60.0  # seconds a group join or rebalance may take before the test fails


async def _produce(kafka: KafkaSettings, topic: str, *values: bytes,
                   partition: int | None = None) -> None:
    producer = make_producer(kafka)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, partition=partition)
    finally:
        await producer.stop()


def _pipeline(kafka: KafkaSettings, topic: str, dead: str, group: str, name: str,
              max_in_flight: int = 256) -> RecordPipeline:
    return RecordPipeline(kafka, [topic], PipelineSettings(group_id=group,
                                                           max_in_flight=max_in_flight),
                          stage="score", dead_letter_topic=dead, limits=DEFAULT_LIMITS,
                          name=name)


@pytest.mark.parametrize("failure", [
    KafkaTimeoutError("the broker did not acknowledge the outputs"),
    EngineDead("cuda:0: CUDA error: an illegal memory access was encountered"),
], ids=["broker", "engine-dead"])
async def test_a_broker_failure_stops_the_pipeline_without_dead_letter_or_commit(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str,
        failure: Exception) -> None:
    kafka = kafka_settings(kafka_bootstrap)
    source = await create_topic(f"{topic_name}.in")
    dead = await create_topic(f"{topic_name}.dead")
    producer = make_producer(kafka)
    await producer.start()
    try:
        for value in (b"ok", b"outputs-not-acked", b"after"):
            await producer.send_and_wait(source, value)
    finally:
        await producer.stop()

    seen: list[bytes] = []

    async def handler(record: ConsumerRecord) -> None:
        seen.append(record.value)
        if record.value == b"outputs-not-acked":
            raise failure

    pipeline = RecordPipeline(kafka, [source], PipelineSettings(group_id=f"{topic_name}-g",
                                                                max_in_flight=1),
                              stage="score", dead_letter_topic=dead, limits=DEFAULT_LIMITS,
                              fatal=(EngineDead,))  # as the scoring worker declares it
    await pipeline.start()
    try:
        with pytest.raises(PipelineError):
            await asyncio.wait_for(pipeline.run(handler, idle_exit_s=2), 60)
    finally:
        await pipeline.stop()
    assert pipeline.stats.dead_letters == 0  # not the record's fault: no dead letter
    assert b"outputs-not-acked" in seen
    # It joined its group, and aiokafka revokes (nothing, the first time) before every join.
    assert pipeline.stats.rebalances >= 1

    check = make_consumer(kafka, group_id=f"{topic_name}-g")
    await check.start()
    try:
        committed = await check.committed(TopicPartition(source, 0))
    finally:
        await check.stop()
    assert committed == 1  # "ok" done; the unacknowledged record will be redelivered


async def test_backpressure_pauses_fetching_until_a_slot_frees(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str) -> None:
    kafka = kafka_settings(kafka_bootstrap)
    source = await create_topic(f"{topic_name}.in")
    dead = await create_topic(f"{topic_name}.dead")
    await _produce(kafka, source, b"r0", b"r1", b"r2")

    gate, paused, done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    handled: list[bytes] = []

    async def handler(record: ConsumerRecord) -> None:
        await gate.wait()  # r0 and r1 hold both slots until the test opens the gate
        handled.append(record.value)
        if len(handled) == 3:
            done.set()

    pipeline = _pipeline(kafka, source, dead, f"{topic_name}-g", "bp", max_in_flight=2)
    pause = pipeline.consumer.pause

    def spy(*partitions: TopicPartition) -> None:
        pause(*partitions)
        paused.set()

    pipeline.consumer.pause = spy  # type: ignore[method-assign]
    await pipeline.start()
    run = asyncio.create_task(pipeline.run(handler))
    try:
        await asyncio.wait_for(paused.wait(), TIMEOUT)  # r2 fetched, no slot free for it
        assert pipeline.stats.pauses == 1 and pipeline.stats.records == 2
        assert pipeline.consumer.paused() == {TopicPartition(source, 0)}
        gate.set()
        await asyncio.wait_for(done.wait(), TIMEOUT)
        assert sorted(handled) == [b"r0", b"r1", b"r2"]
        assert pipeline.stats.pauses == 1  # nothing was left to wait for a slot after r2
        assert pipeline.consumer.paused() == set()  # resumed once r2 got its slot
        pipeline.request_stop()
        await asyncio.wait_for(run, TIMEOUT)
    finally:
        pipeline.request_stop()
        await pipeline.stop()
    assert pipeline.stats.finished == 3 and pipeline.stats.rebalances >= 1


async def test_a_member_joining_and_leaving_rebalances_the_group(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str) -> None:
    kafka = kafka_settings(kafka_bootstrap)
    source = await create_topic(f"{topic_name}.in", partitions=2)
    dead = await create_topic(f"{topic_name}.dead")
    group = f"{topic_name}-g"
    changed = asyncio.Event()
    assignments: dict[str, set[TopicPartition]] = {}

    def watch(pipeline: RecordPipeline) -> RecordPipeline:
        on_assigned = pipeline.on_assigned

        def spy(assigned: set[TopicPartition]) -> None:
            on_assigned(assigned)
            assignments[pipeline.name] = assigned
            changed.set()

        pipeline.on_assigned = spy  # type: ignore[method-assign]
        return pipeline

    async def until(*sizes: int) -> None:
        """Until members a (and b) hold `sizes` partitions."""
        async with asyncio.timeout(TIMEOUT):
            while [len(assignments.get(n, ())) for n in "ab"[:len(sizes)]] != list(sizes):
                changed.clear()
                await changed.wait()

    async def handler(record: ConsumerRecord) -> None:
        pass

    a = watch(_pipeline(kafka, source, dead, group, "a"))
    b = watch(_pipeline(kafka, source, dead, group, "b"))
    await a.start()
    run_a = asyncio.create_task(a.run(handler))
    try:
        await until(2)  # alone: both partitions
        alone = a.stats.rebalances
        assert alone >= 1  # its own join
        await b.start()
        run_b = asyncio.create_task(b.run(handler))
        try:
            await until(1, 1)  # b joined: a gave a partition up
            assert b.stats.rebalances >= 1
            shared = a.stats.rebalances
            assert shared > alone
        finally:
            b.request_stop()
            await asyncio.wait_for(run_b, TIMEOUT)
            await b.stop()
        assignments.pop("b")
        await until(2)  # b left: a takes both partitions again
        assert a.stats.rebalances > shared
    finally:
        a.request_stop()
        await asyncio.wait_for(run_a, TIMEOUT)
        await a.stop()


async def test_a_handler_slower_than_max_poll_interval_does_not_leave_the_group(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str) -> None:
    # Every slot busy for longer than max_poll_interval_ms: fetching pauses, but the consumer
    # must keep polling, or it leaves its group and the partition churns between members.
    kafka = dataclasses.replace(kafka_settings(kafka_bootstrap), max_poll_interval_ms=2500)
    source = await create_topic(f"{topic_name}.in")
    dead = await create_topic(f"{topic_name}.dead")
    await _produce(kafka, source, b"slow", b"a", b"b", partition=0)
    pipeline = RecordPipeline(
        kafka, [source], PipelineSettings(group_id=f"{topic_name}-g", max_in_flight=1),
        stage="score", dead_letter_topic=dead, limits=DEFAULT_LIMITS, name="slow")
    done: list[bytes] = []
    all_done = asyncio.Event()

    async def handler(record: ConsumerRecord) -> None:
        if record.value == b"slow":
            await asyncio.sleep(5.0)  # the work itself takes this long: it is what is tested
        done.append(record.value)
        if len(done) == 3:
            all_done.set()

    await pipeline.start()
    run = asyncio.create_task(pipeline.run(handler))
    try:
        await asyncio.wait_for(all_done.wait(), TIMEOUT)
        joins = pipeline.stats.rebalances
    finally:
        pipeline.request_stop()
        await asyncio.wait_for(run, TIMEOUT)
        await pipeline.stop()
    assert done == [b"slow", b"a", b"b"]
    assert joins == 1, "the consumer left its group while its only slot was busy"
    assert pipeline.stats.pauses >= 1


async def test_stop_with_the_broker_gone_ends_within_its_bounds(
        create_topic: CreateTopic, topic_name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The final drain, commit and client shutdown each have a bound: a service whose broker
    # vanished exits (its uncommitted work is redelivered later) instead of hanging.
    with EmbeddedBroker() as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers).with_fast_groups()
        await ensure_topics(kafka, [f"{topic_name}.in", f"{topic_name}.dead"], partitions=1)
        await _produce(kafka, f"{topic_name}.in", b"stuck", partition=0)
        pipeline = RecordPipeline(
            kafka, [f"{topic_name}.in"],
            PipelineSettings(group_id=f"{topic_name}-g", drain_timeout_s=1.0,
                             commit_timeout_s=1.0, close_timeout_s=1.0),
            stage="score", dead_letter_topic=f"{topic_name}.dead", limits=DEFAULT_LIMITS,
            name="orphan")
        started = asyncio.Event()

        async def handler(record: ConsumerRecord) -> None:
            started.set()
            await asyncio.Event().wait()  # never finishes: e.g. outputs the broker never acks

        await pipeline.start()
        run = asyncio.create_task(pipeline.run(handler))
        await asyncio.wait_for(started.wait(), TIMEOUT)
        broker.kill()
        pipeline.request_stop()
        loop = asyncio.get_running_loop()
        begun = loop.time()
        await asyncio.wait_for(run, 30)
        await asyncio.wait_for(pipeline.stop(), 30)
        assert loop.time() - begun < 20
        assert pipeline.tracker.in_flight() == 1  # abandoned, so never committed past


async def test_an_output_the_broker_would_always_refuse_dead_letters_instead_of_stopping(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str) -> None:
    # Too large (or a topic that does not exist): a redelivery fails the same way, so
    # stopping would only make a crash loop out of one record.
    kafka = dataclasses.replace(kafka_settings(kafka_bootstrap), max_message_bytes=4096)
    source = await create_topic(f"{topic_name}.in")
    out = await create_topic(f"{topic_name}.out")
    dead = await create_topic(f"{topic_name}.dead")
    await _produce(kafka, source, b"huge", b"missing-topic", b"fine", partition=0)
    pipeline = _pipeline(kafka, source, dead, f"{topic_name}-g", "refused")
    finished = asyncio.Event()

    async def handler(record: ConsumerRecord) -> None:
        if record.value == b"huge":
            await pipeline.publish(out, b"x" * 200_000)  # over the producer's request limit
        elif record.value == b"missing-topic":
            await pipeline.check_topic(f"{topic_name}.never-created")
        else:
            await pipeline.publish(out, b"ok")
            finished.set()

    await pipeline.start()
    run = asyncio.create_task(pipeline.run(handler))
    try:
        await asyncio.wait_for(finished.wait(), TIMEOUT)
    finally:
        pipeline.request_stop()
        await asyncio.wait_for(run, TIMEOUT)  # raises PipelineError had it stopped
        await pipeline.stop()
    assert pipeline.failure is None and pipeline.stats.dead_letters == 2
    assert pipeline.stats.finished == 3
