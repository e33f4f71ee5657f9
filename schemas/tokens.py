"""Token batches: tokenizer output on the token topic, in a compact binary layout.

Token ids are most of a TokenBatch, so they travel as little-endian arrays, never JSON lists::

    b"QSTB" | u16 version (2) | u32 header length H | header: H bytes of JSON, space-padded
    so the arrays start 4-byte aligned | seq_item u32[n_seq] | seq_doc i32[n_seq] |
    offsets u32[n_seq+1] | truncated u8[n_seq] | zero padding to 4 bytes |
    input_ids (u16 if every id < 65536, else u32)[n_ids] | token_type_ids u8[n_ids] if present |
    if has_keys: zero padding to 4 bytes | cache_keys u8[n_seq * 16]

The header holds batch_id, item_ids, tokenizer_id, head, max_length, submitted_at,
reply_topic, priority, embedding_format, n_seq, n_ids, id_width (2 or 4), has_type_ids and
has_keys. Sequence i
is ``input_ids[offsets[i]:offsets[i+1]]``; it belongs to item ``item_ids[seq_item[i]]`` and is
the query alone (``seq_doc[i] == -1``) or doc ``seq_doc[i]`` (alone for the similarity head,
paired with the query for the classifier head).
``cache_keys[i]`` is the 16-byte result-cache digest of sequence i (plumbing.cache.key_digest):
the worker sees only token ids, so the tokenizer ships the keys it looked up for it to write
results through under.

Sequences are laid out as the tokenizer writes them (rule ``seq_layout`` otherwise): grouped by
item, items in order, every item at least once; per item, for ``head`` "similarity" the query
alone then its docs, ``seq_doc`` = ``-1, 0, 1, .., n-1``; for "classifier" its (query, doc)
pairs ``0, 1, .., n-1``, or ``-1`` alone for an item without docs. The worker takes an item's
scores from its rows by position, so this is what makes every row it reads the item's own.

Versioning: the header's key set is strict (unknown and missing keys are refused), so adding a
header key is a layout change like any other and bumps VERSION. A decoder reads its own version
only and refuses any other with rule ``version`` (a dead letter that says so): token topics hold
seconds of work, so tokenizers and workers are upgraded together rather than made to read old
layouts. Version 2 added ``head`` and the ``seq_layout`` rules; version 3 ``embedding_format``
(how the worker writes embeddings on the score topic, resolved by the tokenizer from the
QueryBatch or the fleet's default).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson

from . import _check as c
from .errors import SchemaError
from .limits import DEFAULT_LIMITS, Limits
from .query import PRIORITIES, Priority
from .scores import EMBEDDING_FORMATS, EmbeddingFormat

MAGIC = b"QSTB"
VERSION = 3
# The engine head a batch was tokenized for: the layouts differ, so a worker must refuse the
# other head's batches (engines.manifest keeps its own copy: schemas imports nothing above it).
Head = Literal["similarity", "classifier"]
HEADS: tuple[Head, ...] = ("similarity", "classifier")
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_U32_MAX = 2**32 - 1
_HEADER_KEYS = (
    "batch_id",
    "item_ids",
    "tokenizer_id",
    "head",
    "max_length",
    "submitted_at",
    "reply_topic",
    "priority",
    "embedding_format",
    "n_seq",
    "n_ids",
    "id_width",
    "has_type_ids",
    "has_keys",
)
KEY_BYTES = 16  # one cache-key digest per sequence


@dataclass(frozen=True, slots=True, eq=False)
class TokenBatch:
    """Tokenized sequences of one QueryBatch (or part of it), ready for micro-batching."""

    batch_id: str
    item_ids: tuple[str, ...]
    tokenizer_id: str  # which tokenizer made the ids; engines refuse a mismatch
    max_length: int  # every sequence is at most this long (truncated to fit)
    seq_item: np.ndarray  # uint32 [n_seq]: index into item_ids
    seq_doc: np.ndarray  # int32 [n_seq]: -1 = the query alone, else the doc index
    offsets: np.ndarray  # uint32 [n_seq + 1]: sequence boundaries in input_ids
    input_ids: np.ndarray  # uint32 [n_ids], all sequences back to back
    token_type_ids: np.ndarray | None  # uint8 [n_ids]; None = all zero (single sequences)
    truncated: np.ndarray  # bool [n_seq]
    submitted_at: float  # from the QueryBatch, so queue time spans the whole fleet
    reply_topic: str | None = None
    priority: Priority = "online"
    cache_keys: np.ndarray | None = None  # uint8 [n_seq, 16]; None = no write-through
    # None only in batches built by hand that never travel: the encoder refuses it.
    head: Head | None = None
    embedding_format: EmbeddingFormat = "float"  # how the worker writes embeddings

    @property
    def n_sequences(self) -> int:
        return len(self.seq_item)

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every sequence (what the batcher sorts and pads by)."""
        return np.diff(self.offsets.astype(np.int64))

    def sequence(self, i: int) -> np.ndarray:
        """The token ids of sequence `i`, as a view of `input_ids`."""
        start, stop = self._bounds(i)
        return self.input_ids[start:stop]

    def sequence_type_ids(self, i: int) -> np.ndarray:
        """The token type ids of sequence `i` (zeros when the batch carries none)."""
        start, stop = self._bounds(i)
        if self.token_type_ids is None:
            return np.zeros(stop - start, dtype=np.uint8)
        return self.token_type_ids[start:stop]

    def _bounds(self, i: int) -> tuple[int, int]:
        n = self.n_sequences
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        i %= n
        return int(self.offsets[i]), int(self.offsets[i + 1])

    def __eq__(self, other: object) -> bool:
        # Arrays compare by value: a decoded batch equals the one that was encoded.
        if not isinstance(other, TokenBatch):
            return NotImplemented
        return (
            self.batch_id == other.batch_id
            and tuple(self.item_ids) == tuple(other.item_ids)
            and self.tokenizer_id == other.tokenizer_id
            and self.max_length == other.max_length
            and self.submitted_at == other.submitted_at
            and self.reply_topic == other.reply_topic
            and self.priority == other.priority
            and self.head == other.head
            and self.embedding_format == other.embedding_format
            and all(_same(getattr(self, f), getattr(other, f)) for f in _ARRAY_FIELDS)
        )


