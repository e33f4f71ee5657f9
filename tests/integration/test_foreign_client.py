"""The fleet as most producers and consumers in the wild see it: through librdkafka
(confluent-kafka), not our aiokafka clients. Plain JSON in, plain JSON out, keys by batch id,
a consumer group that commits, and a bad batch answered by a dead letter it can read."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import orjson
import pytest

from plumbing.cache import CacheSettings
from schemas import decode_dead_letter, decode_score_batch
from tests.integration.fleet_helpers import (
    CreateTopic,
    in_process_tokenizer,
    in_process_worker,
    kafka_settings,
    make_topics,
    sample_batches,
)

confluent_kafka = pytest.importorskip("confluent_kafka")
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "acks": "all",
                                         "enable.idempotence": False})  # tansu lacks it
    failures: list[str] = []
    for key, value in messages:
        producer.produce(topic, value=value, key=key,
                         on_delivery=lambda err, _msg: err and failures.append(str(err)))
    assert producer.flush(30) == 0 and not failures, failures


def _consume(bootstrap: str, topics: list[str], want: int, group: str) -> list[tuple[str, bytes]]:
    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        # The embedded broker holds a join for about half the session: keep it short.
        "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000})
    consumer.subscribe(topics)
    out: list[tuple[str, bytes]] = []
    try:
        for _ in range(600):  # bounded: 600 polls of at most 0.5 s
            if len(out) >= want:
                break
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            out.append((msg.topic(), msg.value()))
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return out


async def test_a_librdkafka_producer_and_consumer_use_the_fleet(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str,
        default_engine_path: Path) -> None:
    if os.environ.get("QSCORE_TEST_KAFKA"):
        pytest.skip("uses the embedded broker's address")
    kafka = kafka_settings(kafka_bootstrap)
    topics = await make_topics(create_topic, topic_name, partitions=2)
    batches = sample_batches(6, 5, tag="rd")
    messages = [(b.encode(), orjson.dumps({
        "v": 1, "batch_id": b, "submitted_at": 1.7e9,
        "items": [{"id": it.id, "query": it.query, **({"docs": list(it.docs)} if it.docs
                                                       else {})} for it in items]}))
        for b, items in batches.items()]
    messages.append((b"bad", b'{"v": 1, "batch_id": "bad", "items": []}'))
    async with (in_process_tokenizer(kafka, topics, default_engine_path, CacheSettings(),
                                     f"{topic_name}-t"),
                in_process_worker(kafka, topics, default_engine_path, CacheSettings(),
                                  f"{topic_name}-w")):
        await asyncio.to_thread(_produce, kafka_bootstrap, topics.queries, messages)
        got = await asyncio.to_thread(_consume, kafka_bootstrap, [topics.scores],
                                      len(batches), f"rd-{uuid.uuid4().hex[:6]}")
        letters = await asyncio.to_thread(_consume, kafka_bootstrap, [topics.dead_letter], 1,
                                          f"rd-{uuid.uuid4().hex[:6]}")
    scored = {}
    for _, value in got:
        batch = decode_score_batch(value)
        scored.setdefault(batch.batch_id, set()).update(it.id for it in batch.items)
        raw = orjson.loads(value)  # plain JSON for any consumer, not only ours
        assert raw["batch_id"] == batch.batch_id and isinstance(raw["items"], list)
    assert scored == {b: {it.id for it in items} for b, items in batches.items()}
    (letter,) = [decode_dead_letter(v) for _, v in letters]
    assert letter.stage == "ingest" and letter.original.startswith(b'{"v": 1, "batch_id": "bad"')
