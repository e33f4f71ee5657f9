"""Per-sequence engine outputs -> per-item scores, aligned with each item's docs."""

from __future__ import annotations

import numpy as np

from schemas import ItemScore, TokenBatch


def item_scores(tb: TokenBatch, outputs: np.ndarray, *, head: str,
                model_version: str) -> list[ItemScore]:
    """Scores for every item of `tb`, given one output row per sequence of `tb`.

    similarity: outputs are unit vectors; score = cosine(query, doc) = their dot product, and
    a query without docs gets its embedding instead of scores.
    classifier: outputs are probabilities of the positive class, one per (query, doc) pair or
    per query alone.

    Each item is scored from its own rows only: a row it lacks (no query sequence, a gap in its
    doc indices) raises ValueError instead of borrowing another item's. The decoder refuses
    such batches (rule seq_layout); this guards TokenBatches built in-process.
    """
    n_items = len(tb.item_ids)
    if outputs.shape[0] != tb.n_sequences:
        raise ValueError(f"{outputs.shape[0]} outputs for {tb.n_sequences} sequences")
    per_item: list[list[tuple[int, int]]] = [[] for _ in range(n_items)]
    query_row = np.full(n_items, -1, dtype=np.int64)  # -1: the item has no query sequence
    for seq, (item, doc) in enumerate(zip(tb.seq_item.tolist(), tb.seq_doc.tolist(),
                                          strict=True)):
        if not 0 <= item < n_items or doc < -1:
            raise ValueError(f"TokenBatch {tb.batch_id!r}: sequence {seq} has item {item}, "
                             f"doc {doc} (items 0..{n_items - 1}, docs >= -1)")
        if doc == -1:
            if query_row[item] >= 0:
                raise ValueError(f"TokenBatch {tb.batch_id!r}: item {tb.item_ids[item]!r} "
                                 "has two query sequences")
            query_row[item] = seq
        else:
            per_item[item].append((doc, seq))
    results: list[ItemScore] = []
    for item, item_id in enumerate(tb.item_ids):
        docs = sorted(per_item[item])
        # Scores are positional: doc indices must be exactly 0..n-1, or scores land on the
        # wrong docs.
        if [d for d, _ in docs] != list(range(len(docs))):
            raise ValueError(f"TokenBatch {tb.batch_id!r}: item {item_id!r} has doc indices "
                             f"{[d for d, _ in docs]}, not 0..{len(docs) - 1}")
        needs_query = head == "similarity" or not docs
        if needs_query and query_row[item] < 0:
            # outputs[-1] would be the batch's last row: another item's.
            raise ValueError(f"TokenBatch {tb.batch_id!r}: item {item_id!r} has no query "
                             f"sequence ({head} head)")
        embedding: tuple[float, ...] | None = None
        if head == "similarity":
            query = outputs[query_row[item]]
            # tolist() converts in C; a per-float Python loop costs more than inference here.
            scores = tuple((outputs[[s for _, s in docs]] @ query).tolist()) if docs else ()
            if not docs:
                embedding = tuple(query.tolist())
        elif docs:
            scores = tuple(outputs[[s for _, s in docs]].tolist())
        else:
            scores = (float(outputs[query_row[item]]),)
        results.append(ItemScore(id=item_id, scores=scores, cached=False,
                                 model_version=model_version, embedding=embedding))
    return results


def score_arrays(tb: TokenBatch, outputs: np.ndarray, *, head: str,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Vectorised `item_scores` for a decoded TokenBatch (rule seq_layout holds: sequences
    grouped by item in order, a similarity item's query first, then docs 0..n-1 in order).

    Returns (scores float32 [n], score_offsets int64 [n_items + 1], embeddings float32
    [n_items, dim] or None, has_embedding bool [n_items] or None): item i's scores are
    scores[score_offsets[i]:score_offsets[i + 1]].
    """
    n_items, n_seq = len(tb.item_ids), tb.n_sequences
    if outputs.shape[0] != n_seq:
        raise ValueError(f"{outputs.shape[0]} outputs for {n_seq} sequences")
    items = tb.seq_item.astype(np.int64)
    starts = np.searchsorted(items, np.arange(n_items + 1))  # each item's first row
    if head == "similarity":
        docs = tb.seq_doc >= 0
        queries = outputs[starts[:-1]]  # the layout puts each item's query first
        doc_rows = np.flatnonzero(docs)
        # cosine = dot product of unit vectors; one einsum for the whole batch
        scores = np.einsum("ij,ij->i", outputs[doc_rows], queries[items[doc_rows]])
        offsets = np.zeros(n_items + 1, dtype=np.int64)
        np.cumsum(np.bincount(items[doc_rows], minlength=n_items), out=offsets[1:])
        has_embedding = offsets[1:] == offsets[:-1]  # no docs: the query's embedding instead
        return scores.astype(np.float32), offsets, queries, has_embedding
    return outputs.reshape(n_seq).astype(np.float32), starts.astype(np.int64), None, None
