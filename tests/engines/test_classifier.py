"""Classifier head: a tiny random BERT cross-encoder, exported and compared with PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.protocol import Engine
from engines.tokenizer import QueryTokenizer
from schemas import QueryItem
from workers.scoring import BatchLimits, run_token_batch

pytestmark = pytest.mark.slow

ITEMS = [
    QueryItem(id="a", query="how long to boil an egg",
              docs=("Boil for nine minutes.", "Lisbon is in Portugal.", "eggs " * 80)),
    QueryItem(id="b", query="capital of australia"),
    QueryItem(id="c", query="python sort a list", docs=("Use sorted(xs) or xs.sort().",)),
]


def _torch_probs(model_dir: Path, pairs: list[tuple[str, str] | str]) -> np.ndarray:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    with torch.no_grad():
        for p in pairs:
            enc = (tok(p[0], p[1], truncation=True, max_length=64, return_tensors="pt")
                   if isinstance(p, tuple) else
                   tok(p, truncation=True, max_length=64, return_tensors="pt"))
            out.append(torch.softmax(model(**enc).logits, -1)[0, 1].item())
    return np.array(out)


def test_classifier_scores_match_pytorch(classifier_engine: Engine,
                                         tiny_classifier_dir: Path) -> None:
    m = classifier_engine.manifest
    assert (m.head, m.num_labels, m.positive_label, m.max_length) == ("classifier", 2, 1, 64)
    tok = QueryTokenizer(classifier_engine.path / "tokenizer" / "tokenizer.json", m.max_length,
                         pairs=True)
    tb = tok.token_batch("c", ITEMS, submitted_at=0.0)
    assert tb.token_type_ids is not None and tb.token_type_ids.max() == 1
    assert int(tb.truncated.sum()) == 1  # the 80-word doc, cut at 64 tokens
    scores = run_token_batch(classifier_engine, tb, BatchLimits(max_batch=2,
                                                                token_budget=128)).items
    assert [len(s.scores) for s in scores] == [3, 1, 1]  # per doc, or the query alone
    got = np.array([x for s in scores for x in s.scores])
    pairs: list[tuple[str, str] | str] = [
        (ITEMS[0].query, d) for d in ITEMS[0].docs or ()]
    pairs += [ITEMS[1].query, (ITEMS[2].query, (ITEMS[2].docs or ("",))[0])]
    expected = _torch_probs(tiny_classifier_dir, pairs)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.all((got > 0) & (got < 1))
