"""The fleet-wide reload lease on a real redis-server: at most N workers reload at once, a
lease of a worker that died expires, one worker cannot release another's."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from workers.reload import RedisLease

pytestmark = [pytest.mark.integration]


async def test_at_most_n_workers_hold_the_reload_lease(redis_url: str) -> None:
    key = f"test:reload:{uuid.uuid4().hex[:8]}"
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(3)]
    leases = [RedisLease(c, key, slots=2, lease_s=60) for c in clients]
    try:
        assert [await lease.acquire() for lease in leases] == [True, True, False]
        await leases[0].release()
        assert await leases[2].acquire()  # a slot came free
        # Only the holder's token releases a slot: a stale release is a no-op.
        stale = RedisLease(clients[0], key, slots=2, lease_s=60)
        stale.held = f"{key}:1"
        await stale.release()
        assert await clients[0].get(f"{key}:1") is not None
    finally:
        for lease in leases:
            await lease.close()


async def test_a_dead_workers_lease_expires(redis_url: str) -> None:
    key = f"test:reload:{uuid.uuid4().hex[:8]}"
    first, second = (RedisLease(aioredis.Redis.from_url(redis_url), key, slots=1,
                                lease_s=0.3) for _ in range(2))
    try:
        assert await first.acquire()  # ... and its worker dies mid-reload, never releasing
        assert not await second.acquire()
        deadline = asyncio.get_running_loop().time() + 5
        while not await second.acquire():
            assert asyncio.get_running_loop().time() < deadline, "the lease never expired"
            await asyncio.sleep(0.1)
    finally:
        await first.close()
        await second.close()
