"""Offline re-scoring in process: the embedded default, no broker needed.

It runs the fleet's own components (QueryTokenizer -> TokenBatch -> length-sorted,
token-budgeted micro-batches -> Engine -> per-item scores) over a query log, keeps input order,
and sends every malformed line to OUTPUT.rejected.jsonl with its line number and reason.
Tokenizing window n+1 overlaps scoring window n (both release the GIL), as TEI prefetches one.

Windows never cross a block of `chunk_items` lines (by line number), and within a block close
early at `chunk_bytes`: so where a run starts (line 1, a checkpoint, or a shard's block) does not
change which items share a window, and an interrupted-and-resumed run, or shards merged, write
exactly what one uninterrupted run writes (a dynamically quantized engine's numbers depend on
the batch they are in).

Resumable: output is written window by window (engines.outputs) and, once it is durable, a
checkpoint beside it (qscore.offline.checkpoint) records how far; `resume` re-reads the input up
to there (checking it is the same bytes), cuts the output files back to the checkpoint and goes
on. Ctrl-C or SIGTERM stops at the next window with the checkpoint in place (Interrupted).

Memory: at most two windows exist at once, and a window closes at `chunk_items` lines or once
its good lines reach `chunk_bytes`, whichever comes first. A rejected line (raw bytes up to
max_message_bytes) is written out as soon as it is read, never held in a window. Duplicate ids
are remembered for the last `dedupe_window` good lines only, and engine-call latencies in a
fixed histogram, so nothing grows with the log's length.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
import structlog

from engines.protocol import Engine
from engines.select import EngineSettings
from engines.tokenizer import QueryTokenizer
from qscore.offline.checkpoint import (
    Checkpoint,
    ResumeRefused,
    check_resumable,
    checkpoint_path,
    read_checkpoint,
    write_checkpoint,
)
from qscore.offline.outputs import (
    PART_WINDOWS,
    Output,
    Rows,
    discard_merged_parts,
    durable_append,
    format_for,
    fsync,
    open_output,
    partial_of,
)
from qscore.offline.querylog import DEFAULT_DEDUPE_WINDOW, LogRecord, iter_query_log
from schemas import DEFAULT_LIMITS, Limits, QueryItem, TokenBatch
from workers.scoring import BatchLimits, run_token_batch

log = structlog.get_logger(__name__)
OnProgress = Callable[[int], None]  # called with the number of input lines just finished

DEFAULT_CHUNK_ITEMS = 2048
DEFAULT_CHUNK_BYTES = 64 << 20


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run stopped at a checkpoint, which `resume` continues from."""

    def __init__(self, lines_done: int, checkpoint: Path) -> None:
        self.lines_done = lines_done
        self.checkpoint = checkpoint
        super().__init__(
            f"interrupted: lines 1-{lines_done:,} are done and checkpointed in {checkpoint}"
            if lines_done else
            f"interrupted before the first checkpoint ({checkpoint}): no line is done yet, "
            "so a resume starts at line 1")


@dataclass(frozen=True, slots=True)
class Shard:
    """`--shard I/N`: blocks b (of chunk_items lines) with b % N == I - 1, for I in 1..N."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 1 <= I <= N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"shard {text!r}: write it as I/N, e.g. 1/4") from None
        return cls(index, count)

    def owns(self, block: int) -> bool:
        return block % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True, slots=True)
class RescoreSettings:
    input: Path
    output: Path
    engine: EngineSettings = field(default_factory=EngineSettings)
    batch: BatchLimits = field(default_factory=BatchLimits)
    limits: Limits = DEFAULT_LIMITS
    # Lines (by line number) in a block: items tokenized and length-sorted together at most (a
    # wider window pads less: the long tail of each window shares a batch); the next window
    # tokenizes while this one is scored. Shards split the log by these blocks.
    chunk_items: int = DEFAULT_CHUNK_ITEMS
    # ...and a window closes early once its good lines reach this many bytes, so that a log of
    # long lines (up to limits.max_message_bytes each) cannot make two windows of gigabytes.
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    fmt: str = "auto"  # the input's: auto | jsonl | tsv
    progress: bool = True
    out_format: str | None = None  # jsonl | parquet; None: from the output's suffix
    resume: bool = False  # continue from the checkpoint (refused if it does not fit)
    restart: bool = False  # discard a checkpoint and start again
    shard: Shard | None = None
    dedupe_window: int = DEFAULT_DEDUPE_WINDOW
    part_windows: int = PART_WINDOWS  # Parquet: windows in a part (checkpoint interval)

    @property
    def rejected_path(self) -> Path:
        return self.output.with_name(self.output.name + ".rejected.jsonl")

    @property
    def checkpoint_path(self) -> Path:
        return checkpoint_path(self.output)

    @property
    def output_format(self) -> str:
        return format_for(self.output, self.out_format)

    def identity(self) -> dict[str, Any]:
        """What decides the output's bytes besides the input and engine: a resume must match."""
        return {"format": self.output_format, "input_format": self.fmt,
                "chunk_items": self.chunk_items, "chunk_bytes": self.chunk_bytes,
                "max_batch": self.batch.max_batch, "token_budget": self.batch.token_budget,
                "limits": asdict(self.limits), "dedupe_window": self.dedupe_window,
                "shard": str(self.shard) if self.shard else None,
                "part_windows": self.part_windows}


