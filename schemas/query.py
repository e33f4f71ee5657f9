"""Query batches: what producers publish to the query topic (JSON, ``"v": 1``).

Wire form::

    {"v": 1, "batch_id": "b1", "submitted_at": 1700000000.5, "reply_topic": null,
     "priority": "online", "items": [{"id": "q1", "query": "red shoes", "docs": ["..."]}]}

`docs` is omitted (or null) for a query scored alone; item ids may be JSON ints and are then
stored as strings, since consumers correlate by string id. An optional ``"embedding_format"``
("float", "base64" or "base64-f16", see schemas.scores) asks for embeddings in that form; absent,
the fleet's default applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from . import _check as c
from .errors import SchemaError
from .limits import DEFAULT_LIMITS, Limits
from .scores import EMBEDDING_FORMATS, EmbeddingFormat

Priority = Literal["online", "offline"]
PRIORITIES: tuple[str, ...] = get_args(Priority)


@dataclass(frozen=True, slots=True)
class QueryItem:
    """One query, optionally with the documents to score it against."""

    id: str
    query: str
    docs: tuple[str, ...] | None = None

    @classmethod
    def from_obj(
        cls, obj: object, limits: Limits = DEFAULT_LIMITS, where: str = "item"
    ) -> QueryItem:
        """Validate a decoded JSON object (also used for JSONL query logs, one item a line)."""
        m = c.keys(obj, where, ("id", "query"), ("docs",))
        raw_id = m["id"]
        if isinstance(raw_id, int) and not isinstance(raw_id, bool):
            raw_id = str(raw_id)
        item_id = c.text(raw_id, c.join(where, "id"), limits.max_id_chars, blank_ok=True)
        query = c.text(m["query"], c.join(where, "query"), limits.max_query_chars)
        docs = _docs(m.get("docs"), c.join(where, "docs"), limits)
        return cls(item_id, query, docs)

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"id": self.id, "query": self.query}
        if self.docs is not None:
            obj["docs"] = self.docs
        return obj


def _plain_item(obj: object, limits: Limits) -> QueryItem | None:
    """The common item (ASCII strings within the limits, no extra keys) without building a
    field path per check; None for anything else, which QueryItem.from_obj then validates
    (and refuses with the precise error). Must accept nothing that from_obj refuses."""
    if type(obj) is not dict or not 2 <= len(obj) <= 3:
        return None
    item_id, query, docs = obj.get("id"), obj.get("query"), obj.get("docs")
    if (type(item_id) is not str or type(query) is not str or not item_id or not query
            or (len(obj) == 3 and "docs" not in obj)
            or len(item_id) > limits.max_id_chars or len(query) > limits.max_query_chars
            or not (item_id.isascii() and query.isascii()) or query.isspace()):
        return None
    if docs is None:
        return QueryItem(item_id, query, None)
    if (type(docs) is not list or not 1 <= len(docs) <= limits.max_docs_per_item
            or not all(type(d) is str and d and len(d) <= limits.max_doc_chars and d.isascii()
                       for d in docs)):
        return None
    return QueryItem(item_id, query, tuple(docs))


def _docs(value: object, field: str, limits: Limits) -> tuple[str, ...] | None:
    if value is None:
        return None
    docs = c.array(value, field, limits.max_docs_per_item, min_items=1)
    return tuple(
        c.text(d, f"{field}[{i}]", limits.max_doc_chars, blank_ok=True) for i, d in enumerate(docs)
    )


@dataclass(frozen=True, slots=True)
class QueryBatch:
    """A producer's batch; item ids are unique within it."""

    batch_id: str
    items: tuple[QueryItem, ...]
    submitted_at: float  # unix seconds, set by the producer; queue time is measured from it
    reply_topic: str | None = None  # score topic override; None = the fleet's default
    priority: Priority = "online"
    embedding_format: EmbeddingFormat | None = None  # None: the fleet's default

    @classmethod
    def from_obj(cls, obj: object, limits: Limits = DEFAULT_LIMITS) -> QueryBatch:
        required = ("v", "batch_id", "items", "submitted_at")
        m = c.keys(obj, "", required, ("reply_topic", "priority", "embedding_format"))
        c.check_version(m)
        batch_id = c.text(m["batch_id"], "batch_id", limits.max_id_chars, blank_ok=True)
        raw_items = c.array(m["items"], "items", limits.max_items, min_items=1)
        items = tuple(
            _plain_item(it, limits) or QueryItem.from_obj(it, limits, f"items[{i}]")
            for i, it in enumerate(raw_items)
        )
        c.unique((it.id for it in items), "items[{}].id")
        return cls(
            batch_id=batch_id,
            items=items,
            submitted_at=c.number(m["submitted_at"], "submitted_at", lo=0.0),
            reply_topic=c.topic(m.get("reply_topic"), "reply_topic", limits),
            priority=c.enum(m.get("priority", "online"), "priority", PRIORITIES),  # type: ignore[arg-type]
            embedding_format=None if m.get("embedding_format") is None else c.enum(  # type: ignore[arg-type]
                m["embedding_format"], "embedding_format", EMBEDDING_FORMATS),
        )

    def to_obj(self) -> dict[str, Any]:
        items = self.items
        if isinstance(items, list | tuple):
            items = [it.to_obj() if isinstance(it, QueryItem) else it for it in items]
        obj = {
            "v": c.VERSION,
            "batch_id": self.batch_id,
            "submitted_at": self.submitted_at,
            "reply_topic": self.reply_topic,
            "priority": self.priority,
            "items": items,
        }
        if self.embedding_format is not None:  # absent: the fleet's default
            obj["embedding_format"] = self.embedding_format
        return obj


def encode_query_batch(batch: QueryBatch, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Validate with the decoder's rules, then serialise; never emits what decode rejects."""
    if not isinstance(batch, QueryBatch):
        raise SchemaError("$", "type", f"expected QueryBatch, got {type(batch).__name__}")
    return c.dump_message(QueryBatch.from_obj(batch.to_obj(), limits).to_obj(), limits)


@c.decoder
def decode_query_batch(data: bytes, limits: Limits = DEFAULT_LIMITS) -> QueryBatch:
    """Size, then JSON/UTF-8, then version, then fields; raises only SchemaError."""
    return QueryBatch.from_obj(c.load_message(data, limits), limits)
