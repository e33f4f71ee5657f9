"""ResultCache against a real redis-server: write-through, TTLs, one round trip, outages."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog
from structlog.testing import LogCapture

import plumbing.cache
from plumbing.cache import CacheSettings, ResultCache, encode_floats, key_digest
from qscore.local.servers import RedisServer

pytestmark = pytest.mark.integration

HANG = 10.0  # seconds after which a call that should have timed out counts as hung


class FakeClock:
    """ResultCache's breaker clock, moved by hand: no sleeping out retry_after_s."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _version() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"  # the session server is shared: unique keys per test


def _entries(version: str, n: int) -> list[tuple[bytes, bytes]]:
    return [(key_digest(version, f"query {i}", None), encode_floats([i])) for i in range(n)]


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What plumbing.cache logs (its own logger, whatever structlog config other tests left)."""
    capture = LogCapture()
    logger = structlog.wrap_logger(None, processors=[capture], wrapper_class=structlog.BoundLogger)
    monkeypatch.setattr(plumbing.cache, "log", logger)
    return capture.entries


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


@pytest.fixture
def stopped(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The private server, with SIGCONT guaranteed for tests that SIGSTOP it."""
    yield redis_server
    if redis_server.pid is not None and redis_server.running:
        os.kill(redis_server.pid, signal.SIGCONT)


async def test_round_trip_with_ttl_and_versioned_keys(
    redis_url: str, client: aioredis.Redis
) -> None:
    version = _version()
    entries = _entries(version, 3)
    async with ResultCache(CacheSettings(redis_url=redis_url, ttl_s=600), version) as cache:
        assert cache.redis_available
        await cache.put_many(entries)
        assert await cache.get_many([d for d, _ in entries]) == [v for _, v in entries]
        assert cache.stats.hits_local == 3 and cache.stats.hits_redis == 0
    keys = sorted([k async for k in client.scan_iter(match=f"qscore:{version}:*")])
    assert keys == sorted(f"qscore:{version}:{d.hex()}".encode() for d, _ in entries)
    for key in keys:
        assert 590 <= await client.ttl(key) <= 600


async def test_a_fresh_instance_gets_redis_hits(redis_url: str) -> None:
    version = _version()
    entries = _entries(version, 4)
    digests = [d for d, _ in entries]
    settings = CacheSettings(redis_url=redis_url)
    async with ResultCache(settings, version) as writer:
        await writer.put_many(entries[:3])
    async with ResultCache(settings, version) as reader:
        assert await reader.get_many(digests) == [v for _, v in entries[:3]] + [None]
        assert (reader.stats.hits_redis, reader.stats.misses) == (3, 1)
        assert await reader.get_many(digests[:3]) == [v for _, v in entries[:3]]
        assert reader.stats.hits_local == 3  # redis hits were kept in the LRU
    # Another model version shares nothing, even for the same text.
    async with ResultCache(settings, _version()) as other:
        assert await other.get_many(digests) == [None] * 4


async def test_one_round_trip_per_call(redis_server: RedisServer) -> None:
    version = _version()
    entries = _entries(version, 1000)
    settings = CacheSettings(redis_url=redis_server.url, local_entries=0)
    async with aioredis.Redis.from_url(redis_server.url) as admin, ResultCache(
        settings, version
    ) as cache:
        await admin.config_resetstat()
        await cache.put_many(entries)
        assert await cache.get_many([d for d, _ in entries]) == [v for _, v in entries]
        stats = await admin.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 1 and "cmdstat_get" not in stats
    assert stats["cmdstat_set"]["calls"] == 1000 and "cmdstat_multi" not in stats


async def test_password_in_the_url(redis_server: RedisServer, logs: list[dict[str, Any]]) -> None:
    async with aioredis.Redis.from_url(redis_server.url) as admin:
        await admin.config_set("requirepass", "s3cret")
    url = redis_server.url.replace("redis://", "redis://:s3cret@")
    async with ResultCache(CacheSettings(redis_url=url), "v1") as cache:
        assert cache.redis_available and cache.stats.errors == 0
    wrong = redis_server.url.replace("redis://", "redis://:nope@")
    async with ResultCache(CacheSettings(redis_url=wrong), "v1") as cache:
        assert not cache.redis_available and cache.stats.errors == 1
    (warning,) = logs
    assert warning["log_level"] == "warning" and "nope" not in str(warning)


