"""Hot reloads: a worker follows its model's promoted version and swaps it in while serving,
in a low-traffic window, after loading it off the serving path and checking it.

When `current` in the engine registry names another version than the one serving (polled: the
registry is a plain directory tree that may sit on a shared filesystem, and reading one small
file every few seconds costs nothing; a control topic would add a second source of truth that
can disagree with the directory), the reload is *pending*. The ReloadController decides when:

- traffic is low: the worker's measured arrival rate below `quiet_load` of its measured
  capacity, with a shallow queue, for `quiet_s` in a row (and inside the UTC `window`, if
  one is set);
- or the `deadline_s` since the promotion has passed: then at the first moment at least as
  quiet as the quietest seen while waiting.

Fleet-wide, at most `max_concurrent` workers reload at once: a lease in Redis (SET NX with a
timeout, so a worker that dies mid-reload frees it); without Redis, or with Redis down, a
random delay of up to `jitter_s` instead, never a stall.

A version with another tokenizer (or max length) is a *transition*: the tokenizer services
switch to it at the promotion, so its TokenBatches arrive at once. It is loaded as soon as it
is verified (no quiet window, no lease: waiting would hold those records), and the worker keeps
the old engines for the old tokenizer's TokenBatches still in the topics (ScoringWorker.swap).
A version with another head is refused: its scores mean something else (restart onto it).

Loading runs in a thread (GPU runtimes copy at a capped byte rate on a low-priority stream),
then the golden check (engines.golden); a version that does not fit in memory, fails to load
or fails its check is refused: the old one keeps serving, and the reason is logged, counted
and exported. Every step is logged, and timed per phase (the engines' own load phases too).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from engines.errors import EngineError
from engines.manifest import Manifest, read_manifest, swap_blockers, verify_artifact
from engines.memory import InsufficientMemory
from engines.protocol import Engine

log = structlog.get_logger(__name__)

STATES = ("serving", "pending", "loading", "checking", "swapping")


@dataclass(frozen=True, slots=True)
class ReloadSettings:
    poll_s: float = 5.0  # how often the registry's pointer is read
    quiet_load: float = 0.3  # arrival rate / capacity below which traffic is low
    quiet_depth: int = 64  # queued sequences at most, to count as quiet
    quiet_s: float = 10.0  # low traffic for this long before a reload starts
    deadline_s: float = 3600.0  # then reload at the quietest moment seen so far
    window: tuple[int, int] | None = None  # UTC minutes of the day [start, end); wraps
    max_concurrent: int = 1  # workers of the fleet reloading at once (Redis lease)
    lease_s: float = 600.0  # a lease's timeout (a reload that died frees it)
    jitter_s: float = 30.0  # without a lease store: a random delay before loading
    # Engine threads of the new version; None: as the serving engines. ONNX Runtime fixes a
    # session's threads when it is built, so fewer here would serve with fewer for good.
    threads: int | None = None
    # GPU runtimes copy the new weights to the device at most this fast (MB/s; None: as fast
    # as the bus goes), in chunks on a low-priority stream, beside the serving engine's copies.
    copy_mb_per_s: float | None = 1000.0
    # CPU engines: the golden check runs on a session of its own with this many threads
    # (None: on the new serving engines). The check is the longest step in the window, and
    # on the serving engines' threads it takes every core from the engines still serving.
    check_threads: int | None = 1
    # Checksums of a promoted version are verified as soon as it is seen, paced at this rate
    # (a burst of hashing beside the serving engines is a latency spike on a small host).
    verify_mb_per_s: float = 100.0

    def __post_init__(self) -> None:
        for name in ("poll_s", "quiet_s", "deadline_s", "lease_s", "verify_mb_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if not 0 < self.quiet_load <= 1:
            raise ValueError("quiet_load must be in (0, 1]")
        if self.max_concurrent < 1 or self.quiet_depth < 0 or (
                self.threads is not None and self.threads < 1):
            raise ValueError("max_concurrent and threads must be >= 1, quiet_depth >= 0")
        if self.copy_mb_per_s is not None and self.copy_mb_per_s <= 0:
            raise ValueError("copy_mb_per_s must be > 0 (or None: unpaced)")
        if self.jitter_s < 0:
            raise ValueError("jitter_s must be >= 0")
        if self.window is not None and not all(0 <= m < 1440 for m in self.window):
            raise ValueError("window minutes must be in 0..1439")


def parse_window(text: str) -> tuple[int, int]:
    """"HH:MM-HH:MM" (UTC) -> minutes of the day; ValueError names what is wrong."""
    try:
        start, end = (datetime.strptime(part.strip(), "%H:%M") for part in text.split("-"))
    except ValueError:
        raise ValueError(f"expected HH:MM-HH:MM (UTC), got {text!r}") from None
    return start.hour * 60 + start.minute, end.hour * 60 + end.minute


def in_window(window: tuple[int, int] | None, now_utc: datetime) -> bool:
    if window is None:
        return True
    minute = now_utc.hour * 60 + now_utc.minute
    start, end = window
    return start <= minute < end if start <= end else (minute >= start or minute < end)


@dataclass(slots=True)
class ReloadController:
    """When to reload: fed the worker's load every poll, says go or not, and why."""

    settings: ReloadSettings
    pending_since: float | None = None
    quiet_since: float | None = None
    quietest: float = float("inf")  # lowest load seen while pending

    def pending(self, now: float) -> None:
        if self.pending_since is None:
            self.pending_since, self.quiet_since, self.quietest = now, None, float("inf")

    def reset(self) -> None:
        self.pending_since = self.quiet_since = None
        self.quietest = float("inf")

    def decide(self, now: float, load: float, depth: int,
               now_utc: datetime | None = None) -> tuple[bool, str]:
        """(go, reason) for a reload pending since `pending`; `load` = arrival rate /
        capacity (0 when idle), `depth` = queued sequences."""
        s = self.settings
        if self.pending_since is None:
            return False, "nothing pending"
        quiet = load < s.quiet_load and depth <= s.quiet_depth
        self.quiet_since = (self.quiet_since or now) if quiet else None
        windowed = in_window(s.window, now_utc or datetime.now(UTC))
        if self.quiet_since is not None and now - self.quiet_since >= s.quiet_s and windowed:
            return True, f"low traffic for {now - self.quiet_since:.0f} s (load {load:.2f})"
        overdue = now - self.pending_since >= s.deadline_s
        at_least_as_quiet = load <= self.quietest
        self.quietest = min(self.quietest, load)
        if overdue and at_least_as_quiet:
            return True, (f"deadline of {s.deadline_s:.0f} s passed; the quietest moment so "
                          f"far (load {load:.2f})")
        return False, "waiting for low traffic" if windowed else "outside the reload window"


