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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from engines.batch import PaddedBatch, pad_gather
from schemas import TokenBatch

Priority = Literal["online", "offline"]


@dataclass(eq=False, slots=True)
class Job:
    """One TokenBatch waiting for its sequences' outputs. Its sequences queue as entries of
    the batcher's flat arrays (_Queue), never as one Python object each: the host cost per
    item is what decides whether one process can feed a GPU."""

    tb: TokenBatch
    future: asyncio.Future[np.ndarray]
    enqueued_at: float
    lengths: np.ndarray  # int64 [n_seq]
    remaining: int  # sequences without an output yet
    queued: int = 0  # sequences still in the queue (not yet in a batch)
    outputs: np.ndarray | None = None
    generation: int = 0  # the engine generation that must score it (a reload adds one)

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
    size: int = field(init=False)  # rows: read often (pool, stats), counted once
    # Every row's job has this generation: a batch never mixes engine versions.
    generation: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = sum(len(p.index) for p in self.parts)
        self.generation = self.parts[0].job.generation if self.parts else 0

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


class _Queue:
    """Pending sequences of one priority in arrival order, as three flat arrays (job serial,
    sequence index, length) between `head` and `tail`: submitting appends a TokenBatch's
    sequences with three slice copies, and taking a batch compacts the window it chose from
    with a few vector operations, whatever the number of TokenBatches in it."""

    def __init__(self, capacity: int = 1024) -> None:
        self.job = np.zeros(capacity, dtype=np.int64)
        self.seq = np.zeros(capacity, dtype=np.int64)
        self.length = np.zeros(capacity, dtype=np.int64)
        self.generation = np.zeros(capacity, dtype=np.int64)
        self.head = self.tail = 0
        self.jobs: dict[int, Job] = {}  # serial -> Job, while any of its sequences is queued

    def __len__(self) -> int:
        return self.tail - self.head

    def oldest(self) -> Job:
        return self.jobs[int(self.job[self.head])]

    def append(self, serial: int, job: Job) -> None:
        n = len(job.lengths)
        if self.tail + n > len(self.job):
            self._make_room(n)
        end = self.tail + n
        self.job[self.tail:end] = serial
        self.seq[self.tail:end] = np.arange(n)
        self.length[self.tail:end] = job.lengths
        self.generation[self.tail:end] = job.generation
        self.tail = end
        job.queued = n
        self.jobs[serial] = job

    def _make_room(self, n: int) -> None:
        live = len(self)
        size = len(self.job)
        while live + n > size // 2:  # keep appends amortised O(1)
            size *= 2
        for name in ("job", "seq", "length", "generation"):
            old = getattr(self, name)
            new = old if size == len(old) else np.zeros(size, dtype=np.int64)
            new[:live] = old[self.head:self.tail]
            setattr(self, name, new)
        self.head, self.tail = 0, live

    def take(self, chosen: np.ndarray, window: int) -> list[Part]:
        """Remove window positions `chosen` (ascending); the rest of the window keeps its order.
        The batch's rows, grouped by TokenBatch."""
        at = self.head + chosen
        jobs, seqs = self.job[at], self.seq[at]
        keep = np.ones(window, dtype=bool)
        keep[chosen] = False
        k = len(chosen)
        for arr in (self.job, self.seq, self.length, self.generation):
            arr[self.head + k:self.head + window] = arr[self.head:self.head + window][keep]
        self.head += k
        # A job's sequences are contiguous in arrival order, so its rows form one run.
        cuts = (np.flatnonzero(jobs[1:] != jobs[:-1]) + 1).tolist()
        parts = []
        for lo, hi in zip([0, *cuts], [*cuts, k], strict=True):
            job = self.jobs[int(jobs[lo])]
            job.queued -= hi - lo
            if not job.queued:
                del self.jobs[int(jobs[lo])]
            parts.append(Part(job, seqs[lo:hi]))
        return parts


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
        self._queues: dict[Priority, _Queue] = {"online": _Queue(), "offline": _Queue()}
        self._serial = 0  # jobs in submission order
        self.submitted = 0  # sequences ever queued (an arrival rate is its derivative)
        self._arrived = asyncio.Event()
        self._space = asyncio.Condition()
        self._last_submit: float | None = None
        self.mean_gap_s = float("inf")  # moving average of the time between submits

    def head_generation(self) -> int | None:
        """The generation of the work the next batch will be formed from (None: none queued)."""
        for priority in ("online", "offline"):
            queue = self._queues[priority]  # type: ignore[index]
            if len(queue):
                return int(queue.generation[queue.head])
        return None

    def pending(self, generation: int) -> int:
        """Sequences of that generation still queued."""
        return sum(int(np.count_nonzero(q.generation[q.head:q.tail] == generation))
                   for q in self._queues.values())

    def depth(self, priority: Priority | None = None) -> int:
        if priority is not None:
            return len(self._queues[priority])
        return len(self._queues["online"]) + len(self._queues["offline"])

    async def submit(self, tb: TokenBatch, priority: Priority = "online", *,
                     generation: int = 0) -> asyncio.Future[np.ndarray]:
        """Queue every sequence of `tb`; the future resolves with one output row per sequence.

        `generation` is the engine generation that must score it: batches never mix
        generations, so across a reload every TokenBatch is scored wholly by one version.
        Waits while the queue is full (a single TokenBatch larger than the capacity is let in
        when the queue is empty, so nothing is unschedulable).
        """
        n = tb.n_sequences
        queue = self._queues[priority]
        if len(queue) and len(queue) + n > self.settings.capacity:
            async with self._space:  # only when full: the lock costs more than the check
                await self._space.wait_for(
                    lambda: not len(queue) or len(queue) + n <= self.settings.capacity)
        loop = asyncio.get_running_loop()
        now = self._clock()
        if self._last_submit is not None:
            gap = now - self._last_submit
            self.mean_gap_s = gap if self.mean_gap_s == float("inf") else (
                0.8 * self.mean_gap_s + 0.2 * gap)
        self._last_submit = now
        job = Job(tb=tb, future=loop.create_future(), enqueued_at=now, lengths=tb.lengths,
                  remaining=n, generation=generation)
        if n == 0:
            job.future.set_result(np.empty((0,), dtype=np.float32))
            return job.future
        self._serial += 1
        self.submitted += n
        queue.append(self._serial, job)
        self._arrived.set()
        return job.future

    async def next_batch(self) -> MicroBatch:
        """Wait for work, then form one batch (see module docstring)."""
        s = self.settings
        while True:
            priority: Priority = "online" if len(self._queues["online"]) else "offline"
            queue = self._queues[priority]
            if not len(queue):
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if (len(queue) >= s.max_batch or s.max_wait_ms == 0
                    or self.mean_gap_s * 1000 > s.max_wait_ms):
                break
            wait = queue.oldest().enqueued_at + s.max_wait_ms / 1000 - self._clock()
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
        n = min(len(queue), s.window)
        # Only the oldest sequences' generation: after a reload the queue holds the old
        # generation's work first (it arrived first), then the new one's.
        others = queue.generation[queue.head:queue.head + n] != queue.generation[queue.head]
        if others.any():
            n = int(np.argmax(others))
        lengths = queue.length[queue.head:queue.head + n]
        if n <= s.max_batch and n * int(lengths.max()) <= s.token_budget:
            chosen = np.arange(n)  # everything fits: the common case under moderate load
        else:
            chosen = np.sort(_closest_block(lengths, s.max_batch, s.token_budget))
        return queue.take(chosen, n)

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
