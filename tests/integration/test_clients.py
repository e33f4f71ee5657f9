"""QueryProducer, ScoreConsumer and the publish/consume/topics commands against a real broker."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from structlog.testing import LogCapture
from typer.testing import CliRunner, Result

import qscore.client
from plumbing.kafka import KafkaSettings, Topics, make_consumer, make_producer
from qscore.cli.app import app
from qscore.client import QueryProducer, ScoreConsumer, ScoresHandedOut, ScoresTimeout
from schemas import (
    ItemScore,
    QueryBatch,
    QueryItem,
    ScoreBatch,
    Timings,
    decode_query_batch,
    encode_score_batch,
)

pytestmark = pytest.mark.integration

TIMEOUT = 15.0  # seconds any single broker step may take before the test fails
CreateTopic = Callable[..., Awaitable[str]]


@pytest.fixture
def settings(kafka_bootstrap: str) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=kafka_bootstrap)


@pytest.fixture
async def topics(topic_name: str, create_topic: CreateTopic) -> Topics:
    """This test's own fleet topics (deleted afterwards): queries on 2 partitions; scores on 1,
    so that the order in which a test publishes scores is the order they are read."""
    topics = Topics.with_prefix(topic_name)
    await create_topic(topics.queries, partitions=2)
    await create_topic(topics.queries_offline)
    await create_topic(topics.scores)
    return topics


def _scores(batch_id: str, *ids: str) -> ScoreBatch:
    items = tuple(ItemScore(i, (0.25, 0.75), cached=i.endswith("c"), model_version="v1")
                  for i in ids)
    return ScoreBatch(batch_id, items, "test-model", time.time(), Timings(total_ms=1.0))


async def _publish_raw(settings: KafkaSettings, topic: str, *values: bytes,
                       partition: int | None = None) -> None:
    """What a worker does: put ScoreBatches (or anything) on the score topic, in order."""
    producer = make_producer(settings)
    await producer.start()
    try:
        for value in values:
            await asyncio.wait_for(
                producer.send_and_wait(topic, value, partition=partition), TIMEOUT)
    finally:
        await producer.stop()


async def _read_raw(settings: KafkaSettings, topic: str, count: int) -> list[Any]:
    # group_id=None: every partition from the start, no group join to wait for.
    consumer: AIOKafkaConsumer = make_consumer(settings, topic, group_id=None)
    await consumer.start()
    try:
        return [await asyncio.wait_for(consumer.getone(), TIMEOUT) for _ in range(count)]
    finally:
        await consumer.stop()


async def _cli(*args: str, input: str | None = None) -> Result:
    # The command runs its own event loop, so it gets a thread of its own. It points structlog
    # at the runner's stderr, closed afterwards: later tests get the old configuration back.
    saved = structlog.get_config()
    try:
        return await asyncio.to_thread(CliRunner().invoke, app, list(args), input=input)
    finally:
        structlog.configure(**saved)


@pytest.fixture
async def consumer(settings: KafkaSettings, topics: Topics) -> AsyncIterator[ScoreConsumer]:
    async with ScoreConsumer(settings, topics) as consumer:
        yield consumer


# -- QueryProducer ------------------------------------------------------------------------------

async def test_producer_sends_online_and_offline_batches_to_their_topics(
    settings: KafkaSettings, topics: Topics
) -> None:
    online = [QueryItem("q1", "red shoes"), QueryItem("q2", "boil an egg", ("9 minutes",))]
    offline = [QueryItem("q1", "weather paris")]
    async with QueryProducer(settings, topics) as producer:
        first = await asyncio.wait_for(producer.send_and_wait(online, batch_id="b-on"), TIMEOUT)
        pending = await producer.send(offline, priority="offline")
        second = await asyncio.wait_for(pending, TIMEOUT)

    assert (first.batch_id, first.item_ids, first.topic) == ("b-on", ("q1", "q2"), topics.queries)
    assert second.topic == topics.queries_offline and len(second.batch_id) == 32  # uuid4 hex

    for sent, items, priority in ((first, online, "online"), (second, offline, "offline")):
        (message,) = await _read_raw(settings, sent.topic, 1)
        batch: QueryBatch = decode_query_batch(message.value)
        assert (message.partition, message.offset) == (sent.partition, sent.offset)
        assert message.key == sent.batch_id.encode()
        assert (batch.batch_id, batch.items, batch.priority) == (sent.batch_id, tuple(items),
                                                                 priority)


# -- ScoreConsumer ------------------------------------------------------------------------------

async def test_consumer_drops_redelivered_scores(
    settings: KafkaSettings, topics: Topics, consumer: ScoreConsumer
) -> None:
    a = encode_score_batch(_scores("A", "q1", "q2c"))
    await _publish_raw(settings, topics.scores, a, a, encode_score_batch(_scores("S", "s1")))

    await consumer.wait_for("S", ["s1"], timeout=TIMEOUT)  # so A and its copy were read
    assert consumer.stats.duplicates == 2 and consumer.stats.messages == 3

    batch = await asyncio.wait_for(anext(aiter(consumer)), TIMEOUT)
    assert batch.batch_id == "A" and [(i.id, i.cached) for i in batch.items] == [
        ("q1", False), ("q2c", True)]
    assert consumer.book.n_unread == 0  # the copy was never queued for iteration


async def test_wait_for_returns_all_items_or_says_what_is_missing(
    settings: KafkaSettings, topics: Topics, consumer: ScoreConsumer
) -> None:
    await _publish_raw(settings, topics.scores, encode_score_batch(_scores("B", "q1")),
                       encode_score_batch(_scores("S", "s1")))
    await consumer.wait_for("S", ["s1"], timeout=TIMEOUT)  # B/q1 read, kept for iteration
    # q2 is not published until after this wait, so its timeout expires whatever the speed,
    # and the q1 that arrived before the call counts: exactly one of two is missing.
    with pytest.raises(ScoresTimeout, match=r"1 of 2 item scores missing .* 'B': \['q2'\]") as e:
        await consumer.wait_for("B", ["q1", "q2"], timeout=0.2)
    assert e.value.missing == {"B": {"q2"}} and set(e.value.received["B"]) == {"q1"}
    # q1 was handed out (in the error) and is not kept: waiting for it again cannot succeed.
    with pytest.raises(ScoresHandedOut) as gone:
        await consumer.wait_for("B", ["q1", "q2"], timeout=TIMEOUT)
    assert gone.value.handed_out == {"B": {"q1"}}

    # The late item completes the batch for a wait on what is still missing.
    await _publish_raw(settings, topics.scores, encode_score_batch(_scores("B", "q2")))
    scores = await consumer.wait_for("B", e.value.missing["B"], timeout=TIMEOUT)
    assert sorted(scores) == ["q2"] and scores["q2"].scores == (0.25, 0.75)


async def test_collect_many_batches_at_once(
    settings: KafkaSettings, topics: Topics, consumer: ScoreConsumer
) -> None:
    expected = {f"b{n}": [f"q{i}" for i in range(n % 3 + 1)] for n in range(100)}
    async with QueryProducer(settings, topics) as producer:
        sends = [await producer.send([QueryItem(i, f"query {i}") for i in ids], batch_id=b)
                 for b, ids in expected.items()]
        sent = await asyncio.wait_for(asyncio.gather(*sends), TIMEOUT)
    assert {s.batch_id: list(s.item_ids) for s in sent} == expected

    # The "fleet": scores in another order, one batch in two halves, plus one nobody awaits.
    values = [encode_score_batch(_scores(b, *ids)) for b, ids in reversed(expected.items())]
    await _publish_raw(settings, topics.scores, *values)
    # One partition, so the copy is read before "x" (collect may return before reading it).
    await _publish_raw(settings, topics.scores, encode_score_batch(_scores("b2", "q0")),
                       encode_score_batch(_scores("x", "q0")), partition=0)

    got = await consumer.collect(expected, timeout=TIMEOUT)
    assert {b: sorted(s) for b, s in got.items()} == expected
    nobody = await asyncio.wait_for(anext(aiter(consumer)), TIMEOUT)
    assert nobody.batch_id == "x"
    assert consumer.stats.duplicates == 1


async def test_undecodable_messages_are_skipped_and_counted(
    settings: KafkaSettings, topics: Topics, consumer: ScoreConsumer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    capture = LogCapture()
    monkeypatch.setattr(qscore.client, "log", structlog.wrap_logger(
        None, processors=[capture], wrapper_class=structlog.BoundLogger))
    await _publish_raw(settings, topics.scores, b"not json", b'{"v": 99}',
                       encode_score_batch(_scores("ok", "q1")))
    batch = await asyncio.wait_for(anext(aiter(consumer)), TIMEOUT)
    assert batch.batch_id == "ok" and consumer.stats.undecodable == 2
    assert [e["offset"] for e in capture.entries] == [0, 1]


async def test_latest_consumer_reads_only_new_scores(
    settings: KafkaSettings, topics: Topics
) -> None:
    await _publish_raw(settings, topics.scores, encode_score_batch(_scores("old", "q1")))
    async with ScoreConsumer(settings, topics, from_beginning=False) as consumer:
        await _publish_raw(settings, topics.scores, encode_score_batch(_scores("new", "q1")))
        batch = await asyncio.wait_for(anext(aiter(consumer)), TIMEOUT)
        assert batch.batch_id == "new" and consumer.stats.messages == 1


async def test_group_consumer_commits_only_what_it_handed_out(
    settings: KafkaSettings, topics: Topics, kafka_consumer_options: dict[str, Any]
) -> None:
    group = f"{topics.scores}-group"
    await _publish_raw(settings, topics.scores,
                       *(encode_score_batch(_scores(f"g{n}", "q1")) for n in range(3)))
    options = {"consumer_options": kafka_consumer_options, "group_id": group}
    async with ScoreConsumer(settings, topics, **options) as consumer:
        first = await asyncio.wait_for(anext(aiter(consumer)), TIMEOUT)
        assert first.batch_id == "g0" and consumer.book.n_unread == 2  # fetched, not handed out
        await consumer.commit()
    async with ScoreConsumer(settings, topics, **options) as consumer:
        again = await asyncio.wait_for(anext(aiter(consumer)), TIMEOUT)
        assert again.batch_id == "g1"


async def test_full_iteration_buffer_loses_nothing_across_a_restart(
    settings: KafkaSettings, topics: Topics, kafka_consumer_options: dict[str, Any]
) -> None:
    group = f"{topics.scores}-group"
    names = [f"g{n}" for n in range(6)]
    await _publish_raw(settings, topics.scores,
                       *(encode_score_batch(_scores(b, "q1")) for b in names))
    options = {"consumer_options": kafka_consumer_options, "group_id": group, "max_unread": 2}
    async with ScoreConsumer(settings, topics, **options) as consumer:
        # g5 is behind four batches nobody waits for, two more than the buffer takes.
        await consumer.wait_for("g5", ["q1"], timeout=TIMEOUT)
        got = [(await asyncio.wait_for(anext(aiter(consumer)), TIMEOUT)).batch_id
               for _ in range(2)]
        assert got == ["g0", "g1"]
        await consumer.commit()  # g2-g4 were never handed out: the commit stops before them
    async with ScoreConsumer(settings, topics, **options) as consumer:
        rest = [(await asyncio.wait_for(anext(aiter(consumer)), TIMEOUT)).batch_id
                for _ in range(4)]
        assert rest == ["g2", "g3", "g4", "g5"]  # g5 again: at least once


# -- commands -----------------------------------------------------------------------------------

async def test_publish_command_sends_good_lines_and_reports_bad_ones(
    settings: KafkaSettings, topics: Topics, topic_name: str, tmp_path: Path
) -> None:
    log = tmp_path / "queries.jsonl"
    lines = [{"id": f"q{n}", "query": f"query {n}"} for n in range(5)]
    text = [orjson.dumps(line).decode() for line in lines]
    text.insert(2, '{"id": "broken", "query": ')
    log.write_text("\n".join(text) + "\n")

    result = await _cli("publish", str(log), "--batch-size", "2", "--priority", "offline",
                        "--batch-prefix", "run1", "--no-progress", "--rate", "1000",
                        "--bootstrap-servers", settings.bootstrap_servers,
                        "--topic-prefix", topic_name)
    assert result.exit_code == 0, result.output
    assert "line 3: invalid JSON" in result.stderr
    acks = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [a["batch_id"] for a in acks] == ["run1-000000", "run1-000001", "run1-000002"]
    assert {a["topic"] for a in acks} == {topics.queries_offline}

    messages = await _read_raw(settings, topics.queries_offline, 3)
    batches = [decode_query_batch(m.value) for m in messages]
    assert [[i.id for i in b.items] for b in batches] == [["q0", "q1"], ["q2", "q3"], ["q4"]]
    assert {b.priority for b in batches} == {"offline"}


async def test_publish_command_reads_stdin(
    settings: KafkaSettings, topics: Topics, topic_name: str
) -> None:
    result = await _cli("publish", "-", "--no-progress", "--topic-prefix", topic_name,
                        "--bootstrap-servers", settings.bootstrap_servers,
                        input='{"id": "s1", "query": "from a pipe"}\n{"id": "s1"}\n')
    assert result.exit_code == 0, result.output
    assert "line 2:" in result.stderr and len(result.stdout.splitlines()) == 1
    (message,) = await _read_raw(settings, topics.queries, 1)
    assert decode_query_batch(message.value).items == (QueryItem("s1", "from a pipe"),)


async def test_consume_command_writes_jsonl_and_stops(
    settings: KafkaSettings, topics: Topics, topic_name: str, tmp_path: Path
) -> None:
    # Embedding sent as base64 float32 bytes: consume writes floats whatever the format.
    with_embedding = ScoreBatch("c2", (ItemScore("e", (), False, "v1", (0.5, -0.25)),), "m",
                                time.time(), Timings(), embedding_format="base64")
    await _publish_raw(settings, topics.scores, encode_score_batch(_scores("c1", "q1", "q2")),
                       encode_score_batch(_scores("c1", "q1")), encode_score_batch(with_embedding),
                       encode_score_batch(_scores("c3", "q1")))
    common = ("--bootstrap-servers", settings.bootstrap_servers, "--topic-prefix", topic_name)

    out = tmp_path / "scores.jsonl"
    result = await _cli("consume", "-o", str(out), "--max-batches", "2", *common)
    assert result.exit_code == 0, result.output
    rows = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"batch_id": "c1", "id": "q1", "scores": [0.25, 0.75], "cached": False,
         "model_version": "v1"},
        {"batch_id": "c1", "id": "q2", "scores": [0.25, 0.75], "cached": False,
         "model_version": "v1"},
        {"batch_id": "c2", "id": "e", "scores": [], "cached": False, "model_version": "v1",
         "embedding": [0.5, -0.25]},
    ]

    # The idle clock starts once the consumer has its partitions and every record restarts it,
    # filtered out or not; 3 s of silence only comes after the last record (c3).
    result = await _cli("consume", "--batch-id", "c3", "--idle-timeout", "3", *common)
    assert result.exit_code == 0, result.output
    assert [orjson.loads(line)["batch_id"] for line in result.stdout.splitlines()] == ["c3"]
    assert re.search(r"duplicates_dropped\s*│\s*1\b", result.stderr), result.stderr


async def test_topics_create_command(kafka_bootstrap: str, topic_name: str) -> None:
    args = ("topics", "create", "--partitions", "2", "--bootstrap-servers", kafka_bootstrap,
            "--topic-prefix", topic_name)
    names = list(Topics.with_prefix(topic_name).all())
    try:
        first = await _cli(*args)
        assert first.exit_code == 0, first.output
        assert orjson.loads(first.stdout) == {"created": names, "existing": []}
        again = await _cli(*args)
        assert orjson.loads(again.stdout) == {"created": [], "existing": names}
    finally:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_topics(names)
        finally:
            await admin.close()


async def test_commands_refuse_bad_kafka_options(tmp_path: Path) -> None:
    log = tmp_path / "q.jsonl"
    log.write_text('{"id": "q1", "query": "x"}\n')
    result = await _cli("publish", str(log), "--sasl-username", "u")
    assert result.exit_code == 2 and "--sasl-username given but" in result.output
