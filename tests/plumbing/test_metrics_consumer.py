"""The "consumer" metrics of a RecordPipeline on a real broker: the lag of its group (end
offset - committed offset), which unfinished records hold up, and dead letters counted by
stage and reason class."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import ConsumerRecord

from plumbing.kafka import make_producer
from plumbing.pipeline import PipelineSettings, RecordPipeline, consumer_metrics
from schemas import DEFAULT_LIMITS, SchemaError
from tests.integration.fleet_helpers import CreateTopic, kafka_settings
from tests.waiting import until

pytestmark = pytest.mark.integration


async def test_lag_counts_what_the_group_has_not_committed_and_dead_letters_by_reason(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str) -> None:
    kafka = kafka_settings(kafka_bootstrap)
    source = await create_topic(f"{topic_name}.in")
    dead = await create_topic(f"{topic_name}.dead")
    producer = make_producer(kafka)
    await producer.start()
    try:  # one record a request: each its own batch
        for value in (b"held", b"not json", b"bad", b"held", b"held"):
            await producer.send_and_wait(source, value)
    finally:
        await producer.stop()

    gate = asyncio.Event()

    async def handler(record: ConsumerRecord) -> None:
        if record.value == b"not json":
            raise SchemaError("$", "json", "not JSON")
        if record.value == b"bad":
            raise ValueError("the worker cannot score this")
        await gate.wait()

    group = f"{topic_name}-g"
    pipeline = RecordPipeline(kafka, [source], PipelineSettings(
        group_id=group, lag_interval_s=0.2, commit_interval_s=0.1), stage="score",
        dead_letter_topic=dead, limits=DEFAULT_LIMITS, name="lag")
    await pipeline.start()
    run = asyncio.create_task(pipeline.run(handler))
    try:
        # The first record is unfinished: nothing can be committed, all five are lag,
        # though two of them are dead-lettered (finished) already.
        await until(lambda: pipeline.stats.dead_letters == 2, "two dead letters", 60)
        await until(lambda: pipeline.stats.lag.get(source) == 5, "a lag of 5", 30)
        metrics = consumer_metrics([pipeline])
        assert metrics["lag"].values == {(group, source): 5}
        assert metrics["lag"].gauge and not metrics["dead_letters"].gauge
        assert metrics["dead_letters"].values == {(group, "score", "json"): 1,
                                                  (group, "score", "ValueError"): 1}
        gate.set()  # all finish and are committed: no lag left
        await until(lambda: pipeline.stats.lag.get(source) == 0, "no lag", 30)
    finally:
        pipeline.request_stop()
        await asyncio.wait_for(run, 60)
        await pipeline.stop()
