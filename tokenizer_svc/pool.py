"""TokenizerPool: tokenizer processes, each holding one QueryTokenizer, joined to the event loop.

Everything whose cost grows with the message runs here, never on the loop: decoding and
validating a QueryBatch (up to max_message_bytes of JSON), hashing its cache keys, tokenizing,
and packing TokenBatches (split so that each fits the message limits). A stalled loop would
miss consumer heartbeats; with 1 s group sessions, one 1 MiB message could cost a partition.

What crosses the process boundary is bytes, not one Python object per item: the tokenizer's
budget is ~50 us of host CPU per item (DESIGN.md, "Host cost"), and pickling QueryItems both
ways cost more than decoding the record twice. So:
- `prepare(record)` decodes and hashes, and returns a `Prepared`: the header fields the
  service routes by, the item ids, and every digest as one blob (`BatchKeys`). When the caller
  says the cache cannot hit, the same call also tokenizes and packs, so a record costs one
  round trip.
- `tokenize(record, keys, items)` sends the raw record again with the indices of the items to
  tokenize; the process decodes it again (validated once already) rather than receiving
  pickled items.

Each process is a plain spawned process on a socket pair that the event loop reads: no
executor threads, queues or locks between the loop and the processes (a ProcessPoolExecutor
call cost ~90 us of the service's CPU; a socket round trip ~20 us), and calls that queue up are
sent to a free process together (see TokenizerPool). Processes are spawned, not forked: the
parent may hold ONNX Runtime / PyTorch thread pools, which do not survive a fork. A process
that dies (e.g. the OOM killer) fails only the calls it was sent; it is replaced and they are
retried once, so one lost process does not dead-letter anything; a message that kills a
process twice is a poison message and fails.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import structlog

from engines.tokenizer import QueryTokenizer
from plumbing.procs import die_with_parent
from schemas import (
    EmbeddingFormat,
    Limits,
    Priority,
    QueryBatch,
    QueryItem,
    SchemaError,
    TokenBatch,
    decode_query_batch,
    encode_token_batch,
)
from tokenizer_svc.units import BatchKeys, batch_keys

log = structlog.get_logger(__name__)
T = TypeVar("T")
_FRAME = struct.Struct("<I")  # every message: its length, then a pickle
_SPAWN = multiprocessing.get_context("spawn")
_READ_LIMIT = 1 << 22  # stream buffer: a reply of a few MiB is read without pausing
_MAX_GROUP = 8  # calls sent to a process in one message
_MAX_GROUP_BYTES = 32 << 10  # ... and the records they carry (the first call goes regardless)


class TokenizeError(ValueError):
    """Items that cannot become a TokenBatch within the message limits."""


@dataclass(frozen=True, slots=True)
class TokenizerSpec:
    """What each process builds its tokenizer from (picklable, sent once per process)."""

    tokenizer_json: Path
    max_length: int
    pairs: bool  # classifier head: (query, doc) pairs
    model_version: str  # part of every cache key
    limits: Limits
    # How the scores carry embeddings when a QueryBatch does not say (the fleet's default).
    embedding_format: EmbeddingFormat = "float"


@dataclass(frozen=True, slots=True)
class Tokenized:
    """Encoded TokenBatches (same batch_id) for some items, each within the message limits."""

    messages: tuple[bytes, ...]
    sequences: int
    truncated: int
    tokenize_ms: float  # in the tokenizer process: tokenize + pack


@dataclass(frozen=True, slots=True)
class Prepared:
    """A decoded QueryBatch as the service needs it: header fields, item ids, every unit's
    digest; and, when the call tokenized too, its TokenBatches or why they could not be made
    (raised by the service once the record's reply topic is checked, as on the two-call
    path)."""

    batch_id: str
    submitted_at: float
    reply_topic: str | None
    priority: Priority
    item_ids: tuple[str, ...]
    keys: BatchKeys
    embedding_format: EmbeddingFormat  # the batch's own, or the fleet's default
    tokenized: Tokenized | None = None
    tokenize_error: Exception | None = None

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def token_priority(priority: Priority, offline_topic: bool) -> Priority:
    """A record from the offline query topic is offline work whatever it says."""
    return "offline" if offline_topic else priority


# -- in the tokenizer processes ----------------------------------------------------------------
_state: tuple[TokenizerSpec, QueryTokenizer] | None = None


def _init_process(spec: TokenizerSpec) -> None:
    global _state
    # A SIGKILLed service must not leave its pool processes running.
    die_with_parent(multiprocessing.parent_process().pid)  # type: ignore[union-attr]
    # Ctrl-C reaches the whole process group; only the parent decides when to stop (it drains
    # first), so children must not die mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The processes are the parallelism: rayon threads inside each would only burn CPU
    # (measured: ~25 -> ~18 us of CPU per short query). Read by `tokenizers` at encode time.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _state = (spec, QueryTokenizer(spec.tokenizer_json, spec.max_length, pairs=spec.pairs))


def _current() -> tuple[TokenizerSpec, QueryTokenizer]:
    if _state is None:
        raise RuntimeError("tokenizer process not initialised")
    return _state


def _serve(sock: socket.socket, spec: TokenizerSpec) -> None:
    """A tokenizer process: build the tokenizer, say so, then answer calls until EOF."""
    try:
        _init_process(spec)
        reply: tuple[bool, Any] = (True, (os.getpid(), _current()[1].tokenizer_id))
    except Exception as exc:  # reported to the parent, which refuses to start
        reply = (False, RuntimeError(f"{type(exc).__name__}: {exc}"))
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


def prepare_batch(data: bytes, limits: Limits, model_version: str) -> tuple[QueryBatch,
                                                                           BatchKeys]:
    """Decode (raises SchemaError) and compute every unit's cache digest."""
    batch = decode_query_batch(data, limits)
    return batch, batch_keys(batch.items, model_version)


