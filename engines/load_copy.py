"""Weights from host to device beside a serving engine: chunked, staged, low priority, paced.

A hot reload loads a new engine on a GPU whose other engine is serving. Its copies must not
crowd out the serving engine's own (a batch's ids in, its scores out), so they go:

- in chunks of `chunk_bytes` through one page-locked staging buffer (a copy engine runs one
  chunk at a time, so a serving copy waits behind at most one chunk, ~0.7 ms for 8 MiB at
  12 GB/s), each chunk packing the pieces of as many tensors as fit: a tensor larger than a
  chunk spans several, small ones share one, empty ones take none;
- on a stream of the lowest priority torch allows (its casts and quantization kernels too,
  where the caller runs them on `stream`); the serving lanes take the highest
  (`stream_priorities`), so the GPU's scheduler favours their kernels. Priorities do not
  order copies: the byte-rate cap is what bounds those;
- at most `max_bytes_per_s` on average (None: as fast as the bus goes, for a cold start).

One staging buffer, not two: the host waits for each chunk (a blocking event, so the loading
thread sleeps rather than spins on a core the serving path needs) before it refills the
buffer. Double-buffering would overlap refilling with the transfer, which only an unpaced load
notices (tens of milliseconds on a BERT-base), and would let two chunks queue on the copy
engine ahead of a serving copy. The plan and the pacing are pure and tested on CPU; on CPU the
same copier runs with ordinary memory and no stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_CHUNK_BYTES = 8 * 2**20


@dataclass(frozen=True, slots=True)
class Piece:
    """`size` bytes of tensor `tensor` from byte `start`, at byte `offset` of the staging
    buffer."""

    tensor: int
    start: int
    size: int
    offset: int


def chunk_plan(sizes: Sequence[int], chunk_bytes: int) -> list[list[Piece]]:
    """Tensors of `sizes` bytes, in order, cut into chunks of at most `chunk_bytes` bytes.

    Every chunk but the last is full; a tensor continues where the previous one ended, so a
    large one spans several chunks and small ones share one; a zero-size tensor has no piece.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, not {chunk_bytes}")
    chunks: list[list[Piece]] = []
    current: list[Piece] = []
    used = 0
    for index, size in enumerate(sizes):
        if size < 0:
            raise ValueError(f"tensor {index} has a negative size ({size})")
        start = 0
        while start < size:
            take = min(size - start, chunk_bytes - used)
            current.append(Piece(index, start, take, used))
            start += take
            used += take
            if used == chunk_bytes:
                chunks.append(current)
                current, used = [], 0
    if current:
        chunks.append(current)
    return chunks


def pace_delay(done_bytes: int, max_bytes_per_s: float | None, elapsed_s: float) -> float:
    """Seconds to wait so that `done_bytes` moved in `elapsed_s` stay within the rate."""
    if not max_bytes_per_s:
        return 0.0
    return max(0.0, done_bytes / max_bytes_per_s - elapsed_s)


@dataclass(slots=True)
class BytePace:
    """Paces a transfer to `max_bytes_per_s` on average since its first byte (None: no cap).

    `advance(n)` after each `n` bytes sleeps as long as the transfer is ahead of the rate;
    bursts are one chunk at the bus's speed, then a pause.
    """

    max_bytes_per_s: float | None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    done: int = 0
    slept_s: float = 0.0
    started: float | None = field(default=None)

    def __post_init__(self) -> None:
        if self.max_bytes_per_s is not None and self.max_bytes_per_s <= 0:
            raise ValueError(f"max_bytes_per_s must be > 0 or None, not {self.max_bytes_per_s}")

    def begin(self) -> None:
        """Start the clock (once: a transfer in several calls is paced as one)."""
        if self.started is None:
            self.started = self.clock()

    def advance(self, n: int) -> float:
        """`n` more bytes have moved: sleep while ahead of the rate; returns the wait."""
        self.begin()
        self.done += n
        wait = pace_delay(self.done, self.max_bytes_per_s, self.clock() - self.started)
        if wait > 0:
            self.sleep(wait)
            self.slept_s += wait
        return wait


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view (shares its memory)."""
    return t.reshape(-1).view(torch.uint8)


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of a CPU tensor in the process's own memory, in one thread (numpy's memcpy,
    which leaves the GIL and the other cores to the serving path)."""
    t = t.contiguous()
    out = torch.empty(t.shape, dtype=t.dtype)
    if t.numel():
        byte_view(out).numpy()[:] = byte_view(t).numpy()
    return out


