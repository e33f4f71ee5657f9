"""TokenBatch head and sequence layout (rule seq_layout): the decoder and the encoder accept
exactly the layouts the tokenizer writes, so a worker never scores an item with another's row."""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import Any
from unittest import mock

import numpy as np
import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from schemas import SchemaError, TokenBatch, decode_token_batch, encode_token_batch
from schemas.tokens import VERSION
from tests.schemas.strategies import item_layout, token_batches
from tests.schemas.test_schema_token_rules import make, patch, rejects, split, with_header

PROPERTY = settings(max_examples=60, deadline=None)


def laid_out(seq_item: list[int], seq_doc: list[int], head: str = "similarity",
             n_items: int | None = None) -> TokenBatch:
    """A batch with these arrays (3-token sequences), valid or not."""
    n_items = n_items if n_items is not None else max(seq_item) + 1
    return make([[101, 7 + i, 102] for i in range(len(seq_item))],
                 item_ids=tuple(f"q{i}" for i in range(n_items)), head=head,
                 seq_item=np.array(seq_item), seq_doc=np.array(seq_doc))


def forged(tb: TokenBatch) -> bytes:
    """`tb` on the wire as a producer without the layout rule (an old or foreign one) would
    write it: every other rule still holds."""
    with mock.patch("schemas.tokens._check_layout"):
        return encode_token_batch(tb)


# (seq_item, seq_doc, head, n_items) -> the first offending field
INCONSISTENT: dict[str, tuple[list[int], list[int], str, int | None, str]] = {
    # The cases: item_scores used outputs[-1] (another item's row) for these.
    "similarity item without its query": ([0, 0, 1], [0, 1, -1], "similarity", None,
                                          "seq_doc[0]"),
    "classifier item without any sequence": ([0, 0, 2], [0, 1, -1], "classifier", 3,
                                             "item_ids[1]"),
    "item without any sequence": ([0, 2], [-1, -1], "similarity", 3, "item_ids[1]"),
    "last item without any sequence": ([0, 1], [-1, -1], "similarity", 3, "item_ids[2]"),
    "gap in doc indices": ([0, 0, 0], [-1, 0, 2], "similarity", None, "seq_doc[2]"),
    "docs not from 0": ([0, 0], [0, 2], "classifier", None, "seq_doc[1]"),
    "docs out of order": ([0, 0, 0], [-1, 1, 0], "similarity", None, "seq_doc[1]"),
    "query after its docs": ([0, 0], [0, -1], "similarity", None, "seq_doc[1]"),
    "items interleaved": ([0, 1, 0], [-1, -1, 0], "similarity", None, "seq_item[2]"),
    "items out of order": ([1, 0], [-1, -1], "similarity", None, "seq_item[1]"),
    "classifier pairs and query both": ([0, 0, 0], [-1, 0, 1], "classifier", None,
                                        "seq_doc[1]"),
}


@pytest.mark.parametrize("case", INCONSISTENT)
def test_inconsistent_layouts_are_refused_by_decoder_and_encoder(case: str) -> None:
    seq_item, seq_doc, head, n_items, field = INCONSISTENT[case]
    tb = laid_out(seq_item, seq_doc, head, n_items)
    err = rejects(forged(tb), field, "seq_layout")
    assert err.detail  # says what is wrong, for the dead letter's reader
    with pytest.raises(SchemaError) as info:
        encode_token_batch(tb)
    assert (info.value.field, info.value.rule) == (field, "seq_layout")


@pytest.mark.parametrize(("seq_item", "seq_doc", "head"), [
    ([0, 0, 0, 1], [-1, 0, 1, -1], "similarity"),  # what QueryTokenizer writes, per head
    ([0, 0, 1], [0, 1, -1], "classifier"),
    ([0, 1, 2], [-1, -1, -1], "classifier"),
    ([0], [-1], "similarity"),
])
def test_the_tokenizer_layouts_are_accepted(seq_item: list[int], seq_doc: list[int],
                                            head: str) -> None:
    tb = laid_out(seq_item, seq_doc, head)
    data = encode_token_batch(tb)
    assert forged(tb) == data  # forging changes nothing else
    assert decode_token_batch(data) == tb


def test_duplicates_keep_their_own_rule() -> None:
    data = encode_token_batch(laid_out([0, 0, 0], [-1, 0, 1]))
    rejects(patch(data, "seq_doc", 2, 0), "seq_doc[2]", "duplicate")


def test_head_travels_in_the_header() -> None:
    for head in ("similarity", "classifier"):
        tb = make(head=head)
        data = encode_token_batch(tb)
        assert split(data)[0]["head"] == head
        back = decode_token_batch(data)
        assert back.head == head and back == tb
    assert make(head="similarity") != make(head="classifier")


@pytest.mark.parametrize("head", ["ranker", "", "Similarity", None, 1, ["classifier"]])
def test_an_unknown_head_is_refused(head: Any) -> None:
    data = encode_token_batch(make())
    rejects(with_header(data, head=head), "head", "enum")
    with pytest.raises(SchemaError) as info:
        encode_token_batch(make(head=head))
    assert (info.value.field, info.value.rule) == ("head", "enum")


def test_a_header_without_head_is_refused() -> None:
    data = encode_token_batch(make())
    header, start = split(data)
    del header["head"]
    raw = orjson.dumps(header)
    raw += b" " * ((-(10 + len(raw))) % 4)
    rejects(struct.pack("<4sHI", b"QSTB", VERSION, len(raw)) + raw + data[start:],
            "header.head", "required")


