"""The tokenizer service against a real broker and redis-server, run in burst mode: publish,
run until idle, then read what it produced (and what it committed)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from tokenizers import Tokenizer

from engines.manifest import Manifest, read_manifest
from engines.registry import EngineRegistry
from engines.select import artifact_tokenizer
from engines.tokenizer import artifact_tokenizer_json
from plumbing.cache import CacheSettings, ResultCache, encode_floats, key_digest
from plumbing.kafka import KafkaSettings, Topics, make_consumer, make_producer
from schemas import (
    Limits,
    QueryBatch,
    QueryItem,
    TokenBatch,
    decode_dead_letter,
    decode_score_batch,
    decode_token_batch,
    encode_query_batch,
)
from tests.engine_fixtures import copy_version, retokenized_version
from tests.tokenizer_svc.gated import hold_new_pools
from tokenizer_svc.service import TokenizerService, TokenizerServiceSettings
from tokenizer_svc.units import item_keys, sequence_keys

pytestmark = pytest.mark.integration

TIMEOUT = 30.0  # any one step: a run, or reading a topic
IDLE_EXIT_S = 1.0  # burst mode: return once the group was idle this long
CreateTopic = Callable[..., Awaitable[str]]


@pytest.fixture
async def topics(create_topic: CreateTopic, topic_name: str) -> Topics:
    names = Topics.with_prefix(topic_name)
    for name in names.all():
        await create_topic(name)
    return names


@pytest.fixture
def kafka(kafka_bootstrap: str) -> KafkaSettings:
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    return settings if os.environ.get("QSCORE_TEST_KAFKA") else settings.with_fast_groups()


@pytest.fixture
def manifest(default_engine_path: Path) -> Manifest:
    return read_manifest(default_engine_path)


def _settings(kafka: KafkaSettings, topics: Topics, artifact: Path, **kw: object
              ) -> TokenizerServiceSettings:
    return TokenizerServiceSettings(
        kafka=kafka, topics=topics, artifact=artifact, processes=1,
        group_id=f"{topics.queries}.tokenizer", **kw)  # type: ignore[arg-type]


async def _publish(kafka: KafkaSettings, messages: list[tuple[str, bytes]]) -> None:
    producer = make_producer(kafka)
    await producer.start()
    try:
        for topic, value in messages:
            await asyncio.wait_for(producer.send_and_wait(topic, value, key=b"k"), TIMEOUT)
    finally:
        await producer.stop()


@asynccontextmanager
async def _burst(settings: TokenizerServiceSettings) -> AsyncIterator[TokenizerService]:
    """Start the service, run it until idle, yield it (still connected, for committed())."""
    service = TokenizerService(settings)
    await service.start()
    try:
        await asyncio.wait_for(service.run(idle_exit_s=IDLE_EXIT_S), TIMEOUT)
        yield service
    finally:
        await service.stop()


async def _read(kafka: KafkaSettings, topic: str, count: int) -> list[ConsumerRecord]:
    """The first `count` records of `topic` (one partition), then checks there are no more."""
    consumer = make_consumer(kafka, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        records: list[ConsumerRecord] = []

        async def fill() -> None:
            while len(records) < count:
                batches = await consumer.getmany(tp, timeout_ms=200)
                records.extend(batches.get(tp, []))

        await asyncio.wait_for(fill(), TIMEOUT)
        # The service returned only after every send was acknowledged: nothing more is coming.
        # The fetch's high watermark, not end_offsets(): tansu's ListOffsets answers the last
        # batch's base offset + 1, short by all but one record of a multi-record batch.
        end = consumer.highwater(tp) if count else (await consumer.end_offsets([tp]))[tp]
        assert end == count, topic
        return records
    finally:
        await consumer.stop()


def _expected(default_engine_path: Path, manifest: Manifest, batch: QueryBatch,
              items: tuple[QueryItem, ...], priority: str = "online") -> TokenBatch:
    tb = artifact_tokenizer(default_engine_path, manifest).token_batch(
        batch.batch_id, items, submitted_at=batch.submitted_at, reply_topic=batch.reply_topic,
        priority=priority)  # type: ignore[arg-type]
    keys = [item_keys(it, manifest.version) for it in items]
    return replace(tb, cache_keys=sequence_keys(tb.seq_item, tb.seq_doc, keys))


ITEMS = (QueryItem(id="q1", query="how to boil an egg",
                   docs=("Boil for nine minutes.", "Paris is in France.")),
         QueryItem(id="q2", query="capital of australia"))


async def test_query_batches_become_token_batches_online_and_offline(
        kafka: KafkaSettings, topics: Topics, default_engine_path: Path,
        manifest: Manifest, create_topic: CreateTopic) -> None:
    await create_topic(f"{topics.scores}.mine")  # a reply topic must exist
    now = time.time()
    online = QueryBatch("on-1", ITEMS, submitted_at=now, reply_topic=f"{topics.scores}.mine")
    by_priority = QueryBatch("off-1", ITEMS[:1], submitted_at=now, priority="offline")
    by_topic = QueryBatch("off-2", ITEMS[1:], submitted_at=now)
    await _publish(kafka, [(topics.queries, encode_query_batch(online)),
                           (topics.queries, encode_query_batch(by_priority)),
                           (topics.queries_offline, encode_query_batch(by_topic))])

    settings = _settings(kafka, topics, default_engine_path, cache=CacheSettings())
    async with _burst(settings) as service:
        stats = service.stats
        assert (stats.batches, stats.items, stats.tokenized_items) == (3, 4, 4)
        assert (stats.token_batches, stats.score_batches, stats.dead_letters) == (3, 0, 0)

    (record,) = await _read(kafka, topics.tokens, 1)
    assert record.key == b"on-1"
    tb = decode_token_batch(record.value)
    assert tb == _expected(default_engine_path, manifest, online, ITEMS)
    assert tb.item_ids == ("q1", "q2") and tb.seq_doc.tolist() == [-1, 0, 1, -1]
    assert bytes(tb.cache_keys[2]) == key_digest(manifest.version, ITEMS[0].query,
                                                 ITEMS[0].docs[1])

    offline = {r.key: decode_token_batch(r.value)
               for r in await _read(kafka, topics.tokens_offline, 2)}
    assert offline[b"off-1"] == _expected(default_engine_path, manifest, by_priority,
                                          ITEMS[:1], "offline")
    assert offline[b"off-2"] == _expected(default_engine_path, manifest, by_topic,
                                          ITEMS[1:], "offline")
    await _read(kafka, topics.scores, 0)


async def test_cached_items_are_answered_without_tokenizing(
        kafka: KafkaSettings, topics: Topics, default_engine_path: Path, manifest: Manifest,
        redis_url: str, topic_name: str) -> None:
    cache = CacheSettings(redis_url=redis_url, key_prefix=topic_name)
    v = manifest.version
    embedding = np.linspace(-1, 1, manifest.output_dim, dtype=np.float32)
    items = (QueryItem("hit-docs", "red shoes", ("size 42", "blue socks")),
             QueryItem("hit-alone", "green hats"),
             QueryItem("miss", "yellow coats"),
             QueryItem("part", "red shoes", ("size 42", "never cached")))
    # The convention the scoring worker writes with: per-doc key -> [score], query -> embedding.
    async with ResultCache(cache, v) as writer:
        await writer.put_many([(key_digest(v, "red shoes", "size 42"), encode_floats([0.75])),
                               (key_digest(v, "red shoes", "blue socks"), encode_floats([0.5])),
                               (key_digest(v, "green hats", None), encode_floats(embedding))])
    batch = QueryBatch("mixed", items, submitted_at=time.time() - 0.01)
    await _publish(kafka, [(topics.queries, encode_query_batch(batch))])

    settings = _settings(kafka, topics, default_engine_path, cache=cache)
    async with _burst(settings) as service:
        assert (service.stats.cached_items, service.stats.tokenized_items) == (2, 2)
        # One lookup for the whole batch; "part" hit one doc of two, so it is tokenized.
        assert (service.cache.stats.hits_redis, service.cache.stats.misses) == (4, 2)

    (record,) = await _read(kafka, topics.scores, 1)
    scores = decode_score_batch(record.value)
    assert record.key == b"mixed" and scores.batch_id == "mixed"
    assert scores.model_id == manifest.model_id
    hit_docs, hit_alone = scores.items
    assert (hit_docs.id, hit_docs.scores, hit_docs.embedding) == ("hit-docs", (0.75, 0.5), None)
    assert hit_alone.id == "hit-alone" and hit_alone.scores == ()
    assert hit_alone.embedding == pytest.approx(embedding.tolist())
    assert all(it.cached and it.model_version == v for it in scores.items)
    assert scores.timings.tokenize_ms > 0 and scores.timings.total_ms >= 10

    (record,) = await _read(kafka, topics.tokens, 1)
    tb = decode_token_batch(record.value)
    assert tb == _expected(default_engine_path, manifest, batch, items[2:])


def _query(**overrides: object) -> dict[str, object]:
    return {"v": 1, "batch_id": "b", "submitted_at": 1.0,
            "items": [{"id": "q", "query": "fine", "docs": ["a doc"]}]} | overrides


async def test_poison_messages_are_dead_lettered_and_committed_past(
        kafka: KafkaSettings, topics: Topics, default_engine_path: Path) -> None:
    limits = Limits(max_message_bytes=64_000, max_docs_per_item=16)
    poison = {
        "json": b'{"v": 1, "batch_id": ',
        "version": orjson.dumps(_query(v=99)),
        "max_bytes": orjson.dumps(_query(batch_id="x" * 100, pad="y" * 70_000)),
        "utf-8": orjson.dumps(_query(batch_id="caf\u00e9")).replace(b"\xc3\xa9", b"\xe9"),
        "empty": orjson.dumps(_query(items=[{"id": "q", "query": "  "}])),
        "max_items": orjson.dumps(_query(items=[{"id": "q", "query": "x",
                                                 "docs": ["d"] * 17}])),
    }
    good = QueryBatch("good", ITEMS, submitted_at=time.time())
    await _publish(kafka, [(topics.queries, raw) for raw in poison.values()]
                   + [(topics.queries, encode_query_batch(good, limits))])

    settings = _settings(kafka, topics, default_engine_path, cache=CacheSettings(),
                         limits=limits)
    async with _burst(settings) as service:
        assert service.stats.dead_letters == len(poison)
        tp = TopicPartition(topics.queries, 0)
        # Burst mode commits before returning: past the poison and the good message alike.
        assert await service.pipeline.consumer.committed(tp) == len(poison) + 1

    letters = [decode_dead_letter(r.value, limits)
               for r in await _read(kafka, topics.dead_letter, len(poison))]
    for letter, (rule, raw) in zip(sorted(letters, key=lambda d: d.source.offset),
                                   poison.items(), strict=True):
        assert letter.stage == "ingest" and letter.error_rule == rule, letter.reason
        assert letter.source.topic == topics.queries and letter.reason
        assert raw.startswith(letter.original)
        assert letter.original_truncated == (rule == "max_bytes")
    (record,) = await _read(kafka, topics.tokens, 1)
    assert decode_token_batch(record.value, limits).batch_id == "good"


async def test_a_foreign_reply_topic_is_dead_lettered_and_never_created(
        kafka: KafkaSettings, topics: Topics, default_engine_path: Path,
        create_topic: CreateTopic) -> None:
    await create_topic(f"{topics.scores}.team-a")
    now = time.time()
    # Outside the allow-list, internal, another stage's, and allowed but never created.
    foreign = [f"no-such-topic-{uuid.uuid4().hex[:8]}", "__consumer_offsets", topics.tokens,
               f"{topics.scores}.missing"]
    batches = [QueryBatch(f"bad-{i}", ITEMS, submitted_at=now, reply_topic=t)
               for i, t in enumerate(foreign)]
    allowed = QueryBatch("ok", ITEMS, submitted_at=now, reply_topic=f"{topics.scores}.team-a")
    await _publish(kafka, [(topics.queries, encode_query_batch(b)) for b in batches]
                   + [(topics.queries, encode_query_batch(allowed))])

    async with _burst(_settings(kafka, topics, default_engine_path,
                                cache=CacheSettings())) as service:
        assert service.stats.dead_letters == len(foreign)

    letters = [decode_dead_letter(r.value) for r in await _read(kafka, topics.dead_letter,
                                                                 len(foreign))]
    assert sorted(d.error_rule or "" for d in letters) == ["", *["forbidden_topic"] * 3]
    (missing,) = [d for d in letters if d.error_rule is None]
    assert "does not exist" in missing.reason
    assert all(d.stage == "ingest" for d in letters)
    assert sorted(d.original for d in letters) == sorted(encode_query_batch(b) for b in batches)
    (record,) = await _read(kafka, topics.tokens, 1)
    assert decode_token_batch(record.value).reply_topic == f"{topics.scores}.team-a"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        existing = await admin.list_topics()
        assert foreign[0] not in existing and f"{topics.scores}.missing" not in existing
    finally:
        await admin.close()


async def test_command_serves_until_sigterm_then_drains_and_commits(
        kafka: KafkaSettings, topics: Topics, topic_name: str, default_engine_path: Path,
        tmp_path: Path) -> None:
    group = f"{topic_name}.cli"
    args = ["tokenizer", "--bootstrap-servers", kafka.bootstrap_servers,
            "--topic-prefix", topic_name, "--engine", str(default_engine_path),
            "--processes", "1", "--group-id", group, "--log-level", "warning"]
    if not os.environ.get("QSCORE_TEST_KAFKA"):
        args.append("--fast-groups")
    log = (tmp_path / "tokenizer.log").open("wb")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "qscore", *args,
                                                stdout=log, stderr=log)
    try:
        batch = QueryBatch("cli-1", ITEMS, submitted_at=time.time())
        await _publish(kafka, [(topics.queries, encode_query_batch(batch))])
        (record,) = await _read(kafka, topics.tokens, 1)  # served while running
        assert decode_token_batch(record.value).item_ids == ("q1", "q2")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
    output = (tmp_path / "tokenizer.log").read_text()
    assert "tokenizer done: 1 batches" in output, output

    consumer = make_consumer(kafka, group_id=group)
    await consumer.start()
    try:
        assert await consumer.committed(TopicPartition(topics.queries, 0)) == 1
    finally:
        await consumer.stop()


# -- following promotions (issue 12) -----------------------------------------------------------
async def _until(done: Callable[[], object], what: str) -> None:
    """Poll `done()` until it is true (TIMEOUT)."""
    deadline = time.monotonic() + TIMEOUT
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _follow_registry(default_engine_path: Path, root: Path) -> tuple[EngineRegistry, str]:
    """A registry at `root` with v1, a copy of the default engine, promoted; and the model."""
    copy_version(default_engine_path, root, "v1")
    registry = EngineRegistry(root)
    model = read_manifest(default_engine_path).model_id
    registry.promote(model, "v1", smoke=False)
    return registry, model


def _following(kafka: KafkaSettings, topics: Topics, registry: EngineRegistry, model: str,
               **kw: object) -> TokenizerService:
    service = TokenizerService(_settings(kafka, topics, registry.get(model), **kw))
    service.follow = lambda: registry.get(model)
    service.follow_poll_s = 0.05
    return service


def _flow_batch(batch_id: str) -> QueryBatch:
    return QueryBatch(batch_id, (QueryItem("fresh", f"cheap flights for trip {batch_id}",
                                           ("book early",)),
                                 QueryItem("cached", "red shoes")), submitted_at=time.time())


async def test_a_promotion_with_another_tokenizer_is_followed_while_batches_flow(
        kafka: KafkaSettings, topics: Topics, default_engine_path: Path, tmp_path: Path,
        redis_url: str, topic_name: str) -> None:
    registry, model = _follow_registry(default_engine_path, tmp_path / "registry")
    v2 = retokenized_version(default_engine_path, registry.root, "v2")
    manifests = {v: read_manifest(registry.get(model, v)) for v in ("v1", "v2")}
    decoders = {v: Tokenizer.from_file(str(artifact_tokenizer_json(registry.get(model, v))))
                for v in manifests}
    # "red shoes" is cached under each version, with an embedding of its own: a cached score
    # says which version the record's look-up was for.
    cache = CacheSettings(redis_url=redis_url, key_prefix=topic_name)
    dim = manifests["v1"].output_dim
    embeddings = {"v1": np.full(dim, 0.25, np.float32), "v2": np.full(dim, -0.5, np.float32)}
    async with ResultCache(cache, "v1") as writer:
        for v, e in embeddings.items():
            await writer.put_many([(key_digest(v, "red shoes", None), encode_floats(e))],
                                  version=v)
    service = _following(kafka, topics, registry, model, cache=cache)
    in_flight_at_switch: list[int] = []
    switch = service.pools.switch

    def observed(new):  # type: ignore[no-untyped-def]
        in_flight_at_switch.append(service.pools.records(service.pool))
        switch(new)

    service.pools.switch = observed  # type: ignore[method-assign]
    producer = make_producer(kafka)
    await service.start()
    await producer.start()
    old_pool = service.pool
    try:
        run = asyncio.create_task(service.run())

        async def publish(batches: list[QueryBatch]) -> None:
            for b in batches:
                await asyncio.wait_for(producer.send_and_wait(
                    topics.queries, encode_query_batch(b), key=b.batch_id.encode()), TIMEOUT)

        before = [_flow_batch(f"a{i}") for i in range(8)]
        await publish(before)
        await _until(lambda: service.stats.batches == len(before), "the first batches")
        registry.promote(model, "v2", smoke=False)
        # A stream of batches while the new pool starts beside the serving one and the
        # service switches: they are handled on one version or the other, never lost.
        stream: list[QueryBatch] = []
        while service.follow_stats.follows == 0:
            assert len(stream) < 5000, "the switch never came"
            stream.append(_flow_batch(f"b{len(stream):04d}"))
            await publish(stream[-1:])
        after = [_flow_batch(f"c{i}") for i in range(8)]
        await publish(after)
        everything = before + stream + after
        await _until(lambda: service.stats.batches == len(everything), "every batch")
        await asyncio.wait_for(service.retired(), TIMEOUT)  # the old pool, once drained
        assert old_pool.pids == [] and len(service.pool.pids) == 1
        service.request_stop()
        await asyncio.wait_for(run, TIMEOUT)
        follow = service.metrics()["follow"]()
        assert (follow.follows, follow.new_pools, follow.follows_refused) == (1, 1, 0)  # type: ignore[attr-defined]
        assert (follow.serving_version, follow.tokenizer_id) == (  # type: ignore[attr-defined]
            "v2", manifests["v2"].tokenizer_id)
        assert service.serving.artifact == v2 and len(in_flight_at_switch) == 1
    finally:
        await producer.stop()
        await service.stop()
    assert service.stats.dead_letters == 0

    tokens = {r.key.decode(): decode_token_batch(r.value)
              for r in await _read(kafka, topics.tokens, len(everything))}
    scores = {r.key.decode(): decode_score_batch(r.value)
              for r in await _read(kafka, topics.scores, len(everything))}
    assert sorted(tokens) == sorted(scores) == sorted(b.batch_id for b in everything)
    version_of: dict[str, str] = {}
    for b in everything:
        tb, (cached,) = tokens[b.batch_id], scores[b.batch_id].items
        query = b.items[0].query
        (v,) = [v for v in manifests
                if bytes(tb.cache_keys[0]) == key_digest(v, query, None)]  # type: ignore[index]
        version_of[b.batch_id] = v
        # One version per record: its tokenizer, its keys and its cache look-up.
        assert tb.tokenizer_id == manifests[v].tokenizer_id, b.batch_id
        assert decoders[v].decode(tb.sequence(0).tolist()) == query
        assert tb.item_ids == ("fresh",) and cached.id == "cached"
        assert cached.model_version == v
        assert cached.embedding == pytest.approx(embeddings[v].tolist())
    assert {version_of[b.batch_id] for b in before} == {"v1"}
    assert {version_of[b.batch_id] for b in after} == {"v2"}
    # The switch is one point in the stream: every record handled after it is on v2.
    flow = [version_of[b.batch_id] for b in stream]
    assert flow == sorted(flow) and flow[-1] == "v2"
    assert decoders["v1"].decode(tokens["c0"].sequence(0).tolist()) != after[0].items[0].query


async def test_refused_promotions_leave_the_old_version_serving(
        kafka: KafkaSettings, topics: Topics, default_engine_path: Path, tmp_path: Path,
        manifest: Manifest) -> None:
    registry, model = _follow_registry(default_engine_path, tmp_path / "registry")
    retokenized_version(default_engine_path, registry.root, "v2-classifier", head="classifier")
    corrupt = retokenized_version(default_engine_path, registry.root, "v3-corrupt")
    service = _following(kafka, topics, registry, model, cache=CacheSettings())
    producer = make_producer(kafka)
    await service.start()
    await producer.start()
    served: list[QueryBatch] = []
    try:
        run = asyncio.create_task(service.run())

        async def serve_one(batch_id: str) -> None:
            batch = QueryBatch(batch_id, ITEMS, submitted_at=time.time())
            await producer.send_and_wait(topics.queries, encode_query_batch(batch))
            served.append(batch)
            await _until(lambda: service.stats.batches == len(served), batch_id)

        await serve_one("before")
        registry.promote(model, "v2-classifier", smoke=False)  # another head: a restart
        await _until(lambda: service.follow_stats.follows_refused == 1, "the head refusal")
        assert "its head is classifier" in service.follow_stats.last_refusal
        await serve_one("after-head")
        registry.promote(model, "v3-corrupt", smoke=False)
        artifact_tokenizer_json(corrupt).write_bytes(b"{rotted")  # after its promotion
        await _until(lambda: service.follow_stats.follows_refused == 2, "the corrupt refusal")
        assert "v3-corrupt: " in service.follow_stats.last_refusal
        assert "differs from the one the engine was built with" in (
            service.follow_stats.last_refusal)
        await serve_one("after-corrupt")
        service.request_stop()
        await asyncio.wait_for(run, TIMEOUT)
        assert service.manifest.version == "v1" and service.follow_stats.follows == 0
    finally:
        await producer.stop()
        await service.stop()
    tokens = [decode_token_batch(r.value) for r in await _read(kafka, topics.tokens, 3)]
    v1 = registry.get(model, "v1")
    for batch, tb in zip(served, tokens, strict=True):
        assert tb == _expected(v1, read_manifest(v1), batch, ITEMS)  # keys for v1 too
        assert tb.tokenizer_id == manifest.tokenizer_id


async def test_stop_while_a_new_tokenizer_pool_starts_leaves_no_process(
        kafka: KafkaSettings, topics: Topics, default_engine_path: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    registry, model = _follow_registry(default_engine_path, tmp_path / "registry")
    retokenized_version(default_engine_path, registry.root, "v2")
    gate = tmp_path / "gate"
    service = _following(kafka, topics, registry, model, cache=CacheSettings())
    starting = hold_new_pools(monkeypatch, gate)  # after v1's pool was made
    batch = QueryBatch("during", ITEMS, submitted_at=time.time())
    await _publish(kafka, [(topics.queries, encode_query_batch(batch))])
    await service.start()
    stopping = None
    try:
        run = asyncio.create_task(service.run())
        await _until(lambda: service.stats.batches == 1, "the batch")
        registry.promote(model, "v2", smoke=False)
        await _until(lambda: starting and starting[0].pids, "the new pool's process")
        pids = starting[0].pids + service.pool.pids
        service.request_stop()  # SIGTERM
        await asyncio.wait_for(run, TIMEOUT)
        stopping = asyncio.ensure_future(service.stop())
        follow = service._follow_task
        await _until(lambda: follow is not None and follow.cancelling(), "the cancellation")
        gate.touch()  # the held process may finish its set-up now: too late to be used
        await asyncio.wait_for(stopping, TIMEOUT)
    finally:
        if stopping is None:
            await service.stop()
    assert len(pids) == 2 and starting[0].pids == [] and service.pool.pids == []
    assert not any(p.pid in pids for p in multiprocessing.active_children())
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert service.manifest.version == "v1" and service.follow_stats.follows == 0
    (record,) = await _read(kafka, topics.tokens, 1)
    v1 = registry.get(model, "v1")
    assert decode_token_batch(record.value) == _expected(v1, read_manifest(v1), batch, ITEMS)
