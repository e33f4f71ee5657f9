"""The scoring worker on a real broker and redis-server: batches, scores, cache, commits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from engines.loader import load_engine
from engines.protocol import Engine
from engines.tokenizer import QueryTokenizer
from plumbing.cache import CacheSettings, ResultCache, decode_floats, key_digest
from plumbing.kafka import KafkaSettings, Topics, make_consumer, make_producer
from schemas import (
    QueryItem,
    TokenBatch,
    decode_dead_letter,
    decode_score_batch,
    encode_token_batch,
)
from workers.microbatcher import BatcherSettings
from workers.scoring import BatchLimits, run_token_batch
from workers.service import ScoringWorker, WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def kafka(bootstrap: str) -> KafkaSettings:
    settings = KafkaSettings(bootstrap_servers=bootstrap)
    return settings if os.environ.get("QSCORE_TEST_KAFKA") else settings.with_fast_groups()


async def read_all(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """Read at least `count` messages from every partition of `topic`, without a group."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        out: list[bytes] = []
        async with asyncio.timeout(30):
            while len(out) < count:
                batch = await consumer.getmany(timeout_ms=200)
                out.extend(r.value for records in batch.values() for r in records)
        return out
    finally:
        await consumer.stop()


@contextlib.asynccontextmanager
async def worker_running(worker: ScoringWorker, bootstrap: str) -> AsyncIterator[Any]:
    """`worker` started and running, and a started producer to feed it; on leaving, the
    worker is asked to stop, drains and is stopped (and the producer too)."""
    producer = make_producer(kafka(bootstrap))
    await worker.start()
    await producer.start()
    try:
        run = asyncio.create_task(worker.run())
        yield producer
        worker.request_stop()
        await asyncio.wait_for(run, 30)
    finally:
        await producer.stop()
        await worker.stop()


async def publish_token_batches(producer: Any, topic: str, tbs: list[TokenBatch]) -> None:
    """Send `tbs` (keyed by batch id) and wait for every acknowledgement."""
    await asyncio.gather(*[await producer.send(topic, encode_token_batch(tb),
                                               key=tb.batch_id.encode()) for tb in tbs])


def versions_scored(values: list[bytes], tbs: list[TokenBatch]) -> dict[str, set[str]]:
    """The model versions in each TokenBatch's scores, asserting each was scored exactly once
    and never by two versions."""
    batches = {b.batch_id: b for b in map(decode_score_batch, values)}
    assert sorted(batches) == sorted(tb.batch_id for tb in tbs)  # nothing lost, none twice
    versions = {b: {it.model_version for it in s.items} for b, s in batches.items()}
    assert all(len(v) == 1 for v in versions.values()), versions  # never mixed
    return versions


def tokenize(engine: Engine, items: list[QueryItem], batch_id: str) -> TokenBatch:
    """What the tokenizer service sends: a TokenBatch with one cache digest per sequence."""
    m = engine.manifest
    tok = QueryTokenizer(engine.path / "tokenizer" / "tokenizer.json", m.max_length,
                         pairs=m.head == "classifier")
    tb = tok.token_batch(batch_id, items, submitted_at=time.time())
    keys = [key_digest(m.version, items[i].query, None if d < 0 else (items[i].docs or ())[d])
            for i, d in zip(tb.seq_item.tolist(), tb.seq_doc.tolist(), strict=True)]
    return replace(tb, cache_keys=np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 16))


ITEMS = [
    QueryItem(id="a", query="how to boil an egg",
              docs=("Boil the eggs for nine minutes.", "Lisbon is the capital of Portugal.")),
    QueryItem(id="b", query="capital of australia"),
    QueryItem(id="c", query="python sort list", docs=("Use sorted(xs).",)),
]