class Lease(Protocol):
    async def acquire(self) -> bool: ...
    async def release(self) -> None: ...
    async def close(self) -> None: ...


class RedisLease:
    """One of `slots` fleet-wide reload slots in Redis (SET NX PX): at most that many workers
    reload at once; a slot held by a worker that died expires after `lease_s`. Redis down or
    not configured: acquire() says False and the caller falls back to jitter."""

    def __init__(self, redis: Any, key: str, slots: int, lease_s: float) -> None:
        self.redis, self.key, self.slots, self.lease_s = redis, key, slots, lease_s
        self.token = uuid.uuid4().hex
        self.held: str | None = None

    async def acquire(self) -> bool:
        for slot in range(self.slots):
            name = f"{self.key}:{slot}"
            if await self.redis.set(name, self.token, nx=True, px=int(self.lease_s * 1000)):
                self.held = name
                return True
        return False

    async def release(self) -> None:
        name, self.held = self.held, None
        if name is not None:
            # Only our own lease: after a timeout another worker may hold the slot now.
            await self.redis.eval(_RELEASE, 1, name, self.token)

    async def close(self) -> None:
        await self.redis.aclose()


_RELEASE = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
            "return redis.call('DEL', KEYS[1]) end return 0")


class Swappable(Protocol):
    manifest: Any

    async def swap(self, engines: list[Engine]) -> int: ...