def _prepare(data: bytes, offline_topic: bool, tokenize_upto: int) -> Prepared:
    spec, tokenizer = _current()
    batch, keys = prepare_batch(data, spec.limits, spec.model_version)
    fmt = batch.embedding_format or spec.embedding_format
    tokenized, error = None, None
    if len(batch.items) <= tokenize_upto:
        try:
            tokenized = tokenize_items(
                tokenizer, spec.limits, batch.batch_id, batch.items, keys,
                submitted_at=batch.submitted_at, reply_topic=batch.reply_topic,
                priority=token_priority(batch.priority, offline_topic), embedding_format=fmt)
        except Exception as exc:
            error = exc
    return Prepared(batch_id=batch.batch_id, submitted_at=batch.submitted_at,
                    reply_topic=batch.reply_topic, priority=batch.priority,
                    item_ids=tuple(it.id for it in batch.items), keys=keys,
                    embedding_format=fmt, tokenized=tokenized, tokenize_error=error)


def tokenize_items(tokenizer: QueryTokenizer, limits: Limits, batch_id: str,
                   items: Sequence[QueryItem], keys: BatchKeys, *,
                   submitted_at: float, reply_topic: str | None = None,
                   priority: Priority = "online",
                   embedding_format: EmbeddingFormat = "float") -> Tokenized:
    """Tokenize `items` into encoded TokenBatches carrying each sequence's cache key."""
    started = time.perf_counter()
    tb = tokenizer.token_batch(batch_id, items, submitted_at=submitted_at,
                               reply_topic=reply_topic, priority=priority)
    tb = replace(tb, cache_keys=keys.sequence_keys(tb.seq_item, tb.seq_doc),
                 embedding_format=embedding_format)
    messages = tuple(encode_to_fit(tb, limits))
    return Tokenized(messages=messages, sequences=tb.n_sequences,
                     truncated=int(np.count_nonzero(tb.truncated)),
                     tokenize_ms=(time.perf_counter() - started) * 1000)