class LatencyHistogram:
    """Engine-call milliseconds in log-spaced bins (1% wide, 1 us to 1000 s): percentiles
    within 1% in a fixed 18 KB, however many calls."""

    BINS = np.logspace(-3, 6, 2085)

    def __init__(self, counts: list[int] | None = None) -> None:
        self.counts = np.zeros(len(self.BINS) + 1, dtype=np.int64)
        if counts:
            self.counts[:len(counts)] = counts

    def add(self, ms: list[float]) -> None:
        if ms:
            np.add.at(self.counts, np.searchsorted(self.BINS, ms), 1)

    def percentile(self, q: float) -> float:
        total = int(self.counts.sum())
        if not total:
            return 0.0
        i = int(np.searchsorted(np.cumsum(self.counts), q / 100 * total))
        return float(self.BINS[min(i, len(self.BINS) - 1)])

    def __len__(self) -> int:
        return int(self.counts.sum())

    def state(self) -> list[int]:
        nonzero = np.flatnonzero(self.counts)
        return self.counts[: nonzero[-1] + 1].tolist() if len(nonzero) else []


@dataclass(slots=True)
class RescoreSummary:
    items: int = 0
    rejected: int = 0
    blank: int = 0
    sequences: int = 0
    truncated_sequences: int = 0
    truncated_items: int = 0
    batches: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    seconds: float = 0.0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram, repr=False)
    output: str = ""
    rejected_path: str = ""
    model_id: str = ""
    model_version: str = ""
    resumed_at: int = 0  # the checkpoint's line this run continued from (0: a fresh run)

    COUNTERS = ("items", "rejected", "blank", "sequences", "truncated_sequences",
                "truncated_items", "batches", "padded_tokens", "real_tokens", "seconds")

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def batch_percentile(self, q: float) -> float:
        return self.latency.percentile(q)

    def state(self) -> dict[str, Any]:
        """The counters a checkpoint keeps, so a resumed run's summary is the whole run's."""
        return {**{k: getattr(self, k) for k in self.COUNTERS}, "latency": self.latency.state()}

    def restore(self, state: dict[str, Any]) -> None:
        for k in self.COUNTERS:
            setattr(self, k, type(getattr(self, k))(state.get(k, 0)))
        self.latency = LatencyHistogram(state.get("latency"))

    def as_dict(self) -> dict[str, object]:
        return {
            "items": self.items, "rejected": self.rejected, "blank": self.blank,
            "sequences": self.sequences,
            "truncated_sequences": self.truncated_sequences,
            "truncated_items": self.truncated_items, "batches": self.batches,
            "padding_overhead": round(self.padded_tokens / self.real_tokens - 1, 4)
            if self.real_tokens else 0.0,
            "seconds": round(self.seconds, 3), "items_per_s": round(self.items_per_s, 1),
            "p50_batch_ms": round(self.batch_percentile(50), 2),
            "p99_batch_ms": round(self.batch_percentile(99), 2),
            "model_id": self.model_id, "model_version": self.model_version,
            "output": self.output, "rejected_file": self.rejected_path,
            **({"resumed_at_line": self.resumed_at} if self.resumed_at else {}),
        }


@dataclass(slots=True)
class Window:
    """Consecutive lines of one block: the good items to score, and what the rest were."""

    lines: list[int]  # the line number of each item
    items: list[QueryItem]
    last_line: int = 0  # the last line it covers, rejected, blank and other shards' included
    rejected: int = 0
    blank: int = 0
    rejected_end: int = 0  # the rejected file's length once this window's lines are in it
    input_sha256: str = ""  # of the input's bytes through last_line
    token_batch: TokenBatch | None = None

    @property
    def owned(self) -> bool:
        """Whether it has lines of this run's own (not only other shards')."""
        return bool(self.items or self.rejected or self.blank)


