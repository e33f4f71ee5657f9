"""Decoders raise only SchemaError, whatever the bytes: the consumer's poison-message guarantee.

Inputs: arbitrary bytes, arbitrary JSON, valid encodings with bytes flipped/cut/inserted, and
valid messages with one JSON node (or TokenBatch header field/array word) replaced. Whatever
a decoder accepts must re-encode, so a consumer can always forward what it read.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    SchemaError,
    decode_dead_letter,
    decode_query_batch,
    decode_score_batch,
    decode_token_batch,
    encode_dead_letter,
    encode_query_batch,
    encode_score_batch,
    encode_token_batch,
)
from schemas.tokens import VERSION as TOKEN_VERSION
from tests.schemas.strategies import dead_letters, query_batches, score_batches, token_batches

TOKEN_PREFIX = b"QSTB" + struct.pack("<H", TOKEN_VERSION)  # get past magic and version
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# name: (strategy, encode, decode)
CODECS: dict[str, tuple[st.SearchStrategy[Any], Callable[..., bytes], Callable[..., Any]]] = {
    "query": (query_batches, encode_query_batch, decode_query_batch),
    "score": (score_batches, encode_score_batch, decode_score_batch),
    "dead_letter": (dead_letters, encode_dead_letter, decode_dead_letter),
    "token": (token_batches(), encode_token_batch, decode_token_batch),
}
JSON_CODECS = ["query", "score", "dead_letter"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def survives(name: str, data: bytes) -> None:
    """Decode with one codec: success (then it must re-encode) or a non-internal SchemaError."""
    _, encode, decode = CODECS[name]
    try:
        value = decode(data)
    except SchemaError as err:
        assert err.rule != "internal", str(err)
        return
    assert decode(encode(value)) == value


@pytest.mark.parametrize("name", CODECS)
@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(name: str, data: bytes) -> None:
    survives(name, data)
    survives(name, TOKEN_PREFIX + data)


@pytest.mark.parametrize("name", JSON_CODECS)
@FUZZ
@given(value=json_values)
def test_arbitrary_json(name: str, value: object) -> None:
    survives(name, orjson.dumps(value))
    if isinstance(value, dict):
        survives(name, orjson.dumps({"v": 1, **value}))


@pytest.mark.parametrize("name", CODECS)
@FUZZ
@given(data=st.data())
def test_mutated_encodings(name: str, data: st.DataObject) -> None:
    strategy, encode, _ = CODECS[name]
    raw = bytearray(encode(data.draw(strategy)))
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["cut", "flip", "insert", "delete", "word"]))
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "cut":
            del raw[at:]
        elif op == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[at : at + data.draw(st.integers(1, 8))]
        elif op == "word" and at + 4 <= len(raw):
            raw[at : at + 4] = struct.pack("<I", data.draw(st.integers(0, 2**32 - 1)))
    for other in CODECS:  # cross-feeding topics must fail cleanly too
        survives(other, bytes(raw))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def _mutate_tree(data: st.DataObject, root: Any) -> Any:
    """Replace, delete or add one node anywhere in a decoded JSON tree."""
    path = data.draw(st.sampled_from(list(_paths(root))))
    if not path:
        return data.draw(json_values)
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    op = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if op == "replace":
        parent[path[-1]] = data.draw(json_values)
    elif op == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(max_size=6))] = data.draw(json_values)
    else:
        parent.insert(path[-1], data.draw(json_values))
    return root


@pytest.mark.parametrize("name", JSON_CODECS)
@FUZZ
@given(data=st.data())
def test_mutated_json_fields(name: str, data: st.DataObject) -> None:
    strategy, encode, _ = CODECS[name]
    tree = orjson.loads(encode(data.draw(strategy)))
    survives(name, orjson.dumps(_mutate_tree(data, tree)))


@FUZZ
@given(data=st.data())
def test_mutated_token_header_and_arrays(data: st.DataObject) -> None:
    raw = encode_token_batch(data.draw(token_batches()))
    header_len = struct.unpack_from("<I", raw, 6)[0]
    header = orjson.loads(raw[10 : 10 + header_len])
    arrays = bytearray(raw[10 + header_len :])
    if data.draw(st.booleans()):
        header = _mutate_tree(data, header)
    else:
        for _ in range(data.draw(st.integers(1, 3))):
            at = 4 * data.draw(st.integers(0, len(arrays) // 4 - 1))
            word = data.draw(st.sampled_from([0, 1, 2**16, 2**31, 2**32 - 1]) | st.integers(0, 99))
            arrays[at : at + 4] = struct.pack("<I", word)
    packed = orjson.dumps(header)
    packed += b" " * ((-(10 + len(packed))) % 4)
    survives("token", TOKEN_PREFIX + struct.pack("<I", len(packed)) + packed + bytes(arrays))
