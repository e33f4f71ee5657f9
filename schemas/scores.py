"""Score batches: what workers (or the tokenizer, on cache hits) publish (JSON, ``"v": 1``).

Wire form::

    {"v": 1, "batch_id": "b1", "model_id": "all-minilm-l6-v2", "produced_at": 1700000001.2,
     "timings": {"tokenize_ms": 1.1, "queue_ms": 0.4, "inference_ms": 6.0, "total_ms": 8.3},
     "items": [{"id": "q1", "scores": [0.81, 0.12], "cached": false, "model_version": "3f2a..",
                "embedding": null, "error": null}]}

`scores` follow the item's docs. With no docs, a classifier head gives one score for the query
alone, and a similarity head gives no scores but the query's `embedding`.

Embeddings are JSON floats by default, readable anywhere. A batch may instead carry
``"embedding_format": "base64"`` (little-endian float32, as embedding APIs offer with
`encoding_format=base64`) or ``"base64-f16"`` (little-endian float16): every `embedding` is then
a base64 string, a third (or a sixth) of the bytes, and far cheaper to write and parse. The
decoders here return floats either way. Floats are written at float32 precision (the engines'
own), e.g. ``0.1`` rather than ``0.10000000149011612``.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import numpy as np
import orjson

from . import _check as c
from .errors import SchemaError
from .limits import DEFAULT_LIMITS, Limits

EmbeddingFormat = Literal["float", "base64", "base64-f16"]
EMBEDDING_FORMATS: tuple[str, ...] = get_args(EmbeddingFormat)
_BASE64_DTYPES = {"base64": np.dtype("<f4"), "base64-f16": np.dtype("<f2")}
_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def pack_embedding(values: object, fmt: str) -> object:
    """An embedding as it travels in format `fmt` (floats, or a base64 string)."""
    dtype = _BASE64_DTYPES.get(fmt)
    if dtype is None:
        return values
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode("ascii")


def _unpack_embedding(value: object, fmt: str, field: str, limits: Limits) -> tuple[float, ...]:
    dtype = _BASE64_DTYPES.get(fmt)
    if dtype is None:
        return c.floats(value, field, limits.max_embedding_dim, min_items=1)
    if not isinstance(value, str):
        raise SchemaError(field, "type", f"expected a base64 string ({fmt}), got {c.kind(value)}")
    if len(value) > 4 * (limits.max_embedding_dim * dtype.itemsize + 2) // 3 + 4:
        raise SchemaError(field, "max_items", f"got {len(value)} base64 chars",
                          limit=limits.max_embedding_dim)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SchemaError(field, "base64", str(exc)) from None
    if not raw or len(raw) % dtype.itemsize:
        raise SchemaError(field, "length", f"{len(raw)} bytes is not a whole number of "
                                           f"{dtype.itemsize}-byte floats ({fmt})")
    floats = np.frombuffer(raw, dtype=dtype)
    if len(floats) > limits.max_embedding_dim:
        raise SchemaError(field, "max_items", f"got {len(floats)}",
                          limit=limits.max_embedding_dim)
    bad = ~np.isfinite(floats)
    if bad.any():
        raise SchemaError(f"{field}[{int(np.flatnonzero(bad)[0])}]", "finite",
                          "NaN or infinity")
    return tuple(floats.astype(np.float64).tolist())


@dataclass(frozen=True, slots=True)
class ItemScore:
    id: str
    scores: tuple[float, ...]
    cached: bool  # served from the result cache, not the engine
    model_version: str  # engine version hash; part of the cache key
    embedding: tuple[float, ...] | None = None
    error: str | None = None  # per-item failure; the rest of the batch still scores

    @classmethod
    def from_obj(
        cls, obj: object, limits: Limits = DEFAULT_LIMITS, where: str = "item",
        embedding_format: str = "float",
    ) -> ItemScore:
        required = ("id", "scores", "cached", "model_version")
        m = c.keys(obj, where, required, ("embedding", "error"))
        embedding = m.get("embedding")
        if embedding is not None:
            embedding = _unpack_embedding(embedding, embedding_format,
                                          c.join(where, "embedding"), limits)
        return cls(
            id=c.text(m["id"], c.join(where, "id"), limits.max_id_chars, blank_ok=True),
            scores=c.floats(m["scores"], c.join(where, "scores"), limits.max_docs_per_item),
            cached=c.boolean(m["cached"], c.join(where, "cached")),
            model_version=c.text(
                m["model_version"], c.join(where, "model_version"), limits.max_id_chars
            ),
            embedding=embedding,
            error=c.opt_text(m.get("error"), c.join(where, "error"), limits.max_reason_chars),
        )

    def to_obj(self, embedding_format: str = "float") -> dict[str, Any]:
        return {
            "id": self.id,
            "scores": self.scores,
            "cached": self.cached,
            "model_version": self.model_version,
            "embedding": None if self.embedding is None
            else pack_embedding(self.embedding, embedding_format),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Timings:
    """Per-stage milliseconds, split as text-embeddings-inference does, for tail analysis."""

    tokenize_ms: float = 0.0
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0

    @classmethod
    def from_obj(cls, obj: object, where: str = "timings") -> Timings:
        names = ("tokenize_ms", "queue_ms", "inference_ms", "total_ms")
        m = c.keys(obj, where, (), names)
        return cls(*(c.number(m.get(n, 0.0), c.join(where, n), lo=0.0) for n in names))

    def to_obj(self) -> dict[str, Any]:
        return {
            "tokenize_ms": self.tokenize_ms,
            "queue_ms": self.queue_ms,
            "inference_ms": self.inference_ms,
            "total_ms": self.total_ms,
        }


@dataclass(frozen=True, slots=True)
class ScoreBatch:
    """Scores for some or all items of one QueryBatch (same batch_id); ids unique within it."""

    batch_id: str
    items: tuple[ItemScore, ...]
    model_id: str
    produced_at: float  # unix seconds
    timings: Timings
    # How embeddings travel (module docstring); decoded embeddings are floats whatever it is.
    embedding_format: EmbeddingFormat = "float"

    @classmethod
    def from_obj(cls, obj: object, limits: Limits = DEFAULT_LIMITS) -> ScoreBatch:
        required = ("v", "batch_id", "items", "model_id", "produced_at", "timings")
        m = c.keys(obj, "", required, ("embedding_format",))
        c.check_version(m)
        fmt = c.enum(m.get("embedding_format", "float"), "embedding_format", EMBEDDING_FORMATS)
        # Empty is allowed: a batch whose items all failed upstream still gets an answer.
        raw_items = c.array(m["items"], "items", limits.max_items)
        items = tuple(
            ItemScore.from_obj(it, limits, f"items[{i}]", fmt) for i, it in enumerate(raw_items)
        )
        c.unique((it.id for it in items), "items[{}].id")
        return cls(
            batch_id=c.text(m["batch_id"], "batch_id", limits.max_id_chars, blank_ok=True),
            items=items,
            model_id=c.text(m["model_id"], "model_id", limits.max_id_chars),
            produced_at=c.number(m["produced_at"], "produced_at", lo=0.0),
            timings=Timings.from_obj(m["timings"]),
            embedding_format=fmt,  # type: ignore[arg-type]
        )

    def to_obj(self) -> dict[str, Any]:
        fmt = self.embedding_format
        items = self.items
        if isinstance(items, list | tuple):
            items = [it.to_obj(fmt) if isinstance(it, ItemScore) else it for it in items]
        timings = self.timings.to_obj() if isinstance(self.timings, Timings) else self.timings
        obj = {
            "v": c.VERSION,
            "batch_id": self.batch_id,
            "model_id": self.model_id,
            "produced_at": self.produced_at,
            "timings": timings,
            "items": items,
        }
        if fmt != "float":  # absent means floats: readers that predate the key still work
            obj["embedding_format"] = fmt
        return obj


def encode_score_batch(batch: ScoreBatch, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Validate with the decoder's rules (finite scores, ...), then serialise."""
    if not isinstance(batch, ScoreBatch):
        raise SchemaError("$", "type", f"expected ScoreBatch, got {type(batch).__name__}")
    if batch.embedding_format not in EMBEDDING_FORMATS:
        raise SchemaError("embedding_format", "enum", f"got {batch.embedding_format!r}")
    checked = ScoreBatch.from_obj(batch.to_obj(), limits)
    # Embeddings were decoded to floats by the check: encode the caller's values, not those.
    return c.dump_message(replace(checked, items=batch.items).to_obj(), limits)


