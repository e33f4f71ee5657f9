"""A pool of spawned worker processes joined to the event loop by socket pairs.

Why not concurrent.futures.ProcessPoolExecutor: each of its calls goes through a feeder
thread, a queue, a lock and a result thread, which cost the tokenizer service ~90 us of its own
CPU per call, against ~20 us for a socket round trip the event loop reads directly (its host
budget is ~50 us per item; DESIGN.md, "Host cost"). No library offers an asyncio-native process
pool with these failure rules, so this is written here:

- Processes are spawned, not forked: the parent may hold ONNX Runtime / PyTorch thread pools,
  which do not survive a fork. `init(arg)` runs first in each; what it returns is the process's
  ready value, and an error there fails `start()` with that error.
- Calls wait in one queue. A process that comes free takes its share of what waits, up to
  `_MAX_GROUP` calls and `_MAX_GROUP_BYTES` of payload, in one message, and answers them in
  one: under a backlog of small records the per-message syscalls and wake-ups are shared
  (measured on 20-query records: 54 -> 44 us of the service's CPU per query). The bound keeps
  what a group adds to its first call's latency to a few ms, and a lone big call goes alone.
- A process that dies (e.g. the OOM killer) fails only the calls it was sent; it is replaced
  and they are retried once, each alone; a call that kills a process twice is a poison
  message and fails with BrokenProcessPool.
- A cancelled caller's reply is still read (and dropped), so the socket stays in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import pickle
import socket
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)
T = TypeVar("T")
_FRAME = struct.Struct("<I")  # every message: its length, then a pickle
_SPAWN = multiprocessing.get_context("spawn")
_READ_LIMIT = 1 << 22  # stream buffer: a reply of a few MiB is read without pausing
_MAX_GROUP = 8  # calls sent to a process in one message
_MAX_GROUP_BYTES = 32 << 10  # ... and the payload they carry (the first call goes regardless)


# -- in the pool's processes -------------------------------------------------------------------
def _serve(sock: socket.socket, init: Callable[[Any], Any], arg: Any) -> None:
    """A pool process: run `init(arg)`, say so, then answer calls until EOF (or until the
    parent closes the pool while this process still works: it then ends quietly)."""
    try:
        reply: tuple[bool, Any] = (True, init(arg))
    except Exception as exc:  # reported to the parent, which refuses to start
        reply = (False, RuntimeError(f"{type(exc).__name__}: {exc}"))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(_frame(reply))
        if not reply[0]:
            return
        stream = sock.makefile("rb")
        while head := stream.read(_FRAME.size):
            replies = []
            for fn, args in pickle.loads(stream.read(_FRAME.unpack(head)[0])):
                try:
                    replies.append(_frame((True, fn(*args))))
                except Exception as exc:
                    replies.append(_frame((False, exc)))
            sock.sendall(b"".join(replies))  # one send, one wake-up of the parent, per message


def _frame(reply: tuple[bool, Any]) -> bytes:
    try:
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # an exception that does not pickle must not kill the process
        data = pickle.dumps((False, RuntimeError(f"unpicklable reply: {exc!r}")))
    return _FRAME.pack(len(data)) + data


# -- in the parent -----------------------------------------------------------------------------
class _ProcessDied(Exception):
    """The process went away during a call (EOF on its socket)."""


@dataclass(slots=True, eq=False)
class _Request:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    size: int  # bytes of record it carries
    future: asyncio.Future[Any]
    deaths: int = 0  # processes that died while it was sent to them


class _Slot:
    """One pool process (None until spawned, or after it died) and its socket."""

    def __init__(self) -> None:
        self.process: multiprocessing.process.BaseProcess | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def spawn(self, init: Callable[[Any], Any], arg: Any, name: str) -> Any:
        """Start the process and wait until `init(arg)` returned there: its value."""
        ours, theirs = socket.socketpair()
        process = _SPAWN.Process(target=_serve, args=(theirs, init, arg), daemon=True,
                                 name=name)
        try:
            process.start()
        finally:
            theirs.close()
        self.process = process
        try:
            self.reader, self.writer = await asyncio.open_connection(sock=ours,
                                                                     limit=_READ_LIMIT)
        except BaseException:  # e.g. cancelled: the socket must not outlive the call
            ours.close()
            raise
        try:
            ok, value = await self.receive()
        except _ProcessDied:
            raise RuntimeError(f"{name} process exited at start-up (exit code "
                               f"{await self.reap()}): see its error above") from None
        if not ok:
            await self.reap()
            raise RuntimeError(f"{name} process failed to start: {value}")
        return value

    def send(self, calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
        assert self.writer is not None
        data = pickle.dumps(calls, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(_FRAME.pack(len(data)) + data)

    async def receive(self) -> tuple[bool, Any]:
        assert self.reader is not None
        try:
            head = await self.reader.readexactly(_FRAME.size)
            data = await self.reader.readexactly(_FRAME.unpack(head)[0])
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _ProcessDied from exc
        try:
            return pickle.loads(data)  # type: ignore[no-any-return]
        except Exception as exc:  # e.g. an exception type that does not unpickle: this call
            # fails alone, and the stream stays in step (the frame was read whole)
            return False, RuntimeError(f"unreadable reply from a pool process: {exc!r}")

    async def reap(self) -> int | None:
        """Close the socket; end and join the process. Its exit code."""
        process, self.process = self.process, None
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()  # the process sees EOF and returns
        if process is None:
            return None
        await asyncio.to_thread(process.join, 5)  # join blocks: not on the loop
        if process.exitcode is None:
            process.kill()
            await asyncio.to_thread(process.join)
        return process.exitcode


class ProcessPool:
    """`processes` spawned processes, each set up by `init(arg)`; `call` is awaitable (see the
    module docstring for grouping and failures)."""

    def __init__(self, init: Callable[[Any], Any], arg: Any, processes: int = 2, *,
                 name: str = "pool") -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.init, self.arg, self.name = init, arg, name
        self.processes = processes
        self.restarts = 0
        self._slots: list[_Slot] = []
        self._idle: list[_Slot] = []
        self._pending: deque[_Request] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._started = False

    async def start(self) -> list[Any]:
        """Spawn the processes and wait until each is set up: their `init` values. A failing
        `init` (a broken tokenizer file) fails here, at start-up, not on the first call."""
        self._slots = [_Slot() for _ in range(self.processes)]
        try:
            spawned = await asyncio.gather(*(s.spawn(self.init, self.arg, self.name)
                                             for s in self._slots), return_exceptions=True)
        except BaseException:  # cancelled while starting: no process is left behind
            await asyncio.shield(self.close())
            raise
        failed = [r for r in spawned if isinstance(r, BaseException)]
        if failed:
            await self.close()
            raise failed[0]
        self._idle = list(self._slots)
        self._started = True
        return spawned

    async def close(self) -> None:
        self._started = False
        while self._pending:
            _fail(self._pending.popleft(), RuntimeError(f"{self.name} pool closed"))
        slots, self._slots, self._idle = self._slots, [], []
        await asyncio.gather(*(s.reap() for s in slots))
        await asyncio.gather(*self._running, return_exceptions=True)

    @property
    def pids(self) -> list[int]:
        """Process ids of the live processes (for logs, and tests that kill one)."""
        return [s.process.pid for s in self._slots
                if s.process is not None and s.process.pid is not None and s.process.is_alive()]

    async def call(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a pool process (fn and args picklable); `size`: the payload's bytes,
        for grouping."""
        return await self._call(size, fn, *args)

    async def _call(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        if not self._started:
            raise RuntimeError(f"{self.name} pool is not started")
        request = _Request(fn, args, size, asyncio.get_running_loop().create_future())
        self._pending.append(request)
        self._dispatch()
        # A cancelled caller cancels its future: still waiting, it is skipped; already sent,
        # its reply is read and dropped, so the socket stays in step.
        return await request.future  # type: ignore[no-any-return]

    def _dispatch(self) -> None:
        while self._idle and self._pending:
            share = min(_MAX_GROUP, -(-len(self._pending) // self.processes))
            group: list[_Request] = []
            size = 0
            while self._pending and len(group) < share:
                request = self._pending.popleft()
                if request.future.done():
                    continue
                # One that was in a dead process goes alone; a group stays small.
                if group and (request.deaths or size + request.size > _MAX_GROUP_BYTES):
                    self._pending.appendleft(request)
                    break
                group.append(request)
                size += request.size
                if request.deaths:
                    break
            if group:
                task = asyncio.ensure_future(self._run(self._idle.pop(), group))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _run(self, slot: _Slot, group: list[_Request]) -> None:
        try:
            if slot.process is None:  # its process died on an earlier call: replace it
                await slot.spawn(self.init, self.arg, self.name)
            slot.send([(r.fn, r.args) for r in group])
            for request in group:
                ok, value = await slot.receive()
                if not request.future.done():
                    if ok:
                        request.future.set_result(value)
                    else:
                        request.future.set_exception(value)
        except _ProcessDied:
            self._died(slot, group)
            if self._started:
                await slot.reap()
        except Exception as exc:  # a replacement failed to start
            for request in group:
                _fail(request, exc)
        finally:
            if self._started:
                self._idle.append(slot)
                self._dispatch()

    def _died(self, slot: _Slot, group: list[_Request]) -> None:
        if not self._started:
            for request in group:
                _fail(request, RuntimeError(f"{self.name} pool closed"))
            return
        self.restarts += 1
        log.error("process_pool.process_died", pool=self.name, restarts=self.restarts,
                  hint="a pool process died (OOM killer?); starting a new one")
        retry = []
        for request in group:
            if request.future.done():
                continue
            request.deaths += 1
            if request.deaths >= 2:
                _fail(request, BrokenProcessPool(
                    f"a {self.name} process died twice on this message (a poison message?)"))
            else:
                retry.append(request)
        self._pending.extendleft(reversed(retry))  # first in line, in their order


def _fail(request: _Request, exc: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(exc)
