"""Client bookkeeping without a broker: dedupe, waits, iteration buffer, rate limiting, options."""

from __future__ import annotations

import asyncio
import io
from types import SimpleNamespace

import pytest
import typer
from aiokafka import TopicPartition
from typer.testing import CliRunner

from plumbing.cache import redact_url
from plumbing.kafka import KafkaSettings, Topics
from qscore.cli.client import IdleClock, TokenBucket, read_stdin_log
from qscore.cli.options import (
    cache_settings_from,
    kafka_command,
    kafka_settings_from,
    topics_from,
)
from qscore.client import QueryProducer, ScoreBook, ScoreConsumer, ScoresTimeout
from schemas import (
    ItemScore,
    Limits,
    QueryItem,
    SchemaError,
    ScoreBatch,
    Timings,
    encode_score_batch,
)


def _scores(batch_id: str, *ids: str, version: str = "v1") -> ScoreBatch:
    items = tuple(ItemScore(i, (0.5,), cached=False, model_version=version) for i in ids)
    return ScoreBatch(batch_id, items, "m", 1.0, Timings())


def _drain(book: ScoreBook) -> list[tuple[str, tuple[str, ...]]]:
    out = []
    while (entry := book.pop_unread()) is not None:
        out.append((entry[0].batch_id, tuple(it.id for it in entry[0].items)))
    return out


# -- dedupe -------------------------------------------------------------------------------------

def test_redelivered_batch_is_dropped_and_counted() -> None:
    book = ScoreBook()
    assert book.add(_scores("b1", "q1", "q2")) is not None
    assert book.add(_scores("b1", "q1", "q2")) is None
    assert (book.stats.batches, book.stats.items, book.stats.duplicates) == (1, 2, 2)
    assert _drain(book) == [("b1", ("q1", "q2"))]


def test_partly_redelivered_batch_keeps_only_new_items() -> None:
    book = ScoreBook()
    book.add(_scores("b1", "q1"))
    fresh = book.add(_scores("b1", "q1", "q2"))
    assert fresh is not None and [it.id for it in fresh.items] == ["q2"]
    assert book.stats.duplicates == 1
    assert _drain(book) == [("b1", ("q1",)), ("b1", ("q2",))]


def test_same_item_id_in_another_batch_is_not_a_duplicate() -> None:
    book = ScoreBook()
    book.add(_scores("b1", "q1"))
    assert book.add(_scores("b2", "q1")) is not None
    assert book.stats.duplicates == 0


def test_empty_batch_is_yielded_once() -> None:
    book = ScoreBook()
    assert book.add(_scores("b1")) is not None
    assert book.add(_scores("b1")) is None
    assert _drain(book) == [("b1", ())]


def test_seen_set_is_bounded_and_forgets_the_least_recently_seen_batch() -> None:
    book = ScoreBook(remember_items=3)
    book.add(_scores("old", "q1", "q2"))
    book.add(_scores("mid", "q1"))
    book.add(_scores("old", "q2"))  # a redelivery refreshes "old"
    book.add(_scores("new", "q1", "q2"))  # 5 > 3 remembered: "mid" goes first, then "old"
    assert book.add(_scores("mid", "q1")) is not None  # forgotten, so it passes again
    assert book.add(_scores("new", "q1")) is None  # the newest is always remembered


# -- waits --------------------------------------------------------------------------------------

def test_expectation_completes_when_every_item_arrived() -> None:
    book = ScoreBook()
    wait = book.expect({"b1": ["q1", "q2"], "b2": ["q9"]})
    book.add(_scores("b1", "q1"))
    book.add(_scores("b2", "q9", "q8"))
    assert not wait.complete and wait.missing == {"b1": {"q2"}, "b2": set()}
    book.add(_scores("b1", "q2"))
    assert wait.complete
    assert set(wait.scores["b1"]) == {"q1", "q2"} and set(wait.scores["b2"]) == {"q9"}
    assert _drain(book) == []  # waited-for batches are the waiter's, not iteration's
    book.release(wait)
    book.add(_scores("b1", "q3"))
    assert _drain(book) == [("b1", ("q3",))]  # nobody waits any more