def _reject(record: LogRecord, rej: IO[bytes]) -> None:
    rej.write(orjson.dumps({
        "line": record.line, "reason": record.error,
        "raw": record.raw.decode("utf-8", errors="replace").rstrip("\r\n"),
    }) + b"\n")


def skip_done(records: Iterator[LogRecord], digest: Any, done: int,
              expected_sha256: str) -> Iterator[LogRecord]:
    """`records` after line `done`, once the input's bytes through it hash to the checkpoint's
    (ResumeRefused otherwise, or if the input ends before it)."""
    if done:
        for record in records:
            if record.line < done:
                continue
            if record.line > done or digest.copy().hexdigest() != expected_sha256:
                raise ResumeRefused(
                    f"the input changed: its first {done:,} lines are not the ones the "
                    "checkpoint was made on; resume with the same input, or start again with "
                    "--restart")
            break
        else:
            raise ResumeRefused(f"the input changed: it ends before line {done:,}, where the "
                                "checkpoint is; start again with --restart")
    yield from records


def windows(records: Iterator[LogRecord], settings: RescoreSettings, rej: IO[bytes],
            digest: Any) -> Iterator[Window]:
    """Windows of the lines this run owns: each within one block of `chunk_items` lines (by
    line number), closed early once its good lines reach `chunk_bytes` (at least one item).
    Rejected lines go straight to `rej`. `records` must include blank lines, so that every
    block end is seen as it is read (and `digest` is then exactly the input through it)."""
    window = Window([], [])
    n_bytes = 0
    for record in records:
        window.last_line = record.line
        block = (record.line - 1) // settings.chunk_items
        if settings.shard is None or settings.shard.owns(block):
            if record.blank:
                window.blank += 1
            elif record.item is None:
                window.rejected += 1
                _reject(record, rej)
            else:
                window.lines.append(record.line)
                window.items.append(record.item)
                n_bytes += len(record.raw)
        if record.line % settings.chunk_items == 0 or n_bytes >= settings.chunk_bytes:
            window.rejected_end = rej.tell()
            window.input_sha256 = digest.copy().hexdigest()
            yield window
            window = Window([], [])
            n_bytes = 0
    if window.last_line:
        window.rejected_end = rej.tell()
        window.input_sha256 = digest.copy().hexdigest()
        yield window


def _tokenize(tokenizer: QueryTokenizer, window: Window, number: int) -> Window:
    if window.items:
        window.token_batch = tokenizer.token_batch(f"rescore-{number}", window.items,
                                                   submitted_at=time.time(),
                                                   priority="offline")
    return window


def shard_record_path(output: Path) -> Path:
    return output.with_name(output.name + ".shard.json")


