"""A rolling reload (issue 12): when both versions do not fit side by side on a device, a
multi-device worker swaps one device at a time while the others serve, and nothing is lost.

Devices are simulated: each engine is a real ONNX Runtime engine labelled with a device, and
a device "fits" one engine at a time (the loader refuses a device that still holds one, as a
GPU without room for two versions would)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engines.golden import GoldenReport
from engines.loader import load_engine
from engines.memory import InsufficientMemory
from engines.protocol import Engine
from plumbing.cache import CacheSettings
from plumbing.kafka import make_producer
from qscore.cli.services import follower
from schemas import QueryItem, encode_token_batch
from tests.integration.test_worker import _topics, kafka, read_all, tokenize, versions_scored
from tests.integration.test_worker_follow import _registry
from tests.integration.test_worker_swap import Relabelled
from workers.reload import ReloadSettings
from workers.service import ScoringWorker, WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICES = ("gpu:0", "gpu:1")


class OnDevice(Relabelled):
    """A loaded engine labelled as running on `device` (one lane); records its closing."""

    def __init__(self, engine: Engine, device: str) -> None:
        super().__init__(engine, engine.manifest.version)
        self.device, self.lanes = device, 1


@pytest.mark.parametrize("golden_ok", [True, False], ids=["swapped", "refused"])
async def test_a_version_that_does_not_fit_beside_the_old_is_rolled_one_device_at_a_time(
        kafka_bootstrap: str, create_topic, topic_name: str,  # type: ignore[no-untyped-def]
        default_engine_path: Path, tmp_path: Path, golden_ok: bool) -> None:
    root = tmp_path / "registry"
    registry, model = _registry(default_engine_path, root)
    topics = await _topics(create_topic, topic_name)
    engines: list[OnDevice] = [OnDevice(load_engine(registry.get(model), threads=1), d)
                               for d in DEVICES]
    worker = ScoringWorker(WorkerSettings(kafka=kafka(kafka_bootstrap), topics=topics,
                                          group_id=f"{topic_name}-w"), engines)  # type: ignore[arg-type]
    held = {e.device: e for e in engines}  # what each device holds

    def load_all(path: Path, threads: int | None) -> list[Engine]:
        raise InsufficientMemory(f"{path}: needs 90 MiB, the device has 60 MiB free")

    def load_on(path: Path, threads: int | None, device: str) -> Engine:
        if not held[device].closed:
            raise InsufficientMemory(f"{path}: {device} still holds an engine")
        held[device] = OnDevice(load_engine(path, threads=1), device)
        engines.append(held[device])
        return held[device]  # type: ignore[return-value]

    worker.reloader = follower(worker, ReloadSettings(poll_s=0.1, quiet_s=0.1, jitter_s=0),
                               root, model, CacheSettings(), load_all, load_on)
    reloader = worker.reloader
    if not golden_ok:
        reloader.check = lambda engine: GoldenReport(  # type: ignore[assignment]
            ok=False, metric="min_cosine", worst=0.5, budget=0.995, queries=32, seconds=0.0,
            reason="golden set off")
    items = [QueryItem(id=f"q{i}", query=f"cheap flights to city {i}") for i in range(4)]
    tbs = [tokenize(engines[0], items, f"b{n:03d}") for n in range(80)]  # type: ignore[arg-type]
    producer = make_producer(kafka(kafka_bootstrap))
    await worker.start()
    await producer.start()
    try:
        run = asyncio.create_task(worker.run())
        for tb in tbs[:20]:
            await producer.send_and_wait(topics.tokens, encode_token_batch(tb),
                                         key=tb.batch_id.encode())
        outcome = asyncio.ensure_future(reloader.outcomes.wait())
        registry.promote(model, "v2", smoke=False)
        for tb in tbs[20:60]:  # a steady stream while the devices are swapped in turn
            await producer.send_and_wait(topics.tokens, encode_token_batch(tb),
                                         key=tb.batch_id.encode())
            await asyncio.sleep(0.01)  # pacing the offered load, not synchronisation
        await asyncio.wait_for(outcome, 60)
        for tb in tbs[60:]:  # after the reload
            await producer.send_and_wait(topics.tokens, encode_token_batch(tb),
                                         key=tb.batch_id.encode())
        values = await read_all(kafka_bootstrap, topics.scores, len(tbs))
        worker.request_stop()
        await asyncio.wait_for(run, 30)
        serving_on = worker.devices()
    finally:
        await producer.stop()
        await worker.stop()
    versions = versions_scored(values, tbs)  # each once, never by two versions
    assert worker.online.stats.dead_letters == 0
    assert sorted(serving_on) == sorted(DEVICES)  # every device serves again
    stats = reloader.stats
    if golden_ok:
        assert stats.reloads == stats.rolling == 1 and stats.serving == "v2"
        assert all(versions[tb.batch_id] == {"v2"} for tb in tbs[60:])
        assert all(e.closed for e in engines)  # the old ones freed; stop() closed the new
    else:
        assert stats.refused == 1 and "golden set off" in stats.last_reason
        assert worker.manifest.version == "v1"  # the old version restored on gpu:0
        assert all(versions[tb.batch_id] == {"v1"} for tb in tbs)
