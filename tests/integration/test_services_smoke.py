"""The real servers behind the integration tests work the way the fleet relies on."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.exceptions import ConnectionError as RedisConnectionError

from qscore.local.servers import RedisServer
from schemas import QueryBatch, QueryItem, decode_query_batch, encode_query_batch

pytestmark = pytest.mark.integration

TIMEOUT = 15.0  # seconds any single broker/redis step may take before the test fails


def _batch(n: int) -> QueryBatch:
    return QueryBatch(
        batch_id=f"b{n}-{uuid.uuid4().hex[:6]}",
        items=(
            QueryItem(id="q1", query=f"cheap flights {n}"),
            QueryItem(id="q2", query="weather paris", docs=("sunny in paris", "rain in lyon")),
        ),
        submitted_at=time.time(),
        reply_topic="scores.smoke",
    )


@asynccontextmanager
async def _producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    # No idempotence: tansu cannot do InitProducerId.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


@asynccontextmanager
async def _group_consumer(
    bootstrap: str, topic: str, group: str, options: dict[str, Any]
) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", **options,
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def _send(producer: AIOKafkaProducer, topic: str, batch: QueryBatch) -> None:
    await asyncio.wait_for(
        producer.send_and_wait(topic, encode_query_batch(batch), key=batch.batch_id.encode()),
        TIMEOUT,
    )


async def _receive(consumer: AIOKafkaConsumer, count: int) -> dict[str, QueryBatch]:
    received: dict[str, QueryBatch] = {}
    for _ in range(count):
        message = await asyncio.wait_for(consumer.getone(), TIMEOUT)
        batch = decode_query_batch(message.value)
        received[batch.batch_id] = batch
    return received


async def test_query_batch_round_trips_through_a_consumer_group(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, Any], topic_name: str,
    create_topic: Callable[..., Awaitable[str]],
) -> None:
    topic = await create_topic(topic_name)
    sent = _batch(0)
    async with _producer(kafka_bootstrap) as producer:
        await _send(producer, topic, sent)

    async with _group_consumer(
        kafka_bootstrap, topic, f"{topic}-group", kafka_consumer_options
    ) as consumer:
        assert await _receive(consumer, 1) == {sent.batch_id: sent}


async def test_group_reads_all_partitions_and_resumes_from_committed_offsets(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, Any], topic_name: str,
    create_topic: Callable[..., Awaitable[str]],
) -> None:
    topic = await create_topic(topic_name, partitions=3)
    group = f"{topic}-group"
    first = [_batch(n) for n in range(6)]
    later = _batch(99)

    async with _producer(kafka_bootstrap) as producer:
        for batch in first:
            await _send(producer, topic, batch)

        async with _group_consumer(kafka_bootstrap, topic, group, kafka_consumer_options) as c:
            assert await _receive(c, len(first)) == {b.batch_id: b for b in first}
            assert c.assignment() == {TopicPartition(topic, p) for p in range(3)}
            await c.commit()
            committed = [await c.committed(TopicPartition(topic, p)) for p in range(3)]
            assert sum(n or 0 for n in committed) == len(first)

        await _send(producer, topic, later)

    # A new member of the same group starts after the commit: it sees only the new batch.
    async with _group_consumer(kafka_bootstrap, topic, group, kafka_consumer_options) as c:
        assert await _receive(c, 1) == {later.batch_id: later}
        positions = [await c.position(TopicPartition(topic, p)) for p in range(3)]
        assert sum(positions) == len(first) + 1


async def test_redis_set_get_with_ttl(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    key = f"qscore-test:{uuid.uuid4().hex}"
    try:
        assert await client.set(key, b"\x00score:0.93", ex=60)
        assert await client.get(key) == b"\x00score:0.93"
        assert 0 < await client.ttl(key) <= 60
        assert await client.get(f"{key}:missing") is None
    finally:
        await client.delete(key)
        await client.aclose()


async def test_redis_kill_then_restart(redis_server: RedisServer) -> None:
    client = aioredis.from_url(redis_server.url, socket_timeout=2, socket_connect_timeout=2)
    try:
        await client.set("k", "v")
        redis_server.kill()
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(client.ping(), TIMEOUT)

        redis_server.start()  # same port, empty: nothing is persisted
        assert await asyncio.wait_for(client.ping(), TIMEOUT)
        assert await client.get("k") is None
    finally:
        await client.aclose()


async def test_async_tests_run_on_uvloop_when_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
