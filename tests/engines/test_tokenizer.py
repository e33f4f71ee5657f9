"""Tokenization into TokenBatches: layout, pairs, truncation counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

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


def _reference(max_length: int) -> Tokenizer:
    """The tokenizer as its file says, nothing skipped."""
    tok = Tokenizer.from_file(str(TOKENIZER))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def _same_as_reference(tok: QueryTokenizer, items: list[QueryItem]) -> None:
    tb = tok.token_batch("x", items, submitted_at=0.0)
    inputs: list[str | tuple[str, str]] = []
    for it in items:
        if tok.pairs and it.docs:
            inputs += [(it.query, d) for d in it.docs]
        else:
            inputs += [it.query, *(() if tok.pairs else it.docs or ())]
    ref = _reference(tok.max_length).encode_batch(inputs)
    assert [tb.sequence(i).tolist() for i in range(tb.n_sequences)] == [e.ids for e in ref]
    if tok.pairs:
        assert [tb.sequence_type_ids(i).tolist() for i in range(tb.n_sequences)] == [
            e.type_ids for e in ref]
    assert tb.truncated.tolist() == [bool(e.overflowing) for e in ref]


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                              min_size=1, max_size=60).filter(str.strip), min_size=2,
                      max_size=6),
       pairs=st.booleans())
def test_printable_ascii_fast_path_gives_the_reference_ids(texts: list[str], pairs: bool) -> None:
    # Printable ASCII skips the normalizer's Unicode work: it must not change a single id.
    tok = QueryTokenizer(TOKENIZER, 12, pairs=pairs)
    assert tok._ascii_tok is not None
    _same_as_reference(tok, [QueryItem(id="a", query=texts[0], docs=tuple(texts[1:]))])


@pytest.mark.parametrize("pairs", [False, True], ids=["similarity", "classifier"])
def test_other_text_takes_the_full_normalizer(pairs: bool) -> None:
    items = [QueryItem(id="a", query="Café CRÈME brûlée", docs=("naïve résumé", "ab\x01cd")),
             QueryItem(id="b", query="北京 weather\ttoday", docs=(LONG + " é",)),
             QueryItem(id="c", query="Plain ASCII, with PUNCTUATION!", docs=(LONG,))]
    for some in (items, items[2:]):
        _same_as_reference(QueryTokenizer(TOKENIZER, 32, pairs=pairs), some)
