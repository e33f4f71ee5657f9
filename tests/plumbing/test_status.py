"""plumbing.status without a broker: the heartbeat codec, rates from counters, and how records
fold into the live services (newest per key, tombstones, staleness, malformed records)."""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import orjson
import pytest

from plumbing.kafka import KafkaSettings, Topics
from plumbing.status import (
    Heartbeat,
    RunningTotal,
    Sample,
    StatusPublisher,
    decode_heartbeat,
    live_services,
    stale_after_s,
)
from schemas import SchemaError

NOW = 1_700_000_000.0


def _beat(name: str = "worker", *, pid: int = 100, sent_at: float = NOW, **kw: object
          ) -> Heartbeat:
    fields: dict[str, object] = dict(
        kind="worker", name=name, host="h1", pid=pid, started_at=NOW - 60, sent_at=sent_at,
        interval_s=5.0, model_id="m", serving="v1", pending=None, reload_state="serving",
        last_refusal=None, arrival_per_s=12.5, queue_depth=3, busy=0.25, in_flight=2,
        items=40, dead_letters=1)
    return Heartbeat(**(fields | kw))  # type: ignore[arg-type]


class Rec(NamedTuple):
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


def _rec(beat: Heartbeat | None, offset: int, *, key: bytes | None = None, partition: int = 0,
         timestamp: int | None = None, value: bytes | None = None) -> Rec:
    assert beat is not None or key is not None
    return Rec(partition, offset, offset if timestamp is None else timestamp,
               key if key is not None else beat.instance.encode(),  # type: ignore[union-attr]
               value if value is not None else (beat.encode() if beat else None))


def test_topics_have_a_status_topic_under_the_prefix() -> None:
    assert Topics().status == "qscore.status"
    topics = Topics.with_prefix("fleet-a")
    assert topics.status == "fleet-a.status" and topics.status in topics.all()
    assert not any(p == topics.status for p in topics.reply_patterns())


def test_heartbeat_round_trips_through_json() -> None:
    beat = _beat(pending="v2", reload_state="pending", last_refusal="golden check failed",
                 queue_depth=None, busy=None)
    data = beat.encode()
    assert orjson.loads(data)["v"] == 1
    assert decode_heartbeat(data) == beat
    assert beat.instance == "worker/h1/100/worker"


@pytest.mark.parametrize(("change", "rule"), [
    ({"v": 2}, "version"),
    ({"kind": "scheduler"}, "enum"),
    ({"pid": -1}, "range"),
    ({"serving": ""}, "empty"),
    ({"busy": 1.5}, "range"),
    ({"arrival_per_s": -1.0}, "range"),
    ({"items": "many"}, "type"),
    ({"extra": 1}, "unknown_key"),
])
def test_decode_refuses_what_is_not_a_heartbeat(change: dict[str, object], rule: str) -> None:
    with pytest.raises(SchemaError) as caught:
        decode_heartbeat(orjson.dumps(_beat().to_obj() | change))
    assert caught.value.rule == rule


@pytest.mark.parametrize("data", [b"", b"\xff\xfe", b"[1, 2]", b"{", b"x" * 40_000, None, 3])
def test_decode_raises_only_schema_errors(data: object) -> None:
    with pytest.raises(SchemaError):
        decode_heartbeat(data)


def test_newest_heartbeat_per_key_wins() -> None:
    a_old, a_new = _beat("a", sent_at=NOW - 4), _beat("a", sent_at=NOW - 1, serving="v2")
    b = _beat("b", pid=200)
    view = live_services([_rec(a_old, 1), _rec(b, 2), _rec(a_new, 3)], now=NOW)
    assert view.services == (a_new, b)
    assert (view.records, view.malformed, view.stale, view.stopped) == (3, 0, 0, 0)
    # Read out of order (two fetches): the later offset of the partition still wins.
    assert live_services([_rec(a_new, 3), _rec(a_old, 1)], now=NOW).services == (a_new,)


def test_across_partitions_the_later_timestamp_wins() -> None:
    old, new = _beat(sent_at=NOW - 3), _beat(sent_at=NOW - 1, serving="v2")
    records = [_rec(new, 1, partition=1, timestamp=20), _rec(old, 9, partition=0, timestamp=10)]
    assert live_services(records, now=NOW).services == (new,)


def test_a_tombstone_removes_its_service_and_a_later_heartbeat_brings_it_back() -> None:
    beat = _beat()
    key = beat.instance.encode()
    stopped = live_services([_rec(beat, 1), Rec(0, 2, 2, key, None)], now=NOW)
    assert stopped.services == () and stopped.stopped == 1
    again = live_services([_rec(beat, 1), Rec(0, 2, 2, key, None), _rec(beat, 3)], now=NOW)
    assert again.services == (beat,) and again.stopped == 0