_ARRAY_FIELDS = (
    "seq_item", "seq_doc", "offsets", "input_ids", "token_type_ids", "truncated", "cache_keys",
)


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


def pack_sequences(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Flatten per-sequence token ids into (offsets, input_ids) as TokenBatch wants them."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=int(offsets[-1]))
    # Range-check before narrowing: a negative id must fail here, not wrap around.
    if flat.size and (flat.min() < 0 or flat.max() > _U32_MAX):
        raise ValueError("token ids must be in 0..2**32-1")
    return offsets.astype(np.uint32), flat.astype(np.uint32)


def _header(m: object, limits: Limits) -> dict[str, Any]:
    """Validate the header's fields and counts (all before any array is read)."""
    h = c.keys(m, "header", _HEADER_KEYS)
    ids = c.array(h["item_ids"], "item_ids", limits.max_items, min_items=1)
    if (all(type(x) is str for x in ids) and all(map(str.isascii, ids))
            and min(map(len, ids)) >= 1 and max(map(len, ids)) <= limits.max_id_chars
            and len(set(ids)) == len(ids)):
        item_ids = tuple(ids)  # the common case, checked in C-level passes over the ids
    else:  # per id, for the precise error
        item_ids = tuple(c.text(x, f"item_ids[{i}]", limits.max_id_chars, blank_ok=True)
                         for i, x in enumerate(ids))
        c.unique(item_ids, "item_ids[{}]")
    n_seq = _count(h["n_seq"], "n_seq", limits.max_sequences)
    if n_seq == 0:
        raise SchemaError("n_seq", "empty", "a token batch needs at least one sequence")
    width = c.integer(h["id_width"], "id_width", 2, 4)
    if width == 3:
        raise SchemaError("id_width", "range", "expected 2 or 4, got 3")
    return {
        "batch_id": c.text(h["batch_id"], "batch_id", limits.max_id_chars, blank_ok=True),
        "item_ids": item_ids,
        "tokenizer_id": c.text(h["tokenizer_id"], "tokenizer_id", limits.max_id_chars),
        "head": c.enum(h["head"], "head", HEADS),
        "max_length": c.integer(h["max_length"], "max_length", 1, _U32_MAX),
        "submitted_at": c.number(h["submitted_at"], "submitted_at", lo=0.0),
        "reply_topic": c.topic(h["reply_topic"], "reply_topic", limits),
        "priority": c.enum(h["priority"], "priority", PRIORITIES),
        "embedding_format": c.enum(h["embedding_format"], "embedding_format", EMBEDDING_FORMATS),
        "n_seq": n_seq,
        "n_ids": _count(h["n_ids"], "n_ids", limits.max_token_ids),
        "id_width": width,
        "has_type_ids": c.boolean(h["has_type_ids"], "has_type_ids"),
        "has_keys": c.boolean(h["has_keys"], "has_keys"),
    }


def _count(value: object, field: str, limit: int) -> int:
    n = c.integer(value, field, 0, _U32_MAX)
    if n > limit:
        raise SchemaError(field, "max_items", f"got {n}", limit=limit)
    return n


def _layout(h: dict[str, Any], header_end: int) -> list[int]:
    """Byte offsets of each array (and the end), so encoder and decoder cannot disagree:
    seq_item, seq_doc, offsets, truncated, pad, ids, types, pad2, keys, end."""
    n_seq, n_ids = h["n_seq"], h["n_ids"]
    seq_item = header_end
    seq_doc = seq_item + 4 * n_seq
    offsets = seq_doc + 4 * n_seq
    truncated = offsets + 4 * (n_seq + 1)
    pad = truncated + n_seq
    ids = pad + (-pad) % 4
    types = ids + h["id_width"] * n_ids
    pad2 = types + (n_ids if h["has_type_ids"] else 0)
    keys = pad2 + (-pad2) % 4 if h["has_keys"] else pad2  # no padding without keys
    end = keys + (KEY_BYTES * n_seq if h["has_keys"] else 0)
    return [seq_item, seq_doc, offsets, truncated, pad, ids, types, pad2, keys, end]


def _check_arrays(h: dict[str, Any], a: dict[str, np.ndarray], limits: Limits) -> None:
    """Cross-checks shared by encode and decode; arrays already have the right lengths.

    A valid batch passes one combined test of every rule (a handful of vector operations: a
    worker decodes hundreds of these a second); any other runs the rules one by one, in
    order, for the precise error."""
    if not _valid_fast(h, a, limits):
        _check_rules(h, a, limits)


def _valid_fast(h: dict[str, Any], a: dict[str, np.ndarray], limits: Limits) -> bool:
    offsets = a["offsets"].astype(np.int64)
    items, docs = a["seq_item"].astype(np.int64), a["seq_doc"].astype(np.int64)
    n_items, n = len(h["item_ids"]), len(items)
    lengths = offsets[1:] - offsets[:-1]
    if (offsets[0] != 0 or offsets[-1] != h["n_ids"] or lengths.min() < 1
            or lengths.max() > h["max_length"] or items[0] != 0 or items[-1] != n_items - 1
            or docs.max() >= limits.max_docs_per_item):
        return False
    # Items in order with no gaps (steps of 0 or 1 from 0 to n_items - 1): every item present.
    steps = items[1:] - items[:-1]
    if n > 1 and (steps.min() < 0 or steps.max() > 1):
        return False
    # Each item's rows: the query (-1) first if it has one, then docs 0, 1, ...; a similarity
    # item always starts with its query, a classifier item has pairs or the query alone.
    starts = np.ones(n, dtype=bool)
    starts[1:] = steps != 0
    first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    with_query = docs[first] == -1
    if not np.array_equal(docs, np.arange(n) - first - with_query):
        return False
    if h["head"] == "similarity":
        return bool(with_query.all())
    return not bool((with_query & ~starts).any())


def _check_rules(h: dict[str, Any], a: dict[str, np.ndarray], limits: Limits) -> None:
    offsets, seq_item, seq_doc = a["offsets"], a["seq_item"], a["seq_doc"]
    if offsets[0] != 0:
        raise SchemaError("offsets[0]", "range", f"expected 0, got {offsets[0]}")
    lengths = np.diff(offsets.astype(np.int64))
    _first(lengths < 0, "offsets[{}]", "monotone", "offsets go backwards", shift=1)
    if offsets[-1] != h["n_ids"]:
        raise SchemaError("offsets", "monotone", f"end at {offsets[-1]}, expected {h['n_ids']}")
    _first(lengths == 0, "sequence[{}]", "empty")
    _first(lengths > h["max_length"], "sequence[{}]", "max_length", limit=h["max_length"])
    n_items = len(h["item_ids"])
    _first(seq_item >= n_items, "seq_item[{}]", "range", f"expected < {n_items}")
    _first(seq_doc < -1, "seq_doc[{}]", "range", "expected >= -1")
    _first(
        seq_doc >= limits.max_docs_per_item, "seq_doc[{}]", "range", limit=limits.max_docs_per_item
    )
    try:
        _check_layout(h["head"], n_items, seq_item, seq_doc)
    except SchemaError:
        # A valid layout has one sequence per (item, doc), so the sort that finds a duplicate
        # runs only for batches refused anyway, to name the more precise fault.
        _check_unique(seq_item, seq_doc)
        raise


def _check_unique(seq_item: np.ndarray, seq_doc: np.ndarray) -> None:
    """One sequence per (item, doc): a duplicate would publish two scores for one pair."""
    keys = (seq_item.astype(np.int64) << 32) | (seq_doc.astype(np.int64) + 1)
    order = np.argsort(keys, kind="stable")
    dups = order[1:][np.diff(keys[order]) == 0]
    if len(dups):
        raise SchemaError(f"seq_doc[{dups[0]}]", "duplicate", "two sequences for one (item, doc)")


def _check_layout(head: str, n_items: int, seq_item: np.ndarray, seq_doc: np.ndarray) -> None:
    """Rule seq_layout (see the module docstring); items and docs are range-checked already.

    Without it, an item with no query row or a gap in its docs made the worker score it with
    another item's row (outputs[-1]) or shift its scores onto the wrong docs.
    """
    items, docs = seq_item.astype(np.int64), seq_doc.astype(np.int64)
    _first(np.diff(items) < 0, "seq_item[{}]", "seq_layout",
           "sequences must be grouped by item, in item order", shift=1)
    present = np.zeros(n_items, dtype=bool)
    present[items] = True
    _first(~present, "item_ids[{}]", "seq_layout", "an item without any sequence")
    at = np.arange(len(items))
    starts = np.ones(len(items), dtype=bool)
    starts[1:] = items[1:] != items[:-1]
    first = np.maximum.accumulate(np.where(starts, at, 0))  # where each one's item begins
    with_query = docs[first] == -1
    expected = at - first - with_query  # -1 (if the item starts with its query), 0, 1, ...
    bad = docs != expected
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SchemaError(f"seq_doc[{i}]", "seq_layout",
                          f"expected {expected[i]}: the query alone (-1) first, then docs "
                          "0..n-1 in order")
    if head == "similarity":
        # Its docs are scored against the query's own embedding.
        _first(starts & ~with_query, "seq_doc[{}]", "seq_layout",
               "a similarity item needs its query sequence (-1) first")
    else:
        # Pairs carry the query already; a classifier item is its pairs or the query alone.
        _first(with_query & ~starts, "seq_doc[{}]", "seq_layout",
               "a classifier item has (query, doc) pairs or the query alone, not both")


def _first(
    bad: np.ndarray,
    field: str,
    rule: str,
    detail: str = "",
    *,
    limit: int | None = None,
    shift: int = 0,
) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0]) + shift
        raise SchemaError(field.format(i), rule, detail, limit=limit)


