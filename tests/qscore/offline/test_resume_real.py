"""`qscore rescore` on the real default engine (ONNX Runtime INT8: its numbers depend on the
batch an item is in, so equal outputs mean every window and batch was reproduced), run as a
subprocess and stopped for real: SIGKILLed at random points, Ctrl-C'd and SIGTERMed, then
resumed; sharded and merged. Each output must be the uninterrupted run's."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qscore.offline.checkpoint import read_checkpoint
from tests.qscore.offline.rescore_helpers import assert_same_output
from tests.waiting import until

pytestmark = pytest.mark.slow

SAMPLE = Path(__file__).resolve().parents[3] / "qscore" / "data" / "sample_queries.jsonl"
LINES = 1000
# Windows of 16 lines, engine calls of at most 8 sequences: a checkpoint every 16 lines for
# JSONL, every part of 16 windows (256 lines) for Parquet.
OPTIONS = ("--no-progress", "--chunk-items", "16", "--batch-size", "8")
ENV = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1"}


def _make_log(path: Path) -> Path:
    """LINES lines of the shipped sample log with fresh ids: mostly queries alone, one in eight
    with a doc; a malformed line, a blank line, a duplicate id now and then."""
    rows = [orjson.loads(line) for line in SAMPLE.read_bytes().splitlines()]
    lines: list[bytes] = []
    i = 0
    while len(lines) < LINES:
        row = {"id": f"r{i:05d}", "query": rows[i % len(rows)]["query"]}
        if i % 8 == 0 and rows[i % len(rows)].get("docs"):
            row["docs"] = rows[i % len(rows)]["docs"][:1]
        lines.append(orjson.dumps(row))
        if i % 97 == 5:
            lines.append(b'{"id": "broken", "query": ')
        if i % 131 == 7:
            lines.append(b"")
        if i % 173 == 11:
            lines.append(orjson.dumps({"id": row["id"], "query": "the same id again"}))
        i += 1
    path.write_bytes(b"\n".join(lines[:LINES]) + b"\n")
    return path


def _command(engine: Path, log: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qscore", "rescore", str(log), "-o", str(out), "--engine",
            str(engine), *OPTIONS, *extra]


def _summary(stdout: str) -> dict[str, Any]:
    return orjson.loads(stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _rescore(command: list[str]) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=240,
                          check=False)
    assert done.returncode == 0, done.stderr
    return _summary(done.stdout)


@pytest.fixture(scope="module")
def real(default_engine_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The log, and its uninterrupted runs to JSONL and Parquet."""
    root = tmp_path_factory.mktemp("real")
    log = _make_log(root / "log.jsonl")
    found: dict[str, Any] = {"engine": default_engine_path, "log": log}
    for fmt in ("jsonl", "parquet"):
        out = root / "base" / f"out.{fmt}"
        found[fmt] = out
        found[f"{fmt}_summary"] = _rescore(_command(default_engine_path, log, out))
    return found


def _lines_done(checkpoint: Path) -> int:
    found = read_checkpoint(checkpoint)
    return found.lines_done if found else 0


async def _start(command: list[str], tmp_path: Path, n: int) -> asyncio.subprocess.Process:
    """The command, its output in tmp_path/stdout-N and stderr-N."""
    with ((tmp_path / f"stdout-{n}").open("wb") as stdout,
          (tmp_path / f"stderr-{n}").open("wb") as stderr):
        return await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=ENV)


async def _stop_past(proc: asyncio.subprocess.Process, checkpoint: Path, line: int,
                     sig: int, delay_s: float = 0.0) -> int:
    """Send `sig` once the checkpoint is past `line` (and `delay_s` more: a random point in
    the window then being scored); the exit status. The process does not outlive a failure."""
    try:
        await until(lambda: proc.returncode is not None or _lines_done(checkpoint) >= line,
                    f"a checkpoint at line {line:,} or later", timeout_s=120)
        assert proc.returncode is None, "the run ended before it could be stopped"
        if delay_s:
            await asyncio.sleep(delay_s)
        proc.send_signal(sig)
        return await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
async def test_sigkilled_at_random_points_then_resumed(real: dict[str, Any], tmp_path: Path,
                                                       fmt: str) -> None:
    rng = random.Random(f"sigkill-{fmt}")
    out = tmp_path / f"out.{fmt}"
    checkpoint = out.with_name(out.name + ".checkpoint.json")
    done = 0
    for kill in range(2):
        # Parquet checkpoints every 256 lines: stop well before the end (1,000 lines).
        line = rng.randint(done + 1, max(done + 1, min(done + 250, 520)))
        proc = await _start(_command(real["engine"], real["log"], out,
                                     *(["--resume"] if kill else [])), tmp_path, kill)
        rc = await _stop_past(proc, checkpoint, line, signal.SIGKILL, rng.uniform(0, 0.3))
        assert rc == -signal.SIGKILL
        now = _lines_done(checkpoint)
        assert now >= line and now > done and not out.exists()
        done = now
    summary = _rescore(_command(real["engine"], real["log"], out, "--resume"))
    assert summary["resumed_at_line"] == done
    assert_same_output(out, real[fmt])
    want = real[f"{fmt}_summary"]
    for key in ("items", "rejected", "sequences", "truncated_items", "batches",
                "padding_overhead"):
        assert summary[key] == want[key], key


