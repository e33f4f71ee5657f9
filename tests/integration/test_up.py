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

from plumbing.kafka import KafkaSettings, Topics
from qscore.client import QueryProducer, ScoreConsumer
from schemas import QueryItem

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _read_until_up(stream: asyncio.StreamReader) -> str:
    """stderr up to the 'fleet is up' panel; returns the broker address it names."""
    seen = []
    while line := await stream.readline():
        seen.append(line.decode(errors="replace"))
        text = "".join(seen)
        if "qscore fleet is up" in text and "qscore consume" in seen[-1]:  # the panel's end
            found = re.search(r"broker\s+(127\.0\.0\.1:\d+)", text)
            assert found, text
            return found.group(1)
    raise AssertionError("qscore up exited before the fleet was up:\n" + "".join(seen))


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
