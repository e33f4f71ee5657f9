"""/healthz and /readyz on the metrics port, on the real broker: `qscore worker` and `qscore
tokenizer` processes across start (live before ready), engine loaded and assignment received
(ready), SIGTERM drain (live, not ready) and exit (connection refused); in-process workers for
what a process cannot show on demand: a drain held open by an engine call, a member without
partitions, no engine left."""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.errors import EngineDead
from engines.protocol import Engine
from plumbing.health import MetricsPort
from plumbing.kafka import Topics, make_producer
from plumbing.metrics import serve_metrics
from plumbing.pipeline import PipelineError
from qscore.local.fleet import ServiceProcess
from qscore.local.servers import free_port
from schemas import QueryBatch, QueryItem, encode_query_batch
from tests.integration.fleet_helpers import CreateTopic, kafka_settings, make_topics
from tests.integration.test_worker import publish_token_batches, tokenize
from tests.waiting import until
from workers.microbatcher import BatcherSettings
from workers.service import ScoringWorker, WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Answer = tuple[int, str] | None  # (status, body); None: connection refused
OK = (200, "ok\n")


def _get(port: int, path: str) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    except ConnectionRefusedError:
        return None
    finally:
        connection.close()


async def probe(port: int, path: str) -> Answer:
    return await asyncio.to_thread(_get, port, path)


