"""Offline re-scoring in process: the embedded default, no broker needed.

It runs the fleet's own components (QueryTokenizer -> TokenBatch -> length-sorted,
token-budgeted micro-batches -> Engine -> per-item scores) over a query log, keeps input order,
and sends every malformed line to OUTPUT.rejected.jsonl with its line number and reason.
Tokenizing window n+1 overlaps scoring window n (both release the GIL), as TEI prefetches one.

Memory: at most two windows exist at once, and a window closes at `chunk_items` lines or once
its good lines reach `chunk_bytes`, whichever comes first. A rejected line (raw bytes up to
max_message_bytes) is written out as soon as it is read, never held in a window.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import orjson
import structlog

from engines.protocol import Engine
from engines.select import EngineSettings
from engines.tokenizer import QueryTokenizer
from qscore.offline.querylog import LogRecord, iter_query_log
from schemas import DEFAULT_LIMITS, Limits, QueryItem, TokenBatch
from workers.scoring import BatchLimits, run_token_batch

log = structlog.get_logger(__name__)
OnProgress = Callable[[int], None]  # called with the number of input lines just finished

DEFAULT_CHUNK_ITEMS = 2048
DEFAULT_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class RescoreSettings:
    input: Path
    output: Path
    engine: EngineSettings = field(default_factory=EngineSettings)
    batch: BatchLimits = field(default_factory=BatchLimits)
    limits: Limits = DEFAULT_LIMITS
    # Items tokenized and length-sorted together: a wider window pads less (the long tail of
    # each window shares a batch); the next window tokenizes while this one is scored.
    chunk_items: int = DEFAULT_CHUNK_ITEMS
    # ...and a window closes early once its good lines reach this many bytes, so that a log of
    # long lines (up to limits.max_message_bytes each) cannot make two windows of gigabytes.
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    fmt: str = "auto"
    progress: bool = True

    @property
    def rejected_path(self) -> Path:
        return self.output.with_name(self.output.name + ".rejected.jsonl")


@dataclass(slots=True)
class RescoreSummary:
    items: int = 0
    rejected: int = 0
    sequences: int = 0
    truncated_sequences: int = 0
    truncated_items: int = 0
    batches: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    seconds: float = 0.0
    batch_ms: list[float] = field(default_factory=list, repr=False)
    output: str = ""
    rejected_path: str = ""
    model_id: str = ""
    model_version: str = ""

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def batch_percentile(self, q: float) -> float:
        return float(np.percentile(self.batch_ms, q)) if self.batch_ms else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "items": self.items, "rejected": self.rejected, "sequences": self.sequences,
            "truncated_sequences": self.truncated_sequences,
            "truncated_items": self.truncated_items, "batches": self.batches,
            "padding_overhead": round(self.padded_tokens / self.real_tokens - 1, 4)
            if self.real_tokens else 0.0,
            "seconds": round(self.seconds, 3), "items_per_s": round(self.items_per_s, 1),
            "p50_batch_ms": round(self.batch_percentile(50), 2),
            "p99_batch_ms": round(self.batch_percentile(99), 2),
            "model_id": self.model_id, "model_version": self.model_version,
            "output": self.output, "rejected_file": self.rejected_path,
        }


@dataclass(slots=True)
class _Window:
    lines: list[int]  # the line number of each item
    items: list[QueryItem]
    last_line: int  # the last line it covers, rejected ones included
    token_batch: TokenBatch | None = None


def _reject(record: LogRecord, rej: IO[bytes]) -> None:
    rej.write(orjson.dumps({
        "line": record.line, "reason": record.error,
        "raw": record.raw.decode("utf-8", errors="replace").rstrip("\r\n"),
    }) + b"\n")


def _windows(records: Iterator[LogRecord], settings: RescoreSettings, rej: IO[bytes],
             summary: RescoreSummary) -> Iterator[_Window]:
    """Good lines in windows of at most `chunk_items` lines (rejected ones counted, as a window
    is also a step of progress) and `chunk_bytes` bytes of good lines (at least one item);
    rejected lines go straight to `rej`."""
    window = _Window([], [], 0)
    n_lines = n_bytes = 0
    for record in records:
        window.last_line = record.line
        n_lines += 1
        if record.item is None:
            summary.rejected += 1
            _reject(record, rej)
        else:
            window.lines.append(record.line)
            window.items.append(record.item)
            n_bytes += len(record.raw)
        if n_lines >= settings.chunk_items or n_bytes >= settings.chunk_bytes:
            yield window
            window = _Window([], [], 0)
            n_lines = n_bytes = 0
    if n_lines:
        yield window


def _tokenize(tokenizer: QueryTokenizer, window: _Window, number: int) -> _Window:
    if window.items:
        window.token_batch = tokenizer.token_batch(f"rescore-{number}", window.items,
                                                   submitted_at=time.time(),
                                                   priority="offline")
    return window


def rescore(settings: RescoreSettings, engine: Engine, tokenizer: QueryTokenizer,
            on_progress: OnProgress | None = None) -> RescoreSummary:
    """Score every good line of settings.input into settings.output (JSONL, input order)."""
    manifest = engine.manifest
    summary = RescoreSummary(output=str(settings.output),
                             rejected_path=str(settings.rejected_path),
                             model_id=manifest.model_id, model_version=manifest.version)
    out_tmp = settings.output.with_name(settings.output.name + ".partial")
    rej_tmp = settings.rejected_path.with_name(settings.rejected_path.name + ".partial")
    settings.output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records = iter_query_log(settings.input, settings.limits, fmt=settings.fmt)  # type: ignore[arg-type]
    prev_line = 0
    with (out_tmp.open("wb") as out, rej_tmp.open("wb") as rej,
          ThreadPoolExecutor(1, thread_name_prefix="qscore-tokenize") as pool):
        windows = enumerate(_windows(records, settings, rej, summary))
        pending: Future[_Window] | None = None
        for number, window in windows:
            ready = pool.submit(_tokenize, tokenizer, window, number)
            if pending is not None:
                prev_line = _finish(pending.result(), engine, settings, summary, out,
                                    prev_line, on_progress)
            pending = ready
        if pending is not None:
            _finish(pending.result(), engine, settings, summary, out, prev_line, on_progress)
    summary.seconds = time.perf_counter() - started
    # Readers never see a half-written output: it appears whole, or the old one stays.
    os.replace(out_tmp, settings.output)
    os.replace(rej_tmp, settings.rejected_path)
    log.info("rescore.finished", input=str(settings.input), **summary.as_dict())
    return summary


def _finish(window: _Window, engine: Engine, settings: RescoreSettings,
            summary: RescoreSummary, out: IO[bytes], prev_line: int,
            on_progress: OnProgress | None) -> int:
    scored = iter(())
    tb = window.token_batch
    truncated_by_item: np.ndarray | None = None
    span = window.last_line - prev_line
    reported = done = 0
    if tb is not None:
        n_sequences = tb.n_sequences

        def advance(finished: int) -> None:
            # A window takes seconds: move the bar per engine call, in proportion.
            nonlocal reported, done
            done += finished
            now = span * done // n_sequences
            if on_progress is not None and now > reported:
                on_progress(now - reported)
                reported = now

        result = run_token_batch(engine, tb, settings.batch, on_batch=advance)
        scored = iter(result.items)
        summary.batch_ms.extend(result.batch_ms)
        summary.batches += len(result.batch_ms)
        summary.padded_tokens += result.padded_tokens
        summary.real_tokens += result.real_tokens
        summary.sequences += tb.n_sequences
        summary.truncated_sequences += int(tb.truncated.sum())
        truncated_by_item = np.bincount(tb.seq_item[tb.truncated],
                                         minlength=len(tb.item_ids))
        summary.truncated_items += int(np.count_nonzero(truncated_by_item))
    for index, line_number in enumerate(window.lines):
        score = next(scored)
        line = {"id": score.id, "line": line_number, "scores": score.scores,
                "model_id": summary.model_id, "model_version": score.model_version}
        if truncated_by_item is not None and truncated_by_item[index]:
            line["truncated"] = True
        if score.embedding is not None:
            line["embedding"] = score.embedding
        out.write(orjson.dumps(line) + b"\n")
        summary.items += 1
    if on_progress is not None and span > reported:
        on_progress(span - reported)
    return window.last_line