def test_expectation_is_served_from_scores_seen_before_it() -> None:
    book = ScoreBook()
    book.add(_scores("b1", "q1", "q2"))
    book.add(_scores("b2", "q1"))
    wait = book.expect({"b1": ["q1", "q2"]})
    assert wait.complete
    assert _drain(book) == [("b2", ("q1",))]  # b1 left the iteration buffer for the waiter


def test_duplicates_do_not_reach_a_waiter_twice() -> None:
    book = ScoreBook()
    wait = book.expect({"b1": ["q1", "q2"]})
    book.add(_scores("b1", "q1", version="first"))
    book.add(_scores("b1", "q1", version="second"))
    assert wait.scores["b1"]["q1"].model_version == "first"
    assert book.stats.duplicates == 1


def test_two_waiters_for_one_batch_both_get_it() -> None:
    book = ScoreBook()
    a, b = book.expect({"b1": ["q1"]}), book.expect({"b1": ["q1", "q2"]})
    book.add(_scores("b1", "q1", "q2"))
    assert a.complete and b.complete


def test_timeout_error_says_what_is_missing() -> None:
    book = ScoreBook()
    wait = book.expect({"b1": ["q1", "q2"], "b2": ["q1"]})
    book.add(_scores("b1", "q1"))
    book.add(_scores("b2", "q1"))
    exc = ScoresTimeout(wait, 1.5)
    assert isinstance(exc, TimeoutError)
    assert exc.missing == {"b1": {"q2"}} and exc.n_missing == 1
    assert "1 of 3 item scores missing after 1.5s" in str(exc) and "'b1'" in str(exc)


def test_iteration_buffer_is_bounded_and_defers_instead_of_dropping() -> None:
    book = ScoreBook(max_unread=2)
    for n in range(3):
        book.add(_scores(f"b{n}", "q1"), ref=("tp", n))
    book.add(_scores("other", "q1"), ref=("tp2", 0))  # full: deferred on any partition
    assert book.stats.deferred == 2 and book.unread_refs() == [("tp", 0), ("tp", 1)]
    assert book.resume_offsets() == {"tp": 0, "tp2": 0}
    assert book.take_seeks() == {}  # not while iteration still has batches to take
    assert [b for b, _ in _drain(book)] == ["b0", "b1"]
    assert book.resume_offsets() == {"tp": 2, "tp2": 0}  # the deferred ones still hold back
    assert book.take_seeks() == {"tp": 2, "tp2": 0}  # read them again
    assert book.add(_scores("b2", "q1"), ref=("tp", 2)) is not None  # not seen: no duplicate


# -- producer input checks (no broker: they come before any I/O) --------------------------------

@pytest.mark.parametrize(("items", "rule"), [
    ([], "empty"),
    ([QueryItem("q1", "a"), QueryItem("q1", "b")], "duplicate"),
    ([QueryItem("q1", "x" * 30)], "max_chars"),
])
async def test_send_rejects_bad_batches_at_once(items: list[QueryItem], rule: str) -> None:
    producer = QueryProducer(KafkaSettings(), limits=Limits(max_query_chars=20))
    with pytest.raises(SchemaError) as info:
        await producer.send(items)
    assert info.value.rule == rule
    with pytest.raises(SchemaError):
        await producer.send([QueryItem("q1", "a")], priority="urgent")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="not started"):
        await producer.send([QueryItem("q1", "a")])


# -- rate limiting ------------------------------------------------------------------------------

def test_token_bucket_allows_a_burst_then_paces() -> None:
    bucket = TokenBucket(rate=10, burst=20, now=0.0)
    assert bucket.reserve(20, now=0.0) == 0.0  # the full burst at once
    assert bucket.reserve(5, now=0.0) == pytest.approx(0.5)  # then 10/s
    assert bucket.reserve(5, now=0.5) == pytest.approx(0.5)  # the debt is paid first
    assert bucket.reserve(10, now=10.0) == 0.0  # refilled, capped at the burst


