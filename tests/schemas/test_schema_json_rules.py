"""One test per rule of the JSON codecs (queries, scores, dead letters)."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    DeadLetter,
    ItemScore,
    Limits,
    QueryBatch,
    QueryItem,
    SchemaError,
    ScoreBatch,
    SourceRef,
    Timings,
    decode_dead_letter,
    decode_query_batch,
    decode_score_batch,
    encode_dead_letter,
    encode_query_batch,
    encode_score_batch,
    max_original_bytes,
)


def query_msg(**overrides: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "v": 1,
        "batch_id": "b1",
        "submitted_at": 1_700_000_000.5,
        "items": [{"id": "q1", "query": "red shoes", "docs": ["shoe a", "shoe b"]}],
    }
    msg.update(overrides)
    return msg


def item(**overrides: Any) -> dict[str, Any]:
    return {"id": "q1", "query": "red shoes", **overrides}


def rejects(data: bytes, field: str, rule: str, limits: Limits | None = None) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        decode_query_batch(data, limits or Limits())
    assert (info.value.field, info.value.rule) == (field, rule), str(info.value)
    return info.value


def test_valid_message_decodes() -> None:
    batch = decode_query_batch(orjson.dumps(query_msg(reply_topic="scores.v1")))
    assert batch.items[0] == QueryItem("q1", "red shoes", ("shoe a", "shoe b"))
    assert batch.priority == "online" and batch.reply_topic == "scores.v1"


def test_oversize_is_checked_before_parsing() -> None:
    limits = Limits(max_message_bytes=64)
    err = rejects(b"{" * 65, "$", "max_bytes", limits)
    assert err.limit == 64
    data = orjson.dumps(query_msg())
    assert decode_query_batch(data, Limits(max_message_bytes=len(data)))
    rejects(data, "$", "max_bytes", Limits(max_message_bytes=len(data) - 1))


@pytest.mark.parametrize("v", [2, 0, "1", True, 1.0, None])
def test_unknown_version(v: object) -> None:
    rejects(orjson.dumps(query_msg(v=v)), "v", "version")


def test_missing_version() -> None:
    msg = query_msg()
    del msg["v"]
    rejects(orjson.dumps(msg), "v", "version")


def test_version_is_checked_before_fields() -> None:
    rejects(orjson.dumps({"v": 2, "nonsense": True}), "v", "version")


def test_bad_utf8() -> None:
    rejects(b'{"v":1,"batch_id":"\xff\xfe"}', "$", "utf-8")
    rejects(b'{"v":1,"batch_id":"\xed\xa0\x80"}', "$", "utf-8")  # encoded surrogate


@pytest.mark.parametrize("data", [b"", b"{", b'{"v":1,}', b"NaN", b'{"v":1e999}', b"\x00"])
def test_invalid_json(data: bytes) -> None:
    rejects(data, "$", "json")


@pytest.mark.parametrize("data", [b"[]", b"1", b'"x"', b"null"])
def test_top_level_must_be_object(data: bytes) -> None:
    rejects(data, "$", "type")


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_empty_query(query: str) -> None:
    rejects(orjson.dumps(query_msg(items=[item(query=query)])), "items[0].query", "empty")


def test_query_max_chars_boundary_and_message() -> None:
    limits = Limits(max_query_chars=10)
    assert decode_query_batch(orjson.dumps(query_msg(items=[item(query="x" * 10)])), limits)
    err = rejects(
        orjson.dumps(query_msg(items=[item(query="é" * 11)])), "items[0].query", "max_chars", limits
    )
    assert str(err) == "items[0].query: max_chars=10 (got 11)"


def test_too_many_docs() -> None:
    limits = Limits(max_docs_per_item=3)
    assert decode_query_batch(orjson.dumps(query_msg(items=[item(docs=["d"] * 3)])), limits)
    err = rejects(
        orjson.dumps(query_msg(items=[item(docs=["d"] * 4)])), "items[0].docs", "max_items", limits
    )
    assert err.limit == 3


def test_docs_rules() -> None:
    assert (
        decode_query_batch(orjson.dumps(query_msg(items=[item(docs=None)]))).items[0].docs is None
    )
    rejects(orjson.dumps(query_msg(items=[item(docs=[])])), "items[0].docs", "empty")
    rejects(orjson.dumps(query_msg(items=[item(docs=["a", ""])])), "items[0].docs[1]", "empty")
    rejects(orjson.dumps(query_msg(items=[item(docs=["a", 3])])), "items[0].docs[1]", "type")
    rejects(orjson.dumps(query_msg(items=[item(docs="abc")])), "items[0].docs", "type")
    long_doc = ["x" * 9]
    rejects(
        orjson.dumps(query_msg(items=[item(docs=long_doc)])),
        "items[0].docs[0]",
        "max_chars",
        Limits(max_doc_chars=8),
    )


def test_duplicate_item_ids() -> None:
    items = [item(id="a"), item(id="b"), item(id="a")]
    rejects(orjson.dumps(query_msg(items=items)), "items[2].id", "duplicate")
    # Int ids are stored as strings, so 7 and "7" are the same item.
    rejects(orjson.dumps(query_msg(items=[item(id=7), item(id="7")])), "items[1].id", "duplicate")


def test_int_ids_become_strings_other_types_do_not() -> None:
    batch = decode_query_batch(orjson.dumps(query_msg(items=[item(id=42)])))
    assert batch.items[0].id == "42"
    for bad in (True, 1.5, None, [], {}):
        rejects(orjson.dumps(query_msg(items=[item(id=bad)])), "items[0].id", "type")
    rejects(orjson.dumps(query_msg(items=[item(id="")])), "items[0].id", "empty")


def test_unknown_key() -> None:
    err = rejects(orjson.dumps(query_msg(items=[item(extra=1)])), "items[0]", "unknown_key")
    assert "extra" in err.detail
    rejects(orjson.dumps(query_msg(extra=1)), "$", "unknown_key")
    # Attacker-chosen keys are echoed back clipped.
    err = rejects(orjson.dumps(query_msg(**{"k" * 10_000: 1})), "$", "unknown_key")
    assert len(err.detail) < 100


def test_missing_key() -> None:
    rejects(orjson.dumps(query_msg(items=[{"id": "a"}])), "items[0].query", "required")
    msg = query_msg()
    del msg["submitted_at"]
    rejects(orjson.dumps(msg), "submitted_at", "required")


def test_item_count() -> None:
    rejects(orjson.dumps(query_msg(items=[])), "items", "empty")
    many = [item(id=str(i)) for i in range(4)]
    rejects(orjson.dumps(query_msg(items=many)), "items", "max_items", Limits(max_items=3))


def test_batch_fields() -> None:
    rejects(orjson.dumps(query_msg(batch_id="")), "batch_id", "empty")
    rejects(
        orjson.dumps(query_msg(batch_id="b" * 9)), "batch_id", "max_chars", Limits(max_id_chars=8)
    )
    rejects(orjson.dumps(query_msg(submitted_at=-1)), "submitted_at", "range")
    rejects(orjson.dumps(query_msg(submitted_at="1")), "submitted_at", "type")
    rejects(orjson.dumps(query_msg(submitted_at=True)), "submitted_at", "type")
    rejects(orjson.dumps(query_msg(priority="urgent")), "priority", "enum")
    rejects(orjson.dumps(query_msg(reply_topic="has space")), "reply_topic", "topic")
    rejects(orjson.dumps(query_msg(reply_topic="..")), "reply_topic", "topic")
    rejects(orjson.dumps(query_msg(reply_topic=5)), "reply_topic", "type")
    assert decode_query_batch(orjson.dumps(query_msg(submitted_at=5))).submitted_at == 5.0


def test_from_obj_prefixes_fields_with_where() -> None:
    with pytest.raises(SchemaError) as info:
        QueryItem.from_obj({"id": "a", "query": "q", "docs": ["x", "y", ""]})
    assert info.value.field == "item.docs[2]"
    with pytest.raises(SchemaError) as info:
        QueryItem.from_obj({"id": "a", "query": " "}, where="line 7")
    assert info.value.field == "line 7.query"


def test_decoders_accept_bytes_likes_and_reject_others() -> None:
    data = orjson.dumps(query_msg())
    assert decode_query_batch(bytearray(data)) == decode_query_batch(memoryview(data))
    with pytest.raises(SchemaError) as info:
        decode_query_batch(data.decode())  # type: ignore[arg-type]
    assert info.value.rule == "type"


def test_encode_validates_like_decode() -> None:
    good = QueryItem("a", "q")
    bad_batches = [
        (QueryBatch("b", (), 1.0), "items", "empty"),
        (QueryBatch("b", (good, good), 1.0), "items[1].id", "duplicate"),
        (QueryBatch("b", (QueryItem("a", "\ud800"),), 1.0), "items[0].query", "utf-8"),
        (QueryBatch("b", (QueryItem("a", "q", ()),), 1.0), "items[0].docs", "empty"),
        (QueryBatch("b", (good,), math.nan), "submitted_at", "finite"),
        (QueryBatch("b", (good,), 1.0, priority="now"), "priority", "enum"),  # type: ignore[arg-type]
        (QueryBatch("b", ("not an item",), 1.0), "items[0]", "type"),  # type: ignore[arg-type]
    ]
    for batch, field, rule in bad_batches:
        with pytest.raises(SchemaError) as info:
            encode_query_batch(batch)
        assert (info.value.field, info.value.rule) == (field, rule)
    big = QueryBatch("b", (QueryItem("a", "x" * 100),), 1.0)
    with pytest.raises(SchemaError, match="max_bytes"):
        encode_query_batch(big, Limits(max_message_bytes=100))


def test_encode_normalises_python_types() -> None:
    batch = QueryBatch("b", [QueryItem(7, "q", ["d"])], 3)  # type: ignore[arg-type]
    assert decode_query_batch(encode_query_batch(batch)) == QueryBatch(
        "b", (QueryItem("7", "q", ("d",)),), 3.0
    )


# --- scores ---------------------------------------------------------------------------------


def score_batch(*items: ItemScore) -> ScoreBatch:
    return ScoreBatch("b1", items, "minilm", 1.0, Timings(1.0, 2.0, 3.0, 6.0))


def test_nan_score() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(SchemaError) as info:
            encode_score_batch(score_batch(ItemScore("a", (0.5, bad), False, "v1")))
        assert (info.value.field, info.value.rule) == ("items[0].scores[1]", "finite")
    with pytest.raises(SchemaError) as info:
        encode_score_batch(score_batch(ItemScore("a", (), False, "v1", embedding=(math.nan,))))
    assert info.value.rule == "finite"
    # JSON has no NaN: a producer writing one sends invalid JSON.
    nan_item = b'"items":[{"id":"a","scores":[NaN],"cached":false,"model_version":"v"}]'
    data = encode_score_batch(score_batch()).replace(b'"items":[]', nan_item)
    with pytest.raises(SchemaError) as info:
        decode_score_batch(data)
    assert info.value.rule == "json"


def test_score_rules() -> None:
    base = orjson.loads(encode_score_batch(score_batch(ItemScore("a", (0.5,), True, "v1"))))

    def check(mutate: Any, field: str, rule: str) -> None:
        msg = orjson.loads(orjson.dumps(base))
        mutate(msg)
        with pytest.raises(SchemaError) as info:
            decode_score_batch(orjson.dumps(msg))
        assert (info.value.field, info.value.rule) == (field, rule)

    check(lambda m: m["items"][0].update(scores=["0.5"]), "items[0].scores[0]", "type")
    check(lambda m: m["items"][0].update(cached=1), "items[0].cached", "type")
    check(lambda m: m["items"][0].update(embedding=[]), "items[0].embedding", "empty")
    check(lambda m: m["items"][0].update(model_version=" "), "items[0].model_version", "empty")
    check(lambda m: m["items"].append(m["items"][0]), "items[1].id", "duplicate")
    check(lambda m: m["timings"].update(queue_ms=-1), "timings.queue_ms", "range")
    check(lambda m: m["timings"].update(gpu_ms=1), "timings", "unknown_key")
    check(lambda m: m.update(v=3), "v", "version")
    check(lambda m: m.pop("model_id"), "model_id", "required")
    # Ints are fine on the wire and become floats.
    msg = orjson.loads(orjson.dumps(base))
    msg["items"][0]["scores"] = [1, 0]
    assert decode_score_batch(orjson.dumps(msg)).items[0].scores == (1.0, 0.0)


def test_empty_score_batch_is_allowed() -> None:
    assert decode_score_batch(encode_score_batch(score_batch())).items == ()


# --- dead letters ---------------------------------------------------------------------------


def test_dead_letter_from_schema_error() -> None:
    err = SchemaError("items[3].query", "empty")
    dl = DeadLetter.from_error("ingest", err, b"\xff raw", SourceRef("queries", 2, 118), now=5.0)
    assert (dl.error_field, dl.error_rule, dl.reason) == ("items[3].query", "empty", str(err))
    assert dl.failed_at == 5.0 and not dl.original_truncated
    assert decode_dead_letter(encode_dead_letter(dl)) == dl


def test_dead_letter_from_other_errors_never_raises() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    for exc in (ValueError("boom"), KeyError(), ValueError("bad \udcff byte"), Broken()):
        dl = DeadLetter.from_error("score", exc, b"x", SourceRef(line=3))
        assert dl.error_field is None and dl.reason.startswith(type(exc).__name__)
        assert decode_dead_letter(encode_dead_letter(dl)) == dl
    assert DeadLetter.from_error("score", ValueError("boom"), b"", SourceRef()).reason == (
        "ValueError: boom"
    )


def test_dead_letter_clips_reason_and_original_to_fit() -> None:
    for limits in (Limits(), Limits(max_message_bytes=200_000, max_reason_chars=100)):
        huge = bytes(range(256)) * (limits.max_message_bytes // 128)
        reason = "\x01" * (limits.max_reason_chars * 2)  # worst case: 6 bytes a char in JSON
        dl = DeadLetter.from_error(
            "tokenize", SchemaError("f" * 10_000, "r"), huge, SourceRef("t" * 300), limits=limits
        )
        dl = DeadLetter.from_error("tokenize", ValueError(reason), huge, dl.source, limits=limits)
        assert dl.original_truncated and len(dl.original) == max_original_bytes(limits)
        assert len(dl.reason) == limits.max_reason_chars
        data = encode_dead_letter(dl, limits)
        assert len(data) <= limits.max_message_bytes
        assert decode_dead_letter(data, limits) == dl


def test_dead_letter_rules() -> None:
    dl = DeadLetter("publish", "why", b"abc", SourceRef(), 1.0)
    base = orjson.loads(encode_dead_letter(dl))
    assert base["original"] == "YWJj"

    def check(mutate: Any, field: str, rule: str) -> None:
        msg = dict(base, source=dict(base["source"]))
        mutate(msg)
        with pytest.raises(SchemaError) as info:
            decode_dead_letter(orjson.dumps(msg))
        assert (info.value.field, info.value.rule) == (field, rule)

    check(lambda m: m.update(original="not base64!"), "original", "base64")
    check(lambda m: m.update(original="YWJ"), "original", "base64")
    check(lambda m: m.update(original="é"), "original", "base64")
    check(lambda m: m.update(stage="later"), "stage", "enum")
    check(lambda m: m.update(reason=""), "reason", "empty")
    check(lambda m: m["source"].update(partition=-1), "source.partition", "range")
    check(lambda m: m["source"].update(offset=1.5), "source.offset", "type")
    check(lambda m: m.update(original_truncated="no"), "original_truncated", "type")
    with pytest.raises(SchemaError) as info:
        encode_dead_letter(DeadLetter("score", "r", "text", SourceRef(), 1.0))  # type: ignore[arg-type]
    assert (info.value.field, info.value.rule) == ("original", "type")
    small = Limits(max_message_bytes=40_000, max_reason_chars=10, max_id_chars=10)
    too_big = DeadLetter("score", "r", b"x" * (max_original_bytes(small) + 1), SourceRef(), 1.0)
    with pytest.raises(SchemaError) as info:
        encode_dead_letter(too_big, small)
    assert (info.value.field, info.value.rule) == ("original", "max_bytes")


_texts = st.one_of(st.text(max_size=6), st.sampled_from(["", " ", "\t", "é", "a" * 9, "q"]))
_values = st.one_of(_texts, st.integers(-2, 2), st.none(), st.booleans(),
                    st.lists(_texts, max_size=4), st.lists(st.integers(), max_size=2))


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "query", "docs", "extra"]), _values, max_size=4))
def test_the_plain_item_fast_path_accepts_only_what_the_rules_accept(obj: dict) -> None:
    # Query items skip building a field path per check when they are plain; the fast path
    # must never let through what QueryItem.from_obj refuses, and must agree on the value.
    from schemas.query import _plain_item

    limits = Limits(max_id_chars=8, max_query_chars=8, max_doc_chars=8, max_docs_per_item=3)
    fast = _plain_item(obj, limits)
    try:
        checked = QueryItem.from_obj(obj, limits)
    except SchemaError:
        assert fast is None
        return
    assert fast is None or fast == checked