def test_a_batch_built_without_head_never_travels() -> None:
    tb = replace(make(), head=None)
    with pytest.raises(SchemaError) as info:
        encode_token_batch(tb)
    assert (info.value.field, info.value.rule) == ("head", "enum")


# -- properties over every batch the strategy builds --------------------------------------------
def _runs(tb: TokenBatch) -> list[list[int]]:
    """Sequence indices of each item, in order."""
    return [np.flatnonzero(tb.seq_item == item).tolist() for item in range(len(tb.item_ids))]


@PROPERTY
@given(token_batches())
def test_strategy_batches_have_the_tokenizer_layout_and_round_trip(tb: TokenBatch) -> None:
    runs = _runs(tb)
    assert [i for run in runs for i in run] == list(range(tb.n_sequences))  # grouped, in order
    for run in runs:
        docs = tb.seq_doc[run].tolist()
        assert docs == item_layout(tb.head or "", sum(d >= 0 for d in docs))
    data = encode_token_batch(tb)
    back = decode_token_batch(data)
    assert back == tb and back.head == tb.head and encode_token_batch(back) == data


@PROPERTY
@given(token_batches(), st.data())
def test_changing_one_doc_index_is_refused(tb: TokenBatch, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, tb.n_sequences - 1))
    old = int(tb.seq_doc[i])
    new = data.draw(st.integers(-1, 4).filter(lambda v: v != old))
    wire = patch(encode_token_batch(tb), "seq_doc", i, new)
    alone = len(_runs(tb)[int(tb.seq_item[i])]) == 1
    if tb.head == "classifier" and alone and {old, new} == {-1, 0}:
        # The one other valid layout: one pair <-> the query alone.
        assert decode_token_batch(wire).seq_doc[i] == new
        return
    with pytest.raises(SchemaError) as info:
        decode_token_batch(wire)
    assert info.value.rule in {"seq_layout", "duplicate"}, str(info.value)


@PROPERTY
@given(token_batches(), st.data())
def test_moving_one_sequence_to_another_item_is_refused(tb: TokenBatch,
                                                        data: st.DataObject) -> None:
    assume(len(tb.item_ids) >= 2)
    i = data.draw(st.integers(0, tb.n_sequences - 1))
    new = data.draw(st.integers(0, len(tb.item_ids) - 1).filter(lambda v: v != tb.seq_item[i]))
    with pytest.raises(SchemaError) as info:
        decode_token_batch(patch(encode_token_batch(tb), "seq_item", i, new))
    assert info.value.rule in {"seq_layout", "duplicate"}, str(info.value)


def _without(tb: TokenBatch, drop: int) -> TokenBatch:
    keep = np.arange(tb.n_sequences) != drop
    seqs = [tb.sequence(i).tolist() for i in np.flatnonzero(keep)]
    rows = np.concatenate([np.arange(tb.offsets[i], tb.offsets[i + 1])
                           for i in np.flatnonzero(keep)] or [np.zeros(0, dtype=np.int64)])
    return make(seqs, item_ids=tb.item_ids, head=tb.head, max_length=tb.max_length,
                seq_item=tb.seq_item[keep], seq_doc=tb.seq_doc[keep],
                truncated=tb.truncated[keep],
                token_type_ids=None if tb.token_type_ids is None else tb.token_type_ids[rows],
                cache_keys=None if tb.cache_keys is None else tb.cache_keys[keep])


@PROPERTY
@given(token_batches(), st.data())
def test_dropping_a_sequence_is_refused_unless_it_was_an_items_last_doc(
        tb: TokenBatch, data: st.DataObject) -> None:
    assume(tb.n_sequences > 1)  # else nothing would be left: rule empty, tested elsewhere
    i = data.draw(st.integers(0, tb.n_sequences - 1))
    run = _runs(tb)[int(tb.seq_item[i])]
    smaller = _without(tb, i)
    if len(run) > 1 and i == run[-1]:
        # A doc fewer is a smaller valid item: the tokenizer writes that for one doc less.
        assert decode_token_batch(encode_token_batch(smaller)) == smaller
        return
    with pytest.raises(SchemaError) as info:
        encode_token_batch(smaller)
    assert info.value.rule == "seq_layout", str(info.value)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(-2, 3), st.integers(0, 4)),
                min_size=1, max_size=8),
       st.sampled_from(["similarity", "classifier"]), st.integers(1, 4), st.integers(1, 4))
def test_the_fast_check_accepts_exactly_what_the_rules_accept(
        rows: list[tuple[int, int, int]], head: str, n_items: int, max_length: int) -> None:
    # Valid batches take one combined test, the rest the rules one by one (for the precise
    # error): the two must never disagree, or a fault would pass unnamed.
    from schemas import Limits
    from schemas.tokens import _check_rules, _valid_fast

    lengths = np.array([n for _, _, n in rows])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint32)
    h = {"item_ids": tuple(f"q{i}" for i in range(n_items)), "n_ids": int(offsets[-1]),
         "max_length": max_length, "head": head}
    a = {"offsets": offsets, "seq_item": np.array([i for i, _, _ in rows], dtype=np.uint32),
         "seq_doc": np.array([d for _, d, _ in rows], dtype=np.int32)}
    limits = Limits(max_docs_per_item=3)
    try:
        _check_rules(h, a, limits)
        valid = True
    except SchemaError:
        valid = False
    assert _valid_fast(h, a, limits) == valid