@c.decoder
def decode_score_batch(data: bytes, limits: Limits = DEFAULT_LIMITS) -> ScoreBatch:
    """Size, then JSON/UTF-8, then version, then fields; raises only SchemaError."""
    return ScoreBatch.from_obj(c.load_message(data, limits), limits)


def encode_scores_to_fit(scores: ScoreBatch, limits: Limits) -> list[bytes]:
    """Encode `scores`, split by items into ScoreBatches (same batch_id) that each fit the
    limits (200 query embeddings as JSON floats do not fit 1 MiB). Items are packed by their
    own JSON size (orjson: cheap), so each item is validated and encoded once, as a rule.
    The common case, a batch that fits, is one encode."""
    try:
        return [encode_score_batch(scores, limits)]
    except SchemaError as exc:
        if exc.rule != "max_bytes":
            raise
    envelope = len(encode_score_batch(replace(scores, items=()), limits)) + 1  # + "]"
    budget = limits.max_encoded_bytes - envelope
    groups: list[list[ItemScore]] = [[]]
    size = 0
    for item in scores.items:
        n = len(orjson.dumps(item.to_obj(scores.embedding_format))) + 1  # + ","
        if groups[-1] and size + n > budget:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    return [m for g in groups for m in _encode_halving(replace(scores, items=tuple(g)), limits)]


