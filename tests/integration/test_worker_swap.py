"""A scoring worker swaps engine versions while serving (issue 12's atomic swap): every
TokenBatch is scored wholly by one version and labelled with it, batches already queued or
running finish on the old engines, which are then closed, and nothing is lost."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engines.batch import PaddedBatch
from engines.loader import load_engine
from engines.protocol import Engine
from schemas import QueryItem, decode_score_batch, encode_token_batch
from tests.integration.test_worker import (
    _topics,
    kafka,
    publish_token_batches,
    read_all,
    tokenize,
    versions_scored,
    worker_running,
)
from tests.waiting import until
from workers.microbatcher import BatcherSettings
from workers.service import ScoringWorker, WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Relabelled:
    """A loaded engine under another version name (a stand-in for a promoted build), slowed a
    little so batches are still running when the swap comes; records its calls and closing."""

    def __init__(self, engine: Engine, version: str, delay_s: float = 0.0) -> None:
        self._engine, self._delay = engine, delay_s
        self.manifest = replace(engine.manifest, version=version)
        self.path, self.lanes, self.device = engine.path, engine.lanes, engine.device
        self.calls = 0
        self.closed = False
        self.busy = threading.Event()  # set by the 3rd call: serving, with more to come

    def run(self, batch: PaddedBatch, lane: int = 0) -> np.ndarray:
        assert not self.closed, "a closed engine was called"
        self.calls += 1
        if self.calls >= 3:
            self.busy.set()
        if self._delay:
            time.sleep(self._delay)
        return self._engine.run(batch, lane)

    def health(self) -> None:
        self._engine.health()

    def close(self) -> None:
        self.closed = True
        self._engine.close()


async def test_a_swap_while_serving_loses_nothing_and_labels_every_batch_with_one_version(
        kafka_bootstrap: str, create_topic, topic_name: str,  # type: ignore[no-untyped-def]
        default_engine_path: Path) -> None:
    topics = await _topics(create_topic, topic_name)
    old = Relabelled(load_engine(default_engine_path, threads=1), "v-old", delay_s=0.02)
    new = Relabelled(load_engine(default_engine_path, threads=1), "v-new")
    worker = ScoringWorker(WorkerSettings(kafka=kafka(kafka_bootstrap), topics=topics,
                                          group_id=f"{topic_name}-w",
                                          batcher=BatcherSettings(max_batch=8)), [old])
    items = [QueryItem(id=f"q{i}", query=f"query {i} about red shoes", docs=("red shoes",))
             for i in range(4)]
    tbs = [tokenize(old, items, f"b{n:03d}") for n in range(60)]
    async with worker_running(worker, kafka_bootstrap) as producer:
        sends = [await producer.send(topics.tokens, encode_token_batch(tb),
                                     key=tb.batch_id.encode()) for tb in tbs[:30]]
        await asyncio.gather(*sends)
        assert await asyncio.to_thread(old.busy.wait, 30)  # serving, with work still queued
        generation = await worker.swap([new])
        assert generation == 1 and worker.manifest.version == "v-new"
        sends = [await producer.send(topics.tokens, encode_token_batch(tb),
                                     key=tb.batch_id.encode()) for tb in tbs[30:]]
        await asyncio.gather(*sends)
        values = await read_all(kafka_bootstrap, topics.scores, len(tbs))
        await asyncio.wait_for(worker.retired(), 30)
        assert old.closed and not new.closed  # the old engines go once their work is done
        assert len(worker.pools) == 1
    batches = [decode_score_batch(v) for v in values]
    assert sorted(b.batch_id for b in batches) == [tb.batch_id for tb in tbs]  # each once
    versions = {b.batch_id: {it.model_version for it in b.items} for b in batches}
    assert all(len(v) == 1 for v in versions.values()), versions  # never mixed in a batch
    # Everything published after the swap was scored by the new version; the old version
    # scored only what had arrived before it, and was closed once that was done.
    assert all(versions[tb.batch_id] == {"v-new"} for tb in tbs[30:])
    assert {"v-old"} in versions.values() and old.calls and new.calls
    assert old.closed and new.closed is not False  # stop() closed the serving one too
    assert worker.pipeline_dead_letters() == 0 if hasattr(worker, "pipeline_dead_letters") else (
        worker.online.stats.dead_letters == 0)


async def test_another_tokenizer_is_served_beside_the_old_until_its_batches_stop_and_a_head_change_is_refused(  # noqa: E501
        kafka_bootstrap: str, create_topic, topic_name: str,  # type: ignore[no-untyped-def]
        default_engine_path: Path) -> None:
    """A transition: after the swap, TokenBatches of both tokenizers are scored, each by the
    version of its own tokenizer; the old engines go once the old tokenizer's batches stop."""
    topics = await _topics(create_topic, topic_name)
    old = Relabelled(load_engine(default_engine_path, threads=1), "v-old")
    new = Relabelled(load_engine(default_engine_path, threads=1), "v-new")
    new.manifest = replace(new.manifest, tokenizer_id="another-tokenizer@1")
    worker = ScoringWorker(WorkerSettings(kafka=kafka(kafka_bootstrap), topics=topics,
                                          group_id=f"{topic_name}-w", transition_idle_s=0.4),
                           [old])
    items = [QueryItem(id=f"q{i}", query=f"query {i} about red shoes") for i in range(3)]
    tbs = [tokenize(old, items, f"b{n:03d}") for n in range(30)]
    # b000-b009 before the swap (old tokenizer); b010-b019 after it from tokenizers that
    # switched; b020-b029 after it, old tokenizer's, still in the topic.
    tbs[10:20] = [replace(tb, tokenizer_id="another-tokenizer@1") for tb in tbs[10:20]]
    async with worker_running(worker, kafka_bootstrap) as producer:
        await publish_token_batches(producer, topics.tokens, tbs[:10])
        await read_all(kafka_bootstrap, topics.scores, 10)
        head = Relabelled(load_engine(default_engine_path, threads=1), "v-head")
        head.manifest = replace(head.manifest, head="classifier",
                                tokenizer_id="another-tokenizer@1")
        with pytest.raises(ValueError, match="head"):
            await worker.swap([head])
        assert head.closed and worker.manifest.version == "v-old"
        assert await worker.swap([new]) == 1
        await publish_token_batches(producer, topics.tokens, tbs[10:])
        values = await read_all(kafka_bootstrap, topics.scores, len(tbs))
        # b020-b029 were scored by the old engines (below): kept after the swap; then closed
        # once no batch of theirs came for transition_idle_s.
        await asyncio.wait_for(until(lambda: old.closed), 30)
        assert list(worker.pools) == [1]
    versions = versions_scored(values, tbs)  # each once, none dead-lettered
    assert all(versions[tb.batch_id] == {"v-new"} for tb in tbs[10:20])
    assert all(versions[tb.batch_id] == {"v-old"} for tb in tbs[:10] + tbs[20:])
    assert worker.online.stats.dead_letters == 0
