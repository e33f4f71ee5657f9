"""TokenizerPool: tokenizer processes, each holding one QueryTokenizer, joined to the event loop.

Everything whose cost grows with the message runs here, never on the loop: decoding and
validating a QueryBatch (up to max_message_bytes of JSON), hashing its cache keys, tokenizing,
and packing TokenBatches (split so that each fits the message limits). A stalled loop would
miss consumer heartbeats; with 1 s group sessions, one 1 MiB message could cost a partition.

Processes are spawned, not forked: the parent may hold ONNX Runtime / PyTorch thread pools,
which do not survive a fork. A pool that breaks (a child killed, e.g. by the OOM killer) is
replaced and the call retried once, so one lost process does not dead-letter everything in
flight; a message that kills a child twice is a poison message and fails.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import structlog

from engines.tokenizer import QueryTokenizer
from plumbing.procs import die_with_parent
from schemas import (
    Limits,
    Priority,
    QueryBatch,
    QueryItem,
    SchemaError,
    TokenBatch,
    decode_query_batch,
    encode_token_batch,
)
from tokenizer_svc.units import ItemKeys, item_keys, sequence_keys

log = structlog.get_logger(__name__)
T = TypeVar("T")


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


@dataclass(frozen=True, slots=True)
class Prepared:
    """A decoded QueryBatch and the cache digests of each of its items."""

    batch: QueryBatch
    keys: tuple[ItemKeys, ...]


@dataclass(frozen=True, slots=True)
class Tokenized:
    """Encoded TokenBatches (same batch_id) for some items, each within the message limits."""

    messages: tuple[bytes, ...]
    sequences: int
    truncated: int
    tokenize_ms: float  # in the tokenizer process: tokenize + pack


# -- in the tokenizer processes ----------------------------------------------------------------
_state: tuple[TokenizerSpec, QueryTokenizer] | None = None


def _init_process(spec: TokenizerSpec) -> None:
    global _state
    # A SIGKILLed service must not leave its pool processes running.
    die_with_parent(multiprocessing.parent_process().pid)  # type: ignore[union-attr]
    # Ctrl-C reaches the whole process group; only the parent decides when to stop (it drains
    # first), so children must not die mid-batch and break the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _state = (spec, QueryTokenizer(spec.tokenizer_json, spec.max_length, pairs=spec.pairs))


def _current() -> tuple[TokenizerSpec, QueryTokenizer]:
    if _state is None:
        raise RuntimeError("tokenizer process not initialised")
    return _state


def _ready() -> tuple[int, str]:
    return os.getpid(), _current()[1].tokenizer_id


def prepare_batch(data: bytes, limits: Limits, model_version: str) -> Prepared:
    """Decode (raises SchemaError) and compute every item's cache digests."""
    batch = decode_query_batch(data, limits)
    return Prepared(batch, tuple(item_keys(it, model_version) for it in batch.items))


def _prepare(data: bytes) -> Prepared:
    spec = _current()[0]
    return prepare_batch(data, spec.limits, spec.model_version)


def tokenize_items(tokenizer: QueryTokenizer, limits: Limits, batch_id: str,
                   items: Sequence[QueryItem], keys: Sequence[ItemKeys], *,
                   submitted_at: float, reply_topic: str | None = None,
                   priority: Priority = "online") -> Tokenized:
    """Tokenize `items` into encoded TokenBatches carrying each sequence's cache key."""
    started = time.perf_counter()
    tb = tokenizer.token_batch(batch_id, items, submitted_at=submitted_at,
                               reply_topic=reply_topic, priority=priority)
    tb = replace(tb, cache_keys=sequence_keys(tb.seq_item, tb.seq_doc, keys))
    messages = tuple(encode_to_fit(tb, limits))
    return Tokenized(messages=messages, sequences=tb.n_sequences,
                     truncated=int(tb.truncated.sum()),
                     tokenize_ms=(time.perf_counter() - started) * 1000)


def _tokenize(batch_id: str, items: tuple[QueryItem, ...], keys: tuple[ItemKeys, ...],
              submitted_at: float, reply_topic: str | None, priority: Priority) -> Tokenized:
    spec, tokenizer = _current()
    return tokenize_items(tokenizer, spec.limits, batch_id, items, keys,
                          submitted_at=submitted_at, reply_topic=reply_topic, priority=priority)


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
class TokenizerPool:
    """`processes` spawned tokenizer processes; `prepare` and `tokenize` are awaitable."""

    def __init__(self, spec: TokenizerSpec, processes: int = 2) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.spec = spec
        self.processes = processes
        self.restarts = 0
        self._executor: ProcessPoolExecutor | None = None

    async def start(self) -> None:
        """Spawn the processes and wait until each has its tokenizer: a broken tokenizer file
        fails here, at start-up, not on the first message."""
        self._executor = self._new_executor()
        loop = asyncio.get_running_loop()
        try:
            ready = await asyncio.gather(*(loop.run_in_executor(self._executor, _ready)
                                           for _ in range(self.processes)))
        except BrokenProcessPool as exc:
            await self.close()
            raise RuntimeError(f"tokenizer processes failed to start with "
                               f"{self.spec.tokenizer_json}: see their error above") from exc
        log.info("tokenizer_pool.ready", processes=self.processes,
                 tokenizer_id=ready[0][1], pids=sorted({pid for pid, _ in ready}))

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            # shutdown(wait=True) joins processes: blocking, so not on the loop.
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    @property
    def pids(self) -> list[int]:
        """Process ids of the live tokenizer processes (for logs, and tests that kill one)."""
        executor = self._executor
        processes = getattr(executor, "_processes", None) or {}
        return [p.pid for p in processes.values() if p.is_alive()]

    async def prepare(self, data: bytes) -> Prepared:
        """Decode a QueryBatch record and hash its cache keys; raises SchemaError."""
        return await self._call(_prepare, data)

    async def tokenize(self, batch_id: str, items: Sequence[QueryItem],
                       keys: Sequence[ItemKeys], *, submitted_at: float,
                       reply_topic: str | None, priority: Priority) -> Tokenized:
        return await self._call(_tokenize, batch_id, tuple(items), tuple(keys), submitted_at,
                                reply_topic, priority)

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_process, initargs=(self.spec,))

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        retried = False
        while True:
            executor = self._executor
            if executor is None:
                raise RuntimeError("TokenizerPool is not started")
            try:
                return await loop.run_in_executor(executor, fn, *args)
            except BrokenProcessPool:
                if retried:
                    raise
                retried = True
                self._replace(executor)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        # Every call in flight on a broken pool fails at once; only the first replaces it.
        if self._executor is not broken:
            return
        self.restarts += 1
        log.error("tokenizer_pool.broken", restarts=self.restarts,
                  hint="a tokenizer process died (OOM killer?); starting new ones")
        broken.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()