async def until_answer(port: int, path: str, wanted: Callable[[Answer], bool], what: str,
                       proc: ServiceProcess | None = None, timeout_s: float = 120) -> Answer:
    """Poll `path` until its answer is `wanted`; a process that exits meanwhile fails."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            answer = await probe(port, path)
        except (http.client.HTTPException, ConnectionResetError):  # the server is closing
            answer = (0, "")
        if wanted(answer):
            return answer
        if proc is not None and answer is None:
            assert proc.poll() is None, f"{proc.name} exited:\n{proc.log_tail()}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s; last {answer}"
        await asyncio.sleep(0.02)


def _service(kind: str, bootstrap: str, prefix: str, workdir: Path, port: int,
             *args: str) -> ServiceProcess:
    flags = [kind, "--bootstrap-servers", bootstrap, "--topic-prefix", prefix,
             "--group-id", f"{prefix}-{kind}", "--metrics-port", str(port), *args]
    if not os.environ.get("QSCORE_TEST_KAFKA"):
        flags.append("--fast-groups")
    return ServiceProcess(kind, flags, workdir / f"{kind}.log")


async def _starts_live_then_ready(port: int, proc: ServiceProcess, prefix: str) -> list[Answer]:
    """From the port's opening until /readyz is 200: every /readyz answer seen, checking that
    /healthz was live throughout."""
    await until_answer(port, "/healthz", lambda a: a is not None, "the port opens", proc)
    seen: list[Answer] = []
    deadline = time.monotonic() + 120
    while (ready := await probe(port, "/readyz")) != OK:
        seen.append(ready)
        assert await probe(port, "/healthz") == OK, proc.log_tail()
        assert proc.poll() is None, f"{proc.name} exited:\n{proc.log_tail()}"
        assert time.monotonic() < deadline, f"never ready: {seen[-3:]}"
        await asyncio.sleep(0.02)
    status, body = await probe(port, "/metrics") or (0, "")
    assert status == 200 and f"{prefix}_" in body
    assert (await probe(port, "/nope") or (0,))[0] == 404
    return seen


async def _exits_and_refuses(port: int, proc: ServiceProcess) -> None:
    await until_answer(port, "/healthz", lambda a: a is None, "connection refused after exit",
                       timeout_s=90)
    assert await asyncio.to_thread(proc.wait, 60) == 0, proc.log_tail()


async def test_worker_process_is_live_before_ready_and_refuses_after_sigterm(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str,
        default_engine_path: Path, tmp_path: Path) -> None:
    await make_topics(create_topic, topic_name, partitions=2)
    port = free_port()
    proc = _service("worker", kafka_bootstrap, topic_name, tmp_path, port,
                    "--engine", str(default_engine_path), "--threads", "1").start()
    try:
        seen = await _starts_live_then_ready(port, proc, "qscore_worker")
        # The port opened before the engine load ended, and it became ready once both of its
        # consumers (online, offline) had joined.
        assert seen and seen[0] is not None and seen[0][0] == 503, seen
        assert all(a is not None and a[0] == 503 and (a[1] == "starting\n" or a[1].startswith(
            "waiting for a partition assignment: worker-")) for a in seen), seen
        proc_pid = proc.pid
        assert proc_pid is not None
        os.kill(proc_pid, signal.SIGTERM)
        await _exits_and_refuses(port, proc)
    finally:
        proc.stop()


def _spawned_children(pid: int) -> list[int]:
    """The multiprocessing-spawned children of `pid` (the tokenizer processes)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _in_flight(metrics: str) -> float:
    found = re.search(r"^qscore_tokenizer_\w*in_flight(?:\{[^}]*\})? (\S+)$", metrics, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_tokenizer_process_is_not_ready_while_draining_a_held_record(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str,
        default_engine_path: Path, tmp_path: Path) -> None:
    topics = await make_topics(create_topic, topic_name, partitions=1)
    port = free_port()
    proc = _service("tokenizer", kafka_bootstrap, topic_name, tmp_path, port,
                    "--engine", str(default_engine_path), "--processes", "1").start()
    held: list[int] = []
    try:
        seen = await _starts_live_then_ready(port, proc, "qscore_tokenizer")
        assert seen and seen[0] is not None and seen[0][0] == 503, seen
        # Hold the record in flight: its tokenizer process is stopped, so the drain that
        # SIGTERM starts cannot end until it is continued.
        assert proc.pid is not None
        held = _spawned_children(proc.pid)
        assert len(held) == 1, held
        os.kill(held[0], signal.SIGSTOP)
        producer = make_producer(kafka_settings(kafka_bootstrap))
        await producer.start()
        try:
            batch = QueryBatch("held-1", (QueryItem(id="q1", query="red shoes"),),
                               submitted_at=time.time())
            await producer.send_and_wait(topics.queries, encode_query_batch(batch))
        finally:
            await producer.stop()
        await until_answer(port, "/metrics", lambda a: a is not None and _in_flight(a[1]) >= 1,
                           "the record in flight", proc, timeout_s=60)
        os.kill(proc.pid, signal.SIGTERM)
        assert await until_answer(port, "/readyz", lambda a: a is not None and a[0] == 503,
                                  "not ready once draining", proc, timeout_s=30) == (
            503, "draining\n")
        assert await probe(port, "/healthz") == OK  # draining is alive
        os.kill(held.pop(), signal.SIGCONT)
        await _exits_and_refuses(port, proc)
        assert "tokenizer done: 1 batches" in proc.log_tail(), proc.log_tail()
    finally:
        for pid in held:
            os.kill(pid, signal.SIGCONT)
        proc.stop()


# -- in process: states a process cannot be held in on demand -----------------------------------
class GatedEngine:
    """The session's real engine, its calls held until `gate` is set, then run (or failed as a
    dead device with `dead`); never closed here (other tests use it)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.dead = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def run(self, batch: Any, lane: int = 0) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        if self.dead:
            raise EngineDead("the test took this engine out")
        return self.engine.run(batch, lane=lane)

    def close(self) -> None:
        pass


def _worker(bootstrap: str, topics: Any, group: str, engine: GatedEngine) -> ScoringWorker:
    return ScoringWorker(WorkerSettings(kafka=kafka_settings(bootstrap), topics=topics,
                                        group_id=group, batcher=BatcherSettings(max_wait_ms=2)),
                         [engine])  # type: ignore[list-item]


async def test_worker_is_not_ready_while_its_drain_waits_for_an_engine_call(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str,
        default_engine: Engine) -> None:
    topics = await make_topics(create_topic, topic_name, partitions=1)
    engine = GatedEngine(default_engine)
    worker = _worker(kafka_bootstrap, topics, f"{topic_name}-w", engine)
    stopped = False
    with MetricsPort(0, beat_s=0.05) as port:
        serve_metrics(port, "qscore_worker", worker.metrics())
        beating = asyncio.create_task(port.health.run(worker.health))
        try:
            assert await probe(port.port, "/readyz") == (503, "starting\n")
            await worker.start()
            run = asyncio.create_task(worker.run())
            await until_answer(port.port, "/readyz", lambda a: a == OK, "ready")
            await _publish_one(kafka_bootstrap, topics, default_engine, "drain-1")
            assert await asyncio.to_thread(engine.entered.wait, 60)
            worker.request_stop()
            assert await until_answer(port.port, "/readyz", lambda a: a != OK,
                                      "not ready once draining") == (503, "draining\n")
            assert await probe(port.port, "/healthz") == OK
            assert not run.done()  # the drain is still waiting for the engine call
            engine.gate.set()
            await asyncio.wait_for(run, 60)
            assert worker.stats.messages == 1  # drained: scored, published
            stopped = True
            await worker.stop()
            assert await probe(port.port, "/readyz") == (503, "draining\n")
        finally:
            beating.cancel()
            engine.gate.set()
            if not stopped:
                await worker.stop()
    assert await probe(port.port, "/healthz") is None


async def _publish_one(bootstrap: str, topics: Topics, engine: Engine, batch_id: str) -> None:
    """One TokenBatch of one query on the token topic, acknowledged."""
    producer = make_producer(kafka_settings(bootstrap))
    await producer.start()
    try:
        await publish_token_batches(producer, topics.tokens, [tokenize(
            engine, [QueryItem(id="q", query="red shoes")], batch_id)])
    finally:
        await producer.stop()


async def test_a_worker_with_no_engine_left_is_not_live(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str,
        default_engine: Engine) -> None:
    topics = await make_topics(create_topic, topic_name, partitions=1)
    engine = GatedEngine(default_engine)
    engine.dead = True
    engine.gate.set()
    worker = _worker(kafka_bootstrap, topics, f"{topic_name}-w", engine)
    with MetricsPort(0, beat_s=0.05) as port:
        serve_metrics(port, "qscore_worker", worker.metrics())
        beating = asyncio.create_task(port.health.run(worker.health))
        try:
            await worker.start()
            run = asyncio.create_task(worker.run())
            await until_answer(port.port, "/readyz", lambda a: a == OK, "ready")
            await _publish_one(kafka_bootstrap, topics, default_engine, "dead-1")
            status, body = await until_answer(port.port, "/healthz", lambda a: a != OK,
                                              "not live") or (0, "")
            assert status == 503 and "EngineDead" in body, body
            assert (await probe(port.port, "/readyz") or (0,))[0] == 503
            with pytest.raises((PipelineError, EngineDead)):
                await asyncio.wait_for(run, 60)
        finally:
            beating.cancel()
            await worker.stop()


async def test_a_member_without_partitions_is_ready(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str,
        default_engine: Engine) -> None:
    """Two workers in one group on one partition: the one that got none stands by, ready."""
    topics = await make_topics(create_topic, topic_name, partitions=1)
    workers = []
    for _ in range(2):
        engine = GatedEngine(default_engine)
        engine.gate.set()
        workers.append(_worker(kafka_bootstrap, topics, f"{topic_name}-w", engine))
    runs = []
    try:
        for worker in workers:
            await worker.start()
            runs.append(asyncio.create_task(worker.run()))
        await until(lambda: sorted(len(w.online.consumer.assignment()) for w in workers)
                    == [0, 1] and all(w.online.assigned and w.offline.assigned for w in workers),
                    "one partition between two members", timeout_s=60)
        assert [w.health() for w in workers] == [(True, True, "ok")] * 2
    finally:
        for worker in workers:
            worker.request_stop()
        await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 60)
        for worker in workers:
            await worker.stop()
