"""Result-cache units of query items: which digests an item is looked up under, and the item's
ItemScore when every one of them hit.

The convention, shared with the scoring worker (which writes through under the digests a
TokenBatch carries in `cache_keys`):
- unit key: ``key_digest(version, query, doc)`` per doc; ``key_digest(version, query, None)``
  for the query alone.
- similarity head: per-doc value = ``[cosine(query, doc)]``; query value = the embedding.
- classifier head: per-doc value = ``[p(positive | query, doc)]``; query-alone value = ``[p]``.
An item with docs is a hit when every doc key hits; an item without docs when its query key
hits. Pure functions only: they run on the event loop and in tokenizer processes.

`BatchKeys` holds a whole batch's digests as one bytes blob (per item: its query, then each
doc) with each item's doc count: it crosses the process boundary as two buffers, not as one
Python object per unit, and the unit rows it answers for are index arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plumbing.cache import DIGEST_BYTES, decode_floats, key_digest, query_digests
from schemas import ItemScore, QueryItem


@dataclass(frozen=True, slots=True)
class ItemKeys:
    """Digests of one item: the query alone, and each (query, doc)."""

    query: bytes
    docs: tuple[bytes, ...] = ()

    @property
    def lookup(self) -> tuple[bytes, ...]:
        """The units deciding a hit: every doc, or the query when there are none."""
        return self.docs or (self.query,)


def item_keys(item: QueryItem, model_version: str) -> ItemKeys:
    # The query digest is computed for items with docs too: a similarity TokenBatch still has
    # the query's own sequence, and the worker writes its embedding under this key.
    return ItemKeys(query=key_digest(model_version, item.query, None),
                    docs=tuple(key_digest(model_version, item.query, d)
                               for d in item.docs or ()))


def cached_item(item: QueryItem, values: Sequence[bytes | None], head: str,
                model_version: str) -> ItemScore | None:
    """The item's score from its looked-up unit values (in `ItemKeys.lookup` order), or None
    unless all of them hit. A malformed value counts as a miss: the engine recomputes it."""
    return cached_score(item.id, len(item.docs or ()), values, head, model_version)


def cached_score(item_id: str, n_docs: int, values: Sequence[bytes | None], head: str,
                 model_version: str) -> ItemScore | None:
    """`cached_item` for an item known by its id and doc count (all the service keeps)."""
    if not values or any(v is None for v in values):
        return None
    try:
        arrays = [decode_floats(v) for v in values]  # type: ignore[arg-type]
    except ValueError:
        return None
    if n_docs:
        if len(arrays) != n_docs or any(a.shape != (1,) for a in arrays):
            return None
        scores = tuple(float(a[0]) for a in arrays)
        return _finite(ItemScore(id=item_id, scores=scores, cached=True,
                                 model_version=model_version))
    (value,) = arrays
    if head == "similarity":
        if value.size < 2:  # a 1-float value under a query key is not an embedding
            return None
        return _finite(ItemScore(id=item_id, scores=(), cached=True,
                                 model_version=model_version, embedding=tuple(value.tolist())))
    if value.shape != (1,):
        return None
    return _finite(ItemScore(id=item_id, scores=(float(value[0]),), cached=True,
                             model_version=model_version))


def _finite(score: ItemScore) -> ItemScore | None:
    # The ScoreBatch encoder refuses NaN/inf; a corrupt entry must not fail the whole batch.
    values = score.embedding if score.embedding is not None else score.scores
    return score if np.isfinite(np.asarray(values, dtype=np.float64)).all() else None


def sequence_keys(seq_item: np.ndarray, seq_doc: np.ndarray,
                  keys: Sequence[ItemKeys]) -> np.ndarray:
    """TokenBatch.cache_keys: uint8 [n_seq, 16], the digest of each sequence's unit (the query
    alone for seq_doc -1, else (query, doc seq_doc) of item seq_item)."""
    flat: list[bytes] = []
    base = np.empty(len(keys), dtype=np.int64)  # where each item's [query, docs...] start
    for i, k in enumerate(keys):
        base[i] = len(flat)
        flat.append(k.query)
        flat.extend(k.docs)
    table = np.frombuffer(b"".join(flat), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    rows = base[seq_item.astype(np.int64)] + 1 + seq_doc.astype(np.int64)
    return table[rows]


@dataclass(frozen=True, slots=True, eq=False)  # an array field: compare `digests` instead
class BatchKeys:
    """Every unit digest of a batch's items: `digests` holds, per item, its query's digest and
    then each doc's (16 bytes each); `n_docs` (int64 [n_items]) says how many docs each has."""

    digests: bytes
    n_docs: np.ndarray

    @property
    def starts(self) -> np.ndarray:
        """Row of each item's query digest."""
        starts = np.zeros(len(self.n_docs), dtype=np.int64)
        np.cumsum(self.n_docs[:-1] + 1, out=starts[1:])
        return starts

    def table(self) -> np.ndarray:
        """uint8 [n_units, 16], a view of `digests`."""
        return np.frombuffer(self.digests, dtype=np.uint8).reshape(-1, DIGEST_BYTES)

    def lookup(self) -> list[bytes]:
        """The digests deciding hits (`ItemKeys.lookup` of each item, in item order): every
        row but the query rows of items with docs."""
        keep = np.ones(len(self.digests) // DIGEST_BYTES, dtype=bool)
        keep[self.starts[self.n_docs > 0]] = False
        d = self.digests
        return [d[r * DIGEST_BYTES:(r + 1) * DIGEST_BYTES] for r in np.flatnonzero(keep).tolist()]

    def take(self, items: np.ndarray) -> BatchKeys:
        """The keys of items `items` (indices, ascending), in that order."""
        selected = np.zeros(len(self.n_docs), dtype=bool)
        selected[items] = True
        rows = np.repeat(selected, self.n_docs + 1)  # row -> is its item selected
        return BatchKeys(self.table()[rows].tobytes(), self.n_docs[items])

    def sequence_keys(self, seq_item: np.ndarray, seq_doc: np.ndarray) -> np.ndarray:
        """TokenBatch.cache_keys for sequences of these items (as `sequence_keys`)."""
        rows = self.starts[seq_item.astype(np.int64)] + 1 + seq_doc.astype(np.int64)
        return self.table()[rows]


def batch_keys(items: Sequence[QueryItem], model_version: str) -> BatchKeys:
    """Every unit digest of `items` (the same digests `item_keys` gives, in one blob)."""
    parts: list[bytes] = []
    for item in items:
        parts.extend(query_digests(model_version, item.query, item.docs or ()))
    n_docs = np.fromiter((len(it.docs or ()) for it in items), dtype=np.int64, count=len(items))
    return BatchKeys(b"".join(parts), n_docs)
