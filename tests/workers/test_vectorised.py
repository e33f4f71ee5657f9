"""The worker's array path equals the per-object path it replaced (pure logic, property tests).

Batch picking, padding, score assembly and score encoding run on arrays for host cost; each is
checked here against a plain reference on random inputs.
"""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.batch import pad_gather, pad_sequences
from schemas import (
    Limits,
    SchemaError,
    ScoreArrays,
    Timings,
    TokenBatch,
    decode_score_batch,
    encode_score_arrays,
    encode_scores_to_fit,
)
from tests.schemas.strategies import token_batches
from workers.assemble import item_scores, score_arrays
from workers.microbatcher import BatcherSettings, MicroBatcher, _closest_block


def greedy_block(lengths: list[int], max_batch: int, token_budget: int) -> list[int]:
    """The loop the batcher used before (one Python object per sequence): the reference."""
    ranked = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    k = ranked.index(0)
    lo = hi = k
    longest = lengths[0]
    while hi - lo + 1 < max_batch:
        left = ranked[lo - 1] if lo > 0 else None
        right = ranked[hi + 1] if hi + 1 < len(ranked) else None
        if left is None and right is None:
            break
        take_left = right is None or (
            left is not None and lengths[0] - lengths[left] <= lengths[right] - lengths[0])
        new_longest = longest if take_left else max(longest, lengths[right])  # type: ignore[index]
        if (hi - lo + 2) * new_longest > token_budget:
            break
        lo, hi = (lo - 1, hi) if take_left else (lo, hi + 1)
        longest = new_longest
    return sorted(ranked[lo:hi + 1])


@given(st.lists(st.integers(1, 40), min_size=1, max_size=80), st.integers(1, 20),
       st.integers(1, 300))
def test_closest_block_picks_what_the_greedy_loop_picked(lengths: list[int], max_batch: int,
                                                         budget: int) -> None:
    got = _closest_block(np.array(lengths, dtype=np.int64), max_batch, budget)
    assert sorted(got.tolist()) == greedy_block(lengths, max_batch, budget)


def _tb(lengths: list[int], name: str) -> TokenBatch:
    offsets = np.zeros(len(lengths) + 1, dtype=np.uint32)
    np.cumsum(lengths, out=offsets[1:])
    return TokenBatch(
        batch_id=name, item_ids=tuple(f"i{k}" for k in range(len(lengths))), tokenizer_id="t",
        max_length=512, seq_item=np.arange(len(lengths), dtype=np.uint32),
        seq_doc=np.full(len(lengths), -1, dtype=np.int32), offsets=offsets,
        input_ids=np.arange(int(offsets[-1]), dtype=np.uint32), token_type_ids=None,
        truncated=np.zeros(len(lengths), dtype=bool), submitted_at=0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 30), min_size=1, max_size=40), min_size=1, max_size=6),
       st.integers(1, 16), st.integers(1, 200), st.integers(1, 64))
def test_every_sequence_is_batched_once_and_its_output_comes_home(
        jobs: list[list[int]], max_batch: int, budget: int, window: int) -> None:
    async def run() -> None:
        batcher = MicroBatcher(BatcherSettings(max_batch=max_batch, token_budget=budget,
                                               max_wait_ms=0, window=window))
        futures = [await batcher.submit(_tb(lengths, f"j{j}")) for j, lengths in
                   enumerate(jobs)]
        seen: set[tuple[int, int]] = set()
        while batcher.depth():
            batch = await batcher.next_batch()
            lengths = batch.lengths
            assert 1 <= batch.size <= max_batch and len(lengths) == batch.size
            assert batch.size == 1 or batch.size * int(lengths.max()) <= budget
            padded = batch.padded()
            rows = []
            for part in batch.parts:
                j = int(part.job.tb.batch_id[1:])
                for i in part.index.tolist():
                    assert (j, i) not in seen
                    seen.add((j, i))
                    rows.append([j, i])
            # Row r of the padded batch holds that sequence's own tokens.
            for r, (j, i) in enumerate(rows):
                tb = _tb(jobs[j], "x")
                want = tb.input_ids[tb.offsets[i]:tb.offsets[i + 1]]
                assert padded.input_ids[r, :len(want)].tolist() == want.tolist()
            batcher.complete(batch, np.array(rows, dtype=np.float32))
        assert len(seen) == sum(map(len, jobs))
        for j, future in enumerate(futures):
            out = future.result()
            assert out[:, 0].tolist() == [j] * len(jobs[j])
            assert out[:, 1].tolist() == list(range(len(jobs[j])))

    asyncio.run(run())


async def test_a_batch_splits_into_halves_that_cover_it() -> None:
    batcher = MicroBatcher(BatcherSettings(max_batch=16, max_wait_ms=0))
    for name, lengths in (("a", [3, 4, 5]), ("b", [4, 4]), ("c", [5, 6, 7])):
        await batcher.submit(_tb(lengths, name))
    batch = await batcher.next_batch()
    head, tail = batch.split()
    assert (head.size, tail.size) == (4, 4)
    whole = [(p.job.tb.batch_id, i) for p in batch.parts for i in p.index.tolist()]
    halves = [(p.job.tb.batch_id, i) for h in (head, tail) for p in h.parts
              for i in p.index.tolist()]
    assert halves == whole
    one, other = head.split()
    assert (one.size, other.size) == (2, 2)


