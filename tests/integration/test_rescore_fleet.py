"""`qscore rescore --fleet` on the real broker with an in-process tokenizer and worker (FP32,
so scores do not depend on the batch): the same output as the embedded path, line for line,
in JSONL and Parquet, after an interruption and a resume too; a fleet that does not answer,
or dead-letters the run's batches, fails the run instead of hanging it."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from engines.select import EngineSettings, open_engine
from plumbing.cache import CacheSettings
from plumbing.kafka import KafkaSettings, Topics
from qscore.offline.checkpoint import ResumeRefused, read_checkpoint, write_checkpoint
from qscore.offline.fleet import (
    FleetDeadLetter,
    FleetOptions,
    FleetTimeout,
    rescore_via_fleet,
)
from qscore.offline.rescore import RescoreSettings, rescore
from tests.integration.fleet_helpers import (
    SAMPLE,
    CreateTopic,
    in_process_tokenizer,
    in_process_worker,
    kafka_settings,
    make_topics,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHUNK = 16  # lines in a block: a 140-line log is 9 windows


def _log(tmp_path: Path, n: int = 120) -> Path:
    """Sample items (some without docs: embeddings) with bad and blank lines among them."""
    rows = [orjson.loads(line) for line in SAMPLE.read_bytes().splitlines()[:n]]
    lines: list[bytes] = []
    for i, row in enumerate(rows):
        if i % 4 == 0:
            row.pop("docs", None)
        elif row.get("docs"):
            row["docs"] = row["docs"][:1 + i % 2]  # fewer sequences: a quicker test
        lines.append(orjson.dumps(row))
        if i % 17 == 5:
            lines.append(b'{"id": "bad%d", "query": ""}' % i)
        if i % 23 == 7:
            lines.append(b"{not json")
        if i % 41 == 3:
            lines.append(b"")
    lines.append(orjson.dumps(rows[3]))  # a duplicate id
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _reference(log: Path, out: Path, artifact: Path, **settings: object) -> None:
    s = RescoreSettings(input=log, output=out, engine=EngineSettings(artifact=artifact),
                        chunk_items=CHUNK, progress=False, **settings)  # type: ignore[arg-type]
    engine, tokenizer = open_engine(s.engine)
    rescore(s, engine, tokenizer)


def _same_rows(got: list[dict], want: list[dict]) -> None:
    assert [(r["id"], r["line"]) for r in got] == [(r["id"], r["line"]) for r in want]
    for g, w in zip(got, want, strict=True):
        assert (g["model_id"], g["model_version"]) == (w["model_id"], w["model_version"])
        # The one known difference: a ScoreBatch does not say whether the fleet truncated
        # an item, so the fleet path never sets `truncated` (the sample has long docs).
        assert not g.get("truncated")
        np.testing.assert_allclose(g["scores"], w["scores"], atol=1e-5)
        assert (g.get("embedding") is None) == (w.get("embedding") is None), g["id"]
        if w.get("embedding") is not None:
            np.testing.assert_allclose(g["embedding"], w["embedding"], atol=1e-5)


def _jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def _parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


async def _fleet_topics(create_topic: CreateTopic, topic_name: str) -> Topics:
    return await make_topics(create_topic, topic_name, partitions=2)


async def _topics_named(bootstrap: str, prefix: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return sorted(t for t in await admin.list_topics() if t.startswith(prefix))
    finally:
        await admin.close()


async def test_cli_fleet_output_equals_the_embedded_path(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str,
        default_engine_path: Path, tmp_path: Path) -> None:
    kafka = kafka_settings(kafka_bootstrap)
    topics = await _fleet_topics(create_topic, topic_name)
    log = _log(tmp_path)
    _reference(log, tmp_path / "ref.jsonl", default_engine_path)

    out = tmp_path / "fleet.jsonl"
    args = [sys.executable, "-m", "qscore", "rescore", str(log), "-o", str(out), "--fleet",
            "--bootstrap-servers", kafka_bootstrap, "--topic-prefix", topic_name,
            "--chunk-items", str(CHUNK), "--max-in-flight-windows", "3",
            "--fleet-batch-items", "10", "--window-timeout-s", "60", "--no-progress"]
    if not os.environ.get("QSCORE_TEST_KAFKA"):
        args.append("--fast-groups")
    async with (in_process_tokenizer(kafka, topics, default_engine_path, CacheSettings(),
                                     f"{topic_name}-t"),
                in_process_worker(kafka, topics, default_engine_path, CacheSettings(),
                                  f"{topic_name}-w")):
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    summary = orjson.loads(stdout.splitlines()[-1])
    want = _jsonl(tmp_path / "ref.jsonl")
    _same_rows(_jsonl(out), want)
    assert (tmp_path / "fleet.jsonl.rejected.jsonl").read_bytes() == (
        tmp_path / "ref.jsonl.rejected.jsonl").read_bytes()
    assert summary["via"] == "fleet" and summary["items"] == len(want)
    assert summary["rejected"] == len((tmp_path / "ref.jsonl.rejected.jsonl").read_bytes()
                                      .splitlines())
    assert summary["model_version"] == want[0]["model_version"]
    assert summary["reply_topic"].startswith(f"{topics.scores}.rescore-")
    # Windows of 16 lines (~14 items) in batches of at most 10 items.
    assert summary["published_batches"] >= 2 * (len(want) // CHUNK)
    assert not (tmp_path / "fleet.jsonl.checkpoint.json").exists()
    # The run's own reply topic goes once the run has finished.
    assert await _topics_named(kafka_bootstrap, f"{topics.scores}.") == []
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("fleet")) == [
        "fleet.jsonl", "fleet.jsonl.rejected.jsonl"]


async def test_parquet_interrupted_and_resumed_equals_the_embedded_path(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str,
        default_engine_path: Path, tmp_path: Path) -> None:
    kafka = kafka_settings(kafka_bootstrap)
    topics = await _fleet_topics(create_topic, topic_name)
    log = _log(tmp_path)
    _reference(log, tmp_path / "ref.parquet", default_engine_path, part_windows=2)
    settings = RescoreSettings(input=log, output=tmp_path / "fleet.parquet",
                               chunk_items=CHUNK, progress=False, part_windows=2)
    options = FleetOptions(max_in_flight_windows=3, batch_items=8, window_timeout_s=60)
    elsewhere = await create_topic(f"{topic_name}-elsewhere")
    async with (in_process_tokenizer(kafka, topics, default_engine_path, CacheSettings(),
                                     f"{topic_name}-t"),
                in_process_worker(kafka, topics, default_engine_path, CacheSettings(),
                                  f"{topic_name}-w")):
        # A reply topic outside the fleet's allow-list: dead-lettered, the run fails at once.
        with pytest.raises(FleetDeadLetter, match="reply_topic"):
            await rescore_via_fleet(
                RescoreSettings(input=log, output=tmp_path / "forbidden.jsonl"), kafka,
                topics, FleetOptions(reply_topic=elsewhere, window_timeout_s=60))

        # Interrupted once more than half the lines are written and checkpointed.
        done = 0
        task: asyncio.Task | None = None

        def progress(n: int) -> None:
            nonlocal done
            done += n
            if done > 60 and task is not None:
                task.cancel()

        task = asyncio.create_task(rescore_via_fleet(settings, kafka, topics, options,
                                                     on_progress=progress))
        with pytest.raises(asyncio.CancelledError):
            await task
        checkpoint = read_checkpoint(settings.checkpoint_path)
        assert checkpoint is not None and 0 < checkpoint.lines_done < 110
        assert checkpoint.fleet["acked_line"] > checkpoint.lines_done

        # Resuming against a fleet that serves another version is refused.
        write_checkpoint(settings.checkpoint_path,
                         replace(checkpoint, model_version="another-version"))
        resumed = replace(settings, resume=True)
        with pytest.raises(ResumeRefused, match="now serves"):
            await rescore_via_fleet(resumed, kafka, topics, options)
        write_checkpoint(settings.checkpoint_path, checkpoint)

        summary = await rescore_via_fleet(resumed, kafka, topics, options)
    assert summary.resumed_at == checkpoint.lines_done
    # The windows acknowledged before the interruption are collected, not sent again.
    assert summary.picked_up_windows >= 1
    want = _parquet(tmp_path / "ref.parquet")
    _same_rows(_parquet(tmp_path / "fleet.parquet"), want)
    assert summary.items == len(want)
    assert (tmp_path / "fleet.parquet.rejected.jsonl").read_bytes() == (
        tmp_path / "ref.parquet.rejected.jsonl").read_bytes()
    import pyarrow.parquet as pq

    assert pq.read_schema(tmp_path / "fleet.parquet") == pq.read_schema(
        tmp_path / "ref.parquet")


async def test_no_fleet_fails_the_run_in_time(kafka_bootstrap: str, create_topic: CreateTopic,
                                              topic_name: str, tmp_path: Path) -> None:
    kafka: KafkaSettings = kafka_settings(kafka_bootstrap)
    topics = await _fleet_topics(create_topic, topic_name)
    settings = RescoreSettings(input=_log(tmp_path, 20), output=tmp_path / "out.jsonl")
    with pytest.raises(FleetTimeout, match="probe"):
        await rescore_via_fleet(settings, kafka, topics, FleetOptions(window_timeout_s=2))
    assert not settings.checkpoint_path.exists()  # nothing published: nothing to resume
    assert await _topics_named(kafka_bootstrap, f"{topics.scores}.") == []