def stream_priorities() -> tuple[int, int]:
    """(lowest, highest) stream priority torch offers (lower numbers run first: (0, -1) or
    wider on recent torch); (0, 0) without CUDA."""
    if not torch.cuda.is_available():
        return 0, 0
    lowest, highest = torch.cuda.Stream.priority_range()
    return int(lowest), int(highest)


@dataclass(slots=True)
class CopyStats:
    bytes: int = 0
    chunks: int = 0
    paced_s: float = 0.0  # time spent waiting for the rate cap


class StagedCopier:
    """Copies host tensors onto `device` chunk by chunk through one staging buffer.

    On CUDA the buffer is page-locked and the copies are non-blocking on `stream`, a stream of
    the lowest priority; destination tensors are allocated on that stream too, so the caching
    allocator never hands them memory another stream may still be using. On CPU the same loop
    runs with ordinary memory, which is how the tests cover the loop without a GPU.
    """

    def __init__(self, device: torch.device | str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 max_bytes_per_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, not {chunk_bytes}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.chunk_bytes = chunk_bytes
        self.pace = BytePace(max_bytes_per_s, clock, sleep)  # checks the rate
        self.stats = CopyStats()
        self.stream: Any = None
        self._done: Any = None
        if self.cuda:
            lowest, _highest = stream_priorities()
            self.stream = torch.cuda.Stream(self.device, priority=lowest)
            self._done = torch.cuda.Event(blocking=True)

    def on_stream(self) -> AbstractContextManager[Any]:
        """Run the enclosed torch work on the copier's stream (a no-op on CPU)."""
        return torch.cuda.stream(self.stream) if self.cuda else nullcontext()

    def synchronize(self) -> None:
        """Wait (sleeping) until everything queued on the copier's stream has run."""
        if self.cuda:
            self._done.record(self.stream)
            self._done.synchronize()

    def copy(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The same tensors (names, shapes, dtypes, bytes) on the device, once all arrived."""
        names = list(tensors)
        sources = [tensors[n].contiguous() for n in names]
        if any(t.device.type != "cpu" for t in sources):
            raise ValueError("StagedCopier copies host (CPU) tensors")
        with self.on_stream():
            targets = [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in sources]
        sizes = [t.numel() * t.element_size() for t in sources]
        plan = chunk_plan(sizes, self.chunk_bytes)
        if plan:
            staging = torch.empty(min(self.chunk_bytes, sum(sizes)), dtype=torch.uint8,
                                  pin_memory=self.cuda)
            self._run(plan, staging, [byte_view(t) for t in sources],
                      [byte_view(t) for t in targets])
        return dict(zip(names, targets, strict=True))

    def _run(self, plan: list[list[Piece]], staging: torch.Tensor, sources: list[torch.Tensor],
             targets: list[torch.Tensor]) -> None:
        host = staging.numpy()
        self.pace.begin()
        for chunk in plan:
            for p in chunk:  # host side: one thread (numpy releases the GIL to copy)
                host[p.offset:p.offset + p.size] = (
                    sources[p.tensor][p.start:p.start + p.size].numpy())
            with self.on_stream():
                for p in chunk:
                    targets[p.tensor][p.start:p.start + p.size].copy_(
                        staging[p.offset:p.offset + p.size], non_blocking=self.cuda)
            self.synchronize()  # the staging buffer is free again
            moved = sum(p.size for p in chunk)
            self.stats.bytes += moved
            self.stats.chunks += 1
            self.stats.paced_s += self.pace.advance(moved)
