"""The tokenizer service follows the registry's promoted version (issue 12), without a broker:
a version with another tokenizer or max length gets a pool of its own, started beside the
serving one, and records in flight finish on the old pool, which is then closed; another head,
or a tokenizer that does not match or does not load, is refused and the old version serves on.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import replace
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from engines.manifest import hash_files, list_files, read_manifest, write_manifest
from engines.registry import EngineRegistry
from engines.tokenizer import artifact_tokenizer_json, tokenizer_id_of
from plumbing.cache import CacheSettings, key_digest
from plumbing.kafka import KafkaSettings, Topics
from plumbing.metrics import StatsCollector
from schemas import QueryBatch, QueryItem, decode_token_batch, encode_query_batch
from tests.engine_fixtures import copy_version, retokenized_version
from tests.tokenizer_svc.gated import hold_new_pools
from tokenizer_svc.pool import TokenizerPool
from tokenizer_svc.service import TokenizerService, TokenizerServiceSettings

ITEMS = (QueryItem(id="a", query="how to boil an egg", docs=("nine minutes",)),
         QueryItem(id="b", query="capital of australia"))
DATA = encode_query_batch(QueryBatch(batch_id="b1", items=ITEMS, submitted_at=1.0))


@pytest.fixture
def registry(default_engine_path: Path, tmp_path: Path) -> EngineRegistry:
    """A registry with version v1 (a copy of the default engine) promoted."""
    root = tmp_path / "registry"
    copy_version(default_engine_path, root, "v1")
    registry = EngineRegistry(root)
    registry.promote(_model(registry), "v1", smoke=False)
    return registry


def _model(registry: EngineRegistry) -> str:
    (entry, *_) = registry.list()
    return entry.model_id


def _version(registry: EngineRegistry, name: str, make=copy_version,  # type: ignore[no-untyped-def]
             **changes: object) -> Path:
    """Version `name` made from v1 by `make`, promoted."""
    model = _model(registry)
    make(registry.get(model, "v1"), registry.root, name, **changes)
    return registry.promote(model, name, smoke=False)


def _service(registry: EngineRegistry) -> TokenizerService:
    model = _model(registry)
    service = TokenizerService(TokenizerServiceSettings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"), topics=Topics(),
        cache=CacheSettings(), artifact=registry.get(model), processes=1))
    service.follow = lambda: registry.get(model)
    return service


def _no_process_left(pids: list[int]) -> bool:
    return not any(p.pid in pids for p in multiprocessing.active_children())


async def test_another_tokenizer_gets_its_own_pool_and_the_old_one_is_closed(
        registry: EngineRegistry) -> None:
    service = _service(registry)
    await service.pool.start()
    old_pool, old_manifest = service.pool, service.manifest
    old_pids = old_pool.pids
    try:
        assert not await service.follow_once()  # serving what is promoted
        v2 = _version(registry, "v2", retokenized_version)
        assert await service.follow_once()
        new = read_manifest(v2)
        assert new.tokenizer_id != old_manifest.tokenizer_id and new.head == old_manifest.head
        assert service.manifest == new and service.serving.artifact == v2
        assert service.pool is not old_pool and service.pool.tokenizer_id == new.tokenizer_id
        await service.retired()  # no record was on the old pool: closed at once
        assert old_pool.pids == [] and _no_process_left(old_pids)

        # The new pool tokenizes with the new vocabulary, under keys for the new version.
        prepared = await service.pool.prepare(DATA, tokenize_upto=10, model_version="v2")
        assert prepared.tokenized is not None
        (tb,) = [decode_token_batch(m) for m in prepared.tokenized.messages]
        assert tb.tokenizer_id == new.tokenizer_id and tb.head == old_manifest.head
        assert bytes(tb.cache_keys[0]) == key_digest("v2", ITEMS[0].query, None)
        tokenizers = {v: Tokenizer.from_file(str(artifact_tokenizer_json(registry.get(
            _model(registry), v)))) for v in ("v1", "v2")}
        assert tokenizers["v2"].decode(tb.sequence(0).tolist()) == ITEMS[0].query
        assert tokenizers["v1"].decode(tb.sequence(0).tolist()) != ITEMS[0].query

        follow = service.metrics()["follow"]()
        assert (follow.follows, follow.new_pools, follow.follows_refused) == (1, 1, 0)  # type: ignore[attr-defined]
        assert follow.serving_version == "v2"  # type: ignore[attr-defined]
        assert follow.tokenizer_id == new.tokenizer_id  # type: ignore[attr-defined]
        assert follow.retiring_pools == 0  # type: ignore[attr-defined]
        assert service.metrics()["pool"]()["restarts"] == 0  # type: ignore[index]
        exported = {m.name: m.samples[0].value  # labelled families may have no sample yet
                    for m in StatsCollector("t", service.metrics()).collect() if m.samples}
        assert (exported["t_follow_follows"], exported["t_follow_follows_refused"]) == (1, 0)
    finally:
        await service.stop()
    assert service.pool.pids == []


async def test_a_record_in_flight_finishes_on_the_pool_it_started_with(
        registry: EngineRegistry) -> None:
    service = _service(registry)
    await service.pool.start()
    try:
        with service.pools.use() as serving:  # a record that started before the promotion
            old_pids = serving.pool.pids
            _version(registry, "v2", retokenized_version)
            assert await service.follow_once()
            assert service.manifest.version == "v2" and serving.manifest.version == "v1"
            assert service.pools.retiring == 1 and serving.pool.pids == old_pids
            prepared = await serving.pool.prepare(DATA, tokenize_upto=10, model_version="v1")
            assert prepared.tokenized is not None
            (tb,) = [decode_token_batch(m) for m in prepared.tokenized.messages]
            assert tb.tokenizer_id == serving.manifest.tokenizer_id
            with service.pools.use() as later:  # a record that starts after the switch
                assert later.manifest.version == "v2" and later.pool is service.pool
        await service.retired()  # the record is done: the old pool is closed
        assert serving.pool.pids == [] and _no_process_left(old_pids)
        assert service.pools.retiring == 0
    finally:
        await service.stop()


async def test_same_tokenizer_switches_in_place_another_max_length_gets_a_pool(
        registry: EngineRegistry) -> None:
    service = _service(registry)
    first = service.pool
    _version(registry, "v2")
    assert await service.follow_once()
    assert service.manifest.version == "v2" and service.pool is first  # nothing to start
    shorter = service.manifest.max_length // 2
    _version(registry, "v3", max_length=shorter)
    try:
        assert await service.follow_once()
        assert service.pool is not first and service.pool.spec.max_length == shorter
        assert service.pool.spec.model_version == "v3"
        f = service.follow_stats
        assert (f.follows, f.new_pools, f.serving_version) == (2, 1, "v3")
    finally:
        await service.stop()


async def test_another_head_is_refused_and_not_tried_again(registry: EngineRegistry) -> None:
    service = _service(registry)
    pool = service.pool
    _version(registry, "v2-classifier", retokenized_version, head="classifier")
    assert not await service.follow_once()
    assert service.manifest.version == "v1" and service.pool is pool
    f = service.follow_stats
    assert (f.follows, f.follows_refused, f.serving_version) == (0, 1, "v1")
    assert f.last_refusal.startswith("v2-classifier: its head is classifier")
    assert not await service.follow_once()  # refused once: not tried again every poll
    assert service.follow_stats.follows_refused == 1
    _version(registry, "v3", retokenized_version)  # the pointer moves on: followed
    try:
        assert await service.follow_once() and service.manifest.version == "v3"
    finally:
        await service.stop()


async def test_a_tokenizer_that_does_not_match_its_manifest_is_refused(
        registry: EngineRegistry) -> None:
    service = _service(registry)
    v2 = _version(registry, "v2", retokenized_version)
    # Promoted intact, then rotted on the shared volume.
    artifact_tokenizer_json(v2).write_bytes(b'{"version": "1.0", "trunc')
    assert not await service.follow_once()
    assert service.manifest.version == "v1"
    assert "differs from the one the engine was built with" in service.follow_stats.last_refusal
    await service.stop()


async def test_a_tokenizer_that_does_not_load_is_refused_and_leaves_no_process(
        registry: EngineRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    service = _service(registry)
    # Consistent with its manifest (checksum and tokenizer_id), but not a tokenizer.
    model = _model(registry)
    target = copy_version(registry.get(model, "v1"), registry.root, "v2")
    tokenizer_json = artifact_tokenizer_json(target)
    tokenizer_json.write_bytes(b'{"not": "a tokenizer"}')
    write_manifest(target, replace(read_manifest(target),
                                   tokenizer_id=tokenizer_id_of(tokenizer_json),
                                   files=hash_files(target, list_files(target))))
    registry.promote(model, "v2", smoke=False)
    started: list[TokenizerPool] = []
    new_pool = TokenizerService._new_pool

    def track(self: TokenizerService, *args: object) -> TokenizerPool:
        started.append(new_pool(self, *args))  # type: ignore[arg-type]
        return started[-1]

    monkeypatch.setattr(TokenizerService, "_new_pool", track)
    try:
        assert not await service.follow_once()
        assert service.manifest.version == "v1"
        assert "does not load" in service.follow_stats.last_refusal
        (failed,) = started
        assert failed.pids == []
    finally:
        await service.stop()


async def test_a_cancelled_switch_leaves_no_process(
        registry: EngineRegistry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    service = _service(registry)
    _version(registry, "v2", retokenized_version)
    starting = hold_new_pools(monkeypatch, gate)
    follow = asyncio.ensure_future(service.follow_once())
    deadline = time.monotonic() + 30
    while not (starting and starting[0].pids):  # the new pool's process is up, held
        assert time.monotonic() < deadline and not follow.done()
        await asyncio.sleep(0.01)
    pids = starting[0].pids
    follow.cancel()
    gate.touch()  # its set-up may now finish: the cancellation is delivered first
    with pytest.raises(asyncio.CancelledError):
        await follow
    assert starting[0].pids == [] and _no_process_left(pids)
    assert service.manifest.version == "v1" and service.follow_stats.follows == 0
    await service.stop()
