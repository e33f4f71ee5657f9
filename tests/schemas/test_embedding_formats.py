"""Embeddings as JSON floats or base64 bytes on the score topic: round trips and refusals."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from schemas import (
    ItemScore,
    Limits,
    QueryBatch,
    QueryItem,
    SchemaError,
    ScoreBatch,
    Timings,
    decode_query_batch,
    decode_score_batch,
    encode_query_batch,
    encode_score_batch,
)

VECTOR = np.array([0.1, -0.5, 0.25, 3.0e-5], dtype=np.float32)


def batch(fmt: str, embedding: tuple[float, ...] | None = None) -> ScoreBatch:
    values = tuple(VECTOR.astype(np.float64).tolist()) if embedding is None else embedding
    return ScoreBatch(
        batch_id="b", model_id="m", produced_at=1.0, timings=Timings(),
        items=(ItemScore(id="q", scores=(), cached=False, model_version="v",
                         embedding=values),
               ItemScore(id="d", scores=(0.5,), cached=True, model_version="v")),
        embedding_format=fmt)  # type: ignore[arg-type]


def test_float_is_the_default_and_writes_no_format_key() -> None:
    data = encode_score_batch(batch("float"))
    assert "embedding_format" not in orjson.loads(data)
    assert decode_score_batch(data).embedding_format == "float"


@pytest.mark.parametrize(("fmt", "dtype"), [("base64", "<f4"), ("base64-f16", "<f2")])
def test_base64_embeddings_are_bytes_and_decode_to_floats(fmt: str, dtype: str) -> None:
    data = encode_score_batch(batch(fmt))
    obj = orjson.loads(data)
    assert obj["embedding_format"] == fmt
    raw = base64.b64decode(obj["items"][0]["embedding"])
    assert np.array_equal(np.frombuffer(raw, dtype=dtype), VECTOR.astype(dtype))
    assert obj["items"][1]["embedding"] is None and obj["items"][1]["scores"] == [0.5]
    back = decode_score_batch(data)
    assert back.embedding_format == fmt
    emb = back.items[0].embedding
    assert emb is not None and all(type(x) is float for x in emb)
    assert np.array_equal(np.asarray(emb, dtype=dtype), VECTOR.astype(dtype))
    # Re-encoding what was decoded gives the same bytes: the format is kept.
    assert encode_score_batch(back) == data


def test_base64_is_a_third_of_the_float_bytes_for_a_real_sized_embedding() -> None:
    rng = np.random.default_rng(0)
    vector = tuple(rng.normal(size=384).astype(np.float32).astype(np.float64).tolist())
    sizes = {fmt: len(encode_score_batch(batch(fmt, vector)))
             for fmt in ("float", "base64", "base64-f16")}
    assert sizes["base64"] * 2.5 < sizes["float"]
    assert sizes["base64-f16"] * 1.6 < sizes["base64"]  # the envelope is the same


def _with_embedding(fmt: str, value: object) -> bytes:
    obj = orjson.loads(encode_score_batch(batch(fmt)))
    obj["items"][0]["embedding"] = value
    return orjson.dumps(obj)


@pytest.mark.parametrize(("fmt", "value", "field", "rule"), [
    ("base64", [0.1, 0.2], "items[0].embedding", "type"),  # floats where bytes were promised
    ("float", "AAAAAA==", "items[0].embedding", "type"),  # bytes where floats were promised
    ("base64", "not base64!", "items[0].embedding", "base64"),
    ("base64", base64.b64encode(b"\0" * 6).decode(), "items[0].embedding", "length"),
    ("base64", "", "items[0].embedding", "length"),
    ("base64", base64.b64encode(np.float32([1, np.nan]).tobytes()).decode(),
     "items[0].embedding[1]", "finite"),
    ("base64-f16", base64.b64encode(np.float16([np.inf]).tobytes()).decode(),
     "items[0].embedding[0]", "finite"),
])
def test_bad_embeddings_are_refused_with_the_field(fmt: str, value: object, field: str,
                                                   rule: str) -> None:
    with pytest.raises(SchemaError) as info:
        decode_score_batch(_with_embedding(fmt, value))
    assert (info.value.field, info.value.rule) == (field, rule), str(info.value)


def test_unknown_format_and_oversized_embeddings_are_refused() -> None:
    obj = orjson.loads(encode_score_batch(batch("base64")))
    obj["embedding_format"] = "hex"
    with pytest.raises(SchemaError) as info:
        decode_score_batch(orjson.dumps(obj))
    assert (info.value.field, info.value.rule) == ("embedding_format", "enum")
    limits = Limits(max_embedding_dim=3)
    with pytest.raises(SchemaError) as info:
        decode_score_batch(encode_score_batch(batch("base64")), limits)
    assert (info.value.field, info.value.rule) == ("items[0].embedding", "max_items")
    with pytest.raises(SchemaError) as info:  # refused before decoding a huge string
        decode_score_batch(_with_embedding("base64", "A" * 10_000), limits)
    assert (info.value.field, info.value.rule) == ("items[0].embedding", "max_items")
    with pytest.raises(SchemaError) as info:
        encode_score_batch(batch("hex"))
    assert info.value.rule == "enum"


def test_query_batches_may_ask_for_a_format() -> None:
    items = (QueryItem(id="1", query="red shoes"),)
    plain = QueryBatch(batch_id="b", items=items, submitted_at=1.0)
    assert "embedding_format" not in orjson.loads(encode_query_batch(plain))
    assert decode_query_batch(encode_query_batch(plain)).embedding_format is None
    asked = QueryBatch(batch_id="b", items=items, submitted_at=1.0,
                       embedding_format="base64")
    assert decode_query_batch(encode_query_batch(asked)).embedding_format == "base64"
    obj = orjson.loads(encode_query_batch(asked))
    obj["embedding_format"] = "b64"
    with pytest.raises(SchemaError) as info:
        decode_query_batch(orjson.dumps(obj))
    assert (info.value.field, info.value.rule) == ("embedding_format", "enum")
