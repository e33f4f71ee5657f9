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
    """
    n_items = len(tb.item_ids)
    if outputs.shape[0] != tb.n_sequences:
        raise ValueError(f"{outputs.shape[0]} outputs for {tb.n_sequences} sequences")
    per_item: list[list[tuple[int, int]]] = [[] for _ in range(n_items)]
    query_row = np.full(n_items, -1, dtype=np.int64)
    for seq, (item, doc) in enumerate(zip(tb.seq_item.tolist(), tb.seq_doc.tolist(),
                                          strict=True)):
        if doc < 0:
            query_row[item] = seq
        else:
            per_item[item].append((doc, seq))
    results: list[ItemScore] = []
    for item, item_id in enumerate(tb.item_ids):
        docs = sorted(per_item[item])
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
