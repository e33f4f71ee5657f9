"""Tokenization into TokenBatches: layout, pairs, truncation counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.source import default_model_path
from engines.tokenizer import QueryTokenizer, TokenizerError, tokenizer_id_of
from schemas import QueryItem, decode_token_batch, encode_token_batch

TOKENIZER = default_model_path() / "tokenizer.json"
LONG = "the quick brown fox jumps over the lazy dog " * 40
ITEMS = [QueryItem(id="a", query="boil an egg", docs=("nine minutes", LONG)),
         QueryItem(id="b", query="capital of australia")]


def test_similarity_layout_and_truncation() -> None:
    tok = QueryTokenizer(TOKENIZER, 32, pairs=False)
    tb = tok.token_batch("x", ITEMS, submitted_at=1.0)
    assert tb.seq_item.tolist() == [0, 0, 0, 1]
    assert tb.seq_doc.tolist() == [-1, 0, 1, -1]
    assert tb.truncated.tolist() == [False, False, True, False]
    lengths = np.diff(tb.offsets.astype(int))
    assert lengths[2] == 32 and lengths.max() == 32
    assert tb.token_type_ids is None
    first = tb.sequence(0)
    assert first[0] == 101 and first[-1] == 102  # [CLS] ... [SEP]
    assert tb.tokenizer_id == tokenizer_id_of(TOKENIZER)
    assert tb.head == tok.head == "similarity"
    # What the tokenizer produces is what the wire carries.
    assert decode_token_batch(encode_token_batch(tb)) == tb


def test_pairs_for_classifier() -> None:
    tok = QueryTokenizer(TOKENIZER, 32, pairs=True)
    tb = tok.token_batch("x", ITEMS, submitted_at=1.0)
    assert tb.seq_item.tolist() == [0, 0, 1]
    assert tb.seq_doc.tolist() == [0, 1, -1]
    assert tb.truncated.tolist() == [False, True, False]
    assert tb.token_type_ids is not None
    first = tb.token_type_ids[tb.offsets[0]:tb.offsets[1]]
    assert first[0] == 0 and first[-1] == 1  # segment B is the doc
    assert int(tb.token_type_ids[tb.offsets[2]:tb.offsets[3]].max()) == 0
    # Pairs for an item with docs, no query-alone sequence: a layout of its own, which the
    # head on the wire tells the decoder (and the worker) to expect.
    assert tb.head == tok.head == "classifier"
    assert decode_token_batch(encode_token_batch(tb)) == tb


def test_tokenizer_json_settings_do_not_leak() -> None:
    # The shipped tokenizer.json pads to 128; our sequences stay unpadded.
    tb = QueryTokenizer(TOKENIZER, 256, pairs=False).token_batch(
        "x", [QueryItem(id="a", query="hi")], submitted_at=0.0)
    assert tb.offsets.tolist() == [0, 3]


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        QueryTokenizer(tmp_path / "tokenizer.json", 32, pairs=False)
