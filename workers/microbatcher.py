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
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from engines.batch import PaddedBatch, pad_gather
from schemas import TokenBatch

Priority = Literal["online", "offline"]


@dataclass(eq=False, slots=True)
class Job:
    """One TokenBatch waiting for its sequences' outputs. Its sequences queue as an index
    array (`pending`), never as one Python object each: the host cost per item is what
    decides whether one process can feed a GPU."""

    tb: TokenBatch
    future: asyncio.Future[np.ndarray]
    enqueued_at: float
    lengths: np.ndarray  # int64 [n_seq]
    pending: np.ndarray  # int64: indices of the sequences not yet in a batch, ascending
    remaining: int  # sequences without an output yet
    outputs: np.ndarray | None = None

    def deliver(self, index: np.ndarray, rows: np.ndarray) -> None:
        if self.outputs is None:
            self.outputs = np.empty((self.tb.n_sequences, *rows.shape[1:]), dtype=np.float32)
        self.outputs[index] = rows
        self.remaining -= len(index)
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.outputs)


@dataclass(slots=True)
class Part:
    """The sequences of one Job in a MicroBatch (rows of the batch, in this order)."""

    job: Job
    index: np.ndarray  # int64 sequence indices into job.tb

    @property
    def lengths(self) -> np.ndarray:
        return self.job.lengths[self.index]


