"""ScoreConsumer delivery without a broker: a full iteration buffer never drops or commits past
a batch (issue 10, defect 4), and de-duplication keeps no scores (defect 11a)."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition

import qscore.client as client_api
from plumbing.kafka import KafkaSettings, Topics
from qscore.client import ScoreBook, ScoreConsumer
from schemas import ItemScore, ScoreBatch, Timings, encode_score_batch

TP = TopicPartition("scores", 0)
WAIT_S = 5.0  # only a failing test waits this long


class _FakeLog:
    """One partition as aiokafka serves it to a group consumer: a position that getmany
    advances (honouring max_records), seek, and commit."""

    def __init__(self, values: list[bytes]) -> None:
        self.values = values
        self.pos = 0
        self.seeks: list[int] = []
        self.commits: list[int] = []

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.values)

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    async def position(self, tp: TopicPartition) -> int:
        return self.pos

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append(offset)
        self.pos = offset

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets[TP])

    async def getmany(self, timeout_ms: int, max_records: int | None = None,
                      ) -> dict[TopicPartition, list[SimpleNamespace]]:
        end = len(self.values) if max_records is None else self.pos + max_records
        records = [SimpleNamespace(offset=n, value=self.values[n])
                   for n in range(self.pos, min(end, len(self.values)))]
        # A real broker would wait for more; these tests never ask past the last record
        # unless a batch was lost.
        assert records, "fetched past the end of the log: some batch was lost"
        self.pos += len(records)
        return {TP: records}


def _scores(batch_id: str, *ids: str, n_scores: int = 1) -> ScoreBatch:
    items = tuple(ItemScore(i, (0.5,) * n_scores, cached=False, model_version="v1")
                  for i in ids)
    return ScoreBatch(batch_id, items, "m", 1.0, Timings())


def _consumer(values: list[bytes], **options: int) -> tuple[ScoreConsumer, _FakeLog]:
    log = _FakeLog(values)
    consumer = ScoreConsumer(KafkaSettings(), Topics(), group_id="g", **options)
    consumer._consumer = log  # type: ignore[assignment]
    return consumer, log


async def _iterate(consumer: ScoreConsumer, log: _FakeLog, expected: list[str],
                   got: list[str]) -> None:
    """Iterate until `got` (batch "bN" at offset N) is `expected`, committing after every
    batch: each commit must stop at or before the first batch not handed out yet."""
    async with asyncio.timeout(WAIT_S):
        while len(got) < len(expected):
            got.append((await anext(consumer)).batch_id)
            await consumer.commit()
            first_behind = min((int(b[1:]) for b in expected if b not in got),
                               default=len(log.values))
            assert log.commits[-1] <= first_behind, f"committed {log.commits}, handed {got}"
    assert got == expected  # every batch, once, in order


async def test_a_fetch_beyond_the_byte_bound_drops_nothing_and_commits_nothing_unread() -> None:
    # Ten ~1 KB batches arrive in one fetch; the buffer holds 3 KB of them.
    ids = [f"b{n}" for n in range(10)]
    values = [encode_score_batch(_scores(b, "q1", n_scores=250)) for b in ids]
    consumer, log = _consumer(values, max_unread_bytes=3 * len(values[0]))
    got = [(await asyncio.wait_for(anext(consumer), WAIT_S)).batch_id]
    assert log.exhausted  # the one fetch read every record
    assert consumer.book.n_unread == 2 and consumer.stats.deferred == 7  # b3..b9 left unread
    await consumer.commit()
    assert log.commits == [1]  # b1 is buffered: nothing past it
    await _iterate(consumer, log, ids, got)
    assert log.commits[-1] == 10 and consumer.stats.duplicates == 0


async def test_iteration_past_the_count_bound_drops_nothing() -> None:
    ids = [f"b{n}" for n in range(10)]
    consumer, log = _consumer([encode_score_batch(_scores(b, "q1")) for b in ids],
                              max_unread=3)
    await _iterate(consumer, log, ids, [])
    assert log.commits[-1] == 10


async def test_a_wait_behind_a_full_buffer_reads_on_and_iteration_gets_the_rest() -> None:
    ids = [f"b{n}" for n in range(10)]
    values = [encode_score_batch(_scores(b, "q1")) for b in ids]
    consumer, log = _consumer(values, max_unread=3)
    # The wanted batch is behind seven that nobody waits for, three more than the buffer takes:
    # the wait must not stall behind them, nor may they be lost.
    scores = await consumer.wait_for("b9", ["q1"], timeout=WAIT_S)
    assert set(scores) == {"q1"} and consumer.book.n_unread == 3
    await consumer.commit()
    assert log.commits == [0]  # b0 is buffered: nothing past it
    await _iterate(consumer, log, ids[:9], [])  # b9 went to the waiter, nothing was dropped


async def test_a_wait_for_a_batch_left_unread_before_it_began_goes_back_for_it() -> None:
    ids = [f"b{n}" for n in range(8)]
    consumer, log = _consumer([encode_score_batch(_scores(b, "q1")) for b in ids],
                              max_unread=2)
    await consumer.wait_for("b5", ["q1"], timeout=WAIT_S)  # reads all: b2-b4, b6, b7 deferred
    assert consumer.stats.deferred == 5 and log.exhausted
    # Nobody iterates, so the buffer never empties; the wait seeks back to b7 instead.
    await consumer.wait_for("b7", ["q1"], timeout=WAIT_S)
    assert log.seeks == [7]
    await _iterate(consumer, log, ["b0", "b1", "b2", "b3", "b4", "b6"], [])


# -- de-duplication memory (defect 11a) ---------------------------------------------------------

DIM = 384


def _embedded(batch_id: str, n_items: int) -> ScoreBatch:
    """Query embeddings, as a similarity engine sends for queries without docs (~12 KB each)."""
    items = tuple(ItemScore(f"q{i}", (), cached=False, model_version="v1",
                            embedding=tuple(i + d / DIM for d in range(DIM)))
                  for i in range(n_items))
    return ScoreBatch(batch_id, items, "m", 1.0, Timings())


def _reachable(root: object) -> Iterator[object]:
    """Every object reachable from `root`, classes and modules aside."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        yield obj
        stack.extend(gc.get_referents(obj))


