"""MicroBatcher: batch size follows queue depth, budget and priority (pure asyncio logic)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from schemas import TokenBatch
from workers.microbatcher import BatcherSettings, MicroBatcher


def _tb(lengths: list[int], batch_id: str = "b") -> TokenBatch:
    offsets = np.zeros(len(lengths) + 1, dtype=np.uint32)
    np.cumsum(lengths, out=offsets[1:])
    return TokenBatch(
        batch_id=batch_id, item_ids=tuple(f"i{k}" for k in range(len(lengths))),
        tokenizer_id="t", max_length=512, seq_item=np.arange(len(lengths), dtype=np.uint32),
        seq_doc=np.full(len(lengths), -1, dtype=np.int32), offsets=offsets,
        input_ids=np.ones(int(offsets[-1]), dtype=np.uint32), token_type_ids=None,
        truncated=np.zeros(len(lengths), dtype=bool), submitted_at=0.0)


async def test_idle_request_runs_alone_at_once() -> None:
    # Sparse traffic: no company is coming, so waiting max_wait_ms would only add latency.
    batcher = MicroBatcher(BatcherSettings(max_batch=32, max_wait_ms=60_000))
    await batcher.submit(_tb([7]))
    batch = await asyncio.wait_for(batcher.next_batch(), 1)
    assert batch.size == 1 and batcher.depth() == 0


class FakeClock:
    """The batcher's clock, moved by hand: arrival gaps do not depend on the machine's speed."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_frequent_arrivals_wait_at_most_max_wait() -> None:
    clock = FakeClock()
    batcher = MicroBatcher(BatcherSettings(max_batch=32, max_wait_ms=5), clock=clock)
    for _ in range(3):  # arrivals 1 ms apart: company is likely, so it waits (briefly)
        await batcher.submit(_tb([7]))
        clock.now += 0.001
    assert batcher.mean_gap_s == pytest.approx(0.001)
    # 3 ms after the oldest arrival (at 100.000): it waits for company, up to 5 ms from it.
    clock.now = 100.003
    pending = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0)
    assert not pending.done()
    first = await asyncio.wait_for(pending, 1)  # nobody comes: it stops waiting by itself
    assert first.size == 3 and first.oldest_wait_s() == pytest.approx(0.003)

    # max_wait_ms is counted from the oldest arrival: once that is over, no wait at all.
    for _ in range(3):
        await batcher.submit(_tb([7]))
        clock.now += 0.001  # still frequent: the mean gap stays ~1 ms
    assert batcher.mean_gap_s * 1000 < 5
    clock.now += 0.003  # the oldest of these arrived 6 ms ago, past max_wait_ms
    pending = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0)
    assert pending.done() and pending.result().size == 3
    assert pending.result().oldest_wait_s() == pytest.approx(0.006)


async def test_deep_queue_gives_full_batches_without_waiting() -> None:
    batcher = MicroBatcher(BatcherSettings(max_batch=16, max_wait_ms=10_000))
    await batcher.submit(_tb([5] * 40))
    sizes = [(await asyncio.wait_for(batcher.next_batch(), 1)).size for _ in range(2)]
    assert sizes == [16, 16] and batcher.depth() == 8


async def test_shallow_queue_waits_for_company_then_takes_it() -> None:
    batcher = MicroBatcher(BatcherSettings(max_batch=4, max_wait_ms=10_000))
    await batcher.submit(_tb([5], "a0"))
    await batcher.submit(_tb([5], "a1"))  # traffic is frequent: worth waiting for company
    await batcher.submit(_tb([5], "a2"))
    pending = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0)  # let it start waiting: the arrival below is what releases it
    assert not pending.done()
    await batcher.submit(_tb([5], "c"))
    batch = await asyncio.wait_for(pending, 1)
    assert batch.size == 4


