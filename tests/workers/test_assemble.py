"""Per-sequence outputs -> per-item scores (pure logic, fake engine outputs)."""

from __future__ import annotations

import numpy as np
import pytest

from schemas import TokenBatch
from workers.assemble import item_scores


def _tb(seq_item: list[int], seq_doc: list[int], n_items: int) -> TokenBatch:
    n = len(seq_item)
    return TokenBatch(
        batch_id="b", item_ids=tuple(f"i{k}" for k in range(n_items)), tokenizer_id="t",
        max_length=8, seq_item=np.array(seq_item, dtype=np.uint32),
        seq_doc=np.array(seq_doc, dtype=np.int32),
        offsets=np.arange(n + 1, dtype=np.uint32), input_ids=np.ones(n, dtype=np.uint32),
        token_type_ids=None, truncated=np.zeros(n, dtype=bool), submitted_at=0.0)


def test_similarity_scores_are_dot_products_aligned_with_docs() -> None:
    q = np.array([1.0, 0.0])
    d0 = np.array([0.6, 0.8])
    d1 = np.array([0.0, 1.0])
    # Item 0: query + two docs (given out of order); item 1: query only.
    tb = _tb([0, 0, 0, 1], [1, -1, 0, -1], 2)
    outputs = np.stack([d1, q, d0, d1]).astype(np.float32)
    a, b = item_scores(tb, outputs, head="similarity", model_version="v1")
    assert a.id == "i0" and a.scores == pytest.approx((0.6, 0.0)) and a.embedding is None
    assert b.scores == () and b.embedding == pytest.approx((0.0, 1.0))
    assert a.model_version == "v1" and not a.cached


def test_classifier_scores_per_pair_or_query_alone() -> None:
    tb = _tb([0, 0, 1], [1, 0, -1], 2)
    a, b = item_scores(tb, np.array([0.2, 0.9, 0.5], dtype=np.float32), head="classifier",
                       model_version="v1")
    assert a.scores == pytest.approx((0.9, 0.2))
    assert b.scores == pytest.approx((0.5,))


def test_output_count_must_match_sequences() -> None:
    with pytest.raises(ValueError, match="3 outputs for 2 sequences"):
        item_scores(_tb([0, 0], [-1, 0], 1), np.zeros((3, 2)), head="similarity",
                    model_version="v")
