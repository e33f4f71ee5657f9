"""Result cache: scores keyed by (model version, query, doc), in process and in Redis.

The tokenizer looks every sequence up before tokenizing; the scoring worker sees only token
ids, so it writes results through under the digests the tokenizer shipped in the TokenBatch
(`TokenBatch.cache_keys`). The cache is an accelerator, never a dependency: a failing or slow
Redis costs a counted error, one warning per outage and `retry_after_s` of skipping Redis (a
circuit breaker); callers only ever see misses, never an exception or a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

DIGEST_BYTES = 16  # as TokenBatch.cache_keys carries them
DEFAULT_TTL_S = 86_400
_LEN = struct.Struct("<I")
_SCHEMES = ("redis", "rediss", "unix")
T = TypeVar("T")


def key_digest(model_version: str, query: str, doc: str | None) -> bytes:
    """16-byte digest of one sequence's cache key; the model version is part of it."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"qscore-cache-v1")
    # Length prefixes keep ("ab", "c") apart from ("a", "bc"); the flag byte keeps "no doc"
    # (the query alone) apart from an empty doc.
    h.update(_part(model_version) + _part(query))
    h.update(b"\0" if doc is None else b"\1" + _part(doc))
    return h.digest()


def query_digests(model_version: str, query: str, docs: Sequence[str]) -> list[bytes]:
    """`key_digest` of the query alone, then of (query, doc) for each doc: the hash state after
    the version and the query is computed once and copied (blake2b streams)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"qscore-cache-v1")
    h.update(_part(model_version) + _part(query))
    out = []
    for tail in (b"\0", *(b"\1" + _part(d) for d in docs)):
        unit = h.copy()
        unit.update(tail)
        out.append(unit.digest())
    return out


def _part(text: str) -> bytes:
    raw = text.encode()
    return _LEN.pack(len(raw)) + raw


def redis_key(prefix: str, model_version: str, digest: bytes) -> bytes:
    """b"<prefix>:<version>:<hex digest>": the version stays readable for ops (SCAN, UNLINK)."""
    return f"{prefix}:{model_version}:{digest.hex()}".encode()


def encode_floats(values: Iterable[float] | np.ndarray) -> bytes:
    """A cached value: float32 little-endian, the scores (or embedding) of one sequence."""
    return np.asarray(values, dtype="<f4").tobytes()


def decode_floats(data: bytes) -> np.ndarray:
    """The float32 array `encode_floats` wrote (a read-only view of `data`)."""
    if len(data) % 4:
        raise ValueError(f"cached value of {len(data)} bytes is not a float32 array")
    return np.frombuffer(data, dtype="<f4")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """Where and how long results are cached: the one settings type of the result cache.

    `redis_url` may carry a password: repr and `safe_url` mask it."""

    # redis://[:password@]host:port/db, rediss:// for TLS, unix://; None: in-process only.
    redis_url: str | None = field(default=None, repr=False)
    ttl_s: int = DEFAULT_TTL_S  # Redis expiry of every entry (SET EX takes whole seconds)
    local_entries: int = 100_000  # in-process LRU bound; 0 disables it
    key_prefix: str = "qscore"
    op_timeout_s: float = 0.25  # bound on one Redis round trip, connecting included
    retry_after_s: float = 1.0  # how long Redis is skipped after a failure
    ssl_ca_certs: str | None = None  # CA bundle for rediss:// (default: the system's)

    def __post_init__(self) -> None:
        scheme = None if self.redis_url is None else urlsplit(self.redis_url).scheme
        if scheme is not None and scheme not in _SCHEMES:
            raise CacheSettingsError("redis_url", "must start with redis://, rediss:// (TLS) "
                                     f"or unix://, not {self.safe_url!r}")
        if self.ssl_ca_certs is not None and scheme != "rediss":
            raise CacheSettingsError("ssl_ca_certs", "needs a rediss:// (TLS) redis_url")
        _check_int("ttl_s", self.ttl_s, 1)
        _check_int("local_entries", self.local_entries, 0)
        if not self.key_prefix or any(ch.isspace() for ch in self.key_prefix):
            raise CacheSettingsError("key_prefix", "must be non-empty without spaces: "
                                     f"{self.key_prefix!r}")
        if not (math.isfinite(self.op_timeout_s) and self.op_timeout_s > 0):
            raise CacheSettingsError("op_timeout_s", f"must be > 0, got {self.op_timeout_s!r}")
        if not (math.isfinite(self.retry_after_s) and self.retry_after_s >= 0):
            raise CacheSettingsError("retry_after_s",
                                     f"must be >= 0, got {self.retry_after_s!r}")

    @property
    def safe_url(self) -> str:
        """The Redis URL with its password masked, for logs and error messages."""
        return "" if self.redis_url is None else redact_url(self.redis_url)

    def __repr__(self) -> str:
        return (f"CacheSettings(redis_url={self.safe_url!r}, ttl_s={self.ttl_s!r}, "
                f"local_entries={self.local_entries!r}, key_prefix={self.key_prefix!r}, "
                f"op_timeout_s={self.op_timeout_s!r}, retry_after_s={self.retry_after_s!r}, "
                f"ssl_ca_certs={self.ssl_ca_certs!r})")


class CacheSettingsError(ValueError):
    """A CacheSettings field is invalid; `field` names it so a command line can name its flag."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field} {problem}")


