"""What `qscore rescore` remembers stays bounded however long the log: duplicate ids only
within the last `dedupe_window` good lines, engine latencies in a fixed histogram."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import orjson

from qscore.offline.querylog import iter_query_log
from qscore.offline.rescore import LatencyHistogram, RescoreSummary
from tests.qscore.offline.rescore_helpers import run


def test_duplicates_are_caught_within_the_dedupe_window_only(tmp_path: Path) -> None:
    """Remembering every id would grow with the log, so only the last `dedupe_window` good
    lines' ids are kept: a duplicate 5 lines after its first copy is rejected, one 50 lines
    after it is past a window of 10 and is scored again (a second row with that id)."""
    lines = [{"id": f"q{i}", "query": f"query {i}"} for i in range(1, 71)]
    lines[5] = {"id": "q1", "query": "again, 5 lines on"}  # line 6
    lines[59] = {"id": "q10", "query": "again, 50 lines on"}  # line 60
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    summary = run(log, tmp_path / "out.jsonl", dedupe_window=10)
    rejected = [orjson.loads(r) for r in
                (tmp_path / "out.jsonl.rejected.jsonl").read_bytes().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (6, "duplicate id 'q1', first seen at line 1")]
    rows = [orjson.loads(r) for r in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert [r["line"] for r in rows if r["id"] == "q10"] == [10, 60]
    assert (summary.items, summary.rejected) == (69, 1)


def test_dedupe_memory_does_not_grow_with_the_log(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(b'{"id": "item-%08d", "query": "q"}\n' % i for i in range(25_000)))

    def peak(window: int) -> int:
        tracemalloc.start()
        try:
            n = sum(1 for r in iter_query_log(log, dedupe_window=window) if r.ok)
            used = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert n == 25_000  # all unique: none rejected
        return used

    small, large = peak(100), peak(1_000_000)
    # ~100 B an id remembered: 25,000 of them take megabytes, 100 of them next to nothing.
    assert large > 1_500_000 and small < 200_000, (small, large)


def test_latency_percentiles_are_within_2_percent_of_numpys() -> None:
    rng = np.random.default_rng(3)
    for data in (rng.lognormal(np.log(20), 1.0, 20_000),  # ms: a long tail
                 rng.uniform(0.5, 3.0, 5_000), rng.exponential(200.0, 10_000) + 0.01):
        hist = LatencyHistogram()
        for chunk in np.array_split(data, 37):  # as engine calls come, window by window
            hist.add(chunk.tolist())
        assert len(hist) == len(data)
        for q in (1, 10, 50, 90, 99, 99.9):
            want = float(np.percentile(data, q))
            assert abs(hist.percentile(q) - want) <= 0.02 * want, (q, hist.percentile(q), want)


def test_latency_histogram_has_a_fixed_size_and_survives_a_checkpoint() -> None:
    rng = np.random.default_rng(4)
    first, second = rng.lognormal(3, 1.5, 100_000), rng.lognormal(3, 1.5, 100_000)
    whole = LatencyHistogram()
    whole.add([*first.tolist(), *second.tolist(), 0.0, 1e9])  # out of range ends: kept
    size = whole.counts.nbytes
    assert size < 20_000 and len(whole.state()) <= len(LatencyHistogram.BINS) + 1
    # A resumed run's summary continues the checkpointed histogram: the same as one run's.
    summary = RescoreSummary()
    summary.latency.add(first.tolist())
    summary.items = 7
    state = orjson.loads(orjson.dumps(summary.state()))  # as the checkpoint stores it
    resumed = RescoreSummary()
    resumed.restore(state)
    resumed.latency.add([*second.tolist(), 0.0, 1e9])
    assert resumed.items == 7 and np.array_equal(resumed.latency.counts, whole.counts)
    assert resumed.latency.counts.nbytes == size
    assert resumed.batch_percentile(50) == whole.percentile(50)
