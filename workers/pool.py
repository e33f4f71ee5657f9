"""EnginePool: every lane of every engine is a slot, driven by its own thread, fed by the loop.

A slot is one (engine, lane) pair: an ONNX Runtime session on CPU has one lane, a GPU engine
one per CUDA stream. A batch goes to a free slot; with two or more slots the next batch is
formed and padded while the current one runs. Engine calls block, so they never run on the
event loop.

`acquire` spreads work over devices: of the free slots it takes one on the least-loaded device
(fewest busy lanes, then fewest sequences in flight, then the lowest slot index), so
consecutive batches land on GPU 0, GPU 1, GPU 2 before any GPU gets its second stream's batch.

An engine whose call raises EngineDead, or does not return within `call_timeout_s` (a stuck
device call), is out of service from then on: its lanes are never handed out again, and once
no engine is left `acquire` raises EngineDead instead of waiting, so the worker stops and a
restart (or another host) takes over.

A rolling reload on a multi-GPU host (workers.reload) changes a pool while it serves: `remove`
takes one engine out of service gracefully (no new batch; the running ones finish; then it is
closed and its device memory freed), `add` puts new engines in.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from engines.errors import EngineDead
from engines.protocol import Engine
from workers.microbatcher import MicroBatch

log = structlog.get_logger(__name__)


class SlotRetired(Exception):
    """The slot's engine was taken out of service by `remove` (not a failure): run the batch
    on another slot."""


@dataclass(frozen=True, slots=True)
class Slot:
    index: int  # position in EnginePool.slots
    engine: int  # position in EnginePool.engines
    lane: int  # passed to engine.run: one thread at a time uses it
    device: str  # "cpu", "cuda:0"


@dataclass(slots=True)
class SlotStats:
    """Completed engine calls. busy_s sums call durations, so a device's figure counts
    lane-seconds: two streams busy for one second make 2.0."""

    batches: int = 0
    sequences: int = 0
    busy_s: float = 0.0

    def add(self, sequences: int, busy_s: float) -> None:
        self.batches += 1
        self.sequences += sequences
        self.busy_s += busy_s


class LaneThread:
    """The one thread that drives a slot's lane. A daemon thread, not a ThreadPoolExecutor's:
    those are joined at interpreter exit, so one stuck in a device call would keep a worker
    that has given up on it from ever exiting."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the loop, which decides
                outcome = (future.set_exception, exc)
            else:
                outcome = (future.set_result, result)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_settle, future, *outcome)

    def stop(self) -> None:
        """Finish the calls already queued, then end."""
        self._jobs.put(None)

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


def _settle(future: asyncio.Future[Any], setter: Callable[[Any], None], value: Any) -> None:
    if not future.done():  # a caller that timed out has cancelled it
        setter(value)


