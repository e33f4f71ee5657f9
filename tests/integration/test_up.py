"""`qscore up` as a user runs it: the whole local fleet from one command, scores served,
Ctrl-C drains and leaves no server behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from plumbing.kafka import KafkaSettings, Topics
from qscore.client import QueryProducer, ScoreConsumer
from qscore.local.servers import RedisServer
from schemas import QueryItem

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _read_panel(stream: asyncio.StreamReader) -> str:
    """stderr up to the end of the 'fleet is up' panel."""
    seen = []
    while line := await stream.readline():
        seen.append(line.decode(errors="replace"))
        text = "".join(seen)
        if "qscore fleet is up" in text and "qscore consume" in seen[-1]:  # the panel's end
            return text
    raise AssertionError("qscore up exited before the fleet was up:\n" + "".join(seen))


def _broker(panel: str) -> str:
    """The broker address the panel names."""
    found = re.search(r"broker\s+(127\.0\.0\.1:\d+)", panel)
    assert found, panel
    return found.group(1)


async def _read_until_up(stream: asyncio.StreamReader) -> str:
    """stderr up to the 'fleet is up' panel; returns the broker address it names."""
    return _broker(await _read_panel(stream))


def _accepts(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


async def test_up_serves_scores_and_ctrl_c_stops_everything(default_engine_path: Path) -> None:
    if os.environ.get("QSCORE_TEST_KAFKA"):
        pytest.skip("qscore up runs its own embedded broker")
    prefix = f"up-{uuid.uuid4().hex[:8]}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qscore", "up", "--engine", str(default_engine_path),
        "--no-redis", "--partitions", "1", "--topic-prefix", prefix,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    assert proc.stderr is not None
    try:
        bootstrap = await asyncio.wait_for(_read_until_up(proc.stderr), 240)
        drain = asyncio.create_task(proc.stderr.read())  # keep the pipe from filling
        kafka = KafkaSettings(bootstrap_servers=bootstrap)
        topics = Topics.with_prefix(prefix)
        items = [QueryItem(id=f"q{i}", query=q) for i, q in
                 enumerate(("red shoes", "how to boil an egg", "weather in paris"))]
        async with (QueryProducer(kafka, topics) as producer,
                    ScoreConsumer(kafka, topics) as consumer):
            sent = await producer.send_and_wait(items)
            scores = await consumer.wait_for(sent.batch_id, sent.item_ids, timeout=120)
        assert sorted(scores) == ["q0", "q1", "q2"]
        assert all(s.embedding is not None and not s.cached for s in scores.values())

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 90) == 0
        await drain
        assert not _accepts(bootstrap)  # the embedded broker went with it
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


PASSWORD = "up-s3cret-pw"


def _children(pid: int) -> dict[int, list[bytes]]:
    """The command lines of the processes whose parent is `pid`, by pid."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
            if ppid == pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
    return found


def _environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def _logs(workdir: Path) -> list[str]:
    return [p.read_text(errors="replace") for p in workdir.glob("*.log")]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
async def test_up_gives_services_the_redis_password_by_environment_only(
    default_engine_path: Path, redis_server: RedisServer
) -> None:
    if os.environ.get("QSCORE_TEST_KAFKA"):
        pytest.skip("qscore up runs its own embedded broker")
    async with aioredis.Redis.from_url(redis_server.url) as admin:
        await admin.config_set("requirepass", PASSWORD)
    url = redis_server.url.replace("redis://", f"redis://:{PASSWORD}@")
    prefix = f"up-{uuid.uuid4().hex[:8]}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qscore", "up", "--engine", str(default_engine_path),
        "--partitions", "1", "--topic-prefix", prefix,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "QSCORE_REDIS_URL": url})
    assert proc.stderr is not None
    try:
        panel = await asyncio.wait_for(_read_panel(proc.stderr), 240)
        drain = asyncio.create_task(proc.stderr.read())  # keep the pipe from filling
        assert PASSWORD not in panel
        assert re.search(rf"cache\s+redis://:\*\*\*@127\.0\.0\.1:{redis_server.port}/0", panel)

        # Any user can read a command line (ps, /proc/PID/cmdline); only the owner an environment.
        children = _children(proc.pid)
        assert all(PASSWORD.encode() not in b" ".join(argv) for argv in children.values())
        services = {argv[3].decode(): pid for pid, argv in children.items()
                    if argv[1:3] == [b"-m", b"qscore"]}
        assert sorted(services) == ["tokenizer", "worker"], children
        for pid in services.values():
            assert f"QSCORE_REDIS_URL={url}".encode() in _environ(pid)

        # The password works: the worker's writes reach Redis, the tokenizer reads them back.
        kafka = KafkaSettings(bootstrap_servers=_broker(panel))
        topics = Topics.with_prefix(prefix)
        items = [QueryItem(id=f"q{i}", query=q) for i, q in enumerate(("red shoes", "egg"))]
        async with (QueryProducer(kafka, topics) as producer,
                    ScoreConsumer(kafka, topics) as consumer):
            for cached in (False, True):
                sent = await producer.send_and_wait(items)
                scores = await consumer.wait_for(sent.batch_id, sent.item_ids, timeout=120)
                assert [s.cached for s in scores.values()] == [cached, cached]

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 90) == 0
        assert PASSWORD not in (await drain).decode(errors="replace")
        logs = re.search(r"\(logs: (\S+)\)", panel)
        assert logs, panel
        written = _logs(Path(logs.group(1)))
        assert written and not any(PASSWORD in text for text in written)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