async def test_worker_scores_token_batches_writes_cache_and_commits(
        kafka_bootstrap: str, redis_url: str, create_topic, topic_name: str,  # type: ignore[no-untyped-def]
        default_engine_path: Path) -> None:
    topics = Topics.with_prefix(topic_name)
    for name in topics.all():
        await create_topic(name, partitions=2)
    engine = load_engine(default_engine_path, threads=2)
    token_batches = [tokenize(engine, ITEMS, f"b{i}") for i in range(6)]
    producer = make_producer(kafka(kafka_bootstrap))
    await producer.start()
    try:
        for tb in token_batches[:5]:
            await producer.send_and_wait(topics.tokens, encode_token_batch(tb),
                                         key=tb.batch_id.encode())
        await producer.send_and_wait(topics.tokens_offline,
                                     encode_token_batch(token_batches[5]), key=b"b5")
        await producer.send_and_wait(topics.tokens, b"\x00 not a token batch", key=b"poison")
        truncated = encode_token_batch(token_batches[0])[:-7]
        await producer.send_and_wait(topics.tokens, truncated, key=b"truncated")
    finally:
        await producer.stop()

    settings = WorkerSettings(kafka=kafka(kafka_bootstrap), topics=topics,
                              batcher=BatcherSettings(max_batch=8, max_wait_ms=2),
                              group_id=f"{topic_name}-w",
                              cache=CacheSettings(redis_url=redis_url))
    worker = ScoringWorker(settings, [engine])
    await worker.start()
    try:
        await asyncio.wait_for(worker.run(idle_exit_s=1.5), 60)
    finally:
        await worker.stop()

    batches = [decode_score_batch(v) for v in await read_all(kafka_bootstrap, topics.scores, 6)]
    expected = run_token_batch(load_engine(default_engine_path), token_batches[0],
                               BatchLimits()).items
    assert sorted(b.batch_id for b in batches) == [f"b{i}" for i in range(6)]
    for batch in batches:
        for got, want in zip(batch.items, expected, strict=True):
            assert got.id == want.id and not got.cached
            assert got.model_version == engine.manifest.version
            np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
            if want.embedding is not None:
                np.testing.assert_allclose(got.embedding, want.embedding, atol=1e-5)
    assert worker.stats.messages == 6 and worker.stats.batches >= 1
    assert worker.online.stats.dead_letters == 2

    # Write-through: every unit is in Redis under the tokenizer's digests.
    fresh = ResultCache(CacheSettings(redis_url=redis_url, local_entries=0),
                        engine.manifest.version)
    async with fresh:
        keys = token_batches[0].cache_keys
        assert keys is not None
        values = await fresh.get_many([bytes(k) for k in keys])
    assert all(v is not None for v in values)
    a_doc0 = decode_floats(values[1])  # sequences: a's query, a's doc 0, a's doc 1, ...
    assert a_doc0[0] == pytest.approx(expected[0].scores[0], abs=1e-5)

    letters = {bytes(d.original): d for d in (decode_dead_letter(v) for v in await read_all(
        kafka_bootstrap, topics.dead_letter, 2))}
    assert set(letters) == {b"\x00 not a token batch", truncated}
    assert all(d.stage == "score" for d in letters.values())
    assert letters[truncated].error_rule == "length"  # says what was wrong with it

    # Every offset, the poison message's included, is committed.
    check = make_consumer(kafka(kafka_bootstrap), group_id=f"{topic_name}-w")
    await check.start()
    try:
        committed = [await check.committed(TopicPartition(topics.tokens, p)) or 0
                     for p in range(2)]
        assert sum(committed) == 7  # 5 token batches + 2 poison messages
    finally:
        await check.stop()


async def _topics(create_topic, topic_name: str) -> Topics:  # type: ignore[no-untyped-def]
    topics = Topics.with_prefix(topic_name)
    for name in topics.all():
        await create_topic(name, partitions=1)
    return topics