def _tokenize(data: bytes, keys: BatchKeys, items: np.ndarray | None,
              offline_topic: bool) -> Tokenized:
    spec, tokenizer = _current()
    batch = decode_query_batch(data, spec.limits)
    chosen = batch.items
    if items is not None:
        chosen = tuple(chosen[i] for i in items.tolist())
        keys = keys.take(items)
    return tokenize_items(tokenizer, spec.limits, batch.batch_id, chosen, keys,
                          submitted_at=batch.submitted_at, reply_topic=batch.reply_topic,
                          priority=token_priority(batch.priority, offline_topic),
                          embedding_format=batch.embedding_format or spec.embedding_format)


# -- splitting (pure) --------------------------------------------------------------------------
def slice_items(tb: TokenBatch, start: int, stop: int) -> TokenBatch:
    """Items [start, stop) of `tb` with their sequences (which are grouped by item, in order)."""
    first, last = (int(x) for x in tb.seq_item.searchsorted([start, stop]))
    lo, hi = int(tb.offsets[first]), int(tb.offsets[last])
    return replace(
        tb,
        item_ids=tuple(tb.item_ids[start:stop]),
        seq_item=tb.seq_item[first:last] - start,
        seq_doc=tb.seq_doc[first:last],
        offsets=tb.offsets[first:last + 1] - lo,
        input_ids=tb.input_ids[lo:hi],
        token_type_ids=None if tb.token_type_ids is None else tb.token_type_ids[lo:hi],
        truncated=tb.truncated[first:last],
        cache_keys=None if tb.cache_keys is None else tb.cache_keys[first:last],
    )


def encode_to_fit(tb: TokenBatch, limits: Limits) -> list[bytes]:
    """Encode `tb`, split by items into as many TokenBatches (same batch_id) as it takes for
    each to fit the limits (bytes, sequences, token ids). One encode in the common case; on
    overflow, halves are tried recursively, reusing the tokens (no re-tokenizing)."""
    n_items = len(tb.item_ids)
    too_many = tb.n_sequences > limits.max_sequences or len(tb.input_ids) > limits.max_token_ids
    if not too_many:
        try:
            return [encode_token_batch(tb, limits)]
        except SchemaError as exc:
            if exc.rule != "max_bytes":
                raise
    if n_items == 1:
        raise TokenizeError(
            f"item {tb.item_ids[0]!r} alone needs more than one TokenBatch ({tb.n_sequences} "
            f"sequences, {len(tb.input_ids)} tokens; limits: {limits.max_message_bytes} bytes, "
            f"{limits.max_sequences} sequences, {limits.max_token_ids} tokens): send fewer or "
            "shorter docs, or raise the limits")
    mid = n_items // 2
    return encode_to_fit(slice_items(tb, 0, mid), limits) + encode_to_fit(
        slice_items(tb, mid, n_items), limits)


# -- in the service's process ------------------------------------------------------------------
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
    """One tokenizer process (None until spawned, or after it died) and its socket."""

    def __init__(self) -> None:
        self.process: multiprocessing.process.BaseProcess | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def spawn(self, spec: TokenizerSpec) -> tuple[int, str]:
        """Start the process and wait until it has its tokenizer: (pid, tokenizer_id)."""
        ours, theirs = socket.socketpair()
        process = _SPAWN.Process(target=_serve, args=(theirs, spec), daemon=True,
                                 name="qscore-tokenizer")
        try:
            process.start()
        finally:
            theirs.close()
        self.process = process
        self.reader, self.writer = await asyncio.open_connection(sock=ours, limit=_READ_LIMIT)
        try:
            ok, value = await self.receive()
        except _ProcessDied:
            raise RuntimeError(f"tokenizer process exited at start-up (exit code "
                               f"{await self.reap()}): see its error above") from None
        if not ok:
            await self.reap()
            raise RuntimeError(f"tokenizer process failed to start with {spec.tokenizer_json}: "
                               f"{value}")
        return value  # type: ignore[no-any-return]

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
            return False, RuntimeError(f"unreadable reply from a tokenizer process: {exc!r}")

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