def _encode_halving(scores: ScoreBatch, limits: Limits) -> list[bytes]:
    # The estimate is exact today; halving keeps a future format change from failing batches.
    try:
        return [encode_score_batch(scores, limits)]
    except SchemaError as exc:
        if exc.rule != "max_bytes" or len(scores.items) < 2:
            raise
    mid = len(scores.items) // 2
    return (_encode_halving(replace(scores, items=scores.items[:mid]), limits)
            + _encode_halving(replace(scores, items=scores.items[mid:]), limits))


@dataclass(frozen=True, slots=True)
class ScoreArrays:
    """A worker's scores for the items of one TokenBatch, as arrays: encoded in one orjson
    call with no ItemScore (or float) object per score. Decodes to the same ScoreBatch as the
    ItemScore path; `to_score_batch` builds that path's object for the rare fallbacks."""

    batch_id: str
    item_ids: tuple[str, ...]
    model_id: str
    model_version: str
    produced_at: float
    timings: Timings
    scores: np.ndarray  # float32 [n]: item i's are scores[score_offsets[i]:score_offsets[i+1]]
    score_offsets: np.ndarray  # int64 [n_items + 1]
    # float32 [n_items, dim]; row i is item i's embedding where has_embedding[i]. None: none.
    embeddings: np.ndarray | None = None
    has_embedding: np.ndarray | None = None  # bool [n_items]
    embedding_format: EmbeddingFormat = "float"

    def to_score_batch(self) -> ScoreBatch:
        items = []
        for i, item_id in enumerate(self.item_ids):
            emb = None
            if self.embeddings is not None and self.has_embedding is not None and (
                    self.has_embedding[i]):
                emb = tuple(self.embeddings[i].astype(np.float64).tolist())
            lo, hi = int(self.score_offsets[i]), int(self.score_offsets[i + 1])
            items.append(ItemScore(id=item_id, scores=tuple(
                self.scores[lo:hi].astype(np.float64).tolist()), cached=False,
                model_version=self.model_version, embedding=emb))
        return ScoreBatch(batch_id=self.batch_id, items=tuple(items), model_id=self.model_id,
                          produced_at=self.produced_at, timings=self.timings,
                          embedding_format=self.embedding_format)