def test_stale_heartbeats_are_left_out() -> None:
    fresh, old = _beat("fresh"), _beat("old", sent_at=NOW - 16)
    assert stale_after_s(old) == 15.0  # 3 intervals of 5 s
    view = live_services([_rec(fresh, 1), _rec(old, 2)], now=NOW)
    assert view.services == (fresh,) and view.stale == 1
    assert live_services([_rec(old, 2)], now=NOW, stale_s=60).services == (old,)
    slow = _beat("slow", sent_at=NOW - 50, interval_s=20.0)  # 3 of its own intervals: 60 s
    assert live_services([_rec(slow, 1)], now=NOW).services == (slow,)
    assert live_services([_rec(slow, 1)], now=NOW, stale_s=30).stale == 1


def test_malformed_records_are_skipped_and_counted_never_raised() -> None:
    good = _beat()
    other = _beat("other", pid=7)
    records = [
        _rec(good, 1),
        _rec(good, 2, value=b"not json"),  # newest of its key, but invalid: the older stands
        Rec(0, 3, 3, None, good.encode()),  # no key
        _rec(good, 4, key=b"worker/h1/1/impostor"),  # key is not the heartbeat's instance
        _rec(other, 5, value=orjson.dumps(other.to_obj() | {"v": 9})),
    ]
    view = live_services(records, now=NOW)
    assert view.services == (good,) and view.malformed == 4 and view.records == 5


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class _Counters:
    def __init__(self) -> None:
        self.sample = Sample(model_id="m", serving="v1", reload_state="serving", slots=2,
                             busy_s=0.0, queue_depth=0)

    def __call__(self) -> Sample:
        return self.sample


def test_rates_come_from_counter_differences_between_heartbeats() -> None:
    counters, mono = _Counters(), _Clock(100.0)
    publisher = StatusPublisher(KafkaSettings(), "s", kind="worker", name="w",
                                sample=counters, interval_s=5, host="h", pid=9,
                                clock=_Clock(NOW), monotonic=mono)
    first = publisher.heartbeat()  # no previous heartbeat: no span to measure over
    assert first.arrival_per_s == 0.0 and first.busy == 0.0
    assert first.instance == "worker/h/9/w" and first.sent_at == NOW
    counters.sample = replace(counters.sample, arrived=500, busy_s=4.0, items=450,
                              last_refusal="x" * 5000)
    mono.now += 5
    second = publisher.heartbeat()
    assert second.arrival_per_s == 100.0  # 500 in 5 s
    assert second.busy == pytest.approx(0.4)  # 4 slot-seconds of 2 slots x 5 s
    assert second.items == 450 and len(second.last_refusal or "") == 1024
    counters.sample = replace(counters.sample, busy_s=40.0)  # a call longer than the span
    mono.now += 5
    assert publisher.heartbeat().busy == 1.0
    decode_heartbeat(second.encode())  # what it sends is a valid heartbeat


def test_running_total_keeps_increments_of_counters_that_come_and_go() -> None:
    total = RunningTotal()
    assert total({0: 2.0}) == 2.0
    assert total({0: 3.0, 1: 0.5}) == 3.5  # a new pool (a swap) starts from zero
    assert total({1: 1.5}) == 4.5  # the retired one left: nothing is taken back
    assert total({1: 1.5}) == 4.5


def test_a_service_without_an_engine_reports_no_busy_fraction() -> None:
    publisher = StatusPublisher(KafkaSettings(), "s", kind="tokenizer", name="t",
                                sample=lambda: Sample(model_id="m", serving="v1"))
    assert publisher.heartbeat().busy is None


def test_publisher_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        StatusPublisher(KafkaSettings(), "s", kind="worker", name="w",
                        sample=_Counters(), interval_s=0)
    with pytest.raises(ValueError, match="kind"):
        StatusPublisher(KafkaSettings(), "s", kind="scheduler", name="w",  # type: ignore[arg-type]
                        sample=_Counters())


async def test_an_unreachable_broker_is_logged_not_raised() -> None:
    publisher = StatusPublisher(KafkaSettings(bootstrap_servers="127.0.0.1:1",
                                              request_timeout_ms=1000),
                                "s", kind="worker", name="w", sample=_Counters(),
                                send_timeout_s=2)
    assert await publisher.beat() is False
    assert publisher.failures == 1 and publisher.sent == 0
    await publisher.stop()  # nothing was sent: no tombstone to send, nothing raised


async def test_a_failing_sample_is_logged_not_raised() -> None:
    def broken() -> Sample:
        raise KeyError("pools")

    publisher = StatusPublisher(KafkaSettings(), "s", kind="worker", name="w", sample=broken)
    assert await publisher.beat() is False and publisher.failures == 1
