"""A worker follows its model's promoted version while serving (issue 12): a promotion in the
registry is picked up, loaded off the serving path, checked on its golden set and swapped in;
a corrupt version is refused and the old one keeps serving; nothing is lost either way."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from engines.loader import load_engine
from engines.manifest import read_manifest, write_manifest
from engines.registry import EngineRegistry, model_dir
from plumbing.cache import CacheSettings
from plumbing.kafka import make_producer
from qscore.cli.services import follower
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
from workers.reload import ReloadSettings
from workers.service import ScoringWorker, WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _version(src: Path, root: Path, name: str) -> Path:
    """A copy of artifact `src` as version `name` of its model in registry `root`."""
    manifest = read_manifest(src)
    target = model_dir(root, manifest.model_id) / name
    shutil.copytree(src, target)
    write_manifest(target, replace(manifest, version=name))
    return target


def _registry(src: Path, root: Path, *more: str) -> tuple[EngineRegistry, str]:
    """A registry at `root` with versions v1 (promoted), v2 and `more`, all copies of `src`;
    and the model id."""
    model = read_manifest(_version(src, root, "v1")).model_id
    for name in ("v2", *more):
        _version(src, root, name)
    registry = EngineRegistry(root)
    registry.promote(model, "v1", smoke=False)
    return registry, model


@pytest.fixture(params=["onnxruntime", "openvino"])
def served(request: pytest.FixtureRequest) -> Path:
    """The INT8 artifact of the default model on each CPU backend."""
    if request.param == "openvino":
        return request.getfixturevalue("openvino_artifacts")["int8"]
    return request.getfixturevalue("default_engine_path")


async def test_a_promotion_is_followed_and_a_corrupt_one_refused_while_serving(
        kafka_bootstrap: str, create_topic, topic_name: str,  # type: ignore[no-untyped-def]
        served: Path, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    registry, model = _registry(served, root, "v3-corrupt")
    bad = registry.get(model, "v3-corrupt")
    topics = await _topics(create_topic, topic_name)
    engine = load_engine(registry.get(model), threads=1)
    worker = ScoringWorker(WorkerSettings(kafka=kafka(kafka_bootstrap), topics=topics,
                                          group_id=f"{topic_name}-w"), [engine])
    swapped = asyncio.Event()
    original_swap = worker.swap

    async def swap(engines):  # type: ignore[no-untyped-def]
        generation = await original_swap(engines)
        swapped.set()
        return generation

    worker.swap = swap  # type: ignore[method-assign]
    worker.reloader = follower(
        worker, ReloadSettings(poll_s=0.1, quiet_s=0.2, jitter_s=0), root, model,
        CacheSettings(), lambda path, threads: [load_engine(path, threads=threads)])
    reloader = worker.reloader
    refused = asyncio.Event()
    original_refuse = reloader._refuse

    def refuse(version: str, reason: str) -> bool:
        refused.set()
        return original_refuse(version, reason)

    reloader._refuse = refuse  # type: ignore[method-assign]
    items = [QueryItem(id=f"q{i}", query=f"cheap flights to city {i}") for i in range(5)]
    tbs = [tokenize(engine, items, f"b{n:02d}") for n in range(30)]
    async with worker_running(worker, kafka_bootstrap) as producer:
        await publish_token_batches(producer, topics.tokens, tbs[:10])
        # Promoted intact, then rotted on the shared volume: the worker refuses it and v1
        # keeps serving.
        registry.promote(model, "v3-corrupt", smoke=False)
        with (bad / read_manifest(bad).model_file).open("r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xFF]))
        await asyncio.wait_for(refused.wait(), 30)
        assert worker.manifest.version == "v1" and "checksum" in reloader.stats.last_reason
        await publish_token_batches(producer, topics.tokens, tbs[10:20])
        registry.promote(model, "v2", smoke=False)
        await asyncio.wait_for(swapped.wait(), 30)
        assert worker.manifest.version == "v2" and reloader.stats.reloads == 1
        await publish_token_batches(producer, topics.tokens, tbs[20:])
        values = await read_all(kafka_bootstrap, topics.scores, len(tbs))
    versions = versions_scored(values, tbs)
    assert all(versions[tb.batch_id] == {"v1"} for tb in tbs[:10])
    assert all(versions[tb.batch_id] == {"v2"} for tb in tbs[20:])
    assert worker.online.stats.dead_letters == 0
    assert {"reload_state", "reloads", "reloads_refused"} <= set(reloader.stats.metrics())


async def test_the_tokenizer_follows_a_promotion_and_looks_up_its_keys(
        default_engine_path: Path, tmp_path: Path) -> None:
    from plumbing.kafka import KafkaSettings, Topics
    from qscore.cli.services import registry_pointer
    from schemas import QueryBatch, encode_query_batch
    from tokenizer_svc.service import TokenizerService, TokenizerServiceSettings
    from tokenizer_svc.units import batch_keys

    root = tmp_path / "registry"
    registry, model = _registry(default_engine_path, root)
    service = TokenizerService(TokenizerServiceSettings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"), topics=Topics(),
        cache=CacheSettings(), artifact=registry.get(model, "v1"), processes=1))
    service.follow = registry_pointer(root, model)
    assert not await service.follow_once()  # serving what is promoted
    registry.promote(model, "v2", smoke=False)
    assert await service.follow_once() and service.manifest.version == "v2"
    # Keys are computed for the version the service now looks up.
    items = (QueryItem(id="a", query="red shoes", docs=("cheap red shoes",)),)
    await service.pool.start()
    try:
        prepared = await service.pool.prepare(
            encode_query_batch(QueryBatch(batch_id="b", items=items, submitted_at=1.0)),
            model_version=service.manifest.version)
    finally:
        await service.pool.close()
    assert prepared.keys.digests == batch_keys(items, "v2").digests


async def test_a_stop_in_the_middle_of_a_reload_loses_nothing_and_frees_the_new_engine(
        kafka_bootstrap: str, create_topic, topic_name: str,  # type: ignore[no-untyped-def]
        default_engine_path: Path, tmp_path: Path) -> None:
    # SIGTERM while a promoted version is still loading: the worker drains and commits on
    # the version it serves, and the engine the load thread returns late is closed.
    import threading

    root = tmp_path / "registry"
    registry, model = _registry(default_engine_path, root)
    topics = await _topics(create_topic, topic_name)
    engine = load_engine(registry.get(model), threads=1)
    worker = ScoringWorker(WorkerSettings(kafka=kafka(kafka_bootstrap), topics=topics,
                                          group_id=f"{topic_name}-w"), [engine])
    entered, release, closed = threading.Event(), threading.Event(), threading.Event()

    class Tracked:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def close(self) -> None:
            self.inner.close()  # type: ignore[attr-defined]
            closed.set()

    def slow_load(path: Path, threads: int) -> list[object]:
        entered.set()
        release.wait(30)
        return [Tracked(load_engine(path, threads=threads))]

    worker.reloader = follower(worker, ReloadSettings(poll_s=0.1, quiet_s=0.1, jitter_s=0),
                               root, model, CacheSettings(), slow_load)  # type: ignore[arg-type]
    items = [QueryItem(id=f"q{i}", query=f"weather in city {i}") for i in range(5)]
    tbs = [tokenize(engine, items, f"s{n:02d}") for n in range(20)]
    producer = make_producer(kafka(kafka_bootstrap))
    await worker.start()
    await producer.start()
    try:
        run = asyncio.create_task(worker.run())
        await asyncio.gather(*[await producer.send(topics.tokens, encode_token_batch(tb),
                                                   key=tb.batch_id.encode()) for tb in tbs])
        registry.promote(model, "v2", smoke=False)
        assert await asyncio.to_thread(entered.wait, 30)  # loading v2 now
        assert worker.reloader.stats.state == "loading"
        worker.request_stop()  # SIGTERM
        await asyncio.wait_for(run, 30)
    finally:
        await producer.stop()
        await worker.stop()
    release.set()  # the load thread finishes after the worker stopped
    values = await read_all(kafka_bootstrap, topics.scores, len(tbs))
    batches = {b.batch_id: b for b in map(decode_score_batch, values)}
    assert sorted(batches) == [tb.batch_id for tb in tbs]
    assert all(it.model_version == "v1" for b in batches.values() for it in b.items)
    assert worker.online.stats.dead_letters == 0 and worker.swaps == 0
    assert await asyncio.to_thread(closed.wait, 30)  # freed once the thread returned it


async def test_a_promotion_with_another_tokenizer_is_loaded_at_once_and_both_are_served(
        kafka_bootstrap: str, create_topic, topic_name: str,  # type: ignore[no-untyped-def]
        default_engine_path: Path, tmp_path: Path) -> None:
    """The tokenizers switch at the promotion: the first TokenBatch of the new tokenizer makes
    the worker poll (long before its poll_s), load the version at once and score it there;
    the old tokenizer's TokenBatches still in the topic are scored by the old version."""
    from types import SimpleNamespace

    from tests.engine_fixtures import retokenized_version

    root = tmp_path / "registry"
    registry, model = _registry(default_engine_path, root)
    v3 = retokenized_version(registry.get(model, "v1"), root, "v3-retokenized")
    topics = await _topics(create_topic, topic_name)
    engine = load_engine(registry.get(model), threads=1)
    worker = ScoringWorker(WorkerSettings(kafka=kafka(kafka_bootstrap), topics=topics,
                                          group_id=f"{topic_name}-w"), [engine])
    # poll_s of 10 minutes: only the new tokenizer's TokenBatch can make it look in time.
    worker.reloader = follower(
        worker, ReloadSettings(poll_s=600, quiet_s=600, jitter_s=0), root, model,
        CacheSettings(), lambda path, threads: [load_engine(path, threads=threads)])
    items = [QueryItem(id=f"q{i}", query=f"cheap flights to city {i}") for i in range(5)]
    new = SimpleNamespace(path=v3, manifest=read_manifest(v3))
    tbs = ([tokenize(engine, items, f"b{n:02d}") for n in range(10)]
           + [tokenize(new, items, f"b{n:02d}") for n in range(10, 20)]  # type: ignore[arg-type]
           + [tokenize(engine, items, f"b{n:02d}") for n in range(20, 30)])
    assert tbs[10].tokenizer_id != tbs[0].tokenizer_id
    async with worker_running(worker, kafka_bootstrap) as producer:
        await publish_token_batches(producer, topics.tokens, tbs[:10])
        await read_all(kafka_bootstrap, topics.scores, 10)
        registry.promote(model, "v3-retokenized", smoke=False)
        await publish_token_batches(producer, topics.tokens, tbs[10:])
        values = await read_all(kafka_bootstrap, topics.scores, len(tbs))
    versions = versions_scored(values, tbs)
    assert all(versions[tb.batch_id] == {"v1"} for tb in tbs[:10] + tbs[20:])
    assert all(versions[tb.batch_id] == {"v3-retokenized"} for tb in tbs[10:20])
    assert worker.online.stats.dead_letters == 0
    stats = worker.reloader.stats
    assert stats.transitions == 1 and stats.serving == "v3-retokenized" and not stats.refused