class EnginePool:
    def __init__(self, engines: Sequence[Engine], *, call_timeout_s: float = 300.0) -> None:
        if not engines:
            raise ValueError("an EnginePool needs at least one engine")
        self.engines = list(engines)
        self.manifest = self.engines[0].manifest
        for engine in self.engines[1:]:
            if engine.manifest.version != self.manifest.version:
                raise ValueError("all engines of a pool must be the same version")
        self.slots: list[Slot] = []
        # A call that takes longer than this is stuck (a hung GPU): its engine is declared dead.
        self.call_timeout_s = call_timeout_s
        self._threads: list[LaneThread] = []
        self.slot_stats: list[SlotStats] = []
        self.device_stats: dict[str, SlotStats] = {}
        self.dead: set[int] = set()  # engines out of service
        self.removed: set[int] = set()  # engines taken out and closed (remove)
        self._draining: set[int] = set()  # being removed: no new batch, held slots still run
        self._closed = False
        self._stuck: set[int] = set()  # slots whose thread may never return
        self._free: set[int] = set()
        self._held: set[int] = set()
        self._running: set[int] = set()  # slots with a call submitted and not returned
        self._in_flight: Counter[str] = Counter()  # sequences being run, per device
        self._changed = asyncio.Event()  # a slot was released or an engine died
        for i in range(len(self.engines)):
            self._add_slots(i)

    def _add_slots(self, i: int) -> None:
        engine = self.engines[i]
        lanes = getattr(engine, "lanes", 1)
        if lanes < 1:
            raise ValueError(f"engine {i} has {lanes} lanes; it needs at least one")
        device = getattr(engine, "device", "cpu")
        first = len(self.slots)
        new = [Slot(first + lane, i, lane, device) for lane in range(lanes)]
        self.slots += new
        self._threads += [LaneThread(f"qscore-engine-{i}-lane-{s.lane}") for s in new]
        self.slot_stats += [SlotStats() for _ in new]
        self.device_stats.setdefault(device, SlotStats())
        self._free |= {s.index for s in new}

    def devices(self) -> list[str]:
        """The devices of the engines in service, in engine order."""
        return [getattr(e, "device", "cpu") for i, e in enumerate(self.engines)
                if i not in self.dead]

    def add(self, engines: Sequence[Engine]) -> None:
        """Put more engines of this pool's version in service."""
        for engine in engines:
            if engine.manifest.version != self.manifest.version:
                raise ValueError(f"an engine of version {engine.manifest.version} cannot join "
                                 f"a pool of {self.manifest.version}")
            self.engines.append(engine)
            self._add_slots(len(self.engines) - 1)
        self._changed.set()

    async def remove(self, engine: int) -> None:
        """Take engine `engine` out of service gracefully: no new batch goes to it, the calls
        running on it finish, then its lanes end and it is closed (its memory freed). A slot
        of it still held (the dispatcher waits for a batch with it) gets SlotRetired."""
        lanes = {s.index for s in self.slots if s.engine == engine}
        if engine in self.dead:
            raise ValueError(f"engine {engine} is out of service already")
        self.dead.add(engine)
        self._draining.add(engine)
        self._free -= lanes
        self._changed.set()
        try:
            while lanes & self._running:
                self._changed.clear()
                await self._changed.wait()
        finally:
            self._draining.discard(engine)
        self.removed.add(engine)  # from here run() refuses its slots (before any await)
        for i in lanes:
            self._threads[i].stop()
        for i in lanes:
            await asyncio.to_thread(self._threads[i].join, self.call_timeout_s)
        if not self._closed:  # else close() has closed it
            await asyncio.to_thread(self.engines[engine].close)
        log.info("engine_removed", engine=engine, device=self.slots[min(lanes)].device,
                 slots_left=self.size)

    @property
    def size(self) -> int:
        """Slots in service (the lanes of engines that are not dead)."""
        return sum(1 for s in self.slots if s.engine not in self.dead)

    def busy(self) -> int:
        return len(self._held)

    async def acquire(self) -> Slot:
        """Wait for a free slot; take the one on the least-loaded device."""
        while True:
            if not self.size:
                raise EngineDead(f"all {len(self.engines)} engines of the pool are out of "
                                 "service (see the engine_dead errors logged before)")
            if self._free:
                busy = Counter(self.slots[i].device for i in self._held)
                index = min(self._free, key=lambda i: (
                    busy[self.slots[i].device], self._in_flight[self.slots[i].device], i))
                self._free.discard(index)
                self._held.add(index)
                return self.slots[index]
            self._changed.clear()
            await self._changed.wait()

    def release(self, slot: Slot) -> None:
        if slot.index not in self._held:
            raise ValueError(f"slot {slot.index} released but not held")
        self._held.discard(slot.index)
        if slot.engine not in self.dead:
            self._free.add(slot.index)
        self._changed.set()

    async def run(self, slot: Slot, batch: MicroBatch) -> np.ndarray:
        """Run `batch` on `slot`'s lane. EngineDead takes the slot's engine out of service
        (and is raised, so the caller can run the batch elsewhere); other errors leave it in."""
        if slot.engine in self.removed:
            raise SlotRetired(f"engine {slot.engine} on {slot.device} was taken out")
        if slot.engine in self.dead and slot.engine not in self._draining:
            raise EngineDead(f"engine {slot.engine} on {slot.device} is out of service")
        self._in_flight[slot.device] += batch.size
        self._running.add(slot.index)
        call = self._threads[slot.index].submit(self._call, slot, batch)
        try:
            out, busy_s = await asyncio.wait_for(call, self.call_timeout_s)
        except TimeoutError:
            dead = EngineDead(f"engine {slot.engine} on {slot.device}: a call on lane "
                              f"{slot.lane} did not return within {self.call_timeout_s:g} s "
                              f"({batch.size} sequences); taken out of service as stuck")
            self._take_out(slot.engine, dead)
            self._stuck.add(slot.index)
            raise dead from None
        except EngineDead as exc:
            self._take_out(slot.engine, exc)
            raise
        finally:
            self._in_flight[slot.device] -= batch.size
            self._running.discard(slot.index)
            self._changed.set()
        # Counted here, on the loop: lanes of one device finish on different threads.
        self.slot_stats[slot.index].add(batch.size, busy_s)
        self.device_stats[slot.device].add(batch.size, busy_s)
        return out

    def _call(self, slot: Slot, batch: MicroBatch) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        out = self.engines[slot.engine].run(batch.padded(), lane=slot.lane)
        return out, time.perf_counter() - started

    def _take_out(self, engine: int, exc: BaseException) -> None:
        if engine in self.dead:
            return
        self.dead.add(engine)
        lanes = {s.index for s in self.slots if s.engine == engine}
        self._free -= lanes
        self._changed.set()  # waiters re-check: with no engine left they raise
        log.error("engine_dead", engine=engine, device=self.slots[min(lanes)].device,
                  lanes=len(lanes), slots_left=self.size, error=f"{type(exc).__name__}: {exc}")

    def device_counters(self) -> dict[str, float]:
        """Per-device totals as flat metric names: cuda_0_batches, cuda_0_busy_s, ..."""
        out: dict[str, float] = {}
        for device, stats in self.device_stats.items():
            name = device.replace(":", "_")
            out |= {f"{name}_batches": stats.batches, f"{name}_sequences": stats.sequences,
                    f"{name}_busy_s": stats.busy_s}
        return out

    async def close(self, timeout_s: float = 10.0) -> None:
        """Let queued calls finish (up to `timeout_s`, off the loop), then close the engines.
        An engine with a lane still stuck in a call is left unclosed: freeing a device under
        a running call can crash the process, and it is exiting anyway."""
        self._closed = True
        for lane in self._threads:
            lane.stop()
        deadline = time.monotonic() + timeout_s
        stuck: set[int] = set()
        for slot, lane in zip(self.slots, self._threads, strict=True):
            left = 0.0 if slot.index in self._stuck else max(0.0, deadline - time.monotonic())
            if not await asyncio.to_thread(lane.join, left):
                stuck.add(slot.engine)
        for i, engine in enumerate(self.engines):
            if i in self.removed:  # closed already
                continue
            if i in stuck:
                log.warning("engine_not_closed", engine=i, reason="a call is still running")
                continue
            try:
                engine.close()
            except Exception as exc:  # a dead device may fail to free; close the others
                log.warning("engine_close_failed", engine=i, error=f"{type(exc).__name__}: {exc}")