def test_the_book_keeps_no_scores_once_handed_out() -> None:
    n_batches, per_batch = 10, 100
    book = ScoreBook()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        wait = book.expect({"w": [f"q{i}" for i in range(per_batch)]})
        for n in range(n_batches):
            book.add(_embedded(f"b{n}", per_batch), ref=("tp", n))
        book.add(_embedded("w", per_batch), ref=("tp", n_batches))
        assert wait.complete and len(wait.scores["w"]) == per_batch
        book.release(wait)
        del wait  # the waiter has its scores
        while book.pop_unread() is not None:
            pass  # iteration has its batches
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    remembered = (n_batches + 1) * per_batch
    # An embedding alone is ~12 KB; what dedupe keeps per item is a hash in a set.
    assert held / remembered < 300, f"{held / remembered:.0f} bytes per remembered item"
    assert not [o for o in _reachable(book) if isinstance(o, ItemScore)]
    # ... and still drops redeliveries.
    assert book.add(_embedded("b3", per_batch)) is None
    assert book.add(_embedded("w", per_batch)) is None
    assert book.stats.duplicates == 2 * per_batch


def test_dedupe_is_bounded_by_remembered_items_oldest_out() -> None:
    book = ScoreBook(remember_items=250)
    for n in range(5):
        book.add(_scores(f"b{n}", *(f"q{i}" for i in range(100))))
        book.pop_unread()
    # 500 seen, 250 remembered: whole batches, the least recently seen first.
    assert book.add(_scores("b2", "q0")) is not None  # forgotten: passes again
    assert book.add(_scores("b4", "q99")) is None and book.add(_scores("b3", "q0")) is None


def test_waiting_again_for_handed_out_scores_fails_at_once() -> None:
    book = ScoreBook()
    book.add(_scores("b1", "q1", "q2"))
    book.add(_scores("b2", "q1"))
    assert book.pop_unread() is not None  # b1 went to iteration
    with pytest.raises(client_api.ScoresHandedOut, match="already handed out") as info:
        book.expect({"b1": ["q1", "q3"], "b2": ["q1"]})
    assert info.value.handed_out == {"b1": {"q1"}}  # b2 is still buffered: not handed out
    wait = book.expect({"b1": ["q3"], "b2": ["q1"]})  # nothing registered by the failed one
    assert wait.missing == {"b1": {"q3"}, "b2": set()} and book.n_unread == 0
    book.release(wait)
    with pytest.raises(client_api.ScoresHandedOut):  # a waiter's scores are handed out too
        book.expect({"b2": ["q1"]})
