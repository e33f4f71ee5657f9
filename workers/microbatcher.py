"""Queue-depth micro-batching across TokenBatches, online before offline.

When an engine is free, the batcher hands it what the queue holds: one sequence alone when
idle, up to `max_batch` under load, within a padded-token budget. If the queue is shallow it
waits up to `max_wait_ms` (from the oldest arrival) for company, but only while arrivals come
faster than that (a moving average of the gaps between them): when traffic is sparse, waiting
would only add latency, since no company is coming. Inside a window of the oldest
sequences it picks those whose lengths are closest to the oldest one's, so a batch pads little
and the oldest sequence is always served (no starvation).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from engines.batch import PaddedBatch, pad_sequences
from schemas import TokenBatch

Priority = Literal["online", "offline"]


@dataclass(eq=False, slots=True)
class Job:
    """One TokenBatch waiting for its sequences' outputs."""

    tb: TokenBatch
    future: asyncio.Future[np.ndarray]
    enqueued_at: float
    remaining: int
    outputs: np.ndarray | None = None

    def deliver(self, index: int, row: np.ndarray) -> None:
        if self.outputs is None:
            self.outputs = np.empty((self.tb.n_sequences, *row.shape), dtype=np.float32)
        self.outputs[index] = row
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.outputs)


@dataclass(slots=True)
class SeqRef:
    job: Job
    index: int
    length: int
    arrival: int


@dataclass(slots=True)
class MicroBatch:
    refs: list[SeqRef]
    priority: Priority
    formed_at: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return len(self.refs)

    def padded(self) -> PaddedBatch:
        """Pad in the engine's thread, not on the event loop."""
        seqs = [r.job.tb.sequence(r.index) for r in self.refs]
        types = None
        if any(r.job.tb.token_type_ids is not None for r in self.refs):
            types = [r.job.tb.sequence_type_ids(r.index) for r in self.refs]
        return pad_sequences(seqs, types)

    def oldest_wait_s(self) -> float:
        return self.formed_at - min(r.job.enqueued_at for r in self.refs)


@dataclass(frozen=True, slots=True)
class BatcherSettings:
    max_batch: int = 64
    token_budget: int = 16_384
    max_wait_ms: float = 2.0
    capacity: int = 8192  # queued sequences per priority; submit waits beyond (backpressure)
    window: int = 256  # oldest sequences considered when picking a batch

    def __post_init__(self) -> None:
        for name in ("max_batch", "token_budget", "capacity", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")


class MicroBatcher:
    def __init__(self, settings: BatcherSettings, *,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """`clock` times arrivals, waits and batch formation (tests pass a fake one)."""
        self.settings = settings
        self._clock = clock
        self._queues: dict[Priority, deque[SeqRef]] = {"online": deque(), "offline": deque()}
        self._arrived = asyncio.Event()
        self._space = asyncio.Condition()
        self._arrival = itertools.count()
        self._last_submit: float | None = None
        self.mean_gap_s = float("inf")  # moving average of the time between submits

    def depth(self, priority: Priority | None = None) -> int:
        if priority is not None:
            return len(self._queues[priority])
        return sum(len(q) for q in self._queues.values())

    async def submit(self, tb: TokenBatch, priority: Priority = "online") -> asyncio.Future[
            np.ndarray]:
        """Queue every sequence of `tb`; the future resolves with one output row per sequence.

        Waits while the queue is full (a single TokenBatch larger than the capacity is let in
        when the queue is empty, so nothing is unschedulable).
        """
        queue = self._queues[priority]
        n = tb.n_sequences
        async with self._space:
            await self._space.wait_for(
                lambda: not queue or len(queue) + n <= self.settings.capacity)
        loop = asyncio.get_running_loop()
        now = self._clock()
        if self._last_submit is not None:
            gap = now - self._last_submit
            self.mean_gap_s = gap if self.mean_gap_s == float("inf") else (
                0.8 * self.mean_gap_s + 0.2 * gap)
        self._last_submit = now
        job = Job(tb=tb, future=loop.create_future(), enqueued_at=now, remaining=n)
        if n == 0:
            job.future.set_result(np.empty((0,), dtype=np.float32))
            return job.future
        lengths = tb.lengths.tolist()
        queue.extend(SeqRef(job, i, lengths[i], next(self._arrival)) for i in range(n))
        self._arrived.set()
        return job.future

    async def next_batch(self) -> MicroBatch:
        """Wait for work, then form one batch (see module docstring)."""
        s = self.settings
        while True:
            priority: Priority = "online" if self._queues["online"] else "offline"
            queue = self._queues[priority]
            if not queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if (len(queue) >= s.max_batch or s.max_wait_ms == 0
                    or self.mean_gap_s * 1000 > s.max_wait_ms):
                break
            wait = queue[0].job.enqueued_at + s.max_wait_ms / 1000 - self._clock()
            if wait <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except TimeoutError:
                break
        batch = MicroBatch(self._take(queue), priority, formed_at=self._clock())
        async with self._space:
            self._space.notify_all()
        return batch

    def _take(self, queue: deque[SeqRef]) -> list[SeqRef]:
        s = self.settings
        window = [queue[i] for i in range(min(len(queue), s.window))]
        ranked = sorted(window, key=lambda r: (r.length, r.arrival))
        k = ranked.index(window[0])
        lo = hi = k  # the block ranked[lo:hi+1] always holds the oldest sequence
        longest = ranked[k].length
        while hi - lo + 1 < s.max_batch:
            left = ranked[lo - 1] if lo > 0 else None
            right = ranked[hi + 1] if hi + 1 < len(ranked) else None
            if left is None and right is None:
                break
            # Grow towards the neighbour whose length is closest to the oldest's.
            take_left = right is None or (
                left is not None and ranked[k].length - left.length
                <= right.length - ranked[k].length)
            new_longest = longest if take_left else max(longest, right.length)  # type: ignore[union-attr]
            if (hi - lo + 2) * new_longest > s.token_budget:
                break
            if take_left:
                lo -= 1
            else:
                hi += 1
            longest = new_longest
        chosen = ranked[lo:hi + 1]
        picked = {id(r) for r in chosen}
        rest = [r for r in window if id(r) not in picked]
        for _ in range(len(window)):
            queue.popleft()
        queue.extendleft(reversed(rest))
        return chosen

    @staticmethod
    def complete(batch: MicroBatch, outputs: np.ndarray) -> None:
        for ref, row in zip(batch.refs, outputs, strict=True):
            if not ref.job.future.done():
                ref.job.deliver(ref.index, row)

    @staticmethod
    def fail(batch: MicroBatch, exc: BaseException) -> None:
        for ref in batch.refs:
            if not ref.job.future.done():
                ref.job.future.set_exception(exc)