async def test_ctrl_c_and_sigterm_stop_at_a_checkpoint_and_say_how_to_resume(
        real: dict[str, Any], tmp_path: Path) -> None:
    rng = random.Random("sigint")
    out = tmp_path / "out.jsonl"
    checkpoint = out.with_name("out.jsonl.checkpoint.json")
    command = _command(real["engine"], real["log"], out)
    done = 0
    for n, sig in enumerate((signal.SIGINT, signal.SIGTERM)):
        proc = await _start(command, tmp_path, n)
        rc = await _stop_past(proc, checkpoint, rng.randint(done + 1, done + 250), sig)
        stderr = (tmp_path / f"stderr-{n}").read_text()
        assert rc == 130, stderr
        said = re.search(r"interrupted: lines 1-([\d,]+) are done and checkpointed in (\S+)",
                         stderr)
        assert said, stderr
        done = int(said[1].replace(",", ""))
        assert Path(said[2]) == checkpoint and _lines_done(checkpoint) == done
        assert "resume with the same command and --resume:" in stderr
        suggested = shlex.split(stderr.strip().splitlines()[-1])
        assert suggested[:2] == ["qscore", "rescore"] and suggested[-1] == "--resume"
        command = [sys.executable, "-m", *suggested]  # then run what it says to
        assert not out.exists()
    summary = _rescore(command)
    assert summary["resumed_at_line"] == done > 0
    assert_same_output(out, real["jsonl"])


def test_shards_via_the_command_line_merge_to_the_unsharded_run(real: dict[str, Any],
                                                                tmp_path: Path) -> None:
    outs = []
    for i in (1, 2, 3):
        outs.append(tmp_path / f"shard{i}" / "out.jsonl")
        summary = _rescore(_command(real["engine"], real["log"], outs[-1], "--shard", f"{i}/3"))
        assert 0 < summary["items"] < real["jsonl_summary"]["items"]
    merged = tmp_path / "merged.jsonl"
    done = subprocess.run([sys.executable, "-m", "qscore", "merge", *map(str, outs[::-1]),
                           "-o", str(merged)], capture_output=True, text=True, env=ENV,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert _summary(done.stdout)["items"] == real["jsonl_summary"]["items"]
    assert_same_output(merged, real["jsonl"])


def test_parquet_schema_and_values_equal_the_jsonl_run(real: dict[str, Any]) -> None:
    schema = pq.read_schema(real["parquet"])
    assert [(f.name, f.type) for f in schema] == [
        ("id", pa.string()), ("line", pa.int64()), ("scores", pa.list_(pa.float32())),
        ("embedding", pa.list_(pa.float32(), 384)), ("truncated", pa.bool_()),
        ("model_id", pa.dictionary(pa.int32(), pa.string())),
        ("model_version", pa.dictionary(pa.int32(), pa.string()))]
    rows = pq.read_table(real["parquet"]).to_pylist()
    want = [orjson.loads(line) for line in real["jsonl"].read_bytes().splitlines()]
    assert len(rows) == len(want) == real["jsonl_summary"]["items"]
    with_docs = 0
    for got, exp in zip(rows, want, strict=True):
        assert (got["id"], got["line"], got["model_id"], got["model_version"]) == (
            exp["id"], exp["line"], exp["model_id"], exp["model_version"])
        assert got["truncated"] is exp.get("truncated", False)
        np.testing.assert_array_equal(np.float32(got["scores"]), np.float32(exp["scores"]))
        if exp["scores"]:
            with_docs += 1
            assert got["embedding"] is None and "embedding" not in exp
        else:
            assert len(got["embedding"]) == 384
            np.testing.assert_array_equal(np.float32(got["embedding"]),
                                          np.float32(exp["embedding"]))
    assert 80 < with_docs < len(rows) - 500
    assert pq.ParquetFile(real["parquet"]).num_row_groups == -(-LINES // 16)  # one a window


def test_parquet_output_is_readable_by_pandas(real: dict[str, Any]) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(real["parquet"])
    assert len(frame) == real["parquet_summary"]["items"]
    assert len(frame["embedding"].dropna().iloc[0]) == 384