def test_token_bucket_request_larger_than_burst_waits_its_share() -> None:
    bucket = TokenBucket(rate=100, burst=10, now=0.0)
    assert bucket.reserve(50, now=0.0) == pytest.approx(0.4)
    assert bucket.reserve(1, now=0.0) == pytest.approx(0.41)


def test_token_bucket_long_run_rate_and_clock_going_back() -> None:
    bucket = TokenBucket(rate=50, burst=20, now=0.0)
    now = 0.0
    for _ in range(100):  # 2000 items in batches of 20, sleeping as told
        now += bucket.reserve(20, now)
    assert now == pytest.approx((2000 - 20) / 50)
    # The last reserve (at now - 0.4) left a debt of 20 tokens, 0.4 s at 50/s. A clock step
    # backwards neither refills the bucket nor counts as negative time (which would deepen the
    # debt: 5 s back at 50/s would ask for a 5.0 s wait); the debt stays exactly as it was.
    assert bucket.reserve(0, now - 5.0) == pytest.approx(0.4)
    # The step back did not rewind the bucket's clock either: 0.4 s after the latest time seen
    # the debt is paid and the next 20 wait 0.4 s again (a bucket that took now - 5.0 as its
    # last time would refill 5 s worth, to the burst, and answer 0.0).
    assert bucket.reserve(20, now) == pytest.approx(0.4)
    assert bucket.reserve(0, now + 0.4) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        TokenBucket(rate=0)


# -- consume --idle-timeout ---------------------------------------------------------------------

class _FakeKafkaConsumer:
    """What a ScoreConsumer asks of aiokafka per poll: the records, and the assignment."""

    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()
        self.next_poll: list[bytes] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def getmany(self, timeout_ms: int, max_records: int | None = None,
                      ) -> dict[TopicPartition, list[SimpleNamespace]]:
        values, self.next_poll = self.next_poll, []
        tp = TopicPartition("scores", 0)
        return {tp: [SimpleNamespace(offset=n, value=v) for n, v in enumerate(values)]}


async def test_idle_clock_starts_at_assignment_and_any_record_restarts_it() -> None:
    kafka = _FakeKafkaConsumer()
    clock = IdleClock(30.0)
    consumer = ScoreConsumer(KafkaSettings(), Topics(), on_poll=clock.poll)
    consumer._consumer = kafka  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    far = loop.time() + 1e6  # a deadline no restart would set: a restart moves it to ~now + 30

    def restarted() -> bool:
        moved = idle.when() != far
        idle.reschedule(far)
        return moved

    async def poll(*values: bytes) -> None:
        kafka.next_poll = list(values)
        before = loop.time()
        await consumer._fetch(lambda: False)
        when = idle.when()
        assert when is None or when == far or before + 30 <= when <= loop.time() + 30

    async with asyncio.timeout(None) as idle:
        clock.timeout = idle
        await poll()
        assert idle.when() is None  # no partitions yet (a group still joining): not counting
        kafka.assigned = {TopicPartition("scores", 0)}
        await poll()
        assert idle.when() is not None  # assigned: the clock starts
        idle.reschedule(far)
        await poll()
        assert not restarted()  # an empty poll is idle time
        await poll(encode_score_batch(_scores("elsewhere", "q1")))  # any batch, kept or not
        assert restarted()
        await poll(encode_score_batch(_scores("elsewhere", "q1")))  # a duplicate
        assert restarted() and consumer.stats.duplicates == 1
        await poll(b"not json")  # undecodable
        assert restarted() and consumer.stats.undecodable == 1
        kafka.assigned = {TopicPartition("scores", 0), TopicPartition("scores", 1)}
        await poll()
        assert restarted()  # a rebalance gave it new partitions
        await poll()
        assert not restarted()


# -- stdin query logs ---------------------------------------------------------------------------

