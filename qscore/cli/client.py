"""Fleet client commands: `qscore publish`, `qscore consume`, `qscore topics create`.

stdout carries only machine-readable JSON lines; progress, reports and summaries go to stderr.
Every option is a flag and a QSCORE_* environment variable (the Kafka ones: qscore.cli.options).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO, TextIO

import orjson
import typer
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from plumbing import aio
from plumbing.kafka import KafkaSettings, Topics, ensure_topics
from plumbing.logs import configure_logging
from qscore.cli.options import LogLevel, kafka_command
from qscore.cli.output import err, fail, print_summary
from qscore.client import QueryProducer, ScoreConsumer, SentBatch
from qscore.offline.querylog import LogRecord, count_lines, iter_query_log
from schemas import DEFAULT_LIMITS, EMBEDDING_FORMATS, Limits, QueryItem, SchemaError

topics_app = typer.Typer(help="Manage the fleet's Kafka topics.", no_args_is_help=True)



class TokenBucket:
    """Rate limit in items/s with bursts up to `burst` items. `reserve(n, now)` takes n tokens
    and says how long to wait before using them; debt is allowed, so a request larger than the
    bucket waits its fair share instead of forever."""

    def __init__(self, rate: float, burst: float | None = None, *, now: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0 items/s, got {rate}")
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self._tokens = self.burst
        self._last = now

    def reserve(self, n: float, now: float) -> float:
        elapsed = max(0.0, now - self._last)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate) - n
        self._last = max(self._last, now)
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def acquire(self, n: float) -> None:
        if (delay := self.reserve(n, asyncio.get_running_loop().time())) > 0:
            await asyncio.sleep(delay)  # pacing, not synchronisation


def read_stdin_log(stream: BinaryIO, limits: Limits = DEFAULT_LIMITS) -> Iterator[LogRecord]:
    """JSONL query items from a stream, as iter_query_log reads files (same checks, same
    reasons), but streaming: a pipe cannot be sniffed or re-opened."""
    max_bytes, seen, lineno = limits.max_message_bytes, {}, 0
    while chunk := stream.readline(max_bytes + 2):
        lineno += 1
        if len(chunk) == max_bytes + 2 and not chunk.endswith(b"\n"):
            length = len(chunk)
            while chunk and not chunk.endswith(b"\n"):  # skip the rest, in bounded reads
                chunk = stream.readline(1 << 20)
                length += len(chunk)
            reason = f"line too long: over {max_bytes} bytes (max_message_bytes)"
            yield LogRecord(lineno, None, reason, b"")
            continue
        raw = chunk.rstrip(b"\r\n")
        if lineno == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        if not raw.strip():
            continue
        try:
            item = QueryItem.from_obj(orjson.loads(raw), limits, where="item")
        except orjson.JSONDecodeError as exc:
            yield LogRecord(lineno, None, f"invalid JSON: {exc}", raw)
            continue
        except SchemaError as exc:
            yield LogRecord(lineno, None, str(exc), raw)
            continue
        if (first := seen.setdefault(item.id, lineno)) != lineno:
            yield LogRecord(lineno, None, f"duplicate id {item.id!r}, first seen at line {first}",
                            raw)
            continue
        yield LogRecord(lineno, item, None, raw)


def _run(main: Any, what: str) -> Any:
    try:
        return aio.run(main)
    except KafkaError as exc:
        fail(f"{what}: {exc!r}. Check --bootstrap-servers and the security options; "
              "if a topic is missing, run `qscore topics create`.")
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


class _ItemRateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.finished_time or task.elapsed
        items = task.fields.get("items", 0)
        rate = f"{items / elapsed:,.0f}" if elapsed and items else "--"
        return Text(f"{items:,} items, {rate}/s", style="cyan")


def publish(
    kafka: KafkaSettings,
    topics: Topics,
    input: Annotated[str, typer.Argument(metavar="INPUT|-", help=(
        "Query log: JSONL {id, query, docs?} or TSV id<TAB>query[<TAB>doc...], .gz read "
        "transparently; '-' reads JSONL from stdin."))],
    batch_size: Annotated[int, typer.Option(envvar="QSCORE_PUBLISH_BATCH_SIZE", min=1,
                                            max=DEFAULT_LIMITS.max_items,
                                            help="Items per QueryBatch.")] = 20,
    rate: Annotated[float | None, typer.Option(envvar="QSCORE_PUBLISH_RATE", min=0.001, help=(
        "Max items per second (token bucket, bursts of one batch); default: as fast as the "
        "broker acknowledges."))] = None,
    priority: Annotated[str, typer.Option(envvar="QSCORE_PRIORITY", help=(
        "online (the query topic) or offline (the low-priority topic the fleet drains when "
        "idle)."))] = "online",
    batch_prefix: Annotated[str | None, typer.Option(envvar="QSCORE_BATCH_PREFIX", help=(
        "Batch ids are PREFIX-000000, PREFIX-000001, ...; default: a random prefix. Reuse a "
        "prefix to make a re-run's scores duplicates of the first run's."))] = None,
    fmt: Annotated[str, typer.Option("--format", envvar="QSCORE_FORMAT",
                                     help="auto | jsonl | tsv (files only)")] = "auto",
    embedding_format: Annotated[str | None, typer.Option(
        "--embedding-format", envvar="QSCORE_EMBEDDING_FORMAT", help=(
            "How the scores carry embeddings: float (JSON numbers), base64 (float32 bytes, a "
            "third of the size) or base64-f16; default: the fleet's."))] = None,
    progress: Annotated[bool, typer.Option(envvar="QSCORE_PROGRESS", help=(
        "Show a progress bar (on a terminal)."))] = True,
    log_level: LogLevel = "warning",
) -> None:
    """Publish a query log to the fleet as QueryBatches.

    stdout: one JSON line per acknowledged batch {batch_id, item_ids, topic, partition, offset}.

    Bad lines are reported on stderr with their line numbers, counted, and not sent.

    Exit status 1 if any batch could not be delivered.
    """
    configure_logging(log_level)
    if priority not in ("online", "offline"):
        raise typer.BadParameter(f"must be online or offline, not {priority!r}",
                                 param_hint="--priority")
    if fmt not in ("auto", "jsonl", "tsv"):
        raise typer.BadParameter(f"must be auto, jsonl or tsv, not {fmt!r}",
                                 param_hint="--format")
    if embedding_format is not None and embedding_format not in EMBEDDING_FORMATS:
        raise typer.BadParameter(f"must be one of {', '.join(EMBEDDING_FORMATS)}, not "
                                 f"{embedding_format!r}", param_hint="--embedding-format")
    if input == "-":
        records, total = read_stdin_log(sys.stdin.buffer), None
    else:
        path = Path(input)
        if not path.is_file():
            raise typer.BadParameter(f"{input} is not a file", param_hint="INPUT")
        records, total = iter_query_log(path, fmt=fmt), count_lines(path)  # type: ignore[arg-type]
    summary = _run(_publish(records, total, kafka, topics, batch_size=batch_size, rate=rate,
                            priority=priority, prefix=batch_prefix or uuid.uuid4().hex[:12],
                            progress=progress, out=sys.stdout,
                            embedding_format=embedding_format), "publishing failed")
    print_summary("publish summary", summary)
    if summary["failed_batches"]:
        raise typer.Exit(1)


async def _publish(records: Iterator[LogRecord], total: int | None, settings: KafkaSettings,
                   topics: Topics, *, batch_size: int, rate: float | None, priority: str,
                   prefix: str, progress: bool, out: TextIO,
                   embedding_format: str | None = None) -> dict[str, object]:
    counts = dict.fromkeys(("batches", "items", "rejected", "failed_batches", "failed_items"), 0)
    bucket = (TokenBucket(rate, max(rate, batch_size), now=asyncio.get_running_loop().time())
              if rate else None)
    pending: set[asyncio.Future[SentBatch]] = set()
    next_number = 0  # taken only by a batch that is sent: ids stay dense
    started = time.perf_counter()

    def reject(line: int, reason: str) -> None:
        counts["rejected"] += 1
        err.print(f"line {line}: {reason}", markup=False, highlight=False, soft_wrap=True)

    def acked(fut: asyncio.Future[SentBatch], n_items: int) -> None:
        pending.discard(fut)
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if exc is not None:
            counts["failed_batches"] += 1
            counts["failed_items"] += n_items
            err.print(f"batch not delivered: {exc!r}", markup=False, highlight=False)
            return
        sent = fut.result()
        counts["batches"] += 1
        counts["items"] += n_items
        bar.update(task, items=counts["items"])
        out.write(orjson.dumps({"batch_id": sent.batch_id, "item_ids": sent.item_ids,
                                "topic": sent.topic, "partition": sent.partition,
                                "offset": sent.offset}).decode() + "\n")

    async def send(lines: list[int], items: list[QueryItem]) -> None:
        nonlocal next_number
        batch_id = f"{prefix}-{next_number:06d}"
        try:
            fut = await producer.send(items, batch_id=batch_id, priority=priority,  # type: ignore[arg-type]
                                      embedding_format=embedding_format)  # type: ignore[arg-type]
        except SchemaError as exc:
            if len(items) == 1:  # the one item is too big for a message on its own
                reject(lines[0], f"cannot be sent: {exc}")
                return
            for line, item in zip(lines, items, strict=True):  # find the culprit(s)
                await send([line], [item])
            return
        next_number += 1
        pending.add(fut)
        fut.add_done_callback(lambda f: acked(f, len(items)))
        if bucket is not None:  # pace after sending: rejected items cost no tokens
            await bucket.acquire(len(items))

    bar = Progress(TextColumn("publishing"), BarColumn(), MofNCompleteColumn(),
                   _ItemRateColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), console=err, disable=not progress)
    with bar:
        task = bar.add_task("publishing", total=total, items=0)
        async with QueryProducer(settings, topics) as producer:
            lines: list[int] = []
            items: list[QueryItem] = []
            for record in records:
                if record.item is None:
                    reject(record.line, record.error or "rejected")
                    continue
                lines.append(record.line)
                items.append(record.item)
                if len(items) >= batch_size:
                    await send(lines, items)
                    bar.update(task, completed=record.line)
                    lines, items = [], []
            if items:
                await send(lines, items)
            if pending:
                await asyncio.wait(set(pending))
        bar.update(task, completed=total)
    elapsed = time.perf_counter() - started
    out.flush()
    return counts | {"seconds": round(elapsed, 3),
                     "items_per_s": round(counts["items"] / elapsed, 1) if elapsed else 0.0}


def consume(
    kafka: KafkaSettings,
    topics: Topics,
    output: Annotated[Path | None, typer.Option("--output", "-o", envvar="QSCORE_CONSUME_OUTPUT",
                                                dir_okay=False, help=(
        "Write score lines here (overwritten) instead of stdout."))] = None,
    batch_id: Annotated[list[str] | None, typer.Option("--batch-id", envvar="QSCORE_BATCH_IDS",
                                                       help=(
        "Only these batches (repeat the flag; the env var takes a space-separated list)."))]
    = None,
    max_batches: Annotated[int | None, typer.Option(envvar="QSCORE_MAX_BATCHES", min=1, help=(
        "Stop after this many score batches (after filtering)."))] = None,
    idle_timeout: Annotated[float | None, typer.Option(envvar="QSCORE_IDLE_TIMEOUT", min=0.0,
                                                       help=(
        "Stop when no score record arrived for this many seconds; default: run until Ctrl-C. "
        "The clock starts once the consumer has partitions (with --group-id: once the group "
        "assigned it some, so a slow join does not use it up) and every record received "
        "restarts it, including records --batch-id filters out, duplicates and undecodable "
        "ones."))] = None,
    from_beginning: Annotated[bool, typer.Option(
        "--from-beginning/--latest", envvar="QSCORE_FROM_BEGINNING", help=(
            "Start at the oldest scores on the topic, or only read new ones (with --group-id: "
            "only where the group has no committed offset)."))] = True,
    group_id: Annotated[str | None, typer.Option(envvar="QSCORE_GROUP_ID", help=(
        "Share partitions with this consumer group and commit progress at exit; default: "
        "read every partition, commit nothing."))] = None,
    log_level: LogLevel = "warning",
) -> None:
    """Read scores from the score topic as JSONL.

    One line per item: {batch_id, id, scores, cached, model_version, embedding?, error?}.

    Redelivered duplicates are dropped; undecodable messages are skipped with a warning.
    """
    configure_logging(log_level)
    clock = IdleClock(idle_timeout) if idle_timeout is not None else None
    consumer = ScoreConsumer(kafka, topics, group_id=group_id, from_beginning=from_beginning,
                             on_poll=clock.poll if clock is not None else None)
    opened = output.open("w") if output else contextlib.nullcontext(sys.stdout)
    with opened as out:
        summary = _run(_consume(consumer, out, wanted=set(batch_id or ()),
                                max_batches=max_batches, clock=clock),
                       "consuming failed")
    print_summary("consume summary", summary)


class IdleClock:
    """`consume --idle-timeout`'s clock over an asyncio.Timeout (`timeout`, once set): armed
    at the first poll that finds partitions assigned, restarted whenever the assignment
    changes and whenever a poll received records, whatever becomes of them. A ScoreConsumer
    reports its polls through `on_poll=clock.poll`."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.timeout: asyncio.Timeout | None = None
        self._assigned: frozenset[TopicPartition] = frozenset()

    def restart(self) -> None:
        if self.timeout is not None:
            self.timeout.reschedule(asyncio.get_running_loop().time() + self.idle_s)

    def poll(self, records: int, assigned: frozenset[TopicPartition]) -> None:
        if records or (assigned and assigned != self._assigned):
            self.restart()
        self._assigned = assigned


