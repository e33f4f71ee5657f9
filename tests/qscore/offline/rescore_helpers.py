"""Helpers for the resumable-rescore tests: a log with every kind of line, a stand-in engine
whose numbers depend on the batch an item is in (as a dynamically quantized engine's do), and
comparisons of whole outputs. No model needed."""

from __future__ import annotations

import gzip
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson

from engines.batch import PaddedBatch
from qscore.offline.rescore import RescoreSettings, RescoreSummary, rescore
from tests.qscore.offline.test_rescore_windows import _ByteTokenizer

WORDS = ("rice", "cook", "how", "to", "weather", "paris", "red", "shoes", "tennis", "plant",
         "yellow", "leaves", "history", "printing", "press", "é", "日本")

# Small windows so that a few hundred lines make dozens of windows and checkpoints: blocks of
# 7 lines, closed early at 260 bytes of good lines; at most 3 sequences an engine call.
SMALL: dict[str, Any] = {"chunk_items": 7, "chunk_bytes": 260, "dedupe_window": 30}


class BatchEngine:
    """Similarity head whose rows depend on their batch: each row is its own tokens' vector
    plus a little of the batch's mean, so an item scored in another window (or another engine
    call) gets other numbers, as with the real INT8 engine. Raises KeyboardInterrupt (Ctrl-C)
    on call `interrupt_at` (1-based), as the CLI's SIGINT / SIGTERM handling does."""

    def __init__(self, interrupt_at: int | None = None, version: str = "v0",
                 model_id: str = "fake") -> None:
        self.manifest = SimpleNamespace(model_id=model_id, version=version, head="similarity",
                                        output_dim=3)
        self.interrupt_at = interrupt_at
        self.calls = 0

    def run(self, batch: PaddedBatch, lane: int = 0) -> np.ndarray:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        ids = (batch.input_ids * batch.attention_mask).astype(np.float64)
        rows = np.stack([ids.sum(1), (ids ** 2).sum(1) / 256, np.ones(batch.size)], axis=1)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        rows += 0.05 * rows.mean(axis=0) * batch.length / 16
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def make_log(path: Path, n: int = 300, seed: int = 11) -> Path:
    """A JSONL log (gzip if `path` ends in .gz) of `n` lines: good items with and without docs,
    long texts (truncated), blank lines, malformed lines, ids repeated a few lines later (within
    the dedupe window: rejected) and far later (outside it: scored again)."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    good_ids: list[str] = []

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    for i in range(n):
        roll = rng.random()
        if roll < 0.06:
            lines.append(rng.choice([b"", b"   ", b"\t"]))
        elif roll < 0.12:
            lines.append(rng.choice([b"{not json", b'{"id": "x%d"}' % i, b'["a list"]',
                                     b'{"id": "e%d", "query": ""}' % i, b"\xff\xfe"]))
        elif roll < 0.16 and len(good_ids) > 3:
            item_id = rng.choice(good_ids[-3:])  # a duplicate a few lines later: rejected
            lines.append(orjson.dumps({"id": item_id, "query": text(1, 3)}))
        elif roll < 0.19 and len(good_ids) > 120:
            item_id = good_ids[rng.randrange(0, len(good_ids) - 100)]  # far back: scored
            lines.append(orjson.dumps({"id": item_id, "query": text(1, 3)}))
            good_ids.append(item_id)
        else:
            row: dict[str, Any] = {"id": f"q{i}", "query": text(1, 12)}
            if rng.random() < 0.4:
                row["docs"] = [text(1, 20) for _ in range(rng.randint(1, 3))]
            lines.append(orjson.dumps(row))
            good_ids.append(row["id"])
    data = b"\n".join(lines) + b"\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def settings(log: Path, out: Path, **overrides: Any) -> RescoreSettings:
    from workers.scoring import BatchLimits

    return RescoreSettings(input=log, output=out, batch=BatchLimits(max_batch=3),
                           progress=False, **{**SMALL, **overrides})


def run(log: Path, out: Path, engine: BatchEngine | None = None,
        on_progress: Callable[[int], None] | None = None, **overrides: Any) -> RescoreSummary:
    return rescore(settings(log, out, **overrides), engine or BatchEngine(),  # type: ignore[arg-type]
                   _ByteTokenizer(), on_progress=on_progress)  # type: ignore[arg-type]


def row_groups(path: Path) -> list[int]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    return [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]


def assert_same_output(got: Path, want: Path) -> None:
    """The output and its rejected file are what the reference run wrote: byte for byte for
    JSONL; for Parquet the same table in the same row groups (one a window)."""
    rejected = got.name + ".rejected.jsonl"
    assert (got.parent / rejected).read_bytes() == (want.parent / (want.name + ".rejected.jsonl")
                                                    ).read_bytes(), "rejected lines differ"
    if got.suffix == ".parquet":
        import pyarrow.parquet as pq

        assert row_groups(got) == row_groups(want), "other windows (row groups)"
        got_t, want_t = pq.read_table(got), pq.read_table(want)
        assert got_t.schema.equals(want_t.schema), (got_t.schema, want_t.schema)
        assert got_t.equals(want_t), "the tables differ"
    else:
        g, w = got.read_bytes(), want.read_bytes()
        if g != w:
            diff = next(i for i, (a, b) in enumerate(zip(g.splitlines(), w.splitlines(),
                                                         strict=False)) if a != b)
            raise AssertionError(f"outputs differ from output line {diff + 1}: "
                                 f"{g.splitlines()[diff][:200]!r} != "
                                 f"{w.splitlines()[diff][:200]!r}")
    assert_no_leftovers(got)


def assert_no_leftovers(out: Path) -> None:
    """A finished run leaves the output, its rejected file (and a shard's record) only."""
    left = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name)
                  and p.name not in (out.name, out.name + ".rejected.jsonl",
                                     out.name + ".shard.json"))
    assert not left, f"left behind: {left}"


COUNTS = ("items", "rejected", "blank", "sequences", "truncated_sequences", "truncated_items",
          "batches", "padded_tokens", "real_tokens")


def counts(summary: RescoreSummary) -> dict[str, int]:
    return {k: getattr(summary, k) for k in COUNTS} | {"latencies": len(summary.latency)}


def fresh_dir(root: Path, name: str) -> Path:
    d = root / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d