class TokenizerPool:
    """`processes` spawned tokenizer processes; `prepare` and `tokenize` are awaitable.

    Calls wait in one queue. A process that comes free takes its share of what waits, up to
    `_MAX_GROUP` calls and `_MAX_GROUP_BYTES` of records, in one message, and answers them in
    one: under a backlog of small records, the per-message syscalls and wake-ups are shared
    (measured on 20-query records: 54 -> 44 us of the service's CPU per query). The bound keeps
    what a group adds to its first call's latency to a few ms, and a lone big record is sent
    alone. A call that was in a message whose process died goes alone next time."""

    def __init__(self, spec: TokenizerSpec, processes: int = 2) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.spec = spec
        self.processes = processes
        self.restarts = 0
        self._slots: list[_Slot] = []
        self._idle: list[_Slot] = []
        self._pending: deque[_Request] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._started = False

    async def start(self) -> None:
        """Spawn the processes and wait until each has its tokenizer: a broken tokenizer file
        fails here, at start-up, not on the first message."""
        self._slots = [_Slot() for _ in range(self.processes)]
        spawned = await asyncio.gather(*(s.spawn(self.spec) for s in self._slots),
                                       return_exceptions=True)
        failed = [r for r in spawned if isinstance(r, BaseException)]
        if failed:
            await self.close()
            raise failed[0]
        self._idle = list(self._slots)
        self._started = True
        ready = [r for r in spawned if not isinstance(r, BaseException)]
        log.info("tokenizer_pool.ready", processes=self.processes,
                 tokenizer_id=ready[0][1], pids=sorted(pid for pid, _ in ready))

    async def close(self) -> None:
        self._started = False
        while self._pending:
            _fail(self._pending.popleft(), RuntimeError("TokenizerPool closed"))
        slots, self._slots, self._idle = self._slots, [], []
        await asyncio.gather(*(s.reap() for s in slots))
        await asyncio.gather(*self._running, return_exceptions=True)

    @property
    def pids(self) -> list[int]:
        """Process ids of the live tokenizer processes (for logs, and tests that kill one)."""
        return [s.process.pid for s in self._slots
                if s.process is not None and s.process.pid is not None and s.process.is_alive()]

    async def prepare(self, data: bytes, *, offline_topic: bool = False,
                      tokenize_upto: int = 0) -> Prepared:
        """Decode a QueryBatch record and hash its cache keys (raises SchemaError); with at most
        `tokenize_upto` items, tokenize and pack them all in the same call."""
        return await self._call(len(data), _prepare, data, offline_topic, tokenize_upto)

    async def tokenize(self, data: bytes, keys: BatchKeys, items: np.ndarray | None, *,
                       offline_topic: bool = False) -> Tokenized:
        """TokenBatches for items `items` (indices; None: all) of the record `data`, whose
        digests `keys` are (as `prepare` returned them)."""
        return await self._call(len(data), _tokenize, data, keys, items, offline_topic)

    async def _call(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        if not self._started:
            raise RuntimeError("TokenizerPool is not started")
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
                await slot.spawn(self.spec)
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
                _fail(request, RuntimeError("TokenizerPool closed"))
            return
        self.restarts += 1
        log.error("tokenizer_pool.process_died", restarts=self.restarts,
                  hint="a tokenizer process died (OOM killer?); starting a new one")
        retry = []
        for request in group:
            if request.future.done():
                continue
            request.deaths += 1
            if request.deaths >= 2:
                _fail(request, BrokenProcessPool(
                    "a tokenizer process died twice on this message (a poison message?)"))
            else:
                retry.append(request)
        self._pending.extendleft(reversed(retry))  # first in line, in their order


def _fail(request: _Request, exc: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(exc)
