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

The processes are a tokenizer_svc.procpool.ProcessPool: spawned, on socket pairs the event
loop reads (a ProcessPoolExecutor call cost ~90 us of the service's CPU; a socket round trip
~20 us), calls that queue up sent to a free process together, a process that dies replaced and
its calls retried once, a message that kills a process twice failed as poison.

`ServingPools` says which pool records are tokenized by while the service follows promotions:
a record keeps the version (and pool) it started with; a switch serves another from the next
record on, and a pool it replaced is closed once the last record that started on it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import structlog

from engines.manifest import Manifest
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
from tokenizer_svc.procpool import ProcessPool
from tokenizer_svc.units import BatchKeys, batch_keys

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


def _init_process(spec: TokenizerSpec) -> tuple[int, str]:
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
    return os.getpid(), _state[1].tokenizer_id


def _current() -> tuple[TokenizerSpec, QueryTokenizer]:
    if _state is None:
        raise RuntimeError("tokenizer process not initialised")
    return _state


def prepare_batch(data: bytes, limits: Limits, model_version: str) -> tuple[QueryBatch,
                                                                           BatchKeys]:
    """Decode (raises SchemaError) and compute every unit's cache digest."""
    batch = decode_query_batch(data, limits)
    return batch, batch_keys(batch.items, model_version)


def _prepare(data: bytes, offline_topic: bool, tokenize_upto: int,
             model_version: str | None = None) -> Prepared:
    spec, tokenizer = _current()
    batch, keys = prepare_batch(data, spec.limits, model_version or spec.model_version)
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
class TokenizerPool:
    """`processes` tokenizer processes (tokenizer_svc.procpool); `prepare` and `tokenize` are
    awaitable, and a record's items stay in the processes (see the module docstring)."""

    def __init__(self, spec: TokenizerSpec, processes: int = 2) -> None:
        self.spec = spec
        self.processes = processes
        self.tokenizer_id: str | None = None  # as the processes loaded it (once started)
        self._pool = ProcessPool(_init_process, spec, processes, name="tokenizer")

    @property
    def restarts(self) -> int:
        return self._pool.restarts

    @property
    def pids(self) -> list[int]:
        """Process ids of the live tokenizer processes (for logs, and tests that kill one)."""
        return self._pool.pids

    async def start(self) -> None:
        """Spawn the processes and wait until each has its tokenizer: a broken tokenizer file
        fails here, at start-up, not on the first message."""
        try:
            ready = await self._pool.start()
        except RuntimeError as exc:
            raise RuntimeError(f"{exc} (tokenizer {self.spec.tokenizer_json})") from None
        self.tokenizer_id = ready[0][1]
        log.info("tokenizer_pool.ready", processes=self.processes,
                 tokenizer_id=self.tokenizer_id, max_length=self.spec.max_length,
                 version=self.spec.model_version, pids=sorted(pid for pid, _ in ready))

    async def close(self) -> None:
        await self._pool.close()

    async def prepare(self, data: bytes, *, offline_topic: bool = False,
                      tokenize_upto: int = 0, model_version: str | None = None) -> Prepared:
        """Decode a QueryBatch record and hash its cache keys (raises SchemaError); with at most
        `tokenize_upto` items, tokenize and pack them all in the same call. `model_version`:
        the version the keys are for (default: the spec's; a service that followed a
        promotion passes the new one)."""
        return await self._pool.call(len(data), _prepare, data, offline_topic, tokenize_upto,
                                     model_version)

    async def tokenize(self, data: bytes, keys: BatchKeys, items: np.ndarray | None, *,
                       offline_topic: bool = False) -> Tokenized:
        """TokenBatches for items `items` (indices; None: all) of the record `data`, whose
        digests `keys` are (as `prepare` returned them)."""
        return await self._pool.call(len(data), _tokenize, data, keys, items, offline_topic)

    async def _call(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        return await self._pool.call(size, fn, *args)


@dataclass(frozen=True, slots=True)
class ServingVersion:
    """What a record is handled with, start to end: the version's manifest (its keys, look-ups
    and cached scores), its artifact, and the pool tokenizing with its tokenizer."""

    manifest: Manifest
    artifact: Path
    pool: TokenizerPool


class ServingPools:
    """The serving version and the pools it replaced that still finish records: `use()` gives a
    record the serving version for its whole life; `switch(new)` serves `new` from the next
    record on; a replaced pool is closed once no record that started on it is in flight."""

    def __init__(self, first: ServingVersion) -> None:
        self.serving = first
        self._records: Counter[TokenizerPool] = Counter()  # records in flight per pool
        self._retired: dict[TokenizerPool, asyncio.Event] = {}  # replaced, set once closed
        self._closing: dict[TokenizerPool, asyncio.Task[None]] = {}
        self._past_restarts = 0  # process restarts of pools closed since

    @property
    def retiring(self) -> int:
        """Replaced pools not closed yet."""
        return len(self._retired)

    @property
    def restarts(self) -> int:
        """Process restarts of every pool this service ran (a counter: it never goes back)."""
        return self._past_restarts + sum(p.restarts for p in self._live())

    def records(self, pool: TokenizerPool) -> int:
        return self._records[pool]

    @contextlib.contextmanager
    def use(self) -> Iterator[ServingVersion]:
        """The serving version, held by one record until it is done."""
        serving = self.serving
        self._records[serving.pool] += 1
        try:
            yield serving
        finally:
            self._records[serving.pool] -= 1
            self._maybe_close(serving.pool)

    def switch(self, new: ServingVersion) -> None:
        """Serve `new` (its pool started, or the serving pool) from the next record on."""
        old, self.serving = self.serving, new
        if new.pool is not old.pool:
            self._retired[old.pool] = asyncio.Event()
            self._maybe_close(old.pool)

    async def retired(self) -> None:
        """Wait until every replaced pool is closed."""
        for done in list(self._retired.values()):
            await done.wait()

    async def close(self) -> None:
        """Close every pool, replaced ones whose records never finished included."""
        await asyncio.gather(*(p.close() for p in self._live()))
        if self._closing:
            await asyncio.wait(self._closing.values())

    def _live(self) -> set[TokenizerPool]:
        return {self.serving.pool, *self._retired}

    def _maybe_close(self, pool: TokenizerPool) -> None:
        if pool not in self._retired or self._records[pool] or pool in self._closing:
            return
        del self._records[pool]

        async def close() -> None:
            try:
                await pool.close()
            finally:
                self._past_restarts += pool.restarts
                del self._closing[pool]
                self._retired.pop(pool).set()

        self._closing[pool] = asyncio.ensure_future(close())
        log.info("tokenizer_pool.retired", version=pool.spec.model_version,
                 tokenizer_id=pool.tokenizer_id)