async def test_token_budget_and_length_grouping_keep_the_oldest() -> None:
    batcher = MicroBatcher(BatcherSettings(max_batch=8, token_budget=100, max_wait_ms=0))
    await batcher.submit(_tb([50] + [10] * 6 + [48] * 3))
    first = await batcher.next_batch()
    assert [p.job.tb.batch_id for p in first.parts] == ["b"]
    lengths = sorted(first.lengths.tolist())
    assert 0 in first.parts[0].index  # the oldest sequence is always served
    assert len(lengths) * max(lengths) <= 100
    assert lengths == [48, 50]  # grouped with similar lengths, not the short ones
    second = await batcher.next_batch()
    assert sorted(second.lengths.tolist()) == [10] * 6


async def test_online_before_offline() -> None:
    batcher = MicroBatcher(BatcherSettings(max_batch=4, max_wait_ms=0))
    await batcher.submit(_tb([5] * 4, "off"), "offline")
    await batcher.submit(_tb([5] * 2, "on"), "online")
    first = await batcher.next_batch()
    assert first.priority == "online" and {p.job.tb.batch_id for p in first.parts} == {"on"}
    second = await batcher.next_batch()
    assert second.priority == "offline" and second.size == 4


async def test_outputs_reassemble_per_token_batch() -> None:
    batcher = MicroBatcher(BatcherSettings(max_batch=3, max_wait_ms=0))
    fa = await batcher.submit(_tb([4, 9], "a"))
    fb = await batcher.submit(_tb([4, 4, 9], "b"))
    while not (fa.done() and fb.done()):
        batch = await batcher.next_batch()
        # Fake engine: output row = (index, length) of each sequence.
        batcher.complete(batch, np.array([[i, p.job.lengths[i]] for p in batch.parts
                                          for i in p.index], float))
    assert fa.result().tolist() == [[0, 4], [1, 9]]
    assert fb.result().tolist() == [[0, 4], [1, 4], [2, 9]]


async def test_engine_failure_fails_every_job_in_the_batch() -> None:
    batcher = MicroBatcher(BatcherSettings(max_batch=8, max_wait_ms=0))
    fa = await batcher.submit(_tb([4], "a"))
    fb = await batcher.submit(_tb([4], "b"))
    batcher.fail(await batcher.next_batch(), RuntimeError("engine gone"))
    for fut in (fa, fb):
        with pytest.raises(RuntimeError, match="engine gone"):
            fut.result()


async def test_full_queue_makes_submit_wait_until_a_batch_is_taken() -> None:
    batcher = MicroBatcher(BatcherSettings(max_batch=4, capacity=4, max_wait_ms=0))
    await batcher.submit(_tb([5] * 4, "a"))
    blocked = asyncio.create_task(batcher.submit(_tb([5] * 2, "b")))
    await asyncio.sleep(0)
    assert not blocked.done()  # backpressure: no room
    await batcher.next_batch()
    await asyncio.wait_for(blocked, 1)
    assert batcher.depth() == 2


async def test_batches_never_mix_engine_generations() -> None:
    # Around a reload the queue holds work for the old engines and the new: each batch is
    # wholly one generation's, the old one's first (it arrived first).
    batcher = MicroBatcher(BatcherSettings(max_batch=16, max_wait_ms=0))
    await batcher.submit(_tb([5, 5], "a"), generation=0)
    await batcher.submit(_tb([5], "b"), generation=1)
    await batcher.submit(_tb([5, 5], "c"), generation=0)  # validated before the swap, late
    await batcher.submit(_tb([5], "d"), generation=1)
    assert batcher.head_generation() == 0 and batcher.pending(0) == 4
    seen = []
    while batcher.depth():
        batch = await batcher.next_batch()
        assert {p.job.generation for p in batch.parts} == {batch.generation}
        seen.append((batch.generation, sorted(p.job.tb.batch_id for p in batch.parts)))
    assert seen == [(0, ["a"]), (1, ["b"]), (0, ["c"]), (1, ["d"])]
    assert batcher.head_generation() is None and batcher.pending(0) == 0
