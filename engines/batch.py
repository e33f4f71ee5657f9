"""Micro-batch planning and padding: pure functions shared by the fleet and offline re-scoring.

Sorting by length before cutting batches means each batch pads only to its own longest
sequence, and a token budget (padded length x count) keeps long batches from blowing up
latency and memory while short ones still fill up to `max_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class PaddedBatch:
    """Engine input: int64 [n, longest] arrays, the layout ONNX exports of BERT take."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def plan_batches(lengths: np.ndarray, *, max_batch: int, token_budget: int) -> list[np.ndarray]:
    """Cut length-sorted sequence indices into batches within count and padded-token limits.

    A single sequence longer than the budget still gets a batch of its own: the budget bounds
    batching, it must never make a sequence unschedulable.
    """
    if max_batch < 1 or token_budget < 1:
        raise ValueError("max_batch and token_budget must be >= 1")
    order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        end = start + 1
        # Ascending order: the candidate is always the longest, so padded size is count x it.
        while (end < n and end - start < max_batch
               and (end - start + 1) * int(lengths[order[end]]) <= token_budget):
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def pad_sequences(
    sequences: Sequence[np.ndarray],
    type_ids: Sequence[np.ndarray] | None = None,
    *,
    pad_id: int = 0,
) -> PaddedBatch:
    """Right-pad token id arrays to the longest of them."""
    if not sequences:
        raise ValueError("cannot pad an empty batch")
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    longest = int(lengths.max())
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    types = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        if type_ids is not None:
            types[row, : len(seq)] = type_ids[row]
    mask = (np.arange(longest)[None, :] < lengths[:, None]).astype(np.int64)
    return PaddedBatch(input_ids=ids, attention_mask=mask, token_type_ids=types)


def pad_gather(
    sources: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]],
    *,
    pad_id: int = 0,
) -> PaddedBatch:
    """Right-pad rows gathered straight from flat token arrays, one vector gather per source.

    Each source is (input_ids, token_type_ids or None, starts, lengths): row r of it is
    ``input_ids[starts[r]:starts[r] + lengths[r]]``. No per-row Python: this runs once per
    engine call with up to hundreds of rows.
    """
    if not sources:
        raise ValueError("cannot pad an empty batch")
    lengths = np.concatenate([np.asarray(src[3], dtype=np.int64) for src in sources])
    if not lengths.size:
        raise ValueError("cannot pad an empty batch")
    longest = int(lengths.max())
    columns = np.arange(longest)
    real = columns[None, :] < lengths[:, None]
    ids = np.full((len(lengths), longest), pad_id, dtype=np.int64)
    types = np.zeros((len(lengths), longest), dtype=np.int64)
    row = 0
    for input_ids, type_ids, starts, src_lengths in sources:
        k = len(src_lengths)
        mask = real[row:row + k]
        at = (np.asarray(starts, dtype=np.int64)[:, None] + columns[None, :])[mask]
        ids[row:row + k][mask] = input_ids[at]
        if type_ids is not None:
            types[row:row + k][mask] = type_ids[at]
        row += k
    return PaddedBatch(input_ids=ids, attention_mask=real.astype(np.int64),
                       token_type_ids=types)