async def _publish(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """(key, value) records, each acknowledged before the next."""
    producer = make_producer(kafka(bootstrap))
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def _record(tb: TokenBatch) -> tuple[bytes, bytes]:
    return tb.batch_id.encode(), encode_token_batch(tb)


async def _burst(bootstrap: str, topics: Topics, group: str, engine: Engine) -> ScoringWorker:
    """A worker run until its topics are idle; returned stopped, for its stats."""
    worker = ScoringWorker(WorkerSettings(kafka=kafka(bootstrap), topics=topics,
                                          group_id=group), [engine])
    await worker.start()
    try:
        await asyncio.wait_for(worker.run(idle_exit_s=1.5), 60)
    finally:
        await worker.stop()
    return worker


async def test_a_token_batch_of_300_query_embeddings_is_scored_in_parts_not_dead_lettered(
        kafka_bootstrap: str, create_topic, topic_name: str,  # type: ignore[no-untyped-def]
        default_engine_path: Path) -> None:
    # 300 queries without docs: a ~8 KB TokenBatch whose ScoreBatch (300 embeddings as JSON
    # floats, ~11 bytes each at float32 precision) is ~1.3 MB, over the 1 MiB message limit.
    # Good input: it must be scored.
    topics = await _topics(create_topic, topic_name)
    engine = load_engine(default_engine_path, threads=2)
    items = [QueryItem(id=f"q{i}", query=f"query number {i} about red shoes")
             for i in range(300)]
    await _publish(kafka_bootstrap, topics.tokens,
                   [_record(tokenize(engine, items, "big")), (b"poison", b"\x00 poison")])
    worker = await _burst(kafka_bootstrap, topics, f"{topic_name}-w", engine)

    parts = [decode_score_batch(v) for v in await read_all(kafka_bootstrap, topics.scores, 2)]
    assert len(parts) >= 2 and {p.batch_id for p in parts} == {"big"}
    assert sorted(it.id for p in parts for it in p.items) == sorted(it.id for it in items)
    assert all(it.embedding is not None and len(it.embedding) == 384
               for p in parts for it in p.items)
    assert worker.stats.score_batches == len(parts) and worker.stats.items == 300
    # Only the poison record was dead-lettered (the one after it shows the topic was read).
    letters = [decode_dead_letter(v) for v in await read_all(kafka_bootstrap,
                                                             topics.dead_letter, 1)]
    assert [bytes(d.original) for d in letters] == [b"\x00 poison"]


async def test_a_token_batch_with_a_foreign_reply_topic_is_dead_lettered_not_sent(
        kafka_bootstrap: str, create_topic, topic_name: str,  # type: ignore[no-untyped-def]
        default_engine_path: Path) -> None:
    # TokenBatches normally come from the tokenizer, which checks reply topics; one produced
    # by anyone else must not make the worker write (or auto-create) where it says.
    topics = await _topics(create_topic, topic_name)
    engine = load_engine(default_engine_path, threads=2)
    foreign = replace(tokenize(engine, ITEMS, "foreign"), reply_topic="__consumer_offsets")
    fine = replace(tokenize(engine, ITEMS, "fine"), reply_topic=f"{topics.scores}.team-a")
    await create_topic(f"{topics.scores}.team-a", partitions=1)
    await _publish(kafka_bootstrap, topics.tokens, [_record(foreign), _record(fine)])
    worker = await _burst(kafka_bootstrap, topics, f"{topic_name}-w", engine)

    (letter,) = [decode_dead_letter(v) for v in await read_all(kafka_bootstrap,
                                                              topics.dead_letter, 1)]
    assert letter.stage == "score" and letter.error_rule == "forbidden_topic"
    (scores,) = [decode_score_batch(v) for v in await read_all(
        kafka_bootstrap, f"{topics.scores}.team-a", 1)]
    assert scores.batch_id == "fine" and worker.stats.messages == 1


async def test_token_ids_outside_the_vocabulary_dead_letter_only_their_batch(
        kafka_bootstrap: str, create_topic, topic_name: str,  # type: ignore[no-untyped-def]
        default_engine_path: Path) -> None:
    # Checked before any engine call: on a GPU an id past the embedding table reads out of
    # bounds instead of failing, and on CPU it would fail a whole micro-batch.
    topics = await _topics(create_topic, topic_name)
    engine = load_engine(default_engine_path, threads=2)
    good = tokenize(engine, ITEMS, "good")
    ids = good.input_ids.copy()
    ids[1] = 10**6
    bad = replace(tokenize(engine, ITEMS, "bad"), input_ids=ids)
    await _publish(kafka_bootstrap, topics.tokens, [_record(bad), _record(good)])
    worker = await _burst(kafka_bootstrap, topics, f"{topic_name}-w", engine)
    (letter,) = [decode_dead_letter(v) for v in await read_all(kafka_bootstrap,
                                                              topics.dead_letter, 1)]
    assert letter.stage == "score" and "outside the vocabulary" in letter.reason
    (scores,) = [decode_score_batch(v) for v in await read_all(kafka_bootstrap,
                                                               topics.scores, 1)]
    assert scores.batch_id == "good" and worker.stats.engine_errors == 0
