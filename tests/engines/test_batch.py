"""Micro-batch planning and padding (pure logic)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from engines.batch import pad_sequences, plan_batches


@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=300),
       max_batch=st.integers(1, 64), budget=st.integers(1, 8192))
def test_plan_covers_everything_within_limits(lengths: list[int], max_batch: int,
                                              budget: int) -> None:
    arr = np.array(lengths)
    batches = plan_batches(arr, max_batch=max_batch, token_budget=budget)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # each sequence exactly once
    previous_max = 0
    for rows in batches:
        longest = int(arr[rows].max())
        assert len(rows) <= max_batch
        assert len(rows) == 1 or len(rows) * longest <= budget
        assert int(arr[rows].min()) >= previous_max  # length-sorted across batches
        previous_max = longest


def test_plan_fills_batches_when_sequences_are_short() -> None:
    batches = plan_batches(np.full(100, 10), max_batch=32, token_budget=10_000)
    assert [len(b) for b in batches] == [32, 32, 32, 4]


def test_token_budget_shrinks_long_batches() -> None:
    batches = plan_batches(np.array([10] * 8 + [200] * 8), max_batch=8, token_budget=800)
    assert [len(b) for b in batches] == [8, 4, 4]


def test_pad_sequences_masks_and_type_ids() -> None:
    seqs = [np.array([101, 7, 102]), np.array([101, 102])]
    types = [np.array([0, 0, 1]), np.array([0, 1])]
    batch = pad_sequences(seqs, types)
    assert batch.input_ids.tolist() == [[101, 7, 102], [101, 102, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.token_type_ids.tolist() == [[0, 0, 1], [0, 1, 0]]
    assert batch.input_ids.dtype == np.int64
    assert (batch.size, batch.length, batch.real_tokens) == (2, 3, 5)
