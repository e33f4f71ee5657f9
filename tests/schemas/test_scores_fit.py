"""Score batches split to fit a message, with room left for Kafka's record overhead."""

from __future__ import annotations

import numpy as np

from schemas import (
    ItemScore,
    Limits,
    ScoreBatch,
    Timings,
    decode_score_batch,
    encode_scores_to_fit,
)


def test_cached_score_batches_split_to_fit() -> None:
    items = tuple(ItemScore(id=f"q{i}", scores=(), cached=True, model_version="v1",
                            embedding=tuple(np.linspace(-1, 1, 384).tolist()))
                  for i in range(30))
    scores = ScoreBatch(batch_id="b", items=items, model_id="m", produced_at=1.0,
                        timings=Timings(tokenize_ms=1.0))
    limits = Limits(max_message_bytes=64_000)
    messages = encode_scores_to_fit(scores, limits)
    assert len(messages) > 1 and all(len(m) <= 64_000 for m in messages)
    decoded = [decode_score_batch(m, limits) for m in messages]
    assert [it for b in decoded for it in b.items] == list(items)
    assert {b.batch_id for b in decoded} == {"b"}


def test_200_query_embeddings_split_and_every_part_leaves_record_headroom() -> None:
    # 200 queries without docs: one 384-float embedding each, ~1.6 MB as JSON floats.
    rng = np.random.default_rng(0)
    items = tuple(ItemScore(id=f"q{i}", scores=(), cached=False, model_version="v1",
                            embedding=tuple(rng.standard_normal(384).tolist()))
                  for i in range(200))
    scores = ScoreBatch(batch_id="b" * 256, items=items, model_id="m", produced_at=1.0,
                        timings=Timings())
    limits = Limits()
    messages = encode_scores_to_fit(scores, limits)
    assert len(messages) >= 2
    assert all(len(m) <= limits.max_encoded_bytes for m in messages)
    # Value plus a 256-char key plus ~70 bytes of batch overhead fit message.max.bytes.
    assert all(len(m) + 256 * 4 + 70 <= 1_048_588 for m in messages)
    assert [it for m in messages for it in decode_score_batch(m, limits).items] == list(items)