async def _consume(consumer: ScoreConsumer, out: TextIO, *, wanted: set[str],
                   max_batches: int | None, clock: IdleClock | None) -> dict[str, object]:
    batches = items = 0
    async with consumer:
        try:
            async with asyncio.timeout(None) as idle:  # armed by the clock, see --idle-timeout
                if clock is not None:
                    clock.timeout = idle
                async for batch in consumer:
                    if clock is not None:
                        clock.restart()  # a batch handed out is activity too
                    if wanted and batch.batch_id not in wanted:
                        continue
                    for item in batch.items:
                        line: dict[str, Any] = {
                            "batch_id": batch.batch_id, "id": item.id, "scores": item.scores,
                            "cached": item.cached, "model_version": item.model_version}
                        if item.embedding is not None:
                            line["embedding"] = item.embedding
                        if item.error is not None:
                            line["error"] = item.error
                        out.write(orjson.dumps(line).decode() + "\n")
                    out.flush()  # so that `tail -f` and pipes see whole batches at once
                    batches, items = batches + 1, items + len(batch.items)
                    if max_batches is not None and batches >= max_batches:
                        break
        except TimeoutError:
            pass  # idle: nothing more to read
        finally:
            if clock is not None:
                clock.timeout = None
        await consumer.commit()
    stats = consumer.stats
    return {"batches": batches, "items": items, "duplicates_dropped": stats.duplicates,
            "undecodable": stats.undecodable}


