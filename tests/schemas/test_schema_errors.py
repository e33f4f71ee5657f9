"""SchemaError formatting/pickling and Limits validation."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from schemas import DEFAULT_LIMITS, Limits, SchemaError


def test_str_names_field_rule_limit_and_detail() -> None:
    err = SchemaError("items[3].query", "max_chars", "got 5000", limit=2048)
    assert str(err) == "items[3].query: max_chars=2048 (got 5000)"
    assert (err.field, err.rule, err.detail, err.limit) == (
        "items[3].query",
        "max_chars",
        "got 5000",
        2048,
    )
    assert str(SchemaError("$", "json")) == "$: json"
    assert str(SchemaError("v", "version", "got 2")) == "v: version (got 2)"
    assert isinstance(err, ValueError)


def test_positional_signature() -> None:
    err = SchemaError("f", "r", "d")
    assert (err.field, err.rule, err.detail, err.limit) == ("f", "r", "d", None)
    assert SchemaError("f", "r").detail == ""


def test_pickles_across_processes() -> None:
    err = pickle.loads(pickle.dumps(SchemaError("a.b", "max_items", "got 9", limit=8)))
    assert isinstance(err, SchemaError)
    assert (err.field, err.rule, err.detail, err.limit) == ("a.b", "max_items", "got 9", 8)
    assert str(err) == "a.b: max_items=8 (got 9)"


def test_limits_defaults() -> None:
    assert Limits() == DEFAULT_LIMITS
    assert DEFAULT_LIMITS.max_message_bytes == 1_048_576
    assert DEFAULT_LIMITS.max_items == 1024
    assert DEFAULT_LIMITS.max_id_chars == 256
    assert DEFAULT_LIMITS.max_query_chars == 2048
    assert DEFAULT_LIMITS.max_doc_chars == 8192
    assert DEFAULT_LIMITS.max_docs_per_item == 256
    assert DEFAULT_LIMITS.max_sequences == 65_536
    assert DEFAULT_LIMITS.max_token_ids == 4_194_304
    assert DEFAULT_LIMITS.max_reason_chars == 4096


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Limits)])
@pytest.mark.parametrize("value", [0, -1])
def test_limits_below_one_name_the_field(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        Limits(**{field: value})


def test_limits_reject_non_ints_and_are_frozen() -> None:
    with pytest.raises(ValueError, match="max_items"):
        Limits(max_items=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_items"):
        Limits(max_items=True)  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_LIMITS.max_items = 5  # type: ignore[misc]
