"""Kafka plumbing shared by every service and client: settings, topics, client factories.

aiokafka notes that shape these defaults:
- acks="all" and no idempotence: the embedded broker (tansu) refuses idempotent producers, and
  at-least-once delivery with deterministic, id-carrying scores makes duplicates harmless.
- Consumers never auto-commit: services commit offsets only after what they produced for them
  is acknowledged (see plumbing.offsets).
"""

from __future__ import annotations

import fnmatch
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from schemas import SchemaError

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


# Timings for the embedded broker (tansu), which holds group joins for about half a session
# and fetches for about half their max wait: 1 s sessions (joins take ~1 s instead of 5-20 s)
# and 2 ms fetch waits. The price: an event loop stalled for over a second loses its
# partitions. Apache Kafka rejects sessions under 6 s.
FAST_GROUP_TIMINGS: dict[str, int] = {
    "session_timeout_ms": 1000,
    "heartbeat_interval_ms": 250,
    "fetch_max_wait_ms": 2,
}


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names. Online and offline traffic use separate topics so that an offline backlog
    never sits in front of online messages in a partition. `status` carries the services'
    heartbeats (plumbing.status; create it compacted with ensure_status_topic)."""

    queries: str = "qscore.queries"
    queries_offline: str = "qscore.queries.offline"
    tokens: str = "qscore.tokens"
    tokens_offline: str = "qscore.tokens.offline"
    scores: str = "qscore.scores"
    dead_letter: str = "qscore.dead-letter"
    status: str = "qscore.status"

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        """All names under another prefix (e.g. per test or per environment)."""
        base = cls()
        return cls(**{f: getattr(base, f).replace("qscore", prefix, 1)
                      for f in cls.__dataclass_fields__})

    def all(self) -> tuple[str, ...]:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)

    def reply_patterns(self) -> tuple[str, ...]:
        """Where a producer may ask for its scores by default: this fleet's score topic and
        the topics under it (PREFIX.scores.*)."""
        return (self.scores, f"{self.scores}.*")


class ReplyTopicError(SchemaError):
    """A batch asks for its scores on a topic outside the fleet's allow-list."""

    def __init__(self, topic: str, patterns: Sequence[str]) -> None:
        super().__init__("reply_topic", "forbidden_topic",
                         f"{topic!r}: this fleet writes scores only to {', '.join(patterns)} "
                         "(see --reply-topics)")


def check_reply_topic(topic: str | None, patterns: Sequence[str]) -> None:
    """Only the fleet chooses where it writes: a producer's reply_topic must match one of the
    shell-style `patterns`, or the batch is refused (and dead-lettered by the caller), so no
    producer can make a worker create topics or write into internal ones."""
    if topic is not None and not any(fnmatch.fnmatchcase(topic, p) for p in patterns):
        raise ReplyTopicError(topic, patterns)


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "qscore"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    request_timeout_ms: int = 30_000
    # Group timing: Kafka's defaults; the embedded broker wants much shorter (qscore up sets it).
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    max_message_bytes: int = 1_048_576
    linger_ms: int = 0  # send at once: batches form anyway while a request is in flight
    # How long a fetch may wait for data. Kafka answers as soon as data arrives, so this only
    # bounds idle polling; the embedded broker holds fetches for about half of it, so there
    # it is latency (250 ms at the client default of 500).
    fetch_max_wait_ms: int = 100

    def __post_init__(self) -> None:
        """Refuse settings the protocol would silently ignore: a typo in the protocol must
        never send credentials, or data, in the clear (the CLI names flags; this names fields
        for settings built in Python)."""
        protocol = self.security_protocol
        if protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"security_protocol must be one of {SECURITY_PROTOCOLS}, "
                             f"not {protocol!r}")
        sasl_given = [name for name in ("sasl_mechanism", "sasl_username", "sasl_password")
                      if getattr(self, name) is not None]
        if sasl_given and not protocol.startswith("SASL"):
            raise ValueError(f"{', '.join(sasl_given)} given but security_protocol is "
                             f"{protocol!r}: use SASL_SSL (or SASL_PLAINTEXT) to authenticate")
        ssl_given = [name for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
                     if getattr(self, name) is not None]
        if not self.ssl_check_hostname:
            ssl_given.append("ssl_check_hostname=False")
        if ssl_given and protocol not in ("SSL", "SASL_SSL"):
            raise ValueError(f"{', '.join(ssl_given)} given but security_protocol is "
                             f"{protocol!r}: use SSL or SASL_SSL")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile needs ssl_certfile (the certificate of this key)")
        if protocol.startswith("SASL"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ValueError(f"{self.security_protocol} needs sasl_mechanism in "
                                 f"{SASL_MECHANISMS}, not {self.sasl_mechanism!r}")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError(f"{self.security_protocol} needs a SASL username and password")
        if not self.bootstrap_servers.strip():
            raise ValueError("bootstrap_servers is empty")

    def with_fast_groups(self) -> KafkaSettings:
        """These settings with FAST_GROUP_TIMINGS."""
        return replace(self, **FAST_GROUP_TIMINGS)


def client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Connection and security arguments common to producers, consumers and admin clients."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers.split(","),
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
        "request_timeout_ms": settings.request_timeout_ms,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.ssl_cafile, certfile=settings.ssl_certfile,
            keyfile=settings.ssl_keyfile)
        context.check_hostname = settings.ssl_check_hostname
        kwargs["ssl_context"] = context
    if settings.security_protocol.startswith("SASL"):
        kwargs.update(sasl_mechanism=settings.sasl_mechanism,
                      sasl_plain_username=settings.sasl_username,
                      sasl_plain_password=settings.sasl_password)
    return kwargs


def make_producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    kwargs = client_kwargs(settings) | {
        "acks": "all",
        "enable_idempotence": False,
        "linger_ms": settings.linger_ms,
        "max_request_size": settings.max_message_bytes + 65_536,
    }
    return AIOKafkaProducer(**(kwargs | overrides))


def make_consumer(settings: KafkaSettings, *topics: str, group_id: str | None,
                  **overrides: Any) -> AIOKafkaConsumer:
    kwargs = client_kwargs(settings) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        "fetch_max_bytes": max(52_428_800, settings.max_message_bytes * 4),
        "max_partition_fetch_bytes": settings.max_message_bytes + 65_536,
    }
    return AIOKafkaConsumer(*topics, **(kwargs | overrides))


async def ensure_topics(settings: KafkaSettings, names: tuple[str, ...] | list[str], *,
                        partitions: int = 4, replication: int = 1) -> list[str]:
    """Create the topics that do not exist yet; returns the ones created."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [n for n in dict.fromkeys(names) if n not in existing]
        if not wanted:
            return []
        try:
            response = await admin.create_topics(
                [NewTopic(n, num_partitions=partitions, replication_factor=replication)
                 for n in wanted])
        except TopicAlreadyExistsError:
            return []
        created = []
        for topic, code, *_ in response.topic_errors:
            if code not in (0, TopicAlreadyExistsError.errno):
                raise RuntimeError(f"creating topic {topic!r} failed with Kafka error {code}")
            if code == 0:
                created.append(topic)
        return created
    finally:
        await admin.close()
