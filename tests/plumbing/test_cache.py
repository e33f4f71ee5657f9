"""Result-cache logic without a server: digests, value codecs, settings, the in-process LRU."""

from __future__ import annotations

import ssl
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

import plumbing.cache
from plumbing.cache import (
    CacheSettings,
    ResultCache,
    decode_floats,
    encode_floats,
    key_digest,
    redis_key,
)
from qscore.local.servers import free_port

LOCAL = CacheSettings()  # no redis_url: in-process only


def test_digest_is_stable_and_16_bytes() -> None:
    d = key_digest("v1", "how to boil an egg", "Boil for 9 minutes.")
    assert len(d) == 16 and d == key_digest("v1", "how to boil an egg", "Boil for 9 minutes.")
    # Pinned: changing the encoding silently empties every deployed cache; do it on purpose.
    assert key_digest("3f9c0a1b2c4d", "q", "d").hex() == "88e4bcd8dc7c1138a401b067101729c0"
    assert key_digest("v1", "q", None).hex() == "4602f5769a51e4ecc6226650c7474f88"


def test_digest_separates_every_part() -> None:
    digests = {
        key_digest("v1", "q", None),
        key_digest("v1", "q", ""),  # an empty doc is not the query alone
        key_digest("v2", "q", None),  # another model version
        key_digest("v1", "q2", None),
        key_digest("v1", "q", "d"),
        key_digest("v1", "qd", ""),  # no ambiguity where one part ends
        key_digest("v1", "", "qd"),
        key_digest("v1q", "", None),
        key_digest("v1", "q", "d "),
        key_digest("v1", "é", None),
        key_digest("v1", "e\u0301", None),  # not normalised: different tokens
    }
    assert len(digests) == 11


def test_redis_key_shows_the_version() -> None:
    d = key_digest("v1", "q", None)
    assert redis_key("qscore", "3f9c0a1b2c4d", d) == f"qscore:3f9c0a1b2c4d:{d.hex()}".encode()


def test_float_codec_round_trips() -> None:
    values = [0.5, -1.25, 3.0e-8, 1e30]
    data = encode_floats(values)
    assert len(data) == 16 and data[:4] == np.float32(0.5).tobytes()  # little-endian f32
    back = decode_floats(data)
    assert back.dtype == np.float32 and back.tolist() == np.float32(values).tolist()
    assert decode_floats(encode_floats(np.float64([0.1]))).tolist() == [np.float32(0.1)]
    assert decode_floats(b"").size == 0
    with pytest.raises(ValueError, match="float32"):
        decode_floats(b"\0" * 6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"redis_url": "http://localhost:6379"}, "redis://"),
        ({"redis_url": "redis://h:1", "ssl_ca_certs": "/ca.pem"}, "rediss://"),
        ({"ssl_ca_certs": "/ca.pem"}, "rediss://"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"ttl_s": 1.5}, "ttl_s"),
        ({"local_entries": -1}, "local_entries"),
        ({"key_prefix": ""}, "key_prefix"),
        ({"key_prefix": "a b"}, "key_prefix"),
        ({"op_timeout_s": 0}, "op_timeout_s"),
        ({"op_timeout_s": float("nan")}, "op_timeout_s"),
        ({"retry_after_s": -1}, "retry_after_s"),
    ],
)
def test_settings_are_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CacheSettings(**kwargs)  # type: ignore[arg-type]


def test_settings_accept_tls_and_passwords() -> None:
    s = CacheSettings(redis_url="rediss://:secret@cache.example:6380/2", ssl_ca_certs="/ca.pem")
    assert s.redis_url is not None and s.ttl_s == 86_400


@pytest.fixture
def passed(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The keyword arguments ResultCache gives Redis.from_url (which still runs)."""
    seen: dict[str, Any] = {}
    from_url = Redis.from_url

    def recording(url: str, **kwargs: Any) -> Redis:
        seen.update(kwargs)
        return from_url(url, **kwargs)

    monkeypatch.setattr(plumbing.cache.Redis, "from_url", recording)
    return seen


@pytest.mark.parametrize("ca_certs", [None, "/ca.pem"])
async def test_rediss_verifies_the_certificate_and_its_host_name(
    passed: dict[str, Any], ca_certs: str | None
) -> None:
    # redis-py < 6 leaves ssl_check_hostname off unless asked: ask whatever the version.
    url = f"rediss://:secret@127.0.0.1:{free_port()}/0"  # nothing listens: start() just warns
    async with ResultCache(CacheSettings(redis_url=url, ssl_ca_certs=ca_certs), "v1") as cache:
        assert not cache.redis_available
    assert passed["ssl_check_hostname"] is True and passed["ssl_cert_reqs"] == "required"
    assert passed.get("ssl_ca_certs") == ca_certs
    if ca_certs is None:  # the TLS context redis-py would connect with (needs no CA file)
        client = Redis(**passed, ssl=True)
        context = client.connection_pool.make_connection().ssl_context.get()  # type: ignore[attr-defined]
        assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
        await client.aclose()


async def test_plain_redis_gets_no_tls_arguments(passed: dict[str, Any]) -> None:
    async with ResultCache(CacheSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0"), "v1"):
        pass
    assert passed and not any(k.startswith("ssl") for k in passed)


async def test_local_cache_counts_hits_and_misses() -> None:
    a, b, c = (key_digest("v1", q, None) for q in "abc")
    async with ResultCache(LOCAL, "v1") as cache:
        assert not cache.redis_available
        assert await cache.get_many([a, b]) == [None, None]
        await cache.put_many([(a, b"A"), (b, b"B")])
        assert await cache.get_many([a, c, b, a]) == [b"A", None, b"B", b"A"]
        s = cache.stats
        assert (s.hits_local, s.hits_redis, s.misses, s.writes) == (3, 0, 3, 2)
        assert s.hits == 3 and (s.bypasses, s.errors) == (0, 0)


async def test_lru_is_bounded_and_keeps_the_recently_used() -> None:
    digests = [key_digest("v1", str(i), None) for i in range(4)]
    async with ResultCache(CacheSettings(local_entries=2), "v1") as cache:
        await cache.put_many([(digests[0], b"0"), (digests[1], b"1")])
        assert await cache.get_many([digests[0]]) == [b"0"]  # 0 is now the most recent
        await cache.put_many([(digests[2], b"2")])  # evicts 1, the least recently used
        assert await cache.get_many(digests[:3]) == [b"0", None, b"2"]
        await cache.put_many([(d, b"x") for d in digests])
        assert await cache.get_many(digests) == [None, None, b"x", b"x"]


async def test_zero_entries_disables_the_lru() -> None:
    d = key_digest("v1", "q", None)
    async with ResultCache(CacheSettings(local_entries=0), "v1") as cache:
        await cache.put_many([(d, b"x")])
        assert await cache.get_many([d]) == [None]
        assert cache.stats.writes == 1 and cache.stats.misses == 1


async def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="model_version"):
        ResultCache(LOCAL, "")
    cache = ResultCache(LOCAL, "v1")
    with pytest.raises(RuntimeError, match="not started"):
        await cache.get_many([])
    async with cache:
        with pytest.raises(ValueError, match="16 bytes"):
            await cache.get_many([b"short"])
        with pytest.raises(ValueError, match="16 bytes"):
            await cache.put_many([(bytearray(16), b"x")])  # type: ignore[list-item]
