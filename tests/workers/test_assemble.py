"""Per-sequence outputs -> per-item scores (pure logic, fake engine outputs)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings

from engines.batch import PaddedBatch
from engines.source import default_model_path
from engines.tokenizer import QueryTokenizer
from schemas import QueryItem, TokenBatch, decode_dead_letter, encode_token_batch
from tests.schemas.strategies import token_batches
from workers.assemble import item_scores

TOKENIZER = default_model_path() / "tokenizer.json"


def _tb(seq_item: list[int], seq_doc: list[int], n_items: int) -> TokenBatch:
    n = len(seq_item)
    return TokenBatch(
        batch_id="b", item_ids=tuple(f"i{k}" for k in range(n_items)), tokenizer_id="t",
        max_length=8, seq_item=np.array(seq_item, dtype=np.uint32),
        seq_doc=np.array(seq_doc, dtype=np.int32),
        offsets=np.arange(n + 1, dtype=np.uint32), input_ids=np.ones(n, dtype=np.uint32),
        token_type_ids=None, truncated=np.zeros(n, dtype=bool), submitted_at=0.0)


def test_similarity_scores_are_dot_products_aligned_with_docs() -> None:
    q = np.array([1.0, 0.0])
    d0 = np.array([0.6, 0.8])
    d1 = np.array([0.0, 1.0])
    # Item 0: query + two docs (given out of order); item 1: query only.
    tb = _tb([0, 0, 0, 1], [1, -1, 0, -1], 2)
    outputs = np.stack([d1, q, d0, d1]).astype(np.float32)
    a, b = item_scores(tb, outputs, head="similarity", model_version="v1")
    assert a.id == "i0" and a.scores == pytest.approx((0.6, 0.0)) and a.embedding is None
    assert b.scores == () and b.embedding == pytest.approx((0.0, 1.0))
    assert a.model_version == "v1" and not a.cached


def test_classifier_scores_per_pair_or_query_alone() -> None:
    tb = _tb([0, 0, 1], [1, 0, -1], 2)
    a, b = item_scores(tb, np.array([0.2, 0.9, 0.5], dtype=np.float32), head="classifier",
                       model_version="v1")
    assert a.scores == pytest.approx((0.9, 0.2))
    assert b.scores == pytest.approx((0.5,))


def test_output_count_must_match_sequences() -> None:
    with pytest.raises(ValueError, match="3 outputs for 2 sequences"):
        item_scores(_tb([0, 0], [-1, 0], 1), np.zeros((3, 2)), head="similarity",
                    model_version="v")


# -- an item is scored from its own rows only ---------------------------------------------------
def test_a_similarity_item_without_its_query_row_is_refused_not_given_another_items() -> None:
    # Item 1 has docs but no query row: outputs[-1] (item 2's query) used to score them.
    tb = _tb([0, 1, 1, 2], [-1, 0, 1, -1], 3)
    with pytest.raises(ValueError, match="item 'i1' has no query sequence"):
        item_scores(tb, np.eye(4, dtype=np.float32), head="similarity", model_version="v")


def test_a_classifier_item_without_any_row_is_refused() -> None:
    tb = _tb([0, 2], [-1, -1], 3)
    with pytest.raises(ValueError, match="item 'i1' has no query sequence"):
        item_scores(tb, np.array([0.1, 0.2], dtype=np.float32), head="classifier",
                    model_version="v")


@pytest.mark.parametrize(("seq_doc", "message"), [
    ([-1, 0, 2], r"doc indices \[0, 2\], not 0..1"),  # a gap: doc 2's score would be doc 1's
    ([-1, 1], r"doc indices \[1\], not 0..0"),
    ([-1, 0, 0], r"doc indices \[0, 0\], not 0..1"),
    ([-1, -1], "two query sequences"),
    ([-1, -2], "docs >= -1"),
])
def test_doc_rows_must_be_exactly_the_items_docs(seq_doc: list[int], message: str) -> None:
    tb = _tb([0] * len(seq_doc), seq_doc, 1)
    for head in ("similarity", "classifier"):
        with pytest.raises(ValueError, match=message):
            item_scores(tb, np.ones((len(seq_doc), 2), dtype=np.float32), head=head,
                        model_version="v")


def test_a_row_for_an_item_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ValueError, match="sequence 1 has item 1"):
        item_scores(_tb([0, 1], [-1, -1], 1), np.ones((2, 2)), head="similarity",
                    model_version="v")


@settings(max_examples=60, deadline=None)
@given(token_batches())
def test_every_valid_batch_scores_each_item_from_its_own_rows(tb: TokenBatch) -> None:
    head = tb.head or "similarity"
    rows = np.arange(tb.n_sequences, dtype=np.float32)
    # Row s: [1, s] for similarity (so query . doc = 1 + q*s), s for the classifier.
    outputs = np.stack([np.ones_like(rows), rows], axis=1) if head == "similarity" else rows
    scored = item_scores(tb, outputs, head=head, model_version="v")
    assert [s.id for s in scored] == list(tb.item_ids)
    for item, score in enumerate(scored):
        own = np.flatnonzero(tb.seq_item == item)
        docs = sorted((int(tb.seq_doc[s]), int(s)) for s in own if tb.seq_doc[s] >= 0)
        query = [int(s) for s in own if tb.seq_doc[s] == -1]
        if head == "similarity":
            (q,) = query
            assert score.scores == pytest.approx(tuple(1.0 + q * s for _, s in docs))
            assert score.embedding == (None if docs else (1.0, float(q)))
        else:
            assert score.scores == tuple(float(s) for _, s in (docs or [(-1, query[0])]))


# -- the worker refuses a TokenBatch tokenized for the other head -------------------------------
class _Engine:
    """A similarity engine on CPU that answers unit vectors."""

    lanes = 1
    device = "cpu"

    def __init__(self, tokenizer_id: str) -> None:
        self.manifest = SimpleNamespace(model_id="m", version="v1", head="similarity",
                                        tokenizer_id=tokenizer_id, max_length=32, output_dim=2)

    def run(self, batch: PaddedBatch, lane: int = 0) -> np.ndarray:
        return np.tile(np.array([0.6, 0.8], dtype=np.float32), (batch.size, 1))

    def health(self) -> None:
        pass

    def close(self) -> None:
        pass


async def test_the_worker_dead_letters_a_token_batch_of_the_other_head() -> None:
    from plumbing.kafka import KafkaSettings
    from workers.microbatcher import BatcherSettings
    from workers.service import ScoringWorker, WorkerInputError, WorkerSettings

    items = [QueryItem(id="a", query="boil an egg", docs=("nine minutes",))]
    tokenizers = {pairs: QueryTokenizer(TOKENIZER, 32, pairs=pairs) for pairs in (False, True)}
    worker = ScoringWorker(WorkerSettings(kafka=KafkaSettings(),
                                          batcher=BatcherSettings(max_wait_ms=0)),
                           [_Engine(tokenizers[False].tokenizer_id)])  # type: ignore[list-item]
    sent: list[tuple[str, bytes]] = []

    async def send(topic: str, value: bytes, *, key: bytes | None = None) -> asyncio.Future[None]:
        sent.append((topic, value))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    worker.online.send = send  # type: ignore[method-assign]
    worker._dispatcher = asyncio.create_task(worker._dispatch())
    try:
        def record(tb: TokenBatch) -> SimpleNamespace:
            return SimpleNamespace(topic="qscore.tokens", partition=0, offset=7, key=b"b",
                                   value=encode_token_batch(tb))

        # Same tokenizer, similarity head: scored.
        same = tokenizers[False].token_batch("b", items, submitted_at=0.0)
        await asyncio.wait_for(worker._handle(record(same), "online"), 5)
        assert [topic for topic, _ in sent] == ["qscore.scores"]
        # Same tokenizer, classifier pairs: refused before anything is scored.
        other = record(tokenizers[True].token_batch("b", items, submitted_at=0.0))
        with pytest.raises(WorkerInputError, match="classifier head; the engine is similarity"):
            await worker._handle(other, "online")
        assert worker.stats.batches == 1 and len(sent) == 1
        # Not fatal for the pipeline: the record is dead-lettered (stage score) and committed.
        exc = WorkerInputError("x")
        assert not isinstance(exc, worker.online.fatal)
        try:
            await worker._handle(other, "online")
        except WorkerInputError as err:
            await worker.online.dead_letter(other, err)  # type: ignore[arg-type]
        topic, value = sent[-1]
        letter = decode_dead_letter(value)
        assert topic == "qscore.dead-letter" and letter.stage == "score"
        assert "classifier head" in letter.reason and letter.original == other.value
    finally:
        await worker.stop()  # the dispatcher and the engine pool
        for pipeline in (worker.online, worker.offline):  # never started: this only closes them
            await pipeline.consumer.stop()
            await pipeline.producer.stop()
