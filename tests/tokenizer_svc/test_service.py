"""Tokenizer service logic without a broker: cache units and keys, cached scores, splitting
into messages that fit, and the tokenizer process pool."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engines.source import default_model_path
from engines.tokenizer import QueryTokenizer
from plumbing.cache import encode_floats, key_digest
from schemas import (
    Limits,
    QueryBatch,
    QueryItem,
    SchemaError,
    decode_token_batch,
    encode_query_batch,
)
from tokenizer_svc.pool import (
    TokenizeError,
    TokenizerPool,
    TokenizerSpec,
    encode_to_fit,
    prepare_batch,
    slice_items,
    tokenize_items,
)
from tokenizer_svc.units import batch_keys, cached_item, item_keys, sequence_keys

TOKENIZER = default_model_path() / "tokenizer.json"
V = "v1abc"
ITEMS = (QueryItem(id="a", query="boil an egg", docs=("nine minutes", "a pan of water")),
         QueryItem(id="b", query="capital of australia"),
         QueryItem(id="c", query="red shoes", docs=(" ",)))


def _tokenizer(pairs: bool, max_length: int = 64) -> QueryTokenizer:
    return QueryTokenizer(TOKENIZER, max_length, pairs=pairs)


def test_item_keys_units_and_lookup() -> None:
    a, b, c = (item_keys(it, V) for it in ITEMS)
    assert a.query == key_digest(V, "boil an egg", None)
    assert a.docs == (key_digest(V, "boil an egg", "nine minutes"),
                      key_digest(V, "boil an egg", "a pan of water"))
    assert a.lookup == a.docs  # an item with docs hits on its docs, not its query
    assert b.lookup == (key_digest(V, "capital of australia", None),) and b.docs == ()
    assert c.lookup == (key_digest(V, "red shoes", " "),) != (c.query,)  # blank doc != no doc
    assert item_keys(ITEMS[0], "v2").docs[0] != a.docs[0]  # the version is part of the key


@pytest.mark.parametrize("pairs", [False, True], ids=["similarity", "classifier"])
def test_sequence_keys_follow_each_sequence(pairs: bool) -> None:
    tb = _tokenizer(pairs).token_batch("x", ITEMS, submitted_at=1.0)
    keys = sequence_keys(tb.seq_item, tb.seq_doc, [item_keys(it, V) for it in ITEMS])
    assert keys.dtype == np.uint8 and keys.shape == (tb.n_sequences, 16)
    for row, (i, d) in zip(keys, zip(tb.seq_item.tolist(), tb.seq_doc.tolist(), strict=True),
                           strict=True):
        item = ITEMS[i]
        assert bytes(row) == key_digest(V, item.query, None if d < 0 else item.docs[d])
    # similarity: the query's own sequence too; classifier: only pairs for items with docs
    assert (-1 in tb.seq_doc[tb.seq_item == 0].tolist()) is (not pairs)


def test_cached_item_similarity() -> None:
    with_docs, alone = ITEMS[0], ITEMS[1]
    score = cached_item(with_docs, [encode_floats([0.5]), encode_floats([-0.25])],
                        "similarity", V)
    assert score is not None and score.cached and score.model_version == V
    assert score.scores == (0.5, -0.25) and score.embedding is None
    embedding = np.linspace(-1, 1, 8, dtype=np.float32)
    score = cached_item(alone, [encode_floats(embedding)], "similarity", V)
    assert score is not None and score.scores == ()
    assert score.embedding == tuple(embedding.tolist())
    # A one-float value under a query key is a classifier's, not an embedding.
    assert cached_item(alone, [encode_floats([0.3])], "similarity", V) is None


def test_cached_item_classifier() -> None:
    score = cached_item(ITEMS[0], [encode_floats([0.9]), encode_floats([0.1])], "classifier", V)
    assert score is not None and score.scores == pytest.approx((0.9, 0.1))
    score = cached_item(ITEMS[1], [encode_floats([0.75])], "classifier", V)
    assert score is not None and score.scores == (0.75,) and score.embedding is None


@pytest.mark.parametrize("values", [
    [encode_floats([0.5]), None],  # one doc missed: the whole item is tokenized
    [None, None],
    [encode_floats([0.5]), b"\x00\x01"],  # not float32
    [encode_floats([0.5]), encode_floats([0.1, 0.2])],  # not one score
    [encode_floats([0.5]), encode_floats([float("nan")])],  # would not encode
    [],
])
def test_cached_item_needs_every_unit(values: list[bytes | None]) -> None:
    assert cached_item(ITEMS[0], values, "classifier", V) is None


def _per_item(tbs: list) -> dict[str, list[tuple[int, list[int], bytes]]]:
    """item id -> [(seq_doc, token ids, cache key)] across TokenBatches."""
    out: dict[str, list[tuple[int, list[int], bytes]]] = {}
    for tb in tbs:
        for s in range(tb.n_sequences):
            item = tb.item_ids[int(tb.seq_item[s])]
            out.setdefault(item, []).append(
                (int(tb.seq_doc[s]), tb.sequence(s).tolist(), bytes(tb.cache_keys[s])))
    return out


@pytest.mark.parametrize("pairs", [False, True], ids=["similarity", "classifier"])
def test_encode_to_fit_splits_by_size_and_keeps_everything(pairs: bool) -> None:
    items = tuple(QueryItem(id=f"q{i}", query=f"query number {i}",
                            docs=tuple(f"doc {j} of query {i} " * (1 + j) for j in range(4)))
                  for i in range(40))
    keys = batch_keys(items, V)
    whole = tokenize_items(_tokenizer(pairs), Limits(), "big", items, keys, submitted_at=5.0,
                           priority="offline")
    assert len(whole.messages) == 1
    (reference,) = [decode_token_batch(m) for m in whole.messages]

    limits = Limits(max_message_bytes=len(whole.messages[0]) // 3)
    split = tokenize_items(_tokenizer(pairs), limits, "big", items, keys, submitted_at=5.0,
                           priority="offline")
    assert len(split.messages) >= 3
    assert all(len(m) <= limits.max_message_bytes for m in split.messages)
    tbs = [decode_token_batch(m, limits) for m in split.messages]
    assert {tb.batch_id for tb in tbs} == {"big"}
    assert all(tb.priority == "offline" and tb.submitted_at == 5.0 for tb in tbs)
    # Every part says which head it was tokenized for, so no worker of the other head takes it.
    assert {tb.head for tb in tbs} == {reference.head} == {"classifier" if pairs else "similarity"}
    assert [i for tb in tbs for i in tb.item_ids] == [it.id for it in items]  # order kept
    assert _per_item(tbs) == _per_item([reference])
    assert split.sequences == reference.n_sequences


def test_encode_to_fit_splits_by_sequence_count() -> None:
    tb = _tokenizer(False).token_batch("x", ITEMS, submitted_at=1.0)
    tb_keys = sequence_keys(tb.seq_item, tb.seq_doc, [item_keys(it, V) for it in ITEMS])
    tb = replace(tb, cache_keys=tb_keys)
    messages = encode_to_fit(tb, Limits(max_sequences=3))
    tbs = [decode_token_batch(m) for m in messages]
    assert all(t.n_sequences <= 3 for t in tbs)
    assert _per_item(tbs) == _per_item([tb])
    assert slice_items(tb, 1, 2).item_ids == ("b",)
    assert slice_items(tb, 1, 2).seq_item.tolist() == [0]


def test_an_item_too_big_for_any_message_is_refused() -> None:
    item = QueryItem(id="huge", query="q", docs=tuple("word " * 50 for _ in range(30)))
    with pytest.raises(TokenizeError, match="'huge' alone"):
        tokenize_items(_tokenizer(False), Limits(max_message_bytes=2000), "x", [item],
                       batch_keys([item], V), submitted_at=1.0)


def test_batch_keys_are_item_keys_in_one_blob() -> None:
    keys = batch_keys(ITEMS, V)
    per_item = [item_keys(it, V) for it in ITEMS]
    assert keys.digests == b"".join(k.query + b"".join(k.docs) for k in per_item)
    assert keys.n_docs.tolist() == [2, 0, 1]
    assert keys.lookup() == [d for k in per_item for d in k.lookup]
    taken = keys.take(np.array([0, 2]))
    assert taken.digests == batch_keys([ITEMS[0], ITEMS[2]], V).digests
    assert taken.n_docs.tolist() == [2, 1]
    for pairs in (False, True):
        tb = _tokenizer(pairs).token_batch("x", ITEMS, submitted_at=1.0)
        assert np.array_equal(keys.sequence_keys(tb.seq_item, tb.seq_doc),
                              sequence_keys(tb.seq_item, tb.seq_doc, per_item))


def test_prepare_batch_decodes_and_hashes() -> None:
    batch = QueryBatch(batch_id="b1", items=ITEMS, submitted_at=time.time())
    decoded, keys = prepare_batch(encode_query_batch(batch), Limits(), V)
    assert decoded == batch
    assert keys.digests == batch_keys(ITEMS, V).digests
    with pytest.raises(SchemaError) as info:
        prepare_batch(b'{"v": 2}', Limits(), V)
    assert info.value.rule == "version"


def _spec(**kw: object) -> TokenizerSpec:
    return TokenizerSpec(**{"tokenizer_json": TOKENIZER, "max_length": 64, "pairs": False,
                            "model_version": V, "limits": Limits(), **kw})  # type: ignore[arg-type]


async def test_pool_tokenizes_off_the_loop_and_survives_a_dead_process() -> None:
    pool = TokenizerPool(_spec(), processes=1)
    await pool.start()
    try:
        batch = QueryBatch(batch_id="b1", items=ITEMS, submitted_at=1.0, priority="offline")
        data = encode_query_batch(batch)
        prepared = await pool.prepare(data)
        assert (prepared.batch_id, prepared.item_ids, prepared.priority) == (
            "b1", ("a", "b", "c"), "offline")
        assert prepared.keys.digests == batch_keys(ITEMS, V).digests
        assert prepared.tokenized is None
        with pytest.raises(SchemaError) as info:  # errors cross the process boundary intact
            await pool.prepare(b"\xff\xfe not json")
        assert info.value.rule == "utf-8"

        (pid,) = pool.pids
        os.kill(pid, signal.SIGKILL)  # e.g. the OOM killer
        result = await pool.tokenize(data, prepared.keys, None)
        assert pool.restarts == 1 and pool.pids != [pid]
        (tb,) = [decode_token_batch(m) for m in result.messages]
        assert tb.item_ids == ("a", "b", "c") and tb.cache_keys is not None
        assert tb.head == "similarity"  # from spec.pairs, in the tokenizer process
        assert tb.priority == "offline"

        # Some items only: their sequences, under their own keys.
        part = await pool.tokenize(data, prepared.keys, np.array([0, 2]), offline_topic=True)
        (tb,) = [decode_token_batch(m) for m in part.messages]
        assert tb.item_ids == ("a", "c") and tb.priority == "offline"
        assert [bytes(k) for k in tb.cache_keys] == [
            key_digest(V, "boil an egg", None), *item_keys(ITEMS[0], V).docs,
            key_digest(V, "red shoes", None), *item_keys(ITEMS[2], V).docs]

        # One call: decode, keys, tokenize and pack.
        online = encode_query_batch(replace(batch, priority="online"))
        both = await pool.prepare(online, tokenize_upto=3)
        assert both.tokenized is not None and both.tokenize_error is None
        (tb,) = [decode_token_batch(m) for m in both.tokenized.messages]
        assert tb == decode_token_batch(
            (await pool.tokenize(online, both.keys, None)).messages[0])
        assert tb.priority == "online"
        assert (await pool.prepare(online, tokenize_upto=2)).tokenized is None  # 3 items > 2
        assert (await pool.prepare(online, offline_topic=True, tokenize_upto=3)
                ).tokenized is not None
    finally:
        await pool.close()
    assert pool.pids == []


async def test_pool_reports_tokenize_errors_of_the_one_call_path() -> None:
    limits = Limits(max_sequences=3)
    pool = TokenizerPool(_spec(limits=limits), processes=1)
    await pool.start()
    try:
        item = QueryItem(id="huge", query="q", docs=tuple(f"doc {i}" for i in range(5)))
        batch = QueryBatch(batch_id="b1", items=(item,), submitted_at=1.0)
        data = encode_query_batch(batch, limits)
        prepared = await pool.prepare(data, tokenize_upto=10)
        assert prepared.tokenized is None
        assert isinstance(prepared.tokenize_error, TokenizeError)
        with pytest.raises(TokenizeError, match="'huge' alone"):
            await pool.tokenize(data, prepared.keys, None)
    finally:
        await pool.close()


async def test_a_message_that_kills_its_process_twice_fails_and_the_pool_goes_on() -> None:
    pool = TokenizerPool(_spec(), processes=2)
    await pool.start()
    try:
        with pytest.raises(BrokenProcessPool, match="died twice"):
            await pool._call(0, os._exit, 3)
        assert pool.restarts == 2
        data = encode_query_batch(QueryBatch(batch_id="b1", items=ITEMS, submitted_at=1.0))
        results = await asyncio.gather(*(pool.prepare(data, tokenize_upto=10)
                                         for _ in range(6)))
        assert all(r.tokenized is not None for r in results)
        assert len(pool.pids) == 2
    finally:
        await pool.close()


async def test_a_cancelled_call_does_not_leave_its_reply_for_the_next() -> None:
    pool = TokenizerPool(_spec(), processes=1)
    await pool.start()
    try:
        slow = asyncio.ensure_future(pool._call(0, time.sleep, 0.3))
        await asyncio.sleep(0.1)
        slow.cancel()
        data = encode_query_batch(QueryBatch(batch_id="b1", items=ITEMS, submitted_at=1.0))
        prepared = await pool.prepare(data)
        assert prepared.batch_id == "b1"
    finally:
        await pool.close()


async def test_a_broken_tokenizer_fails_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not a tokenizer")
    pool = TokenizerPool(_spec(tokenizer_json=bad), processes=2)
    with pytest.raises(RuntimeError, match="failed to start"):
        await pool.start()
    assert pool.pids == []


async def test_calls_that_queue_go_together_and_a_poison_one_fails_alone() -> None:
    pool = TokenizerPool(_spec(), processes=1)
    await pool.start()
    try:
        batches = [QueryBatch(batch_id=f"b{i}", items=ITEMS, submitted_at=1.0) for i in range(5)]
        calls = [pool.prepare(encode_query_batch(b), tokenize_upto=10) for b in batches]
        calls.insert(2, pool._call(0, os._exit, 3))  # sent with others: they must not fail
        results = await asyncio.gather(*calls, return_exceptions=True)
        poison = results.pop(2)
        assert isinstance(poison, BrokenProcessPool)
        assert [r.batch_id for r in results] == [b.batch_id for b in batches]  # type: ignore[union-attr]
        assert all(r.tokenized is not None for r in results)  # type: ignore[union-attr]
        assert pool.restarts == 2 and len(pool.pids) == 1
    finally:
        await pool.close()