@topics_app.command("create")
@kafka_command
def topics_create(
    kafka: KafkaSettings,
    topics: Topics,
    partitions: Annotated[int, typer.Option(envvar="QSCORE_PARTITIONS", min=1, help=(
        "Partitions per topic: the most consumers of one group that get work."))] = 4,
    replication: Annotated[int, typer.Option(envvar="QSCORE_REPLICATION", min=1, help=(
        "Copies of each partition (at most the number of brokers; 3 for production)."))] = 1,
) -> None:
    """Create every qscore topic that does not exist yet (the status topic compacted).

    stdout: one JSON line {created: [...], existing: [...]}.
    """
    from plumbing.status import ensure_status_topic

    names = topics.all()

    async def create() -> list[str]:
        status = await ensure_status_topic(kafka, topics.status, replication=replication)
        rest = await ensure_topics(kafka, [n for n in names if n != topics.status],
                                   partitions=partitions, replication=replication)
        made = {*rest, *([topics.status] if status else [])}
        return [n for n in names if n in made]

    created = _run(create(), "creating topics failed")
    existing = [n for n in names if n not in created]
    for name in names:
        err.print(f"{'created' if name in created else 'exists '} {name}", highlight=False)
    print(orjson.dumps({"created": created, "existing": existing}).decode())
