"""TokenBatch layout, helpers and one test per decoding rule."""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import Any

import numpy as np
import orjson
import pytest

from schemas import (
    Limits,
    SchemaError,
    TokenBatch,
    decode_token_batch,
    encode_token_batch,
    pack_sequences,
)
from schemas.tokens import VERSION

PREFIX = struct.Struct("<4sHI")


def make(seqs: list[list[int]] | None = None, **overrides: Any) -> TokenBatch:
    """One item per sequence, each a query alone (a valid layout for either head)."""
    seqs = seqs if seqs is not None else [[101, 7592, 102], [101, 7592, 102, 2460, 102]]
    offsets, ids = pack_sequences(seqs)
    fields: dict[str, Any] = {
        "batch_id": "b1",
        "item_ids": tuple(f"q{i + 1}" for i in range(max(1, len(seqs)))),
        "tokenizer_id": "bert-base-uncased@abc",
        "head": "similarity",
        "max_length": 8,
        "seq_item": np.arange(len(seqs)),
        "seq_doc": np.full(len(seqs), -1),
        "offsets": offsets,
        "input_ids": ids,
        "token_type_ids": None,
        "truncated": np.zeros(len(seqs), dtype=bool),
        "submitted_at": 1_700_000_000.0,
    }
    fields.update(overrides)
    return TokenBatch(**fields)


def split(data: bytes) -> tuple[dict[str, Any], int]:
    """The header and where the arrays start."""
    _, _, header_len = PREFIX.unpack_from(data)
    return orjson.loads(data[PREFIX.size : PREFIX.size + header_len]), PREFIX.size + header_len


def with_header(data: bytes, **changes: Any) -> bytes:
    header, start = split(data)
    header.update(changes)
    raw = orjson.dumps(header)
    raw += b" " * ((-(PREFIX.size + len(raw))) % 4)
    return PREFIX.pack(b"QSTB", VERSION, len(raw)) + raw + data[start:]


def patch(data: bytes, array: str, index: int, value: int) -> bytes:
    """Overwrite one u32/i32 element of seq_item, seq_doc or offsets."""
    header, start = split(data)
    n = header["n_seq"]
    at = start + {"seq_item": 0, "seq_doc": 4 * n, "offsets": 8 * n}[array] + 4 * index
    out = bytearray(data)
    struct.pack_into("<i" if array == "seq_doc" else "<I", out, at, value)
    return bytes(out)


def rejects(data: bytes, field: str, rule: str, limits: Limits | None = None) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        decode_token_batch(data, limits or Limits())
    assert (info.value.field, info.value.rule) == (field, rule), str(info.value)
    return info.value


def test_layout() -> None:
    data = encode_token_batch(make())
    assert data[:4] == b"QSTB" and struct.unpack_from("<H", data, 4) == (3,)
    header, start = split(data)
    assert start % 4 == 0
    assert header == {
        "batch_id": "b1",
        "item_ids": ["q1", "q2"],
        "tokenizer_id": "bert-base-uncased@abc",
        "head": "similarity",
        "max_length": 8,
        "submitted_at": 1_700_000_000.0,
        "reply_topic": None,
        "priority": "online",
        "embedding_format": "float",
        "n_seq": 2,
        "n_ids": 8,
        "id_width": 2,
        "has_type_ids": False,
        "has_keys": False,
    }
    # seq_item, seq_doc, offsets, truncated, padding to 4, ids as u16
    assert len(data) == start + 4 * 2 + 4 * 2 + 4 * 3 + 2 + 2 + 2 * 8
    assert struct.unpack_from("<3I", data, start + 16) == (0, 3, 8)


def test_id_width_follows_largest_id() -> None:
    small = encode_token_batch(make([[1, 65535]], max_length=2))
    large = encode_token_batch(make([[1, 65536]], max_length=2))
    assert split(small)[0]["id_width"] == 2 and split(large)[0]["id_width"] == 4
    assert decode_token_batch(large).input_ids.tolist() == [1, 65536]
    top = make([[2**32 - 1]], max_length=1)
    assert decode_token_batch(encode_token_batch(top)) == top


def test_type_ids_travel_when_present() -> None:
    tb = make(token_type_ids=np.array([0, 0, 0, 0, 0, 0, 1, 1], dtype=np.uint8))
    back = decode_token_batch(encode_token_batch(tb))
    assert back == tb and back.sequence_type_ids(1).tolist() == [0, 0, 0, 1, 1]
    assert make().sequence_type_ids(0).tolist() == [0, 0, 0]
    # None and explicit zeros are different wire forms, so not equal.
    assert make() != make(token_type_ids=np.zeros(8, dtype=np.uint8))


KEYS = np.arange(32, dtype=np.uint8).reshape(2, 16)
ODD = [[101, 7592, 102], [101, 2460, 102, 102]]  # 7 u16 ids: arrays end 2 bytes short


