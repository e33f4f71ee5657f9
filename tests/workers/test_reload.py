"""Hot-reload decisions and steps (pure logic: fake clock, fake engines, fake worker)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from engines.errors import ArtifactError
from engines.golden import GoldenReport
from tests.waiting import until
from workers.reload import (
    ReloadController,
    Reloader,
    ReloadSettings,
    in_window,
    parse_window,
)

NOON = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def test_windows_parse_and_wrap_midnight() -> None:
    assert parse_window("02:00-05:30") == (120, 330)
    night = parse_window("23:00-02:00")
    assert in_window(night, NOON.replace(hour=23, minute=30))
    assert in_window(night, NOON.replace(hour=1))
    assert not in_window(night, NOON)
    assert in_window(None, NOON)
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        parse_window("2am-5am")
    with pytest.raises(ValueError, match="quiet_load"):
        ReloadSettings(quiet_load=0)


def test_low_traffic_for_long_enough_starts_a_reload() -> None:
    c = ReloadController(ReloadSettings(quiet_s=10, deadline_s=3600))
    assert c.decide(0, 0.0, 0, NOON) == (False, "nothing pending")
    c.pending(0)
    assert not c.decide(0, 0.1, 0, NOON)[0]  # quiet, but only just
    assert not c.decide(5, 0.9, 0, NOON)[0]  # busy: the quiet stretch starts over
    assert not c.decide(6, 0.1, 0, NOON)[0]
    assert not c.decide(12, 0.1, 500, NOON)[0]  # a deep queue is not quiet either
    assert not c.decide(13, 0.1, 0, NOON)[0]
    go, reason = c.decide(23, 0.2, 0, NOON)
    assert go and "low traffic for 10 s" in reason


def test_past_the_deadline_it_takes_the_quietest_moment_it_saw() -> None:
    c = ReloadController(ReloadSettings(quiet_s=10, deadline_s=100))
    c.pending(0)
    for t, load in ((10, 0.8), (50, 0.5), (90, 0.9)):
        assert not c.decide(t, load, 0, NOON)[0]
    assert not c.decide(101, 0.7, 0, NOON)[0]  # overdue, but busier than 0.5 was
    go, reason = c.decide(102, 0.45, 0, NOON)
    assert go and "deadline" in reason


def test_outside_the_window_it_waits_however_quiet() -> None:
    c = ReloadController(ReloadSettings(quiet_s=1, window=parse_window("02:00-04:00")))
    c.pending(0)
    assert c.decide(0, 0.0, 0, NOON) == (False, "outside the reload window")
    assert c.decide(5, 0.0, 0, NOON) == (False, "outside the reload window")
    assert c.decide(6, 0.0, 0, NOON.replace(hour=3))[0]


def _manifest(version: str) -> SimpleNamespace:
    """v2-tok: another tokenizer; v2-head: another head; v2-torch: another backend;
    anything else: like v1."""
    return SimpleNamespace(version=version, max_length=128,
                           backend="torch" if "torch" in version else "onnxruntime",
                           tokenizer_id="tok-b" if "tok" in version else "tok-a",
                           head="classifier" if "head" in version else "similarity")


@dataclass
class FakeEngine:
    version: str
    closed: bool = False

    @property
    def manifest(self) -> SimpleNamespace:
        return _manifest(self.version)

    def close(self) -> None:
        self.closed = True

    def health(self) -> None:
        pass


class FakeWorker:
    def __init__(self) -> None:
        self.manifest = _manifest("v1")
        self.swapped: list[str] = []

    async def swap(self, engines: list[FakeEngine]) -> int:
        self.manifest = engines[0].manifest
        self.swapped.append(engines[0].version)
        return len(self.swapped)


def _reloader(pointer: list[str | None], *, ok: bool = True, load_error: bool = False,
              lease: object = None) -> tuple[Reloader, FakeWorker, list[FakeEngine]]:
    worker, loaded = FakeWorker(), []
    clock = SimpleNamespace(now=0.0)

    def load(path: Path, threads: int) -> list[FakeEngine]:
        assert threads is None  # as the serving engines
        if load_error:
            raise ArtifactError(path, "model.onnx: checksum mismatch")
        loaded.append(FakeEngine(path.name))
        return [loaded[-1]]

    def check(engine: FakeEngine) -> GoldenReport:
        return GoldenReport(ok=ok, metric="min_cosine", worst=1.0 if ok else 0.5, budget=0.995,
                            queries=32, seconds=0.01, reason="" if ok else "golden set off")

    reloader = Reloader(worker, lambda: None if pointer[0] is None else Path("/r") / pointer[0],
                        load, ReloadSettings(quiet_s=1, jitter_s=0), check=check,  # type: ignore[arg-type]
                        load_sample=lambda: (0.0, 0), lease=lease,  # type: ignore[arg-type]
                        clock=lambda: clock.now, verify=None,
                        manifest_of=lambda path: _manifest(path.name))  # type: ignore[arg-type,return-value]
    reloader.clock_state = clock  # type: ignore[attr-defined]
    return reloader, worker, loaded


async def _steps(reloader: Reloader, times: list[float]) -> list[bool]:
    out = []
    for t in times:
        reloader.clock_state.now = t  # type: ignore[attr-defined]
        out.append(await reloader.step())
    return out


async def test_a_promotion_is_loaded_checked_and_swapped_in_when_quiet() -> None:
    pointer: list[str | None] = ["v1"]
    reloader, worker, _ = _reloader(pointer)
    assert await _steps(reloader, [0, 1]) == [False, False]  # serving what is promoted
    pointer[0] = "v2"
    assert await _steps(reloader, [2]) == [False]
    assert reloader.stats.state == "pending" and reloader.stats.pending == "v2"
    assert await _steps(reloader, [2.5, 3]) == [False, True]  # quiet for quiet_s (1 s)
    assert worker.swapped == ["v2"] and reloader.stats.state == "serving"
    assert reloader.stats.reloads == 1
    assert set(reloader.stats.phases_s) >= {"verify", "load", "warmup", "check", "total"}
    assert await _steps(reloader, [5, 6]) == [False, False]  # nothing new


@pytest.mark.parametrize("failure", ["golden", "load"])
async def test_a_refused_version_leaves_the_old_one_serving_until_the_pointer_moves(
        failure: str) -> None:
    pointer: list[str | None] = ["v2"]
    reloader, worker, loaded = _reloader(pointer, ok=failure != "golden",
                                         load_error=failure == "load")
    assert await _steps(reloader, [0, 1, 2, 3, 4]) == [False] * 5
    assert worker.swapped == [] and worker.manifest.version == "v1"
    assert reloader.stats.refused == 1 and reloader.stats.state == "serving"
    assert ("golden set off" if failure == "golden" else "checksum mismatch") in (
        reloader.stats.last_reason)
    assert all(e.closed for e in loaded)  # a refused engine is closed, not leaked
    pointer[0] = "v1"  # rolled back, then promoted again: tried again
    await _steps(reloader, [5])
    pointer[0] = "v2"
    await _steps(reloader, [6, 7, 8])
    assert reloader.stats.refused == 2


class FakeLease:
    def __init__(self, free: bool = True, down: bool = False) -> None:
        self.free, self.down, self.released = free, down, 0

    async def acquire(self) -> bool:
        if self.down:
            raise ConnectionError("redis is down")
        return self.free

    async def release(self) -> None:
        self.released += 1

    async def close(self) -> None:
        pass


async def test_the_fleet_lease_limits_reloads_and_a_lease_store_outage_never_stalls() -> None:
    pointer: list[str | None] = ["v2"]
    busy = FakeLease(free=False)
    reloader, worker, _ = _reloader(pointer, lease=busy)
    await _steps(reloader, [0, 1, 2, 3])
    assert worker.swapped == [] and reloader.stats.state == "pending"  # waiting its turn
    busy.free = True
    await _steps(reloader, [4])
    assert worker.swapped == ["v2"] and busy.released == 1
    down = FakeLease(down=True)
    reloader, worker, _ = _reloader(pointer, lease=down)
    await _steps(reloader, [0, 1, 2])
    assert worker.swapped == ["v2"]  # jitter (0 here) instead of the lease


async def test_checksums_are_verified_paced_as_soon_as_a_version_is_promoted() -> None:
    pointer: list[str | None] = ["v2"]
    reloader, worker, loaded = _reloader(pointer)
    calls: list[tuple[Path, float]] = []

    def verify(path: Path, *, max_bytes_per_s: float) -> None:
        calls.append((path, max_bytes_per_s))
        raise ArtifactError(path, "model.onnx: checksum mismatch")

    reloader.verify = verify
    assert await _steps(reloader, [0]) == [False]  # refused at once, before any window
    assert calls == [(Path("/r/v2"), 100e6)] and loaded == [] and worker.swapped == []
    assert "verification failed" in reloader.stats.last_reason


async def test_another_tokenizer_loads_at_once_without_a_lease_and_another_head_is_refused(
        ) -> None:
    pointer: list[str | None] = ["v2-tok"]
    busy = FakeLease(free=False)
    reloader, worker, _ = _reloader(pointer, lease=busy)
    reloader.load_sample = lambda: (0.95, 5000)  # busy: a same-tokenizer version would wait
    assert await _steps(reloader, [0]) == [True]  # the tokenizers switch now: so does it
    assert worker.swapped == ["v2-tok"] and reloader.stats.transitions == 1
    assert busy.released == 0  # no lease taken: waiting would hold the new TokenBatches
    pointer[0] = "v3-head"
    assert await _steps(reloader, [1, 2, 3]) == [False] * 3
    assert worker.swapped == ["v2-tok"] and reloader.stats.refused == 1
    assert "head" in reloader.stats.last_reason and "restart" in reloader.stats.last_reason
    pointer[0] = "v4-torch"  # a worker's devices and options are for its own backend
    assert await _steps(reloader, [4]) == [False]
    assert reloader.stats.refused == 2 and "--backend torch" in reloader.stats.last_reason


async def test_a_tokenbatch_of_a_promotion_not_polled_yet_makes_the_reloader_poll() -> None:
    pointer: list[str | None] = ["v1"]
    reloader, worker, _ = _reloader(pointer)
    reloader.load = lambda path, threads: [FakeEngine(path.name)]  # type: ignore[assignment]
    pointer[0] = "v2-tok"
    task = asyncio.create_task(reloader.run())
    try:
        # The run loop polls at once; whether or not that poll saw the promotion, asking
        # wakes it, so the answer never waits for poll_s (5 s by default).
        assert await asyncio.wait_for(reloader.expecting("tok-b"), 2) in (True, False)
        await asyncio.wait_for(until(lambda: worker.swapped == ["v2-tok"]), 2)
        assert await asyncio.wait_for(reloader.expecting("tok-z"), 2) is False
    finally:
        task.cancel()


async def test_on_cpu_the_golden_check_runs_on_a_one_thread_session_of_its_own() -> None:
    pointer: list[str | None] = ["v2"]
    reloader, worker, loaded = _reloader(pointer)
    worker.devices = lambda: ["cpu"]  # type: ignore[attr-defined]
    checked: list[tuple[FakeEngine, int | None]] = []
    checkers: list[FakeEngine] = []

    def load_on(path: Path, threads: int | None, device: str) -> FakeEngine:
        checkers.append(FakeEngine(path.name))
        checkers[-1].threads = threads  # type: ignore[attr-defined]
        return checkers[-1]

    original = reloader.check
    reloader.check = lambda e: (checked.append((e, e.threads)), original(e))[1]  # type: ignore[assignment,attr-defined,misc]
    reloader.load_on = load_on  # type: ignore[assignment]
    assert await _steps(reloader, [0, 1, 2]) == [False, False, True]
    assert checked == [(checkers[0], 1)]  # not on the serving engines' threads
    assert checkers[0].closed and not loaded[0].closed and worker.swapped == ["v2"]
    assert {"check_load", "check", "warmup"} <= set(reloader.stats.phases_s)


async def test_a_version_that_does_not_fit_on_a_single_device_is_refused_with_the_figures(
        ) -> None:
    from engines.memory import InsufficientMemory

    pointer: list[str | None] = ["v2"]
    reloader, worker, _ = _reloader(pointer)

    def load(path: Path, threads: int | None) -> list[FakeEngine]:
        raise InsufficientMemory(f"{path}: the engine needs about 400 MiB but the host has "
                                 "300 MiB free")

    reloader.load = load  # type: ignore[assignment]
    assert await _steps(reloader, [0, 1, 2, 3]) == [False] * 4
    assert worker.swapped == [] and worker.manifest.version == "v1"
    assert reloader.stats.refused == 1 and reloader.stats.rolling == 0
    assert "400 MiB" in reloader.stats.last_reason and "single device" in (
        reloader.stats.last_reason)