class Outcomes:
    """Wakes everyone waiting for the next reload outcome (a swap or a refusal)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass(slots=True)
class ReloadStats:
    state: str = "serving"
    serving: str = ""
    pending: str = ""
    pending_since: float = 0.0  # unix seconds; 0 when nothing is pending
    reloads: int = 0
    refused: int = 0
    transitions: int = 0  # reloads onto another tokenizer (both served for a while)
    rolling: int = 0  # reloads one device at a time (both versions did not fit side by side)
    last_reason: str = ""
    phases_s: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {"reload_state": float(STATES.index(self.state)),
                "reload_pending_since": self.pending_since, "reloads": float(self.reloads),
                "reloads_refused": float(self.refused),
                "reload_transitions": float(self.transitions),
                "reloads_rolling": float(self.rolling),
                **{f"reload_{k}_s": v for k, v in self.phases_s.items()}}


class Reloader:
    """Follows `current(model)` for a worker; see the module docstring."""

    def __init__(self, worker: Swappable, current: Callable[[], Path | None],
                 load: Callable[[Path, int | None], list[Engine]], settings: ReloadSettings, *,
                 load_sample: Callable[[], tuple[float, int]],
                 lease: Lease | None = None, clock: Callable[[], float] = time.monotonic,
                 check: Callable[[Engine], Any] | None = None,
                 verify: Callable[..., Any] | None = verify_artifact,
                 manifest_of: Callable[[Path], Manifest] = read_manifest,
                 load_on: Callable[[Path, int | None, str], Engine] | None = None) -> None:
        """`current()` is the promoted artifact (None: none); `load(path, threads)` loads the
        worker's engines of it without verifying checksums again (blocking: run in a
        thread); `load_sample()` is (load fraction, queue depth) now; `check(engine)` is the
        golden check (engines.golden.check_golden); `load_on(path, threads, device)` loads
        one engine on one device (a rolling reload, when both versions do not fit)."""
        self.worker, self.current, self.load, self.settings = worker, current, load, settings
        self.load_sample, self.lease, self.clock = load_sample, lease, clock
        self.check, self.verify, self.manifest_of = check, verify, manifest_of
        self.load_on = load_on
        self.controller = ReloadController(settings)
        self.pending_manifest: Manifest | None = None
        self.transition = False  # the pending version has another tokenizer: load at once
        self.outcomes = Outcomes()  # fired at each swap or refusal
        self._wake = asyncio.Event()
        self._polled = Outcomes()  # fired after each poll
        self.stats = ReloadStats(serving=worker.manifest.version)
        self._refused: set[str] = set()  # versions refused (until the pointer moves again)
        self._verify_s = 0.0

    async def close(self) -> None:
        if self.lease is not None:
            with contextlib.suppress(Exception):
                await self.lease.close()

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never take the worker down: log, and poll again
                log.error("reload_error", error=f"{type(exc).__name__}: {exc}")
            self._polled.fire()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)
            self._wake.clear()

    async def expecting(self, tokenizer_id: str) -> bool:
        """Is a version of this tokenizer on its way (pending, loading)? A TokenBatch of an
        unknown tokenizer may be the first of a promotion not polled yet: poll now, once
        (bounded: a reloader that is not running, or stuck, answers from what it knows)."""
        if self._expects(tokenizer_id):
            return True
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._polled.wait(), 2 * self.settings.poll_s + 10)
        return self._expects(tokenizer_id)

    def _expects(self, tokenizer_id: str) -> bool:
        m = self.pending_manifest
        return (m is not None and m.tokenizer_id == tokenizer_id
                and self.stats.pending == m.version)

    async def step(self) -> bool:
        """One poll: notice a promotion, decide, maybe reload. True when it swapped."""
        path = await asyncio.to_thread(self.current)
        version = path.name if path is not None else None
        serving = self.worker.manifest.version
        if version not in self._refused:  # the pointer moved on: a refusal is forgotten
            self._refused.clear()
        if version is None or version == serving or version in self._refused:
            if self.stats.state == "pending":
                log.info("reload_cancelled", serving=serving, promoted=version)
            self.controller.reset()
            self.stats.state, self.stats.pending, self.stats.pending_since = "serving", "", 0.0
            self.pending_manifest = None
            return False
        assert path is not None
        now = self.clock()
        if self.stats.state != "pending" or self.stats.pending != version:
            self.controller.reset()
            self.controller.pending(now)
            self.stats.state, self.stats.pending = "pending", version
            self.stats.pending_since = time.time()
            if not await self._notice(path, version):
                return False
        if self.transition:
            log.info("reload_start", serving=serving, promoted=version, reason=(
                "another tokenizer: the tokenizer services switch at the promotion, so its "
                "TokenBatches arrive now (loaded at once, without waiting for a lease)"))
            return await self._load_check_swap(path, version)
        load, depth = self.load_sample()
        go, reason = self.controller.decide(now, load, depth)
        if not go:
            return False
        log.info("reload_start", serving=serving, promoted=version, reason=reason)
        return await self._reload(path, version)

    async def _notice(self, path: Path, version: str) -> bool:
        """A newly promoted version: read its manifest (head and tokenizer), verify it."""
        try:
            new = await asyncio.to_thread(self.manifest_of, path)
        except EngineError as exc:
            return self._refuse(version, f"unreadable manifest: {exc}")
        clash = swap_blockers(self.worker.manifest, new)
        self.pending_manifest, self.transition = new, bool(clash)
        log.info("reload_pending", serving=self.worker.manifest.version, promoted=version,
                 differs=clash or None)
        serving = self.worker.manifest
        if new.backend != serving.backend:
            return self._refuse(version, (
                f"it is a {new.backend} engine and this worker runs {serving.backend} "
                f"engines (its devices and options are for those): start workers with "
                f"--backend {new.backend} for it"))
        if "head" in clash:
            return self._refuse(version, (
                f"its head ({new.head}) differs from the serving version's "
                f"({self.worker.manifest.head}): its scores mean something else, so it is not "
                "swapped in while serving (restart the fleet onto it)"))
        return await self._verify(path, version)

    async def _reload(self, path: Path, version: str) -> bool:
        held = False
        try:
            if self.lease is not None:
                try:
                    held = await self.lease.acquire()
                except Exception as exc:  # the lease store is down: jitter, never a stall
                    log.warning("reload_lease_unavailable", error=f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(random.uniform(0, self.settings.jitter_s))
                else:
                    if not held:
                        log.info("reload_waiting_for_lease", promoted=version)
                        return False
            elif self.settings.jitter_s:
                await asyncio.sleep(random.uniform(0, self.settings.jitter_s))
            return await self._load_check_swap(path, version)
        finally:
            if held and self.lease is not None:
                with contextlib.suppress(Exception):
                    await self.lease.release()

    async def _verify(self, path: Path, version: str) -> bool:
        """Checksums, paced, while the version waits for its window (refused on mismatch)."""
        if self.verify is None:
            return True
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self.verify, path,
                                    max_bytes_per_s=self.settings.verify_mb_per_s * 1e6)
        except EngineError as exc:
            return self._refuse(version, f"verification failed: {exc}")
        self._verify_s = time.perf_counter() - started
        return True

    async def _load_check_swap(self, path: Path, version: str) -> bool:
        phases: dict[str, float] = {"verify": self._verify_s}
        started = time.perf_counter()
        self.stats.state = "loading"
        try:  # verified already: the load does not hash the files again
            engines = await _in_thread(self.load, path, self.settings.threads)
        except InsufficientMemory as exc:  # both versions do not fit side by side
            if self.load_on is not None and len(set(_devices(self.worker))) > 1:
                return await self._rolling(path, version, phases, started, exc)
            return self._refuse(version, f"load failed: {exc} (a single device: the new "
                                         "version cannot be loaded beside the serving one)")
        except EngineError as exc:  # mismatched, unreadable: refused
            return self._refuse(version, f"load failed: {exc}")
        phases["load"] = time.perf_counter() - started
        apart = self._separate_check()
        try:
            if apart:
                await self._check_apart(path, phases, engines)
            await self._prepare(engines, phases, check=not apart)
        except _Refused as exc:
            return self._refuse(version, str(exc))
        self.stats.state = "swapping"
        try:
            await self.worker.swap(engines)  # closes them if it refuses
        except ValueError as exc:  # another head: restart onto it
            return self._refuse(version, str(exc))
        return self._done(version, phases, started)

    def _separate_check(self) -> bool:
        return (self.settings.check_threads is not None and self.load_on is not None
                and self.check is not None and set(_devices(self.worker)) == {"cpu"})

    async def _check_apart(self, path: Path, phases: dict[str, float],
                           engines: list[Engine]) -> None:
        """The golden check on a session of `check_threads` (CPU), closed after it."""
        assert self.load_on is not None and self.check is not None
        began = time.perf_counter()
        try:
            checker = await _in_thread(self.load_on, path, self.settings.check_threads, "cpu")
        except EngineError as exc:
            _close_all(engines)
            raise _Refused(f"load failed: {exc}") from None
        phases["check_load"] = time.perf_counter() - began
        self.stats.state = "checking"
        try:
            report = await asyncio.to_thread(self.check, checker)
        finally:
            _close_all([checker])
        phases["check"] = report.seconds
        if not report.ok:
            _close_all(engines)
            raise _Refused(report.reason)

    async def _prepare(self, engines: list[Engine], phases: dict[str, float], *,
                       check: bool = True) -> None:
        """Warm up and golden-check loaded engines, timing each phase; _Refused (the engines
        closed) when one fails."""
        for engine in engines:  # the runtime's own phases (read, copy, build, capture, ...)
            for name, seconds in getattr(engine, "load_phases", {}).items():
                if name != "verify":  # verified before the window
                    phases[f"load_{name}"] = phases.get(f"load_{name}", 0.0) + seconds
        warm = time.perf_counter()
        try:
            for engine in engines:
                await asyncio.to_thread(engine.health)
        except EngineError as exc:
            _close_all(engines)
            raise _Refused(f"warm-up failed: {exc}") from None
        phases["warmup"] = phases.get("warmup", 0.0) + time.perf_counter() - warm
        if check and self.check is not None:
            self.stats.state = "checking"
            report = await asyncio.to_thread(self.check, engines[0])
            phases["check"] = report.seconds
            if not report.ok:
                _close_all(engines)
                raise _Refused(report.reason)

    async def _rolling(self, path: Path, version: str, phases: dict[str, float],
                       started: float, why: EngineError) -> bool:
        """Both versions do not fit on a device: one device at a time, while the others
        serve. The first device's old engine is closed, the new one loaded and checked there
        and swapped in (the old version keeps its other devices until its queued batches are
        done, then they are freed), then the new version is loaded on each other device."""
        worker: Any = self.worker
        devices: list[str] = _devices(worker)
        first, rest = devices[0], devices[1:]
        old_path = worker.serving_path()
        log.warning("reload_rolling", promoted=version, devices=devices,
                    reason=f"both versions do not fit side by side: {why}")
        await worker.remove_device(first)
        assert self.load_on is not None
        try:
            try:
                engine = await _in_thread(self.load_on, path, self.settings.threads, first)
            except EngineError as exc:
                raise _Refused(f"load on {first} failed: {exc}") from None
            phases["load"] = time.perf_counter() - started
            await self._prepare([engine], phases)
        except _Refused as exc:
            await self._restore(old_path, first)
            return self._refuse(version, f"rolling reload, {exc}")
        self.stats.state = "swapping"
        try:
            await worker.swap([engine])
        except ValueError as exc:
            await self._restore(old_path, first)
            return self._refuse(version, str(exc))
        await worker.retired()  # the old version's engines on the other devices are freed
        for device in rest:
            self.stats.state = "loading"
            try:
                try:
                    more = await _in_thread(self.load_on, path, self.settings.threads, device)
                except EngineError as exc:
                    raise _Refused(f"load failed: {exc}") from None
                await self._prepare([more], phases, check=False)
            except _Refused as exc:  # serving on fewer devices beats not serving
                self.stats.last_reason = f"{version} on {device}: {exc}"
                log.error("reload_device_failed", version=version, device=device,
                          reason=str(exc), serving_on=_devices(worker))
                continue
            worker.add_engines([more])
        self.stats.rolling += 1
        return self._done(version, phases, started)

    async def _restore(self, old_path: Path | None, device: str) -> None:
        """Put the serving version back on `device` after a failed rolling step."""
        try:
            if old_path is None or self.load_on is None:
                raise EngineError("no artifact to reload the serving version from")
            engine = await _in_thread(self.load_on, old_path, self.settings.threads, device)
            self.worker.add_engines([engine])  # type: ignore[attr-defined]
        except Exception as exc:
            log.error("reload_restore_failed", device=device,
                      error=f"{type(exc).__name__}: {exc}", serving_on=_devices(self.worker))

    def _done(self, version: str, phases: dict[str, float], started: float) -> bool:
        phases["total"] = time.perf_counter() - started
        self.stats.phases_s = {k: round(v, 3) for k, v in phases.items()}
        self.stats.reloads += 1
        self.stats.transitions += self.transition
        self.stats.serving, self.stats.pending, self.stats.pending_since = version, "", 0.0
        self.stats.state = "serving"
        self.controller.reset()
        self.pending_manifest, self.transition = None, False
        self.outcomes.fire()
        log.info("reload_done", serving=version, **self.stats.phases_s)
        return True

    def _refuse(self, version: str, reason: str) -> bool:
        self._refused.add(version)
        self.stats.refused += 1
        self.stats.last_reason = reason
        self.stats.state, self.stats.pending, self.stats.pending_since = "serving", "", 0.0
        self.controller.reset()
        self.pending_manifest, self.transition = None, False
        self.outcomes.fire()
        log.error("reload_refused", version=version, serving=self.worker.manifest.version,
                  reason=reason)
        return False


class _Refused(Exception):
    """A loaded version failed a step; the message is the reason."""


def _devices(worker: Any) -> list[str]:
    return worker.devices() if hasattr(worker, "devices") else []


def _close_all(engines: list[Engine]) -> None:
    for engine in engines:
        with contextlib.suppress(Exception):
            engine.close()


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a thread; cancelled (the worker is stopping), what it loads is closed
    when it returns, not leaked."""
    loading = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(loading)
    except asyncio.CancelledError:
        loading.add_done_callback(_close_loaded)
        raise


def _close_loaded(loading: asyncio.Future[Any]) -> None:
    if not loading.cancelled() and loading.exception() is None:
        result = loading.result()
        _close_all(result if isinstance(result, list) else [result])
