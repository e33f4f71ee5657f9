"""Fixtures for tests that talk to real servers.

Servers start only when a test asks for them (lazily, once per session): a tansu broker, or the
Apache Kafka named by QSCORE_TEST_KAFKA=host:port, and a redis-server. Tests that need none of
these fixtures start nothing.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from plumbing.kafka import FAST_GROUP_TIMINGS
from qscore.local.servers import EmbeddedBroker, RedisServer

# Engine fixtures build real engines lazily, once per session, only for tests that use them.
pytest_plugins = ["tests.engine_fixtures"]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Any:
    """Async tests run on uvloop where it is installed, as the services do (plumbing.aio.run)."""
    try:
        import uvloop
    except ImportError:
        return None
    return {"uvloop": uvloop.new_event_loop}

CreateTopic = Callable[..., Awaitable[str]]


def _external_kafka() -> str | None:
    return os.environ.get("QSCORE_TEST_KAFKA") or None


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """"host:port" of a Kafka-protocol broker: QSCORE_TEST_KAFKA, else a fresh tansu."""
    if external := _external_kafka():
        yield external
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def kafka_consumer_options(kafka_bootstrap: str) -> dict[str, Any]:
    """Extra AIOKafkaConsumer kwargs for group consumers: on tansu a 1 s session makes group
    joins take ~1 s instead of 5-20 s; Apache Kafka would reject it, so nothing there."""
    if _external_kafka():
        return {}
    # Only the group timings: these consumers keep aiokafka's own fetch wait.
    return {k: FAST_GROUP_TIMINGS[k] for k in ("session_timeout_ms", "heartbeat_interval_ms")}


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A redis-server shared by the session: use unique keys."""
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server, for tests that stop, kill or restart it."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name no other test (or earlier run against the same Kafka) uses."""
    test = re.sub(r"[^a-zA-Z0-9._-]+", "-", request.node.name)[:80].strip("-")
    return f"qscore-test-{test}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def create_topic(kafka_bootstrap: str) -> AsyncIterator[CreateTopic]:
    """`await create_topic(name, partitions=1)` creates a topic and returns its name.

    Explicit creation works on tansu and on clusters with auto-creation off; the call returns
    once every partition has a leader. Topics are deleted again after the test.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    created: list[str] = []

    async def create(name: str, partitions: int = 1) -> str:
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)]
        )
        for topic, code, *message in response.topic_errors:
            if code:
                raise RuntimeError(f"creating topic {topic!r} failed: error {code} {message}")
        created.append(name)
        await _wait_for_leaders(admin, name, partitions)
        return name

    try:
        yield create
    finally:
        try:
            if created:
                await admin.delete_topics(created)
        finally:
            await admin.close()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, topic: str, partitions: int) -> None:
    # Apache Kafka elects leaders shortly after CreateTopics answers; tansu has them at once.

    async def leaders() -> None:
        while True:
            (described,) = await admin.describe_topics([topic])
            found = described["partitions"]
            if len(found) == partitions and all(p["leader"] >= 0 for p in found):
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(leaders(), timeout=30)
