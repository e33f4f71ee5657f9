"""Every codec round-trips every valid object, and its encoding is canonical."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings

from schemas import (
    DeadLetter,
    QueryBatch,
    ScoreBatch,
    TokenBatch,
    decode_dead_letter,
    decode_query_batch,
    decode_score_batch,
    decode_token_batch,
    encode_dead_letter,
    encode_query_batch,
    encode_score_batch,
    encode_token_batch,
    encoded_size,
)
from tests.schemas.strategies import (
    dead_letters,
    query_batches,
    score_batches,
    token_batches,
)

FAST = settings(max_examples=150, deadline=None)


@FAST
@given(query_batches)
def test_query_batch_round_trips(batch: QueryBatch) -> None:
    data = encode_query_batch(batch)
    assert decode_query_batch(data) == batch
    assert encode_query_batch(decode_query_batch(data)) == data


@FAST
@given(score_batches)
def test_score_batch_round_trips(batch: ScoreBatch) -> None:
    data = encode_score_batch(batch)
    assert decode_score_batch(data) == batch
    assert encode_score_batch(decode_score_batch(data)) == data


@FAST
@given(dead_letters)
def test_dead_letter_round_trips(dl: DeadLetter) -> None:
    data = encode_dead_letter(dl)
    assert decode_dead_letter(data) == dl
    assert encode_dead_letter(decode_dead_letter(data)) == data


@FAST
@given(token_batches())
def test_token_batch_round_trips(tb: TokenBatch) -> None:
    data = encode_token_batch(tb)
    assert len(data) == encoded_size(tb)
    back = decode_token_batch(data)
    assert back == tb
    assert encode_token_batch(back) == data
    # Fixed dtypes whatever the wire width, so workers never branch on it.
    assert back.input_ids.dtype == np.uint32 and back.offsets.dtype == np.uint32
    assert back.seq_item.dtype == np.uint32 and back.seq_doc.dtype == np.int32
    assert back.truncated.dtype == np.bool_
    assert back.token_type_ids is None or back.token_type_ids.dtype == np.uint8
    assert back.cache_keys is None or (
        back.cache_keys.dtype == np.uint8 and back.cache_keys.shape == (back.n_sequences, 16)
    )
    for i in range(back.n_sequences):
        np.testing.assert_array_equal(back.sequence(i), tb.sequence(i))
    np.testing.assert_array_equal(back.lengths, np.diff(tb.offsets.astype(np.int64)))