def _int_array(value: object, field: str, lo: int, hi: int, dtype: str) -> np.ndarray:
    """Accept any integer array-like from the tokenizer; range-check before narrowing."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise SchemaError(field, "type", str(exc)) from None
    integral = arr.dtype.kind in "iu" or (arr.dtype.kind == "b" and hi == 1)
    if arr.ndim != 1 or not integral:
        got = f"{arr.dtype}{arr.shape}"
        raise SchemaError(field, "type", f"expected a 1-D integer array, got {got}")
    # A dtype whose whole range fits (uint32 ids into 0..2**32-1) needs no pass over values.
    fits = arr.dtype.kind == "b" or (np.iinfo(arr.dtype).min >= lo
                                     and np.iinfo(arr.dtype).max <= hi)
    if arr.size and not fits and (int(arr.min()) < lo or int(arr.max()) > hi):
        raise SchemaError(field, "range", f"values outside {lo}..{hi}")
    return arr.astype(dtype, copy=False)


def _keys_array(value: object, n_seq: int) -> np.ndarray:
    """cache_keys must be n_seq digests of KEY_BYTES bytes each."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise SchemaError("cache_keys", "type", str(exc)) from None
    if arr.ndim != 2 or arr.shape[1] != KEY_BYTES or arr.dtype.kind not in "iu":
        got = f"{arr.dtype}{arr.shape}"
        raise SchemaError("cache_keys", "type", f"expected uint8 [n, {KEY_BYTES}], got {got}")
    if len(arr) != n_seq:
        raise SchemaError("cache_keys", "length", f"expected {n_seq} keys, got {len(arr)}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise SchemaError("cache_keys", "range", "values outside 0..255")
    return arr.astype("u1", copy=False)


def _arrays_of(tb: TokenBatch) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    a = {
        "seq_item": _int_array(tb.seq_item, "seq_item", 0, _U32_MAX, "<u4"),
        "seq_doc": _int_array(tb.seq_doc, "seq_doc", -1, 2**31 - 1, "<i4"),
        "offsets": _int_array(tb.offsets, "offsets", 0, _U32_MAX, "<u4"),
        "truncated": _int_array(tb.truncated, "truncated", 0, 1, "u1"),
        "input_ids": _int_array(tb.input_ids, "input_ids", 0, _U32_MAX, "<u4"),
    }
    types = tb.token_type_ids
    if types is not None:
        types = _int_array(types, "token_type_ids", 0, 255, "u1")
    n_seq, n_ids = len(a["seq_item"]), len(a["input_ids"])
    want = {"seq_doc": n_seq, "offsets": n_seq + 1, "truncated": n_seq}
    for name, arr in (*((k, a[k]) for k in want), ("token_type_ids", types)):
        expected = want.get(name, n_ids)
        if arr is not None and len(arr) != expected:
            raise SchemaError(name, "length", f"expected {expected} values, got {len(arr)}")
    return a, types


def _encode_parts(tb: TokenBatch, limits: Limits) -> list[bytes]:
    if not isinstance(tb, TokenBatch):
        raise SchemaError("$", "type", f"expected TokenBatch, got {type(tb).__name__}")
    a, types = _arrays_of(tb)
    keys = None if tb.cache_keys is None else _keys_array(tb.cache_keys, len(a["seq_item"]))
    ids = a["input_ids"]
    width = 2 if not ids.size or int(ids.max()) < 2**16 else 4
    h = _header(
        {
            "batch_id": tb.batch_id,
            "item_ids": tb.item_ids,
            "tokenizer_id": tb.tokenizer_id,
            "head": tb.head,
            "max_length": tb.max_length,
            "submitted_at": tb.submitted_at,
            "reply_topic": tb.reply_topic,
            "priority": tb.priority,
            "embedding_format": tb.embedding_format,
            "n_seq": len(a["seq_item"]),
            "n_ids": len(ids),
            "id_width": width,
            "has_type_ids": types is not None,
            "has_keys": keys is not None,
        },
        limits,
    )
    _check_arrays(h, a, limits)
    header = orjson.dumps(h)
    header += b" " * ((-(_PREFIX.size + len(header))) % 4)
    parts = [_PREFIX.pack(MAGIC, VERSION, len(header)), header]
    parts += [a[name].tobytes() for name in ("seq_item", "seq_doc", "offsets", "truncated")]
    parts.append(b"\0" * ((-len(a["truncated"])) % 4))
    parts.append(ids.astype("<u2" if width == 2 else "<u4", copy=False).tobytes())
    if types is not None:
        parts.append(types.tobytes())
    if keys is not None:
        written = len(ids) * width + (len(ids) if types is not None else 0)
        parts.append(b"\0" * ((-written) % 4))  # ids start 4-aligned: pad what followed
        parts.append(keys.tobytes())
    return parts


def encoded_size(tb: TokenBatch, limits: Limits = DEFAULT_LIMITS) -> int:
    """Bytes `encode_token_batch` would produce, ignoring max_message_bytes: lets the tokenizer
    split a batch before Kafka (or the decoder) refuses it."""
    return sum(map(len, _encode_parts(tb, limits)))


def encode_token_batch(tb: TokenBatch, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Validate with the decoder's rules, then pack; never emits what decode rejects."""
    data = b"".join(_encode_parts(tb, limits))
    if len(data) > limits.max_encoded_bytes:
        raise SchemaError("$", "max_bytes", f"got {len(data)}", limit=limits.max_encoded_bytes)
    return data


@c.decoder
def decode_token_batch(data: bytes, limits: Limits = DEFAULT_LIMITS) -> TokenBatch:
    """Check framing, header, exact length, then array contents; raises only SchemaError.

    Arrays are read-only views of `data` (ids are widened to uint32 when sent as u16).
    """
    data = c.as_bytes(data, limits)
    if len(data) < _PREFIX.size:
        raise SchemaError("$", "length", f"truncated: {len(data)} bytes")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SchemaError("$", "magic", f"got {magic!r}")
    if version != VERSION:
        raise SchemaError("$", "version", f"got {version}, expected {VERSION}")
    header_end = _PREFIX.size + header_len
    if header_end > len(data):
        raise SchemaError("$", "length", f"header of {header_len} bytes in {len(data)}")
    if header_end % 4:
        raise SchemaError("header", "padding", "arrays must start 4-byte aligned")
    h = _header(c.loads(data[_PREFIX.size : header_end], "header"), limits)
    n_seq, n_ids, width = h["n_seq"], h["n_ids"], h["id_width"]
    at = _layout(h, header_end)
    if at[-1] != len(data):
        raise SchemaError("$", "length", f"expected {at[-1]} bytes, got {len(data)}")
    if any(data[at[4] : at[5]]):
        raise SchemaError("$", "padding", "non-zero padding before input_ids")
    if any(data[at[7] : at[8]]):
        raise SchemaError("$", "padding", "non-zero padding before cache_keys")

    def arr(dtype: str, start: int, count: int) -> np.ndarray:
        return np.frombuffer(data, dtype=dtype, count=count, offset=start)

    truncated = arr("u1", at[3], n_seq)
    _first(truncated > 1, "truncated[{}]", "range", "expected 0 or 1")
    ids = arr("<u2" if width == 2 else "<u4", at[5], n_ids).astype(np.uint32, copy=False)
    ids.flags.writeable = False  # like the other views: a decoded batch is immutable
    a = {
        "seq_item": arr("<u4", at[0], n_seq),
        "seq_doc": arr("<i4", at[1], n_seq),
        "offsets": arr("<u4", at[2], n_seq + 1),
        "truncated": truncated.view(np.bool_),
        "input_ids": ids,
    }
    _check_arrays(h, a, limits)
    return TokenBatch(
        batch_id=h["batch_id"],
        item_ids=h["item_ids"],
        tokenizer_id=h["tokenizer_id"],
        head=h["head"],
        max_length=h["max_length"],
        submitted_at=h["submitted_at"],
        reply_topic=h["reply_topic"],
        priority=h["priority"],
        embedding_format=h["embedding_format"],
        token_type_ids=arr("u1", at[6], n_ids) if h["has_type_ids"] else None,
        cache_keys=arr("u1", at[8], KEY_BYTES * n_seq).reshape(n_seq, KEY_BYTES)
        if h["has_keys"] else None,
        **a,
    )
