"""RecordPipeline on a real broker: broker trouble stops it, bad records dead-letter."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from engines.errors import EngineDead
from plumbing.kafka import make_consumer, make_producer
from plumbing.pipeline import PipelineError, PipelineSettings, RecordPipeline
from schemas import DEFAULT_LIMITS
from tests.integration.fleet_helpers import CreateTopic, kafka_settings

pytestmark = pytest.mark.integration


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
                              stage="score", dead_letter_topic=dead, limits=DEFAULT_LIMITS)
    await pipeline.start()
    try:
        with pytest.raises(PipelineError):
            await asyncio.wait_for(pipeline.run(handler, idle_exit_s=2), 60)
    finally:
        await pipeline.stop()
    assert pipeline.stats.dead_letters == 0  # not the record's fault: no dead letter
    assert b"outputs-not-acked" in seen

    check = make_consumer(kafka, group_id=f"{topic_name}-g")
    await check.start()
    try:
        committed = await check.committed(TopicPartition(source, 0))
    finally:
        await check.stop()
    assert committed == 1  # "ok" done; the unacknowledged record will be redelivered