class _Run:
    """One run's files and checkpoints: fresh, or resumed from a checkpoint."""

    def __init__(self, settings: RescoreSettings, engine: Engine) -> None:
        manifest = engine.manifest
        self.settings = settings
        self.summary = RescoreSummary(output=str(settings.output),
                                      rejected_path=str(settings.rejected_path),
                                      model_id=manifest.model_id,
                                      model_version=manifest.version)
        self.output_dim = int(getattr(manifest, "output_dim", 0) or 0)
        self.input_size = os.stat(settings.input).st_size
        self.ckpt_path = settings.checkpoint_path
        self.checkpoint = self._checkpoint()
        self.lines_done = self.checkpoint.lines_done if self.checkpoint else 0
        self.elapsed = self.checkpoint.summary.get("seconds", 0.0) if self.checkpoint else 0.0

    def _found(self) -> Checkpoint | None:
        """The checkpoint to resume from: None for a fresh run (`restart` discards one);
        ResumeRefused for one left without `resume`."""
        s = self.settings
        found = read_checkpoint(self.ckpt_path) if not s.restart else None
        if s.restart:
            self.ckpt_path.unlink(missing_ok=True)
        if found is None:
            if s.resume:
                log.warning("rescore.no_checkpoint", output=str(s.output),
                            note="nothing to resume: starting at line 1")
            return None
        if not s.resume:
            raise ResumeRefused(
                f"{s.output} has a checkpoint at line {found.lines_done:,} from an interrupted "
                f"run ({self.ckpt_path}); continue it with --resume, or start again with "
                "--restart")
        return found

    def _checkpoint(self) -> Checkpoint | None:
        s = self.settings
        if (found := self._found()) is None:
            return None
        if found.fleet:
            raise ResumeRefused(f"{self.ckpt_path} is the checkpoint of a --fleet run: resume "
                                "it with --fleet, or start again with --restart")
        check_resumable(found, input_path=s.input, input_size=self.input_size,
                        model_id=self.summary.model_id,
                        model_version=self.summary.model_version, settings=s.identity())
        self.summary.restore(found.summary)
        self.summary.resumed_at = found.lines_done
        return found

    def open(self) -> tuple[Output, IO[bytes]]:
        s, c = self.settings, self.checkpoint
        s.output.parent.mkdir(parents=True, exist_ok=True)
        # A finished shard's record from an earlier run would vouch for this unfinished one.
        shard_record_path(s.output).unlink(missing_ok=True)
        state = None if c is None else {"output_bytes": c.output_bytes, "parts": c.parts}
        output = open_output(s.output, s.output_format, output_dim=self.output_dim,
                             state=state, part_windows=s.part_windows)
        try:
            rej = durable_append(partial_of(s.rejected_path),
                                 None if c is None else c.rejected_bytes)
        except BaseException:
            output.close()
            raise
        return output, rej

    def commit(self, window: Window, output: Output, rej: IO[bytes], started: float) -> None:
        state = output.commit()
        if state is None:
            return  # not a point to checkpoint at (a Parquet part is still open)
        fsync(rej)
        self.summary.seconds = self.elapsed + time.perf_counter() - started
        write_checkpoint(self.ckpt_path, Checkpoint(
            input=str(self.settings.input), input_size=self.input_size,
            input_sha256=window.input_sha256, lines_done=window.last_line,
            model_id=self.summary.model_id, model_version=self.summary.model_version,
            settings=self.settings.identity(), output_bytes=state.get("output_bytes", 0),
            parts=state.get("parts", 0), rejected_bytes=window.rejected_end,
            summary=self.summary.state()))
        self.lines_done = window.last_line

    def finish(self, last: Window | None, output: Output, rej: IO[bytes]) -> None:
        """Seal everything, checkpoint it as finished, then rename into place: a crash in
        between is completed by the next --resume (`complete`)."""
        state = output.seal()
        rejected_bytes = fsync(rej)
        rej.close()
        if last is not None:
            self.lines_done = last.last_line
        self.checkpoint = Checkpoint(
            input=str(self.settings.input), input_size=self.input_size,
            input_sha256=last.input_sha256 if last else (
                self.checkpoint.input_sha256 if self.checkpoint else ""),
            lines_done=self.lines_done, model_id=self.summary.model_id,
            model_version=self.summary.model_version, settings=self.settings.identity(),
            output_bytes=state.get("output_bytes", 0), parts=state.get("parts", 0),
            rejected_bytes=rejected_bytes,
            summary=self.summary.state(), finished=True)
        write_checkpoint(self.ckpt_path, self.checkpoint)
        self.complete(output)

    def complete(self, output: Output | None = None) -> None:
        """The renames of a finished run (idempotent): the output, the rejected lines, and a
        shard's record; then the checkpoint goes."""
        s, c = self.settings, self.checkpoint
        assert c is not None and c.finished
        if output is None and (partial_of(s.output).exists() or
                               s.output.with_name(s.output.name + ".parts").exists()):
            output = open_output(s.output, s.output_format, output_dim=self.output_dim,
                                 state={"output_bytes": c.output_bytes, "parts": c.parts},
                                 part_windows=s.part_windows)
            output.seal()
        if output is not None:
            output.finish()
        discard_merged_parts(s.output)
        if partial_of(s.rejected_path).exists():
            os.replace(partial_of(s.rejected_path), s.rejected_path)
        if s.shard is not None:
            self._write_shard_record(c)
        self.ckpt_path.unlink(missing_ok=True)

    def _write_shard_record(self, c: Checkpoint) -> None:
        s, summary = self.settings, self.summary
        record = {"input": str(s.input), "input_size": c.input_size,
                  "input_sha256": c.input_sha256, "lines": c.lines_done,
                  "shard": str(s.shard), "chunk_items": s.chunk_items,
                  "format": s.output_format, "model_id": c.model_id,
                  "model_version": c.model_version, "items": summary.items,
                  "rejected": summary.rejected, "blank": summary.blank}
        path = shard_record_path(s.output)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2))
        os.replace(tmp, path)


