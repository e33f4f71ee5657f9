"""Score batches: what workers (or the tokenizer, on cache hits) publish (JSON, ``"v": 1``).

Wire form::

    {"v": 1, "batch_id": "b1", "model_id": "all-minilm-l6-v2", "produced_at": 1700000001.2,
     "timings": {"tokenize_ms": 1.1, "queue_ms": 0.4, "inference_ms": 6.0, "total_ms": 8.3},
     "items": [{"id": "q1", "scores": [0.81, 0.12], "cached": false, "model_version": "3f2a..",
                "embedding": null, "error": null}]}

`scores` follow the item's docs. With no docs, a classifier head gives one score for the query
alone, and a similarity head gives no scores but the query's `embedding`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import orjson

from . import _check as c
from .errors import SchemaError
from .limits import DEFAULT_LIMITS, Limits


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
        cls, obj: object, limits: Limits = DEFAULT_LIMITS, where: str = "item"
    ) -> ItemScore:
        required = ("id", "scores", "cached", "model_version")
        m = c.keys(obj, where, required, ("embedding", "error"))
        embedding = m.get("embedding")
        if embedding is not None:
            field = c.join(where, "embedding")
            embedding = c.floats(embedding, field, limits.max_embedding_dim, min_items=1)
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

    def to_obj(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scores": self.scores,
            "cached": self.cached,
            "model_version": self.model_version,
            "embedding": self.embedding,
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

    @classmethod
    def from_obj(cls, obj: object, limits: Limits = DEFAULT_LIMITS) -> ScoreBatch:
        required = ("v", "batch_id", "items", "model_id", "produced_at", "timings")
        m = c.keys(obj, "", required)
        c.check_version(m)
        # Empty is allowed: a batch whose items all failed upstream still gets an answer.
        raw_items = c.array(m["items"], "items", limits.max_items)
        items = tuple(
            ItemScore.from_obj(it, limits, f"items[{i}]") for i, it in enumerate(raw_items)
        )
        c.unique((it.id for it in items), "items[{}].id")
        return cls(
            batch_id=c.text(m["batch_id"], "batch_id", limits.max_id_chars, blank_ok=True),
            items=items,
            model_id=c.text(m["model_id"], "model_id", limits.max_id_chars),
            produced_at=c.number(m["produced_at"], "produced_at", lo=0.0),
            timings=Timings.from_obj(m["timings"]),
        )

    def to_obj(self) -> dict[str, Any]:
        items = self.items
        if isinstance(items, list | tuple):
            items = [it.to_obj() if isinstance(it, ItemScore) else it for it in items]
        timings = self.timings.to_obj() if isinstance(self.timings, Timings) else self.timings
        return {
            "v": c.VERSION,
            "batch_id": self.batch_id,
            "model_id": self.model_id,
            "produced_at": self.produced_at,
            "timings": timings,
            "items": items,
        }


def encode_score_batch(batch: ScoreBatch, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Validate with the decoder's rules (finite scores, ...), then serialise."""
    if not isinstance(batch, ScoreBatch):
        raise SchemaError("$", "type", f"expected ScoreBatch, got {type(batch).__name__}")
    return c.dump_message(ScoreBatch.from_obj(batch.to_obj(), limits).to_obj(), limits)


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
        n = len(orjson.dumps(item.to_obj())) + 1  # + ","
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