def redact_url(url: str) -> str:
    """`url` with its password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{netloc}"))


def tls_kwargs(settings: CacheSettings) -> dict[str, Any]:
    """redis-py connection arguments for a rediss:// URL ({} otherwise: a plain connection
    takes no ssl_* arguments). Verification is asked for explicitly: redis-py before 6.0 checks
    the chain but not that the certificate names the host (ssl_check_hostname=False)."""
    if settings.redis_url is None or urlsplit(settings.redis_url).scheme != "rediss":
        return {}
    kwargs: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if settings.ssl_ca_certs:
        kwargs["ssl_ca_certs"] = settings.ssl_ca_certs
    return kwargs


def _check_int(name: str, value: object, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise CacheSettingsError(name, f"must be an int >= {lo}, got {value!r}")


@dataclass(slots=True)
class CacheStats:
    """Counters; hits + misses is the number of digests looked up."""

    hits_local: int = 0
    hits_redis: int = 0
    misses: int = 0
    writes: int = 0  # entries put (in the LRU, and in Redis unless skipped or failed)
    bypasses: int = 0  # Redis round trips skipped because Redis was down
    errors: int = 0  # Redis round trips that failed or timed out

    @property
    def hits(self) -> int:
        return self.hits_local + self.hits_redis


class ResultCache:
    """In-process LRU in front of Redis; one round trip per call for whatever the LRU lacks."""

    def __init__(self, settings: CacheSettings, model_version: str, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` is what the circuit breaker reads the time from (tests pass a fake one)."""
        if not model_version:
            raise ValueError("model_version must be non-empty: cache keys include it")
        self.settings = settings
        self.model_version = model_version
        self.stats = CacheStats()
        self._local: OrderedDict[bytes, bytes] = OrderedDict()
        self._redis: Redis | None = None
        self._started = False
        self._clock = clock
        self._down_until = 0.0  # clock() before which Redis is skipped
        self._outage = False  # warned about a failure, no success since
        self._where = settings.safe_url
        self._put_script: Any = None  # registered on first use (EVALSHA, loaded if missing)

    @property
    def redis_available(self) -> bool:
        """Redis is configured, started and its last round trip succeeded."""
        return self._redis is not None and not self._outage

    async def start(self) -> Self:
        """Connect to Redis if configured. Redis being down is logged, never raised."""
        s = self.settings
        if s.redis_url is not None and self._redis is None:
            self._redis = Redis.from_url(
                s.redis_url,
                socket_timeout=s.op_timeout_s,
                socket_connect_timeout=s.op_timeout_s,
                retry=Retry(NoBackoff(), 0),  # retries would stretch a failure past the timeout
                **tls_kwargs(s),
            )
            await self._call(lambda r: r.ping())
        self._started = True
        return self

    async def close(self) -> None:
        self._started = False
        redis, self._redis = self._redis, None
        if redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await redis.aclose()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def get_many(self, digests: Sequence[bytes], *,
                       version: str | None = None) -> list[bytes | None]:
        """The cached value of each digest, or None: the LRU first, then one MGET.
        `version`: whose results (default: the cache's); digests include it too."""
        self._check_started()
        found = [self._local_get(_digest(d)) for d in digests]
        self.stats.hits_local += sum(v is not None for v in found)
        missing = list(dict.fromkeys(d for d, v in zip(digests, found, strict=True) if v is None))
        if missing and self._redis is not None:
            keys = [self._key(d, version) for d in missing]
            values = await self._call(lambda r: r.mget(keys))
            fetched = {d: v for d, v in zip(missing, values or (), strict=False) if v is not None}
            for d, v in fetched.items():
                self._local_put(d, v)
            for i, d in enumerate(digests):
                if found[i] is None and d in fetched:
                    found[i] = fetched[d]
                    self.stats.hits_redis += 1
        self.stats.misses += sum(v is None for v in found)
        return found

    async def put_many(self, entries: Sequence[tuple[bytes, bytes]], *,
                       version: str | None = None) -> None:
        """Store values in the LRU and, in one command and one round trip, in Redis with the
        TTL: a script that SETs every key with EX (a pipeline of SET EX costs redis-py a
        command build and a reply parse per entry: ~30 us an item on the worker's loop).
        `version`: the model version the values were computed by (default: the cache's), the
        key's readable part; a worker that swapped engines writes under the new one."""
        self._check_started()
        for d, _ in entries:
            _digest(d)
        if self.settings.local_entries:
            for d, v in entries:
                self._local_put(d, v)
        self.stats.writes += len(entries)
        if not entries or self._redis is None:
            return
        keys = [self._key(d, version) for d, _ in entries]
        args = [v for _, v in entries]
        args.append(self.settings.ttl_s)
        script = self._put_script
        if script is None:
            script = self._put_script = self._redis.register_script(_PUT_SCRIPT)

        async def write(r: Redis) -> Any:
            return await script(keys=keys, args=args, client=r)

        await self._call(write)

    async def _call(self, op: Callable[[Redis], Awaitable[T]]) -> T | None:
        """One Redis round trip behind the breaker: None when skipped or failed."""
        redis = self._redis
        if redis is None:
            return None
        if self._clock() < self._down_until:
            self.stats.bypasses += 1
            return None
        try:
            # Bounds connecting too: a server that accepts but never answers cannot hang us.
            async with asyncio.timeout(self.settings.op_timeout_s):
                result = await op(redis)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return None
        if self._outage:
            self._outage = False
            log.info("cache.redis_back", redis=self._where)
        return result

    def _failed(self, exc: BaseException) -> None:
        self.stats.errors += 1
        self._down_until = self._clock() + self.settings.retry_after_s
        if not self._outage:  # one warning an outage, not one a call
            self._outage = True
            log.warning(
                "cache.redis_down", redis=self._where,
                error=f"{type(exc).__name__}: {exc}", retry_after_s=self.settings.retry_after_s,
                hint="results are served uncached until Redis answers again",
            )

    def _check_started(self) -> None:
        if not self._started:
            raise RuntimeError("ResultCache is not started: use `async with` or await start()")

    def _key(self, digest: bytes, version: str | None = None) -> bytes:
        return redis_key(self.settings.key_prefix, version or self.model_version, digest)

    def _local_get(self, digest: bytes) -> bytes | None:
        value = self._local.get(digest)
        if value is not None:
            self._local.move_to_end(digest)
        return value

    def _local_put(self, digest: bytes, value: bytes) -> None:
        if self.settings.local_entries == 0:
            return
        self._local[digest] = value
        self._local.move_to_end(digest)
        while len(self._local) > self.settings.local_entries:
            self._local.popitem(last=False)


# Every KEYS[i] gets ARGV[i] with the TTL in the last ARGV. Keys of one call need not share a
# hash slot on a single Redis; Redis Cluster would refuse a multi-key script across slots.
_PUT_SCRIPT = """
local ttl = ARGV[#ARGV]
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i], 'EX', ttl)
end
return #KEYS
"""


def _digest(d: bytes) -> bytes:
    if not isinstance(d, bytes) or len(d) != DIGEST_BYTES:
        raise ValueError(f"a cache digest is {DIGEST_BYTES} bytes (key_digest), got {d!r:.60}")
    return d