def rescore(settings: RescoreSettings, engine: Engine, tokenizer: QueryTokenizer,
            on_progress: OnProgress | None = None) -> RescoreSummary:
    """Score every good line of settings.input into settings.output (input order), resuming
    from its checkpoint with `settings.resume`. Raises Interrupted on Ctrl-C (SIGINT; the CLI
    turns SIGTERM into one too) once the last finished window is checkpointed, ResumeRefused
    when a checkpoint does not fit the run."""
    run = _Run(settings, engine)
    summary = run.summary
    if run.checkpoint is not None and run.checkpoint.finished:
        try:
            run.complete()  # killed while renaming into place: only that was left
        except KeyboardInterrupt:
            raise Interrupted(_checkpointed(run), run.ckpt_path) from None
        return summary
    started = time.perf_counter()
    digest = hashlib.sha256()
    records = iter_query_log(settings.input, settings.limits, fmt=settings.fmt,  # type: ignore[arg-type]
                             dedupe_window=settings.dedupe_window, blank=True, digest=digest)
    if run.checkpoint is not None:
        records = skip_done(records, digest, run.lines_done, run.checkpoint.input_sha256)
        if on_progress is not None:
            on_progress(run.lines_done)
    output, rej = run.open()
    prev_line = run.lines_done
    last: Window | None = None
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="qscore-tokenize") as pool:
            pending: Future[Window] | None = None
            for number, window in enumerate(windows(records, settings, rej, digest)):
                ready = pool.submit(_tokenize, tokenizer, window, number)
                if pending is not None:
                    last = pending.result()
                    prev_line = _finish(last, engine, settings, summary, output, prev_line,
                                        on_progress)
                    if last.owned:
                        run.commit(last, output, rej, started)
                pending = ready
            if pending is not None:
                last = pending.result()
                _finish(last, engine, settings, summary, output, prev_line, on_progress)
    except KeyboardInterrupt:
        output.close()
        rej.close()
        raise Interrupted(_checkpointed(run), run.ckpt_path) from None
    except BaseException:
        output.close()
        rej.close()
        raise
    summary.seconds = run.elapsed + time.perf_counter() - started
    # Readers never see a half-written output: it appears whole, or the old one stays.
    try:
        run.finish(last, output, rej)
    except KeyboardInterrupt:  # sealing, or merging Parquet parts: minutes for a big output
        output.close()
        rej.close()
        raise Interrupted(_checkpointed(run), run.ckpt_path) from None
    log.info("rescore.finished", input=str(settings.input), **summary.as_dict())
    return summary


def _checkpointed(run: _Run) -> int:
    """The lines the checkpoint on disk holds (all of them once it is the finished one)."""
    found = read_checkpoint(run.ckpt_path)
    return found.lines_done if found else 0


def window_rows(window: Window, items: list[Any], model_id: str,
                truncated_by_item: np.ndarray | None) -> Rows:
    """A window's output rows from its ItemScores (in the window's order)."""
    return Rows(
        ids=[score.id for score in items], lines=list(window.lines),
        scores=[list(score.scores) for score in items],
        embeddings=[score.embedding for score in items],
        truncated=[bool(truncated_by_item[i]) if truncated_by_item is not None else False
                   for i in range(len(items))],
        versions=[score.model_version for score in items], model_id=model_id)


def _finish(window: Window, engine: Engine, settings: RescoreSettings,
            summary: RescoreSummary, output: Output, prev_line: int,
            on_progress: OnProgress | None) -> int:
    tb = window.token_batch
    truncated_by_item: np.ndarray | None = None
    span = window.last_line - prev_line
    reported = done = 0
    items: list[Any] = []
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
        items = list(result.items)
        summary.latency.add(result.batch_ms)
        summary.batches += len(result.batch_ms)
        summary.padded_tokens += result.padded_tokens
        summary.real_tokens += result.real_tokens
        summary.sequences += tb.n_sequences
        summary.truncated_sequences += int(tb.truncated.sum())
        truncated_by_item = np.bincount(tb.seq_item[tb.truncated],
                                        minlength=len(tb.item_ids))
        summary.truncated_items += int(np.count_nonzero(truncated_by_item))
    if items:
        output.write(window_rows(window, items, summary.model_id, truncated_by_item))
    summary.items += len(items)
    summary.rejected += window.rejected
    summary.blank += window.blank
    if on_progress is not None and span > reported:
        on_progress(span - reported)
    return window.last_line