def test_stdin_log_reports_bad_lines_with_numbers() -> None:
    data = (b'\xef\xbb\xbf{"id": "q1", "query": "red shoes"}\n\n'
            b'not json\n{"id": "q2"}\n{"id": "q1", "query": "again"}\r\n'
            b'{"id": 3, "query": "ok", "docs": ["d"]}\n' + b'{"id": "big", "query": "' +
            b"x" * 300 + b'"}\n{"id": "q4", "query": "last"}')
    records = list(read_stdin_log(io.BytesIO(data), Limits(max_message_bytes=200)))
    good = [(r.line, r.item.id) for r in records if r.item]
    bad = {r.line: r.error for r in records if not r.item}
    assert good == [(1, "q1"), (6, "3"), (8, "q4")]
    assert set(bad) == {3, 4, 5, 7}
    assert bad[3].startswith("invalid JSON") and "query" in bad[4]
    assert "duplicate id 'q1', first seen at line 1" in bad[5] and "too long" in bad[7]


# -- command-line options -----------------------------------------------------------------------

def test_kafka_settings_refuse_contradictory_options() -> None:
    with pytest.raises(typer.BadParameter, match="SASL_SSL needs --sasl-username"):
        kafka_settings_from(security_protocol="SASL_SSL", sasl_mechanism="PLAIN")
    with pytest.raises(typer.BadParameter, match="--sasl-mechanism"):
        kafka_settings_from(security_protocol="sasl_ssl", sasl_username="u", sasl_password="p")
    with pytest.raises(typer.BadParameter, match="--sasl-password given but"):
        kafka_settings_from(sasl_password="secret")
    with pytest.raises(typer.BadParameter, match="use SSL or SASL_SSL"):
        kafka_settings_from(ssl_no_check_hostname=True)
    with pytest.raises(typer.BadParameter, match="is empty"):
        kafka_settings_from(" , ")
    # Empty values (an unset-but-exported variable) are no credentials, for KafkaSettings too.
    assert kafka_settings_from(sasl_username="", sasl_password="").sasl_username is None
    settings = kafka_settings_from("a:1, b:2", "sasl_ssl", "scram-sha-512", "u", "secret",
                                   ssl_no_check_hostname=True, fast_groups=True)
    assert settings.bootstrap_servers == "a:1,b:2" and settings.sasl_mechanism == "SCRAM-SHA-512"
    assert not settings.ssl_check_hostname and settings.session_timeout_ms == 1000
    assert "secret" not in repr(settings)


def test_topics_and_redis_options() -> None:
    assert topics_from("stage").scores == "stage.scores"
    with pytest.raises(typer.BadParameter, match="topic name prefix"):
        topics_from("bad prefix")
    assert cache_settings_from(None).redis_url is None
    redis = cache_settings_from("rediss://:s3cret@cache:6380/0", cache_ttl=60)
    assert redis.ttl_s == 60 and "s3cret" not in repr(redis)
    assert redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    with pytest.raises(typer.BadParameter, match="redis://"):
        cache_settings_from("http://cache")


def test_kafka_command_turns_flags_and_env_into_settings() -> None:
    app = typer.Typer()
    seen: dict[str, object] = {}

    @app.command()
    @kafka_command
    def show(kafka: KafkaSettings, topics: Topics, n: int = 1) -> None:
        seen.update(kafka=kafka, topics=topics, n=n)

    runner = CliRunner()
    result = runner.invoke(app, ["--n", "3", "--topic-prefix", "t1"],
                           env={"QSCORE_KAFKA_BOOTSTRAP": "k:9"})
    assert result.exit_code == 0, result.output
    assert seen["n"] == 3 and seen["topics"] == Topics.with_prefix("t1")
    assert seen["kafka"].bootstrap_servers == "k:9"  # type: ignore[attr-defined]
    result = runner.invoke(app, ["--security-protocol", "SASL_SSL"])
    assert result.exit_code == 2 and "--sasl-mechanism" in result.output