def test_cache_keys_travel_aligned_after_the_other_arrays() -> None:
    tb = make(ODD, cache_keys=KEYS)
    data = encode_token_batch(tb)
    assert split(data)[0]["has_keys"] is True
    plain = encode_token_batch(make(ODD))
    # The same arrays as without keys (ending 2 bytes past a 4-byte boundary), 2 zero bytes
    # of padding, then n_seq * 16 bytes of keys.
    arrays_end = len(data) - 2 - 32
    assert (arrays_end - split(data)[1]) % 4 == 2
    assert data[split(data)[1] : arrays_end] == plain[split(plain)[1] :]
    assert data[-34:-32] == b"\0\0" and data[-32:] == KEYS.tobytes()
    back = decode_token_batch(data)
    assert back == tb and back.cache_keys is not None
    assert back.cache_keys.shape == (2, 16) and not back.cache_keys.flags.writeable
    assert bytes(back.cache_keys[1]) == bytes(range(16, 32))
    assert tb != make(ODD) and tb != make(ODD, cache_keys=KEYS[::-1])
    # Aligned already (8 u16 ids): no padding at all.
    keyed, bare = encode_token_batch(make(cache_keys=KEYS)), encode_token_batch(make())
    assert len(keyed) - split(keyed)[1] == len(bare) - split(bare)[1] + 32
    typed = make(ODD, token_type_ids=np.ones(7, dtype=np.uint8), cache_keys=KEYS)
    assert decode_token_batch(encode_token_batch(typed)) == typed


def test_cache_key_rules() -> None:
    data = encode_token_batch(make(ODD, cache_keys=KEYS))
    rejects(data[:-1], "$", "length")  # truncated keys array
    rejects(data[:-16], "$", "length")  # one key short
    rejects(data + bytes(16), "$", "length")  # one key too many
    rejects(with_header(encode_token_batch(make(ODD)), has_keys=True), "$", "length")
    rejects(with_header(data, has_keys=False), "$", "length")
    rejects(with_header(data, has_keys=1), "has_keys", "type")
    bad = bytearray(data)
    bad[-33] = 1  # the padding before the keys must be zero, like that before input_ids
    rejects(bytes(bad), "$", "padding")


def test_sequence_is_a_view_and_bounds_checked() -> None:
    tb = decode_token_batch(encode_token_batch(make()))
    assert tb.n_sequences == 2 and tb.lengths.tolist() == [3, 5]
    assert tb.sequence(1).tolist() == [101, 7592, 102, 2460, 102]
    assert tb.sequence(-1).tolist() == tb.sequence(1).tolist()
    assert np.shares_memory(tb.sequence(0), tb.input_ids)
    assert not tb.input_ids.flags.writeable  # decoded arrays are read-only views
    with pytest.raises(IndexError):
        tb.sequence(2)
    with pytest.raises(IndexError):
        tb.sequence(-3)


def test_equality_compares_arrays_by_value() -> None:
    a = make()
    b = replace(a, input_ids=a.input_ids.astype(np.int64), seq_item=a.seq_item.astype(np.uint8))
    assert a == b
    assert a != replace(a, input_ids=a.input_ids + 1)
    assert a != replace(a, batch_id="b2")
    assert a != "not a batch"


def test_truncated_buffer() -> None:
    data = encode_token_batch(make())
    for cut in range(len(data)):
        with pytest.raises(SchemaError) as info:
            decode_token_batch(data[:cut])
        assert info.value.rule in {"length", "json"}, (cut, str(info.value))
    rejects(data[:5], "$", "length")
    rejects(data[:-1], "$", "length")
    rejects(data + b"\0", "$", "length")


def test_magic_version_and_header() -> None:
    data = encode_token_batch(make())
    rejects(b"QSTX" + data[4:], "$", "magic")
    rejects(data[:4] + struct.pack("<H", 4) + data[6:], "$", "version")
    rejects(data[:4] + struct.pack("<H", 2) + data[6:], "$", "version")  # no embedding_format
    rejects(data[:4] + struct.pack("<H", 1) + data[6:], "$", "version")  # no head: refused
    rejects(PREFIX.pack(b"QSTB", VERSION, 3) + b"{} ", "header", "padding")
    rejects(PREFIX.pack(b"QSTB", VERSION, 6) + b"{nope}", "header", "json")
    rejects(PREFIX.pack(b"QSTB", VERSION, 6) + b'"\xff"   ', "header", "utf-8")
    rejects(PREFIX.pack(b"QSTB", VERSION, 2) + b"{}", "header.batch_id", "required")
    rejects(PREFIX.pack(b"QSTB", VERSION, 6) + b"[]    ", "header", "type")
    rejects(with_header(data, extra=1), "header", "unknown_key")
    rejects(with_header(data, n_seq="2"), "n_seq", "type")
    rejects(with_header(data, id_width=3), "id_width", "range")
    rejects(with_header(data, item_ids=["q1", "q1"]), "item_ids[1]", "duplicate")
    rejects(with_header(data, priority="soon"), "priority", "enum")
    rejects(with_header(data, embedding_format="hex"), "embedding_format", "enum")
    rejects(with_header(data, submitted_at=float("1e308") * -1), "submitted_at", "range")
    header, start = split(data)
    del header["tokenizer_id"]
    raw = orjson.dumps(header)
    raw += b" " * ((-(PREFIX.size + len(raw))) % 4)
    rejects(
        PREFIX.pack(b"QSTB", VERSION, len(raw)) + raw + data[start:],
        "header.tokenizer_id",
        "required",
    )


