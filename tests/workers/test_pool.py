"""EnginePool over fake devices: lanes, least-loaded dispatch, dead engines, and the worker's
retry of a batch whose engine died (pure logic: fake engines, no broker).

Engine calls that must stay in flight are held by threading.Events the test opens; a test
only yields to the loop (sleep(0)) to show that something is still waiting.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import structlog
from structlog.testing import LogCapture

import workers.pool
from engines.batch import PaddedBatch, pad_sequences
from engines.errors import EngineDead, EngineError
from schemas import TokenBatch
from workers.microbatcher import BatcherSettings
from workers.pool import EnginePool, Slot, SlotRetired

WAIT_S = 5  # only a failing test ever waits this long


class FakeEngine:
    """Answers one row [engine id, lane] per sequence; can hold its calls or fail them."""

    def __init__(self, ident: int, device: str, lanes: int = 2, version: str = "v1") -> None:
        self.ident = ident
        self.device = device
        self.lanes = lanes
        self.manifest = SimpleNamespace(version=version)
        self.gate = threading.Event()  # calls wait for it; open unless a test holds calls
        self.gate.set()
        self.entered = threading.Semaphore(0)  # released once per call that started
        self.barrier: threading.Barrier | None = None  # calls meet here when set
        self.error: Exception | None = None
        self.calls: list[tuple[int, str]] = []  # (lane, thread name)
        self.closed = False

    def run(self, batch: PaddedBatch, lane: int = 0) -> np.ndarray:
        self.calls.append((lane, threading.current_thread().name))
        self.entered.release()
        if self.barrier is not None:
            self.barrier.wait(WAIT_S)
        assert self.gate.wait(WAIT_S), "the test never opened the gate"
        if self.error is not None:
            raise self.error
        return np.tile(np.array([self.ident, lane], dtype=np.float32), (batch.size, 1))

    def health(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class FakeBatch:
    """What the pool reads of a MicroBatch: its size and its padded arrays."""

    def __init__(self, size: int) -> None:
        self.size = size

    def padded(self) -> PaddedBatch:
        return pad_sequences([np.ones(3, dtype=np.int64)] * self.size)


def gpus(n: int = 3, lanes: int = 2) -> list[FakeEngine]:
    return [FakeEngine(i, f"cuda:{i}", lanes) for i in range(n)]


async def entered(engine: FakeEngine) -> None:
    """Wait (off the loop) until one more call of `engine` has started."""
    assert await asyncio.to_thread(engine.entered.acquire, True, WAIT_S)


async def acquire_all(pool: EnginePool, n: int) -> list[Slot]:
    return [await asyncio.wait_for(pool.acquire(), WAIT_S) for _ in range(n)]


async def test_slots_are_engine_lanes() -> None:
    pool = EnginePool(gpus())
    assert pool.size == 6
    assert [(s.engine, s.lane, s.device) for s in pool.slots] == [
        (0, 0, "cuda:0"), (0, 1, "cuda:0"), (1, 0, "cuda:1"), (1, 1, "cuda:1"),
        (2, 0, "cuda:2"), (2, 1, "cuda:2")]
    await pool.close()


async def test_older_engines_without_lanes_or_device_get_one_cpu_slot() -> None:
    engine = FakeEngine(0, "cpu")
    del engine.lanes, engine.device
    pool = EnginePool([engine, FakeEngine(1, "cpu", lanes=1)])
    assert [(s.engine, s.lane, s.device) for s in pool.slots] == [(0, 0, "cpu"), (1, 0, "cpu")]
    await pool.close()


async def test_consecutive_batches_spread_over_devices_before_second_lanes() -> None:
    pool = EnginePool(gpus())
    slots = await acquire_all(pool, 6)
    assert [s.device for s in slots[:3]] == ["cuda:0", "cuda:1", "cuda:2"]
    assert [s.lane for s in slots[:3]] == [0, 0, 0]
    assert sorted(s.index for s in slots) == list(range(6)) and pool.busy() == 6
    await pool.close()


async def test_acquire_waits_while_every_slot_is_busy_until_a_release() -> None:
    pool = EnginePool(gpus())
    slots = await acquire_all(pool, 6)
    waiter = asyncio.create_task(pool.acquire())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()
    pool.release(slots[3])
    assert await asyncio.wait_for(waiter, WAIT_S) == slots[3]
    pool.release(slots[0])
    with pytest.raises(ValueError, match="not held"):
        pool.release(slots[0])
    await pool.close()


async def test_least_loaded_device_by_busy_lanes() -> None:
    pool = EnginePool(gpus())
    _, b, _ = await acquire_all(pool, 3)
    pool.release(b)  # cuda:1 now has no busy lane, the others one each
    assert (await pool.acquire()).device == "cuda:1"
    d = await pool.acquire()  # all three have one busy lane: lowest free index
    assert (d.device, d.lane) == ("cuda:0", 1)
    assert (await pool.acquire()).device == "cuda:1"  # cuda:0 now has two busy lanes
    await pool.close()


async def test_equal_busy_lanes_break_ties_by_sequences_in_flight() -> None:
    engines = gpus()
    pool = EnginePool(engines)
    for engine in engines:
        engine.gate.clear()
    slots = await acquire_all(pool, 3)
    runs = [asyncio.create_task(pool.run(slot, FakeBatch(n)))  # type: ignore[arg-type]
            for slot, n in zip(slots, (8, 2, 5), strict=True)]
    for engine in engines:
        await entered(engine)
    nxt = await pool.acquire()
    assert (nxt.device, nxt.lane) == ("cuda:1", 1)  # one busy lane each; cuda:1 runs least
    for engine in engines:
        engine.gate.set()
    await asyncio.gather(*runs)
    await pool.close()


async def test_run_passes_the_slots_lane_on_that_lanes_thread() -> None:
    engines = gpus()
    pool = EnginePool(engines)
    for slot in await acquire_all(pool, 6):
        out = await pool.run(slot, FakeBatch(2))  # type: ignore[arg-type]
        assert out.tolist() == [[slot.engine, slot.lane]] * 2
        lane, thread = engines[slot.engine].calls[-1]
        assert lane == slot.lane
        assert thread.startswith(f"qscore-engine-{slot.engine}-lane-{slot.lane}")
    await pool.close()


async def test_lanes_of_one_engine_run_concurrently_on_different_threads() -> None:
    (engine,) = gpus(1)
    engine.barrier = threading.Barrier(2)  # each call waits for the other: serial would break
    pool = EnginePool([engine])
    s0, s1 = await acquire_all(pool, 2)
    out0, out1 = await asyncio.gather(pool.run(s0, FakeBatch(1)),  # type: ignore[arg-type]
                                      pool.run(s1, FakeBatch(1)))  # type: ignore[arg-type]
    assert out0.tolist() == [[0, 0]] and out1.tolist() == [[0, 1]]
    assert sorted(lane for lane, _ in engine.calls) == [0, 1]
    assert len({thread for _, thread in engine.calls}) == 2
    await pool.close()


async def test_per_device_stats_add_up() -> None:
    pool = EnginePool(gpus())
    sizes = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    for k in range(0, len(sizes), 3):  # three batches at a time: one on each device
        slots = await acquire_all(pool, 3)
        await asyncio.gather(*(pool.run(slot, FakeBatch(n))  # type: ignore[arg-type]
                               for slot, n in zip(slots, sizes[k:k + 3], strict=True)))
        for slot in slots:
            pool.release(slot)
    devices = pool.device_stats.values()
    assert sum(s.batches for s in devices) == len(sizes)
    assert sum(s.sequences for s in devices) == sum(sizes)
    for device, stats in pool.device_stats.items():
        lanes = [pool.slot_stats[s.index] for s in pool.slots if s.device == device]
        assert stats.batches == sum(s.batches for s in lanes) == 3  # spread evenly
        assert stats.sequences == sum(s.sequences for s in lanes)
        assert stats.busy_s == pytest.approx(sum(s.busy_s for s in lanes))
    counters = pool.device_counters()
    assert counters["cuda_1_sequences"] == pool.device_stats["cuda:1"].sequences
    assert set(counters) == {f"cuda_{i}_{k}" for i in range(3)
                             for k in ("batches", "sequences", "busy_s")}
    await pool.close()


async def test_engine_dead_takes_its_lanes_out_of_service(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The module's logger replaced by a capturing one, as in test_cache_redis: the global
    # configuration other tests leave behind (logger caching) cannot hide its events.
    capture = LogCapture()
    monkeypatch.setattr(workers.pool, "log", structlog.wrap_logger(
        None, processors=[capture], wrapper_class=structlog.BoundLogger))
    logs = capture.entries
    engines = gpus()
    pool = EnginePool(engines)
    engines[1].error = EngineDead("CUDA error: device lost")
    held = await acquire_all(pool, 5)
    assert [(s.device, s.lane) for s in held] == [
        ("cuda:0", 0), ("cuda:1", 0), ("cuda:2", 0), ("cuda:0", 1), ("cuda:1", 1)]
    lane0, lane1 = held[1], held[4]  # cuda:1's lanes: lane 1 is held while its engine dies
    with pytest.raises(EngineDead, match="device lost"):
        await pool.run(lane0, FakeBatch(4))  # type: ignore[arg-type]
    assert [e for e in logs if e["event"] == "engine_dead"] == [{
        "event": "engine_dead", "log_level": "error", "engine": 1, "device": "cuda:1",
        "lanes": 2, "slots_left": 4, "error": "EngineDead: CUDA error: device lost"}]
    assert pool.size == 4 and pool.dead == {1}
    with pytest.raises(EngineDead, match="out of service"):  # not called again
        await pool.run(lane1, FakeBatch(1))  # type: ignore[arg-type]
    assert len(engines[1].calls) == 1
    for slot in held:
        pool.release(slot)
    again = await acquire_all(pool, 4)
    assert {s.device for s in again} == {"cuda:0", "cuda:2"}
    waiter = asyncio.create_task(pool.acquire())  # cuda:1's lanes are free, never handed out
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()
    pool.release(again[0])
    assert (await asyncio.wait_for(waiter, WAIT_S)).device != "cuda:1"
    await pool.close()
    assert all(e.closed for e in engines)


async def test_remove_lets_running_calls_finish_then_closes_and_add_puts_engines_in() -> None:
    engines = gpus(2)
    pool = EnginePool(engines)
    engines[0].gate.clear()  # cuda:0's calls wait
    held = await acquire_all(pool, 4)
    running, idle = held[0], held[2]  # both cuda:0: one runs a call, one is only held
    call = asyncio.create_task(pool.run(running, FakeBatch(2)))  # type: ignore[arg-type]
    await entered(engines[0])
    removing = asyncio.create_task(pool.remove(0))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not removing.done() and not engines[0].closed  # its call is still running
    assert pool.size == 2 and pool.devices() == ["cuda:1"]  # but no new batch goes there
    engines[0].gate.set()
    assert (await asyncio.wait_for(call, WAIT_S))[0].tolist() == [0, 0]
    await asyncio.wait_for(removing, WAIT_S)
    assert engines[0].closed
    with pytest.raises(SlotRetired):  # a slot held meanwhile is refused, not run
        await pool.run(idle, FakeBatch(1))  # type: ignore[arg-type]
    for slot in held:
        pool.release(slot)
    pool.add([FakeEngine(7, "cuda:0", lanes=1)])
    assert sorted(pool.devices()) == ["cuda:0", "cuda:1"] and pool.size == 3
    with pytest.raises(ValueError, match="cannot join"):
        pool.add([FakeEngine(8, "cuda:2", version="v2")])
    assert {s.device for s in await acquire_all(pool, 3)} == {"cuda:0", "cuda:1"}
    await pool.close()
    assert all(e.closed for e in pool.engines)


async def test_plain_engine_error_keeps_the_slot_in_service() -> None:
    (engine,) = gpus(1, lanes=1)
    pool = EnginePool([engine])
    engine.error = EngineError("batch too long")
    slot = await pool.acquire()
    with pytest.raises(EngineError, match="too long"):
        await pool.run(slot, FakeBatch(1))  # type: ignore[arg-type]
    pool.release(slot)
    assert pool.size == 1 and not pool.dead
    engine.error = None
    slot = await pool.acquire()
    assert (await pool.run(slot, FakeBatch(1))).tolist() == [[0, 0]]  # type: ignore[arg-type]
    await pool.close()


async def test_all_engines_dead_acquire_raises_and_wakes_waiters() -> None:
    engines = gpus(2, lanes=1)
    pool = EnginePool(engines)
    for engine in engines:
        engine.error = EngineDead("device lost")
    s0, s1 = await acquire_all(pool, 2)
    waiter = asyncio.create_task(pool.acquire())
    with pytest.raises(EngineDead):
        await pool.run(s0, FakeBatch(1))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert not waiter.done()  # cuda:1 is still in service
    with pytest.raises(EngineDead):
        await pool.run(s1, FakeBatch(1))  # type: ignore[arg-type]
    with pytest.raises(EngineDead, match="all 2 engines"):
        await asyncio.wait_for(waiter, WAIT_S)
    with pytest.raises(EngineDead, match="all 2 engines"):
        await pool.acquire()
    assert pool.size == 0
    await pool.close()


def test_engines_of_different_versions_are_refused() -> None:
    with pytest.raises(ValueError, match="same version"):
        EnginePool([FakeEngine(0, "cuda:0"), FakeEngine(1, "cuda:1", version="v2")])
    with pytest.raises(ValueError, match="at least one"):
        EnginePool([])


# -- the worker's dispatcher ------------------------------------------------------------------
def _tb(lengths: list[int], batch_id: str = "b") -> TokenBatch:
    offsets = np.zeros(len(lengths) + 1, dtype=np.uint32)
    np.cumsum(lengths, out=offsets[1:])
    return TokenBatch(
        batch_id=batch_id, item_ids=tuple(f"i{k}" for k in range(len(lengths))),
        tokenizer_id="t", max_length=512, seq_item=np.arange(len(lengths), dtype=np.uint32),
        seq_doc=np.full(len(lengths), -1, dtype=np.int32), offsets=offsets,
        input_ids=np.ones(int(offsets[-1]), dtype=np.uint32), token_type_ids=None,
        truncated=np.zeros(len(lengths), dtype=bool), submitted_at=0.0)


async def _worker(engines: list[FakeEngine]):  # type: ignore[no-untyped-def]
    """A ScoringWorker whose dispatcher runs, its Kafka pipelines never started."""
    from plumbing.kafka import KafkaSettings
    from workers.service import ScoringWorker, WorkerSettings

    worker = ScoringWorker(WorkerSettings(kafka=KafkaSettings(),
                                          batcher=BatcherSettings(max_wait_ms=0)),
                           engines)  # type: ignore[arg-type]
    worker._dispatcher = asyncio.create_task(worker._dispatch())
    return worker


async def _shutdown(worker) -> None:  # type: ignore[no-untyped-def]
    worker._dispatcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker._dispatcher
    if worker._running:
        await asyncio.wait(worker._running)
    await worker.pool.close()
    for pipeline in (worker.online, worker.offline):  # never started: this only closes them
        await pipeline.consumer.stop()
        await pipeline.producer.stop()


async def test_worker_runs_a_batch_again_on_another_engine_when_its_engine_dies() -> None:
    engines = gpus(2, lanes=2)
    engines[0].error = EngineDead("CUDA error: device lost")
    worker = await _worker(engines)
    try:
        outputs = await asyncio.wait_for(await worker.batcher.submit(_tb([3, 5])), WAIT_S)
        assert outputs[:, 0].tolist() == [1, 1]  # cuda:0 was tried first, cuda:1 scored
        assert len(engines[0].calls) == 1 and worker.pool.dead == {0}
        assert (worker.stats.engine_retries, worker.stats.engine_errors) == (1, 0)
        assert worker.stats.batches == 1
        assert worker.pool.busy() == 1  # both released; the dispatcher holds one for the next
        later = await asyncio.wait_for(await worker.batcher.submit(_tb([4], "c")), WAIT_S)
        assert later[:, 0].tolist() == [1] and len(engines[0].calls) == 1
    finally:
        await _shutdown(worker)


async def test_worker_fails_other_engine_errors_without_retry() -> None:
    engines = gpus(2, lanes=1)
    engines[0].error = EngineError("bad batch")
    worker = await _worker(engines)
    try:
        with pytest.raises(EngineError, match="bad batch"):
            await asyncio.wait_for(await worker.batcher.submit(_tb([3])), WAIT_S)
        assert (worker.stats.engine_retries, worker.stats.engine_errors) == (0, 1)
        assert len(engines[1].calls) == 0 and not worker.pool.dead
    finally:
        await _shutdown(worker)


async def test_worker_with_no_engine_left_fails_its_work_and_stops() -> None:
    (engine,) = gpus(1, lanes=1)
    engine.error = EngineDead("device lost")
    worker = await _worker([engine])
    try:
        with pytest.raises(EngineDead, match="device lost"):  # nothing left to retry on
            await asyncio.wait_for(await worker.batcher.submit(_tb([3])), WAIT_S)
        with pytest.raises(EngineDead, match="all 1 engines"):  # queued later: failed, too
            await asyncio.wait_for(await worker.batcher.submit(_tb([2], "c")), WAIT_S)
        assert worker.failure is not None and worker.online._stopping.is_set()
        assert worker.offline._stopping.is_set() and worker.stats.engine_errors == 1
    finally:
        await _shutdown(worker)


class PickyEngine(FakeEngine):
    """Fails any batch holding token id 999 (as ONNX Runtime fails an id past the vocabulary)."""

    def run(self, batch: PaddedBatch, lane: int = 0) -> np.ndarray:
        if (np.asarray(batch.input_ids) == 999).any():
            self.calls.append((lane, "refused"))
            raise EngineError("token id 999 is out of the vocabulary")
        return super().run(batch, lane)


async def test_a_failing_batch_is_bisected_so_only_the_culprit_token_batch_fails() -> None:
    engine = PickyEngine(0, "cpu", lanes=1)
    worker = await _worker([engine])  # type: ignore[list-item]
    try:
        engine.gate.clear()  # hold the only lane, so the next three share one micro-batch
        blocker = await worker.batcher.submit(_tb([2], "blocker"))
        await entered(engine)
        good1 = await worker.batcher.submit(_tb([2, 2], "good1"))
        bad = await worker.batcher.submit(
            replace(_tb([2, 2], "bad"), input_ids=np.array([1, 999, 1, 1], dtype=np.uint32)))
        good2 = await worker.batcher.submit(_tb([2, 2], "good2"))
        engine.gate.set()
        await asyncio.wait_for(blocker, WAIT_S)
        assert (await asyncio.wait_for(good1, WAIT_S)).shape == (2, 2)
        assert (await asyncio.wait_for(good2, WAIT_S)).shape == (2, 2)
        with pytest.raises(EngineError, match="out of the vocabulary"):
            await asyncio.wait_for(bad, WAIT_S)
        assert worker.stats.bisections >= 2 and worker.stats.engine_errors >= 3
        assert worker.pool.busy() == 1  # every slot released; the dispatcher holds one again
    finally:
        await _shutdown(worker)


async def test_a_call_that_never_returns_declares_its_engine_dead_and_close_does_not_wait(
        ) -> None:
    stuck, healthy = FakeEngine(0, "cuda:0", lanes=1), FakeEngine(1, "cuda:1", lanes=1)
    stuck.gate.clear()  # its call hangs, as a hung GPU call would
    pool = EnginePool([stuck, healthy], call_timeout_s=0.2)
    slot = await pool.acquire()
    assert slot.engine == 0
    with pytest.raises(EngineDead, match=r"did not return within 0\.2 s"):
        await asyncio.wait_for(pool.run(slot, FakeBatch(2)), WAIT_S)
    pool.release(slot)
    assert pool.dead == {0} and pool.size == 1
    other = await pool.acquire()
    assert other.engine == 1  # the healthy engine keeps serving
    pool.release(other)
    loop = asyncio.get_running_loop()
    begun = loop.time()
    await asyncio.wait_for(pool.close(timeout_s=WAIT_S), WAIT_S)
    assert loop.time() - begun < WAIT_S / 2  # did not wait for the stuck call
    assert healthy.closed and not stuck.closed  # never free a device under a running call
    stuck.gate.set()  # let the thread end


class ShortEngine(FakeEngine):
    """Returns one row too few: a broken engine's outputs, not an exception."""

    def run(self, batch: PaddedBatch, lane: int = 0) -> np.ndarray:
        return super().run(batch, lane)[:-1]


async def test_outputs_that_do_not_fit_the_batch_fail_its_waiters_instead_of_hanging() -> None:
    worker = await _worker([ShortEngine(0, "cpu", lanes=1)])  # type: ignore[list-item]
    try:
        with pytest.raises(ValueError):
            await asyncio.wait_for(await worker.batcher.submit(_tb([3, 4])), WAIT_S)
        assert worker.pool.busy() == 1  # the slot came back; the dispatcher holds it again
    finally:
        await _shutdown(worker)
