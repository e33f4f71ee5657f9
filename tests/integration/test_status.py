"""Fleet status on the real broker (issue 12, "seeing it"): running `qscore worker` and
`qscore tokenizer` processes publish heartbeats; `qscore status` (and read_status) lists them
with the version each serves, shows a promotion swapped in, and drops a service that stopped
cleanly at once (its tombstone), not after the staleness limit."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from plumbing.kafka import KafkaSettings, Topics
from plumbing.status import (
    FleetStatus,
    Sample,
    StatusPublisher,
    ensure_status_topic,
    read_status,
)
from qscore.client import QueryProducer, ScoreConsumer
from qscore.local.fleet import ServiceProcess
from schemas import QueryItem
from tests.integration.fleet_helpers import CreateTopic, make_topics
from tests.integration.test_worker_follow import _registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONG = 3600.0  # a staleness limit no heartbeat of these tests reaches: only tombstones remove


def _service(kind: str, bootstrap: str, prefix: str, workdir: Path, *args: str
             ) -> ServiceProcess:
    flags = [kind, "--bootstrap-servers", bootstrap, "--topic-prefix", prefix,
             "--group-id", f"{prefix}-{kind}", "--status-interval-s", "0.3", *args]
    if not os.environ.get("QSCORE_TEST_KAFKA"):
        flags.append("--fast-groups")
    return ServiceProcess(kind, flags, workdir / f"{kind}.log")


async def _until(kafka: KafkaSettings, topics: Topics, check: Callable[[FleetStatus], bool],
                 what: str, procs: list[ServiceProcess], timeout_s: float = 180) -> FleetStatus:
    """Read the status topic until `check` holds (a poll, not a sleep: each read is a fresh
    look at the topic)."""
    deadline = time.monotonic() + timeout_s
    while True:
        view = await read_status(kafka, topics.status, stale_s=LONG)
        if check(view):
            return view
        for proc in procs:
            assert proc.poll() is None, f"{proc.name} exited:\n{proc.log_tail()}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s; last {view}"
        await asyncio.sleep(0.2)


def _by_kind(view: FleetStatus) -> dict[str, list[str]]:
    """kind -> the versions its live services serve."""
    out: dict[str, list[str]] = {}
    for beat in view.services:
        out.setdefault(beat.kind, []).append(beat.serving)
    return out


async def test_status_lists_running_services_and_drops_one_that_stopped_cleanly(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str,
        default_engine_path: Path, tmp_path: Path) -> None:
    registry, model = _registry(default_engine_path, tmp_path / "registry")
    topics = await make_topics(create_topic, topic_name, partitions=2)
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    tokenizer = _service("tokenizer", kafka_bootstrap, topic_name, tmp_path,
                         "--engine", str(registry.get(model)), "--processes", "1")
    # Follows the registry: a promotion is swapped in when traffic is low (at once: idle).
    worker = _service("worker", kafka_bootstrap, topic_name, tmp_path,
                      "--engine-dir", str(tmp_path / "registry"), "--model", "default",
                      "--threads", "1", "--reload-poll-s", "0.2", "--reload-quiet-s", "0.2",
                      "--reload-jitter-s", "0")
    procs = [tokenizer.start(), worker.start()]
    try:
        view = await _until(kafka, topics, lambda v: _by_kind(v) == {
            "tokenizer": ["v1"], "worker": ["v1"]}, "both services live on v1", procs)
        beats = {b.kind: b for b in view.services}
        assert beats["worker"].pid == worker.pid and beats["tokenizer"].pid == tokenizer.pid
        assert beats["worker"].reload_state == "serving"  # following, nothing pending
        assert beats["tokenizer"].reload_state == "pinned"  # --engine
        assert beats["worker"].model_id == model and beats["worker"].busy is not None

        # Traffic shows in the counters both services report.
        items = [QueryItem(id=f"q{i}", query=q) for i, q in
                 enumerate(("red shoes", "how to boil an egg", "weather in paris"))]
        async with (QueryProducer(kafka, topics) as producer,
                    ScoreConsumer(kafka, topics) as consumer):
            sent = await producer.send_and_wait(items)
            await consumer.wait_for(sent.batch_id, sent.item_ids, timeout=120)
        view = await _until(kafka, topics, lambda v: [(b.kind, b.items) for b in v.services]
                            == [("tokenizer", 3), ("worker", 3)], "3 items counted", procs)
        assert all(b.dead_letters == 0 and b.in_flight == 0 for b in view.services)

        registry.promote(model, "v2", smoke=False)
        await _until(kafka, topics, lambda v: _by_kind(v) == {
            "tokenizer": ["v1"], "worker": ["v2"]}, "the worker swapped v2 in", procs)

        # The command a user runs: one JSON line per live service.
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qscore", "status", "--json", "--stale-s", str(LONG),
            "--bootstrap-servers", kafka_bootstrap, "--topic-prefix", topic_name,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, errors = await asyncio.wait_for(cli.communicate(), 60)
        assert cli.returncode == 0, errors.decode()
        lines = [orjson.loads(line) for line in out.splitlines()]
        assert sorted((line["kind"], line["serving"], line["pid"]) for line in lines) == [
            ("tokenizer", "v1", tokenizer.pid), ("worker", "v2", worker.pid)]
        assert all(line["age_s"] < LONG for line in lines)

        assert worker.stop() == 0  # SIGTERM: drains, stops, then its tombstone
        view = await _until(kafka, topics, lambda v: _by_kind(v) == {"tokenizer": ["v1"]},
                            "the stopped worker gone", [tokenizer])
        assert view.stopped == 1 and view.stale == 0
    finally:
        for proc in procs:
            proc.stop()


async def test_status_command_says_when_no_service_is_live(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str) -> None:
    async def status(prefix: str) -> tuple[int | None, str, str]:
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qscore", "status", "--bootstrap-servers", kafka_bootstrap,
            "--topic-prefix", prefix, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "200"})
        out, errors = await asyncio.wait_for(cli.communicate(), 60)
        return cli.returncode, out.decode(), errors.decode()

    code, out, errors = await status(f"nothing-{uuid.uuid4().hex[:8]}")
    assert code == 0 and out == "" and "does not exist" in errors
    topics = Topics.with_prefix(topic_name)
    await create_topic(topics.status)
    code, out, errors = await status(topic_name)
    assert code == 0 and out == "" and f"no live service on {topics.status}" in errors


async def test_a_heartbeat_and_its_tombstone_through_the_broker(
        kafka_bootstrap: str, topic_name: str) -> None:
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    topic = f"{topic_name}.status"
    assert await ensure_status_topic(kafka, topic, partitions=2) is True
    try:
        assert await ensure_status_topic(kafka, topic) is False  # exists: left as it is
        publisher = StatusPublisher(kafka, topic, kind="tokenizer", name="t1",
                                    sample=lambda: Sample(model_id="m", serving="v7"))
        assert await publisher.beat() and await publisher.beat()
        view = await read_status(kafka, topic)
        assert [(b.name, b.serving) for b in view.services] == [("t1", "v7")]
        assert view.records == 2 and view.malformed == 0
        await publisher.stop()
        view = await read_status(kafka, topic)
        assert view.services == () and view.stopped == 1
    finally:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()
