"""`rescore` windows are bounded by bytes as well as lines, and rejected lines are never held
(issue 10, defect 11b). A stand-in tokenizer and engine: no model needed."""

from __future__ import annotations

import gzip
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson

from engines.batch import PaddedBatch
from qscore.offline.rescore import RescoreSettings, RescoreSummary, rescore
from schemas import QueryItem, TokenBatch

MAX_TOKENS = 16


class _ByteTokenizer:
    """A text's first MAX_TOKENS UTF-8 bytes are its tokens; query then docs, one sequence
    each (the similarity layout). Records the items of every window it tokenizes."""

    def __init__(self) -> None:
        self.windows: list[int] = []

    def token_batch(self, batch_id: str, items: Sequence[QueryItem], *, submitted_at: float,
                    **_: Any) -> TokenBatch:
        self.windows.append(len(items))
        texts = [(i, d, text) for i, item in enumerate(items)
                 for d, text in enumerate((item.query, *(item.docs or ())), start=-1)]
        raw = [text.encode()[:MAX_TOKENS] for _, _, text in texts]
        offsets = np.zeros(len(raw) + 1, dtype=np.uint32)
        np.cumsum([len(r) for r in raw], out=offsets[1:])
        return TokenBatch(
            batch_id=batch_id, item_ids=tuple(it.id for it in items), tokenizer_id="bytes",
            max_length=MAX_TOKENS, seq_item=np.array([i for i, _, _ in texts], np.uint32),
            seq_doc=np.array([d for _, d, _ in texts], np.int32), offsets=offsets,
            input_ids=np.frombuffer(b"".join(raw), np.uint8).astype(np.uint32),
            token_type_ids=None,
            truncated=np.array([len(t.encode()) > MAX_TOKENS for _, _, t in texts]),
            submitted_at=submitted_at, priority="offline", head="similarity")


class _TokenEngine:
    """Similarity head: each row a unit vector of its own tokens only, so a score does not
    depend on padding or on which window the item was in."""

    manifest = SimpleNamespace(model_id="fake", version="v0", head="similarity", output_dim=3)

    def run(self, batch: PaddedBatch, lane: int = 0) -> np.ndarray:
        ids = (batch.input_ids * batch.attention_mask).astype(np.float64)
        rows = np.stack([ids.sum(1), (ids ** 2).sum(1) / 256, np.ones(batch.size)], axis=1)
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _run(log: Path, out: Path, **settings: Any) -> tuple[RescoreSummary, list[int]]:
    tokenizer = _ByteTokenizer()
    summary = rescore(RescoreSettings(input=log, output=out, **settings),
                      _TokenEngine(), tokenizer)  # type: ignore[arg-type]
    return summary, tokenizer.windows


def test_windows_close_at_the_byte_budget_and_output_is_unchanged(tmp_path: Path) -> None:
    lines = []
    for n in range(60):
        if n % 7 == 3:  # a rejected line among them, itself large
            lines.append(b'{"id": "bad%d", "query": ' % n + b"x" * 20_000)
            continue
        docs = [f"doc {n}.{d} " + "words " * 1300 for d in range(n % 3 + 1)]  # ~8 KB each
        lines.append(orjson.dumps({"id": f"q{n}", "query": f"query number {n}", "docs": docs}))
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"\n".join(lines) + b"\n")

    whole, one_window = _run(log, tmp_path / "whole.jsonl")
    small, windows = _run(log, tmp_path / "small.jsonl", chunk_bytes=40_000)
    assert one_window == [whole.items] and whole.items == 51 and whole.rejected == 9
    # 8-24 KB lines against a 40 KB budget: windows of 2 to 5 items.
    assert sum(windows) == whole.items and len(windows) >= 12 and max(windows) <= 5
    for name in ("small.jsonl", "small.jsonl.rejected.jsonl"):
        assert (tmp_path / name).read_bytes() == (tmp_path / name.replace("small", "whole")
                                                  ).read_bytes(), name
    assert (small.items, small.rejected) == (whole.items, whole.rejected)


def test_rejected_lines_are_not_held(tmp_path: Path) -> None:
    # 25 MiB of unparseable lines that gzip to almost nothing; in one window of 2,048 lines
    # they would all be held at once.
    n_lines, size = 200, 128 << 10
    log = tmp_path / "log.jsonl.gz"
    with gzip.open(log, "wb") as f:
        for n in range(n_lines):
            f.write(b'{"id": "r%d", "query": "' % n + b"y" * size + b"\n")
    tracemalloc.start()
    try:
        summary, windows = _run(log, tmp_path / "out.jsonl")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.rejected == n_lines and windows == []
    # Only the line at hand (read, parsed, written to the rejected file) is in memory.
    total = n_lines * size
    assert peak < total / 4, f"peak {peak / 2**20:.1f} MiB for {total / 2**20:.0f} MiB of lines"
    rejected = (tmp_path / "out.jsonl.rejected.jsonl").read_bytes().splitlines()
    assert [orjson.loads(r)["line"] for r in rejected] == list(range(1, n_lines + 1))
