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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plumbing.cache import DIGEST_BYTES, decode_floats, key_digest
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
    if not values or any(v is None for v in values):
        return None
    try:
        arrays = [decode_floats(v) for v in values]  # type: ignore[arg-type]
    except ValueError:
        return None
    if item.docs:
        if len(arrays) != len(item.docs) or any(a.shape != (1,) for a in arrays):
            return None
        scores = tuple(float(a[0]) for a in arrays)
        return _finite(ItemScore(id=item.id, scores=scores, cached=True,
                                 model_version=model_version))
    (value,) = arrays
    if head == "similarity":
        if value.size < 2:  # a 1-float value under a query key is not an embedding
            return None
        return _finite(ItemScore(id=item.id, scores=(), cached=True,
                                 model_version=model_version, embedding=tuple(value.tolist())))
    if value.shape != (1,):
        return None
    return _finite(ItemScore(id=item.id, scores=(float(value[0]),), cached=True,
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