@given(st.lists(st.tuples(st.integers(1, 9), st.integers(0, 20)), min_size=1, max_size=12),
       st.booleans())
def test_pad_gather_equals_pad_sequences(rows: list[tuple[int, int]], typed: bool) -> None:
    rng = np.random.default_rng(len(rows))
    ids = rng.integers(0, 30_000, 64).astype(np.uint32)
    types = rng.integers(0, 2, 64).astype(np.uint8) if typed else None
    lengths = np.array([n for n, _ in rows])
    starts = np.array([min(s, 64 - n) for n, s in rows])
    half = len(rows) // 2  # two sources, as two TokenBatches in one micro-batch
    got = pad_gather([(ids, types, starts[:half], lengths[:half]),
                      (ids, types, starts[half:], lengths[half:])])
    seqs = [ids[s:s + n] for s, n in zip(starts, lengths, strict=True)]
    want = pad_sequences(seqs, None if types is None else
                         [types[s:s + n] for s, n in zip(starts, lengths, strict=True)])
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name


def _outputs(tb: TokenBatch, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if tb.head == "classifier":
        return rng.random(tb.n_sequences).astype(np.float32)
    rows = rng.normal(size=(tb.n_sequences, 8)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _arrays(tb: TokenBatch, outputs: np.ndarray, fmt: str = "float") -> ScoreArrays:
    assert tb.head is not None
    scores, offsets, emb, has = score_arrays(tb, outputs, head=tb.head)
    return ScoreArrays(batch_id=tb.batch_id, item_ids=tb.item_ids, model_id="m",
                       model_version="v1", produced_at=1.5, timings=Timings(queue_ms=2.0),
                       scores=scores, score_offsets=offsets, embeddings=emb,
                       has_embedding=has, embedding_format=fmt)  # type: ignore[arg-type]


@settings(max_examples=80, deadline=None)
@given(token_batches(), st.integers(0, 1000))
def test_score_arrays_decode_to_what_item_scores_gave(tb: TokenBatch, seed: int) -> None:
    assert tb.head is not None
    outputs = _outputs(tb, seed)
    (data,) = encode_score_arrays(_arrays(tb, outputs))
    got = decode_score_batch(data)
    want = item_scores(tb, outputs, head=tb.head, model_version="v1")
    assert [i.id for i in got.items] == [i.id for i in want]
    for a, b in zip(got.items, want, strict=True):
        # Floats travel at float32 precision; a cosine may differ in its last bit (one einsum
        # for the batch against a matmul per item: another summation order).
        assert np.allclose(np.float32(a.scores), np.float32(b.scores), rtol=1e-6, atol=1e-7)
        assert (a.embedding is None) == (b.embedding is None)
        if a.embedding is not None:
            assert np.array_equal(np.float32(a.embedding), np.float32(b.embedding))
        assert a.model_version == "v1" and not a.cached and a.error is None
    assert got.batch_id == tb.batch_id and got.timings.queue_ms == 2.0


@pytest.mark.parametrize("fmt", ["float", "base64", "base64-f16"])
def test_array_path_splits_to_fit_like_the_item_path(fmt: str) -> None:
    n = 40
    tb = _tb([3] * n, "big")
    tb = TokenBatch(**{**{f: getattr(tb, f) for f in tb.__dataclass_fields__},
                       "head": "similarity"})
    outputs = _outputs(tb, 7)
    limits = Limits(max_message_bytes=6_000)
    parts = encode_score_arrays(_arrays(tb, outputs, fmt), limits)
    assert all(len(p) <= limits.max_encoded_bytes for p in parts)
    decoded = [decode_score_batch(p, limits) for p in parts]
    ids = [i.id for d in decoded for i in d.items]
    assert ids == list(tb.item_ids)  # every item once, in order
    assert len(parts) == len(encode_scores_to_fit(_arrays(tb, outputs, fmt).to_score_batch(),
                                                  limits))
    for item, row in zip((i for d in decoded for i in d.items), outputs, strict=True):
        got = np.float32(item.embedding)
        if fmt == "base64-f16":  # half precision: ~3 significant digits
            assert np.allclose(got, row, atol=1e-3, rtol=0)
        else:  # float32 exactly, as JSON text or as bytes
            assert np.array_equal(got, row)
    if fmt != "float":
        assert all(orjson.loads(p)["embedding_format"] == fmt for p in parts)


def test_non_finite_scores_get_the_item_paths_precise_error() -> None:
    tb = _tb([3, 3], "nan")
    tb = TokenBatch(**{**{f: getattr(tb, f) for f in tb.__dataclass_fields__},
                       "head": "classifier"})
    arrays = _arrays(tb, np.array([0.5, np.nan], dtype=np.float32))
    with pytest.raises(SchemaError) as info:
        encode_score_arrays(arrays)
    assert (info.value.field, info.value.rule) == ("items[1].scores[0]", "finite")
