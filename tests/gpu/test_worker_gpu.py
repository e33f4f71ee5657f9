"""The fleet on a GPU: tokenizer service -> broker -> ScoringWorker on a 2-lane CUDA engine.

Real items go in through a QueryProducer and come back from the score topic; each score must
equal what the CPU ONNX Runtime FP32 engine gives within FP16's bound. Redis is used where
`redis-server` is on PATH; without it both services cache in process (the cache is an
accelerator, never a dependency), which is how GPU hosts without Redis run this.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from engines.protocol import Engine
from engines.tokenizer import QueryTokenizer
from engines.torch_runtime import TorchEngine, TorchOptions
from plumbing.cache import CacheSettings
from qscore.client import QueryProducer, ScoreConsumer
from qscore.local.servers import RedisServer
from schemas import ItemScore, QueryItem
from tests.integration.fleet_helpers import (
    CreateTopic,
    in_process_tokenizer,
    in_process_worker,
    kafka_settings,
    make_topics,
    sample_batches,
)
from workers.scoring import BatchLimits, run_token_batch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIN_EMBEDDING_COSINE = 0.999  # FP16 against FP32, per item
MAX_SCORE_DIFF = 2e-3  # a (query, doc) cosine score, FP16 against FP32


@pytest.fixture
def optional_redis_url() -> Iterator[str | None]:
    if shutil.which("redis-server") is None:
        yield None
        return
    with RedisServer() as server:
        yield server.url


def onnx_scores(engine: Engine, tokenizer: QueryTokenizer,
                batches: dict[str, list[QueryItem]]) -> dict[str, dict[str, ItemScore]]:
    out = {}
    for batch_id, items in batches.items():
        tb = tokenizer.token_batch(batch_id, items, submitted_at=0.0)
        out[batch_id] = {s.id: s for s in run_token_batch(engine, tb, BatchLimits()).items}
    return out


async def test_worker_on_a_two_lane_gpu_engine_scores_like_onnx_fp32(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str,
        optional_redis_url: str | None, gpu_artifact: Callable[[str], Path],
        onnx_reference: Engine, gpu_tokenizer: QueryTokenizer) -> None:
    artifact = gpu_artifact("fp16")
    engine = TorchEngine(artifact, options=TorchOptions(device="cuda:0", lanes=2))
    assert engine.lanes == 2 and engine.graphs
    await fleet_matches_reference(kafka_bootstrap, create_topic, topic_name,
                                  optional_redis_url, artifact, engine, onnx_reference,
                                  gpu_tokenizer, n_batches=15, per_batch=20)


async def fleet_matches_reference(kafka_bootstrap: str, create_topic: CreateTopic,
                                  topic_name: str, redis_url: str | None, artifact: Path,
                                  engine: TorchEngine, reference: Engine,
                                  tokenizer: QueryTokenizer, *, n_batches: int,
                                  per_batch: int) -> None:
    """Items through tokenizer service, broker and a worker on `engine` (2 lanes) come back
    complete, each within FP16's bound of `reference` (the FP32 ONNX Runtime engine)."""
    kafka = kafka_settings(kafka_bootstrap)
    topics = await make_topics(create_topic, topic_name, partitions=2)
    cache = CacheSettings(redis_url=redis_url, key_prefix=topic_name)
    total = n_batches * per_batch
    batches = sample_batches(n_batches, per_batch, max_docs=2, tag="g")  # with and without docs
    expected = {b: [it.id for it in items] for b, items in batches.items()}
    async with (in_process_tokenizer(kafka, topics, artifact, cache, f"{topic_name}-t"),
                in_process_worker(kafka, topics, artifact, cache, f"{topic_name}-w",
                                  engine) as worker,
                QueryProducer(kafka, topics) as producer,
                ScoreConsumer(kafka, topics) as consumer):
        sent = [await producer.send(items, batch_id=b) for b, items in batches.items()]
        await asyncio.gather(*sent)
        scores = await consumer.collect(expected, timeout=180)
        stats = worker.stats
        slots = [s.batches for s in worker.pool.slot_stats]

    assert sum(len(v) for v in scores.values()) == total
    assert stats.messages == len(batches) and stats.batches == sum(slots) and len(slots) == 2
    want = onnx_scores(reference, tokenizer, batches)
    with_docs = 0
    for batch_id, items in scores.items():
        for item_id, got in items.items():
            ref = want[batch_id][item_id]
            assert got.error is None and not got.cached
            assert got.model_version == engine.manifest.version
            assert len(got.scores) == len(ref.scores)
            if ref.embedding is not None:
                assert got.embedding is not None
                a, b = np.asarray(got.embedding), np.asarray(ref.embedding)
                cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
                assert cosine >= MIN_EMBEDDING_COSINE, (batch_id, item_id, cosine)
            if ref.scores:
                with_docs += 1
                diff = np.abs(np.asarray(got.scores) - np.asarray(ref.scores)).max()
                assert diff <= MAX_SCORE_DIFF, (batch_id, item_id, diff)
    assert 0 < with_docs < total  # both representations were checked