def encode_score_arrays(sa: ScoreArrays, limits: Limits = DEFAULT_LIMITS) -> list[bytes]:
    """Encode `sa` as one ScoreBatch message, or split by items to fit (as
    encode_scores_to_fit). The decoder's rules are checked on the arrays at once (finite
    values, counts, id lengths and uniqueness); anything they refuse is re-encoded through the
    ItemScore path, which raises the precise SchemaError."""
    n = len(sa.item_ids)
    counts = np.diff(sa.score_offsets)
    emb = sa.embeddings
    has = sa.has_embedding if emb is not None else None
    ok = (n <= limits.max_items and len(sa.score_offsets) == n + 1
          and (not n or int(counts.max()) <= limits.max_docs_per_item)
          and bool(np.isfinite(sa.scores).all())
          and sa.embedding_format in EMBEDDING_FORMATS
          and len(set(sa.item_ids)) == n
          and max(map(len, sa.item_ids), default=0) <= limits.max_id_chars
          and min(map(len, sa.item_ids), default=1) >= 1)
    if ok and emb is not None and has is not None and has.any():
        ok = (emb.ndim == 2 and 1 <= emb.shape[1] <= limits.max_embedding_dim
              and bool(np.isfinite(emb[has]).all()))
    if not ok:
        return encode_scores_to_fit(sa.to_score_batch(), limits)
    for value, field, blank_ok in ((sa.batch_id, "batch_id", True),
                                   (sa.model_id, "model_id", False),
                                   (sa.model_version, "model_version", False)):
        c.text(value, field, limits.max_id_chars, blank_ok=blank_ok)
    fmt = sa.embedding_format
    scores = np.ascontiguousarray(sa.scores, dtype=np.float32)
    offsets = sa.score_offsets.tolist()
    # Per item only what JSON needs per item: a row view per embedding and score list (orjson
    # writes float32 arrays itself), none for an item without scores.
    score_lists: list[object] = [scores[lo:hi] if hi > lo else ()
                                 for lo, hi in itertools.pairwise(offsets)]
    embeddings: list[object] = [None] * n
    if has is not None and emb is not None:
        rows = np.ascontiguousarray(emb, dtype=np.float32)
        for i in np.flatnonzero(has).tolist():
            embeddings[i] = rows[i] if fmt == "float" else pack_embedding(rows[i], fmt)
    version = sa.model_version
    items = [{"id": item_id, "scores": item_scores, "cached": False, "model_version": version,
              "embedding": embedding, "error": None}
             for item_id, item_scores, embedding in zip(sa.item_ids, score_lists, embeddings,
                                                        strict=True)]
    obj: dict[str, Any] = {"v": c.VERSION, "batch_id": sa.batch_id, "model_id": sa.model_id,
                           "produced_at": sa.produced_at, "timings": sa.timings.to_obj(),
                           "items": items}
    if fmt != "float":
        obj["embedding_format"] = fmt
    try:
        data = orjson.dumps(obj, option=_NUMPY)
    except orjson.JSONEncodeError:  # e.g. a lone surrogate in an id: the precise error
        return encode_scores_to_fit(sa.to_score_batch(), limits)
    if len(data) <= limits.max_encoded_bytes:
        return [data]
    # Too big for one message (many embeddings as floats): pack items by their own size.
    envelope = len(orjson.dumps({**obj, "items": []}, option=_NUMPY)) + 1
    budget = limits.max_encoded_bytes - envelope
    out: list[bytes] = []
    group: list[dict[str, Any]] = []
    size = 0
    for item in items:
        k = len(orjson.dumps(item, option=_NUMPY)) + 1
        if group and size + k > budget:
            out.append(orjson.dumps({**obj, "items": group}, option=_NUMPY))
            group, size = [], 0
        if k > budget:  # one item alone over the limit: the precise error
            raise SchemaError(f"items[{items.index(item)}]", "max_bytes", f"got {k}",
                              limit=limits.max_encoded_bytes)
        group.append(item)
        size += k
    out.append(orjson.dumps({**obj, "items": group}, option=_NUMPY))
    return out
