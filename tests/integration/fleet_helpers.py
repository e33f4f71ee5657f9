"""Shared by the fleet tests: topics, in-process services, subprocess workers, items."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from engines.protocol import Engine
from plumbing.cache import CacheSettings
from plumbing.kafka import KafkaSettings, Topics
from qscore.local.fleet import ServiceProcess
from schemas import QueryItem
from tokenizer_svc.service import TokenizerService, TokenizerServiceSettings
from workers.microbatcher import BatcherSettings
from workers.service import ScoringWorker, WorkerSettings

SAMPLE = Path(__file__).resolve().parents[2] / "qscore" / "data" / "sample_queries.jsonl"
CreateTopic = Callable[..., Awaitable[str]]


def kafka_settings(bootstrap: str) -> KafkaSettings:
    settings = KafkaSettings(bootstrap_servers=bootstrap)
    return settings if os.environ.get("QSCORE_TEST_KAFKA") else settings.with_fast_groups()


async def make_topics(create_topic: CreateTopic, prefix: str, partitions: int = 4) -> Topics:
    topics = Topics.with_prefix(prefix)
    for name in topics.all():
        await create_topic(name, partitions=partitions)
    return topics


def sample_batches(n_batches: int, per_batch: int, *, max_docs: int = 1,
                   tag: str = "b") -> dict[str, list[QueryItem]]:
    """Batches of real-looking items from the shipped sample log (repeats included)."""
    rows = [orjson.loads(line) for line in SAMPLE.read_bytes().splitlines()]
    out: dict[str, list[QueryItem]] = {}
    k = 0
    for b in range(n_batches):
        items = []
        for i in range(per_batch):
            row = rows[k % len(rows)]
            k += 1
            docs = tuple(row.get("docs") or ())[:max_docs] or None
            items.append(QueryItem(id=f"i{i}", query=row["query"], docs=docs))
        out[f"{tag}{b:04d}"] = items
    return out


@contextlib.asynccontextmanager
async def in_process_tokenizer(kafka: KafkaSettings, topics: Topics, artifact: Path,
                               cache: CacheSettings, group: str,
                               **settings: Any) -> AsyncIterator[TokenizerService]:
    service = TokenizerService(TokenizerServiceSettings(
        kafka=kafka, topics=topics, cache=cache, artifact=artifact, processes=1,
        group_id=group, **settings))
    await service.start()
    task = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        service.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 60)
        await service.stop()


@contextlib.asynccontextmanager
async def in_process_worker(kafka: KafkaSettings, topics: Topics, artifact: Path,
                            cache: CacheSettings, group: str,
                            engine: Engine | None = None) -> AsyncIterator[ScoringWorker]:
    """A ScoringWorker on `engine` (default: `artifact` loaded on CPU) until the block ends;
    stopping it closes the engine."""
    from engines.loader import load_engine

    engine = engine or load_engine(artifact, threads=2)
    worker = ScoringWorker(WorkerSettings(kafka=kafka, topics=topics, group_id=group,
                                          batcher=BatcherSettings(max_wait_ms=2), cache=cache),
                           [engine])
    await worker.start()
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 60)
        await worker.stop()


def worker_process(bootstrap: str, topics: Topics, artifact: Path, workdir: Path,
                   name: str, group: str, redis_url: str | None = None) -> ServiceProcess:
    prefix = topics.scores.rsplit(".", 1)[0]
    args = ["worker", "--bootstrap-servers", bootstrap, "--topic-prefix", prefix,
            "--engine", str(artifact), "--group-id", group, "--threads", "1"]
    if not os.environ.get("QSCORE_TEST_KAFKA"):
        args.append("--fast-groups")
    if redis_url:
        args += ["--redis-url", redis_url]
    return ServiceProcess(name=name, args=args, log_path=workdir / f"{name}.log")
