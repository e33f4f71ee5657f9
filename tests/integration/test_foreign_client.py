"""The fleet as most producers and consumers in the wild see it: through librdkafka
(confluent-kafka), not our aiokafka clients. Plain JSON in, plain JSON out, keys by batch id,
a consumer group that commits, and a bad batch answered by a dead letter it can read."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from pathlib import Path

import numpy as np
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
pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(bool(os.environ.get("QSCORE_TEST_KAFKA")),
                                 reason="uses the embedded broker's address")]


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


async def test_base64_embeddings_read_by_a_librdkafka_consumer_with_plain_base64(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str,
        default_engine_path: Path) -> None:
    # The same queries asked for as JSON floats, as float32 bytes and as float16 bytes, and
    # one batch that does not ask (the fleet's default, base64 here): what a consumer in the
    # wild decodes with its own base64 and a little-endian array view.
    kafka = kafka_settings(kafka_bootstrap)
    topics = await make_topics(create_topic, topic_name, partitions=2)
    queries = ["red running shoes", "how tall is the eiffel tower", "python asyncio queue"]
    items = [{"id": f"q{i}", "query": q} for i, q in enumerate(queries)]
    formats = {"float": "float", "b64": "base64", "f16": "base64-f16", "default": None}
    messages = [(name.encode(), orjson.dumps({
        "v": 1, "batch_id": name, "submitted_at": 1.7e9, "items": items,
        **({"embedding_format": fmt} if fmt else {})})) for name, fmt in formats.items()]
    async with (in_process_tokenizer(kafka, topics, default_engine_path, CacheSettings(),
                                     f"{topic_name}-t", embedding_format="base64"),
                in_process_worker(kafka, topics, default_engine_path, CacheSettings(),
                                  f"{topic_name}-w")):
        await asyncio.to_thread(_produce, kafka_bootstrap, topics.queries, messages)
        got = await asyncio.to_thread(_consume, kafka_bootstrap, [topics.scores],
                                      len(formats), f"rd-{uuid.uuid4().hex[:6]}")
    raw = {b["batch_id"]: b for b in (orjson.loads(v) for _, v in got)}
    assert set(raw) == set(formats)
    assert "embedding_format" not in raw["float"]
    assert raw["default"]["embedding_format"] == "base64"

    def vectors(name: str) -> dict[str, np.ndarray]:
        batch, dtype = raw[name], {"base64": "<f4", "base64-f16": "<f2"}
        fmt = batch.get("embedding_format", "float")
        return {it["id"]: np.asarray(it["embedding"], dtype=np.float32) if fmt == "float"
                else np.frombuffer(base64.b64decode(it["embedding"]), dtype=dtype[fmt])
                .astype(np.float32) for it in batch["items"]}

    floats = vectors("float")
    for name in ("b64", "f16", "default"):
        for item_id, vector in vectors(name).items():
            # Another micro-batch, another dynamic-INT8 rounding: close, not bit-equal.
            assert vector.shape == (384,)
            cosine = float(vector @ floats[item_id]) / float(
                np.linalg.norm(vector) * np.linalg.norm(floats[item_id]))
            assert cosine > 0.99, (name, item_id, cosine)
        # Our own decoder reads every format to the same floats a plain client gets.
        ours = decode_score_batch(orjson.dumps(raw[name]))
        for it in ours.items:
            assert np.allclose(np.float32(it.embedding), vectors(name)[it.id], atol=0, rtol=0)