@dataclass(slots=True)
class MicroBatch:
    parts: list[Part]
    priority: Priority
    formed_at: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return sum(len(p.index) for p in self.parts)

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every row."""
        return np.concatenate([p.lengths for p in self.parts])

    def padded(self) -> PaddedBatch:
        """Pad in the engine's thread, not on the event loop: one gather per TokenBatch."""
        return pad_gather([(p.job.tb.input_ids, p.job.tb.token_type_ids,
                            p.job.tb.offsets[p.index], p.lengths) for p in self.parts])

    def split(self) -> tuple[MicroBatch, MicroBatch]:
        """The first and second half of the rows (a batch of at least 2)."""
        mid, head, tail, at = self.size // 2, [], [], 0
        for p in self.parts:
            cut = min(max(mid - at, 0), len(p.index))
            if cut:
                head.append(Part(p.job, p.index[:cut]))
            if cut < len(p.index):
                tail.append(Part(p.job, p.index[cut:]))
            at += len(p.index)
        return (MicroBatch(head, self.priority, self.formed_at),
                MicroBatch(tail, self.priority, self.formed_at))

    def oldest_wait_s(self) -> float:
        return self.formed_at - min(p.job.enqueued_at for p in self.parts)


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
        self._queues: dict[Priority, deque[Job]] = {"online": deque(), "offline": deque()}
        self._depth: dict[Priority, int] = {"online": 0, "offline": 0}  # pending sequences
        self._arrived = asyncio.Event()
        self._space = asyncio.Condition()
        self._last_submit: float | None = None
        self.mean_gap_s = float("inf")  # moving average of the time between submits

    def depth(self, priority: Priority | None = None) -> int:
        if priority is not None:
            return self._depth[priority]
        return self._depth["online"] + self._depth["offline"]

    async def submit(self, tb: TokenBatch, priority: Priority = "online") -> asyncio.Future[
            np.ndarray]:
        """Queue every sequence of `tb`; the future resolves with one output row per sequence.

        Waits while the queue is full (a single TokenBatch larger than the capacity is let in
        when the queue is empty, so nothing is unschedulable).
        """
        n = tb.n_sequences
        if self._depth[priority] and self._depth[priority] + n > self.settings.capacity:
            async with self._space:  # only when full: the lock costs more than the check
                await self._space.wait_for(
                    lambda: not self._depth[priority]
                    or self._depth[priority] + n <= self.settings.capacity)
        loop = asyncio.get_running_loop()
        now = self._clock()
        if self._last_submit is not None:
            gap = now - self._last_submit
            self.mean_gap_s = gap if self.mean_gap_s == float("inf") else (
                0.8 * self.mean_gap_s + 0.2 * gap)
        self._last_submit = now
        job = Job(tb=tb, future=loop.create_future(), enqueued_at=now, lengths=tb.lengths,
                  pending=np.arange(n), remaining=n)
        if n == 0:
            job.future.set_result(np.empty((0,), dtype=np.float32))
            return job.future
        self._queues[priority].append(job)
        self._depth[priority] += n
        self._arrived.set()
        return job.future

    async def next_batch(self) -> MicroBatch:
        """Wait for work, then form one batch (see module docstring)."""
        s = self.settings
        while True:
            priority: Priority = "online" if self._depth["online"] else "offline"
            queue = self._queues[priority]
            if not queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if (self._depth[priority] >= s.max_batch or s.max_wait_ms == 0
                    or self.mean_gap_s * 1000 > s.max_wait_ms):
                break
            wait = queue[0].enqueued_at + s.max_wait_ms / 1000 - self._clock()
            if wait <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except TimeoutError:
                break
        batch = MicroBatch(self._take(priority), priority, formed_at=self._clock())
        async with self._space:
            self._space.notify_all()
        return batch

    def _take(self, priority: Priority) -> list[Part]:
        """Pick a batch from the oldest `window` pending sequences, vectorised.

        The oldest sequence is always in it; the others are those whose lengths are closest to
        its length (ties: the shorter, then the older), added while count x longest stays
        within the token budget and the count within max_batch. That is the greedy growth of a
        block around the oldest in length order, computed as one sort instead of a loop.
        """
        s = self.settings
        queue = self._queues[priority]
        jobs: list[Job] = []
        seqs: list[np.ndarray] = []
        count = 0
        for job in queue:  # the window: oldest first (jobs in order, sequences in order)
            jobs.append(job)
            seqs.append(job.pending[:s.window - count])
            count += len(seqs[-1])
            if count >= s.window:
                break
        lengths = np.concatenate([j.lengths[q] for j, q in zip(jobs, seqs, strict=True)])
        n = len(lengths)
        if n <= s.max_batch and n * int(lengths.max()) <= s.token_budget:
            chosen = np.arange(n)  # everything fits: the common case under moderate load
        else:
            chosen = _closest_block(lengths, s.max_batch, s.token_budget)
        # Window position -> (job, sequence); rows are grouped by job for delivery.
        taken = np.zeros(n, dtype=bool)
        taken[chosen] = True
        parts: list[Part] = []
        at = 0
        for job, q in zip(jobs, seqs, strict=True):
            mine = taken[at:at + len(q)]
            at += len(q)
            if mine.all():
                parts.append(Part(job, q))
                job.pending = job.pending[len(q):]
            elif mine.any():
                parts.append(Part(job, q[mine]))
                job.pending = np.concatenate([q[~mine], job.pending[len(q):]])
        for _ in range(len(jobs)):  # drop the jobs now fully taken, keep the others' order
            if queue[0].pending.size:
                queue.rotate(-1)
            else:
                queue.popleft()
        queue.rotate(sum(1 for j in jobs if j.pending.size))
        self._depth[priority] -= len(chosen)
        return parts

    @staticmethod
    def complete(batch: MicroBatch, outputs: np.ndarray) -> None:
        if len(outputs) != batch.size:
            raise ValueError(f"{len(outputs)} outputs for a batch of {batch.size}")
        at = 0
        for p in batch.parts:
            k = len(p.index)
            if not p.job.future.done():
                p.job.deliver(p.index, outputs[at:at + k])
            at += k

    @staticmethod
    def fail(batch: MicroBatch, exc: BaseException) -> None:
        for p in batch.parts:
            if not p.job.future.done():
                p.job.future.set_exception(exc)


def _closest_block(lengths: np.ndarray, max_batch: int, token_budget: int) -> np.ndarray:
    """Window positions of the batch around position 0 (the oldest); see MicroBatcher._take.

    In (length, arrival) order, growing a block around the oldest towards the neighbour whose
    length is closer (the left one on a tie) takes the left side nearest-first and the right
    side nearest-first, merged by distance with left before right: a stable sort by distance.
    """
    n = len(lengths)
    ranked = np.lexsort((np.arange(n), lengths))
    k = int(np.flatnonzero(ranked == 0)[0])
    left, right = ranked[:k][::-1], ranked[k + 1:]
    base = lengths[0]
    distance = np.concatenate([base - lengths[left], lengths[right] - base])
    side = np.concatenate([np.zeros(len(left), np.int8), np.ones(len(right), np.int8)])
    near = np.concatenate([np.arange(len(left)), np.arange(len(right))])
    others = np.concatenate([left, right])[np.lexsort((near, side, distance))]
    order = np.concatenate([[0], others])[:max_batch]
    longest = np.maximum.accumulate(lengths[order])
    over = np.arange(1, len(order) + 1) * longest > token_budget
    over[0] = False  # the oldest is served even alone over the budget
    stop = int(np.argmax(over)) if over.any() else len(order)
    return order[:stop]
