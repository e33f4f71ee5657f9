"""EnginePool: engine instances (slots), each driven by its own thread, fed by the loop.

A slot is one engine instance on CPU (an ONNX Runtime session) or one stream of a GPU engine.
A batch goes to a free slot; with two or more slots the next batch is formed and padded while
the current one runs. Engine calls block, so they never run on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from engines.protocol import Engine
from workers.microbatcher import MicroBatch


@dataclass(slots=True)
class SlotStats:
    batches: int = 0
    sequences: int = 0
    busy_s: float = 0.0


class EnginePool:
    def __init__(self, engines: Sequence[Engine]) -> None:
        if not engines:
            raise ValueError("an EnginePool needs at least one engine")
        self.engines = list(engines)
        self.manifest = self.engines[0].manifest
        for engine in self.engines[1:]:
            if engine.manifest.version != self.manifest.version:
                raise ValueError("all engines of a pool must be the same version")
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix=f"qscore-engine-{i}")
                         for i in range(len(self.engines))]
        self.slot_stats = [SlotStats() for _ in self.engines]
        self._free: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(self.engines)):
            self._free.put_nowait(i)

    @property
    def size(self) -> int:
        return len(self.engines)

    def busy(self) -> int:
        return self.size - self._free.qsize()

    async def acquire(self) -> int:
        return await self._free.get()

    def release(self, slot: int) -> None:
        self._free.put_nowait(slot)

    async def run(self, slot: int, batch: MicroBatch) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads[slot], self._call, slot, batch)

    def _call(self, slot: int, batch: MicroBatch) -> np.ndarray:
        started = time.perf_counter()
        out = self.engines[slot].run(batch.padded())
        stats = self.slot_stats[slot]
        stats.busy_s += time.perf_counter() - started
        stats.batches += 1
        stats.sequences += batch.size
        return out

    def close(self) -> None:
        for pool in self._threads:
            pool.shutdown(wait=True)
        for engine in self.engines:
            engine.close()