def test_counts_against_limits() -> None:
    data = encode_token_batch(make())
    rejects(data, "n_seq", "max_items", Limits(max_sequences=1))
    rejects(data, "n_ids", "max_items", Limits(max_token_ids=7))
    rejects(data, "item_ids", "max_items", Limits(max_items=1))
    rejects(data, "$", "max_bytes", Limits(max_message_bytes=len(data) - 1))
    rejects(with_header(data, n_seq=0), "n_seq", "empty")
    with pytest.raises(SchemaError, match="max_bytes"):
        encode_token_batch(make(), Limits(max_message_bytes=len(data) - 1))


def test_non_monotone_offsets() -> None:
    data = encode_token_batch(make())
    err = rejects(patch(data, "offsets", 1, 9), "offsets[2]", "monotone")
    assert "backwards" in err.detail
    rejects(patch(data, "offsets", 2, 7), "offsets", "monotone")  # does not end at n_ids
    rejects(patch(data, "offsets", 0, 1), "offsets[0]", "range")
    with pytest.raises(SchemaError) as info:
        encode_token_batch(make(offsets=np.array([0, 6, 3, 8][:3])))
    assert info.value.rule == "monotone"


def test_sequence_rules() -> None:
    data = encode_token_batch(make())
    rejects(patch(data, "offsets", 1, 0), "sequence[0]", "empty")
    rejects(with_header(data, max_length=4), "sequence[1]", "max_length")
    rejects(patch(data, "seq_item", 1, 2), "seq_item[1]", "range")
    rejects(patch(data, "seq_doc", 0, -2), "seq_doc[0]", "range")
    rejects(patch(data, "seq_doc", 0, 256), "seq_doc[0]", "range")
    rejects(patch(patch(data, "seq_item", 1, 0), "seq_doc", 1, -1), "seq_doc[1]", "duplicate")
    _, start = split(data)
    bad = bytearray(data)
    bad[start + 4 * 7] = 2  # truncated[0]
    rejects(bytes(bad), "truncated[0]", "range")
    bad = bytearray(data)
    bad[start + 4 * 7 + 2] = 1  # padding after truncated
    rejects(bytes(bad), "$", "padding")


def test_encode_validates_arrays() -> None:
    cases = [
        (make(input_ids=np.array([1.0] * 8)), "input_ids", "type"),
        (make(input_ids=np.array([-1] + [1] * 7)), "input_ids", "range"),
        (make(seq_doc=np.array([-1])), "seq_doc", "length"),
        (make(truncated=np.array([0, 2])), "truncated", "range"),
        (make(token_type_ids=np.zeros(7, dtype=np.uint8)), "token_type_ids", "length"),
        (make(input_ids=np.zeros((2, 4), dtype=np.uint32)), "input_ids", "type"),
        (make(seq_item=np.array([0, 0]), seq_doc=np.array([3, 3])), "seq_doc[1]", "duplicate"),
        (make(item_ids=()), "item_ids", "empty"),
        (make(tokenizer_id=""), "tokenizer_id", "empty"),
        (make(max_length=0), "max_length", "range"),
        (make([]), "n_seq", "empty"),
        (make(cache_keys=KEYS[:1]), "cache_keys", "length"),
        (make(cache_keys=np.zeros((2, 8), dtype=np.uint8)), "cache_keys", "type"),
        (make(cache_keys=np.zeros(32, dtype=np.uint8)), "cache_keys", "type"),
        (make(cache_keys=np.full((2, 16), 256)), "cache_keys", "range"),
        (make(cache_keys=np.zeros((2, 16))), "cache_keys", "type"),
    ]
    for tb, field, rule in cases:
        with pytest.raises(SchemaError) as info:
            encode_token_batch(tb)
        assert (info.value.field, info.value.rule) == (field, rule), str(info.value)


def test_pack_sequences() -> None:
    offsets, ids = pack_sequences([[1, 2], [3], [4, 5, 6]])
    assert offsets.tolist() == [0, 2, 3, 6] and ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert offsets.dtype == ids.dtype == np.uint32
    empty_offsets, empty_ids = pack_sequences([])
    assert empty_offsets.tolist() == [0] and empty_ids.size == 0
    with pytest.raises(ValueError):
        pack_sequences([[-1]])
