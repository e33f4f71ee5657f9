"""Hypothesis strategies for valid wire objects within the default limits.

Sizes stay far below the limits so examples are cheap; the rule tests cover the boundaries.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from schemas import (
    EMBEDDING_FORMATS,
    HEADS,
    PRIORITIES,
    STAGES,
    DeadLetter,
    ItemScore,
    QueryBatch,
    QueryItem,
    ScoreBatch,
    SourceRef,
    Timings,
    TokenBatch,
)
from schemas.tokens import pack_sequences

# Any Unicode scalar value (no lone surrogates: those are not UTF-8).
utf8_chars = st.characters(codec="utf-8")
texts = st.text(utf8_chars, min_size=1, max_size=40)
non_blank = texts.filter(lambda s: s.strip() != "")
ids = st.one_of(st.text(utf8_chars, min_size=1, max_size=16), st.integers(0, 10**9).map(str))
topics = st.from_regex(r"[A-Za-z0-9._-]{1,40}", fullmatch=True).filter(
    lambda t: t not in (".", "..")
)
times = st.floats(0, 4e9, allow_nan=False)
finite = st.floats(allow_nan=False, allow_infinity=False)
scores = st.floats(-1e6, 1e6, allow_nan=False)

query_items = st.builds(
    QueryItem,
    id=ids,
    query=non_blank,
    docs=st.none() | st.lists(texts, min_size=1, max_size=5).map(tuple),
)

query_batches = st.builds(
    QueryBatch,
    batch_id=ids,
    items=st.lists(query_items, min_size=1, max_size=6, unique_by=lambda i: i.id).map(tuple),
    submitted_at=times,
    reply_topic=st.none() | topics,
    priority=st.sampled_from(PRIORITIES),
)

item_scores = st.builds(
    ItemScore,
    id=ids,
    scores=st.lists(finite, max_size=6).map(tuple),
    cached=st.booleans(),
    model_version=non_blank,
    embedding=st.none() | st.lists(scores, min_size=1, max_size=8).map(tuple),
    error=st.none() | texts,
)

timings = st.builds(Timings, *(st.floats(0, 1e7, allow_nan=False) for _ in range(4)))

score_batches = st.builds(
    ScoreBatch,
    batch_id=ids,
    items=st.lists(item_scores, max_size=6, unique_by=lambda i: i.id).map(tuple),
    model_id=non_blank,
    produced_at=times,
    timings=timings,
)

source_refs = st.builds(
    SourceRef,
    topic=st.none() | topics,
    partition=st.none() | st.integers(0, 2**31 - 1),
    offset=st.none() | st.integers(0, 2**63 - 1),
    line=st.none() | st.integers(0, 2**40),
)

dead_letters = st.builds(
    DeadLetter,
    stage=st.sampled_from(STAGES),
    reason=non_blank,
    original=st.binary(max_size=2000),
    source=source_refs,
    failed_at=times,
    error_field=st.none() | texts,
    error_rule=st.none() | texts,
    original_truncated=st.booleans(),
)


def item_layout(head: str, n_docs: int) -> list[int]:
    """seq_doc of one item as QueryTokenizer writes it (the decoder's seq_layout rule)."""
    if head == "similarity":
        return [-1, *range(n_docs)]
    return list(range(n_docs)) if n_docs else [-1]


@st.composite
def token_batches(draw: st.DrawFn) -> TokenBatch:
    """Sequences laid out as the tokenizer writes them for a drawn head (grouped by item, in
    order, -1 for the query alone, docs 0..n-1); ids small (u16 on the wire) or up to 2**32-1
    (u32)."""
    head = draw(st.sampled_from(HEADS))
    item_ids = draw(st.lists(ids, min_size=1, max_size=5, unique=True))
    pairs = [
        (item, doc)
        for item in range(len(item_ids))
        for doc in item_layout(head, draw(st.integers(0, 3)))
    ]
    max_length = draw(st.integers(1, 64))
    top = draw(st.sampled_from([30_521, 2**16 - 1, 2**16, 2**32 - 1]))
    seqs = [draw(st.lists(st.integers(0, top), min_size=1, max_size=max_length)) for _ in pairs]
    offsets, input_ids = pack_sequences(seqs)
    typed = draw(st.booleans())
    type_ids = np.array(
        draw(st.lists(st.integers(0, 1), min_size=len(input_ids), max_size=len(input_ids))),
        dtype=np.uint8,
    )
    return TokenBatch(
        batch_id=draw(ids),
        item_ids=tuple(item_ids),
        tokenizer_id=draw(non_blank),
        head=head,
        max_length=max_length,
        seq_item=np.array([p[0] for p in pairs], dtype=np.uint32),
        seq_doc=np.array([p[1] for p in pairs], dtype=np.int32),
        offsets=offsets,
        input_ids=input_ids,
        token_type_ids=type_ids if typed else None,
        truncated=np.array(
            draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs))), dtype=bool
        ),
        submitted_at=draw(times),
        reply_topic=draw(st.none() | topics),
        priority=draw(st.sampled_from(PRIORITIES)),
        cache_keys=draw(st.none() | cache_keys(len(pairs))),
        embedding_format=draw(st.sampled_from(EMBEDDING_FORMATS)),
    )


def cache_keys(n_seq: int) -> st.SearchStrategy[np.ndarray]:
    """n_seq 16-byte cache-key digests, as uint8 [n_seq, 16]."""
    return st.binary(min_size=16 * n_seq, max_size=16 * n_seq).map(
        lambda b: np.frombuffer(b, dtype=np.uint8).reshape(n_seq, 16).copy()
    )