async def test_outage_is_a_bypass_not_an_error(
    redis_server: RedisServer, logs: list[dict[str, Any]]
) -> None:
    version = _version()
    entries = _entries(version, 4)
    digests = [d for d, _ in entries]
    clock = FakeClock()
    settings = CacheSettings(redis_url=redis_server.url, retry_after_s=5.0, local_entries=2)
    async with ResultCache(settings, version, clock=clock) as cache:
        await cache.put_many(entries)  # the LRU keeps only the last two
        redis_server.kill()

        failed_at = clock.now
        assert await cache.get_many(digests) == [None, None, entries[2][1], entries[3][1]]
        assert (cache.stats.errors, cache.stats.bypasses) == (1, 0)  # tried, failed
        assert not cache.redis_available
        await cache.put_many(entries[:1])  # within retry_after_s: skipped, not tried
        clock.now = failed_at + 4.99
        assert await cache.get_many(digests[1:2]) == [None]  # still skipped
        assert (cache.stats.errors, cache.stats.bypasses) == (1, 2)

        clock.now = failed_at + 5.0  # retry_after_s is up: tried again, fails again, no warning
        assert await cache.get_many(digests[1:2]) == [None]
        assert (cache.stats.errors, cache.stats.bypasses) == (2, 2)
        assert [e["event"] for e in logs] == ["cache.redis_down"]
        assert logs[0]["log_level"] == "warning" and logs[0]["retry_after_s"] == 5.0

        await asyncio.to_thread(redis_server.start)  # same port, empty
        failed_at = clock.now
        clock.now = failed_at + 4.99  # Redis is back, but the breaker holds off until 5 s
        await cache.put_many(entries[2:3])
        assert (cache.stats.errors, cache.stats.bypasses) == (2, 3)
        assert not cache.redis_available
        clock.now = failed_at + 5.0
        await cache.put_many(entries[1:2])
        assert cache.redis_available and (cache.stats.errors, cache.stats.bypasses) == (2, 3)
        assert [e["event"] for e in logs] == ["cache.redis_down", "cache.redis_back"]

    # Only the write made after the hold-off reached the new server.
    async with ResultCache(settings, version) as fresh:
        assert await fresh.get_many(digests[:3]) == [None, entries[1][1], None]
        assert fresh.stats.hits_redis == 1


async def test_concurrent_failures_warn_once(
    redis_server: RedisServer, logs: list[dict[str, Any]]
) -> None:
    version = _version()
    digests = [d for d, _ in _entries(version, 3)]
    async with ResultCache(CacheSettings(redis_url=redis_server.url), version) as cache:
        redis_server.kill()
        results = await asyncio.gather(*(cache.get_many(digests) for _ in range(8)))
        assert results == [[None] * 3] * 8
        assert cache.stats.errors + cache.stats.bypasses == 8 and cache.stats.errors >= 1
        assert cache.stats.misses == 24
    assert [(e["event"], e["log_level"]) for e in logs] == [("cache.redis_down", "warning")]


async def test_a_hung_server_cannot_hang_a_call(
    stopped: RedisServer, logs: list[dict[str, Any]]
) -> None:
    version = _version()
    entries = _entries(version, 2)
    clock = FakeClock()
    settings = CacheSettings(redis_url=stopped.url, op_timeout_s=0.25, retry_after_s=5.0)
    async with ResultCache(settings, version, clock=clock) as cache:
        await cache.put_many(entries[:1])  # a pooled connection, then the server stops answering
        assert stopped.pid is not None
        os.kill(stopped.pid, signal.SIGSTOP)
        # HANG only catches a call that never returns (op_timeout_s is 0.25 s): without the
        # bound these calls wait for the stopped server forever.
        await asyncio.wait_for(cache.put_many(entries[1:]), HANG)
        assert (cache.stats.errors, cache.stats.bypasses) == (1, 0)
        assert not cache.redis_available
        assert logs[0]["error"].startswith("TimeoutError")  # op_timeout_s ended it
        other = ResultCache(settings, version, clock=clock)
        await asyncio.wait_for(other.start(), HANG)  # starting (its PING) is bounded too
        try:
            assert await other.get_many([entries[1][0]]) == [None]
            assert (other.stats.errors, other.stats.bypasses) == (1, 1)
        finally:
            await other.close()
        os.kill(stopped.pid, signal.SIGCONT)
        assert await cache.get_many([entries[0][0]]) == [entries[0][1]]  # from the LRU
        await cache.put_many(entries[1:])  # the server answers again, the breaker holds off
        assert not cache.redis_available and cache.stats.bypasses == 1
        clock.now += settings.retry_after_s
        await cache.put_many(entries[1:])
        assert cache.redis_available and cache.stats.errors == 1
