"""Offline re-scoring by a running fleet: the log published to its offline topic, the scores
collected into the same output files as the embedded path, in input order, resumable the
same way (`qscore rescore --fleet`).

- Same reading, same windows: the input is read and checked as the embedded path reads it
  (qscore.offline.rescore.windows: blocks, windows, shards, rejected lines), and the output,
  rejected file and checkpoint are the embedded path's. Malformed lines are rejected here,
  before anything is published.
- Out: each window's items as QueryBatches of priority "offline" (the fleet's low-priority
  topic: online traffic keeps priority), ids and parts as qscore.offline.windowbatches says.
  At most `max_in_flight_windows` windows are published and not yet written: that bounds
  memory, and is what keeps a large fleet busy (in flight / fleet latency = throughput).
- Back: the fleet writes the scores to a reply topic: by default one of the run's own,
  PREFIX.scores.rescore-<run id> (inside the fleet's default allow-list; created here, and
  deleted once the run has finished), else `reply_topic`. It is read from its beginning (an
  explicit topic on a fresh run: from its end), so a resumed run picks up the scores the fleet
  published while it was away. The oldest window is written once every item is answered.
- Versions: a one-item probe (online priority: it takes a moment, not a place in the offline
  queue) asks the fleet what it serves first: model id, version and output width (the Parquet
  schema). Every score must carry that version: a hot reload in the middle of a run fails it
  (FleetVersionChanged) before a mixed window is written, unless `allow_version_change` (each
  row carries its own version anyway). A resume is refused (ResumeRefused) when the fleet now
  serves another version than the checkpoint's, with the same flag to go on.
- Checkpoint: the embedded one (lines written, output and rejected lengths, input digest,
  counters) plus `fleet`: the run id, reply topic, output width, and `acked_line`, the last
  line through which every window was acknowledged by the broker (rewritten as acks come).
  A resume re-reads the input from the checkpoint; windows through `acked_line` are not
  published again (their batches are in the offline topic, their scores come or came to the
  reply topic: `picked_up_windows`), later ones are (the same ids: duplicates are harmless).
- Never hangs: an item answered with an `error` goes to the rejected file with the fleet's
  reason, in line order; a batch of this run on the dead-letter topic fails the run at once
  with the fleet's reason (FleetDeadLetter); the oldest window not answered within
  `window_timeout_s` (from its publication, or from the previous window's writing if later)
  fails it naming the missing batches (FleetTimeout). The checkpoint stays: --resume goes on.
  Cancelling the task stops at once, with the last checkpoint in place.
- Not the same as the embedded path: `truncated` is never set (a ScoreBatch does not say),
  and the engine counters (sequences, batches, padding, batch latencies) are 0; scores of a
  dynamically quantized engine depend on the batch the fleet formed (use an FP32 engine for
  output equal to the embedded path's).

Here: the attempt (probe, publish, wait, write, in order). The files and checkpoints are
qscore.offline.fleetrun's, the routing of what comes back qscore.offline.replies's, batch ids,
parts and rows qscore.offline.windowbatches's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import IO, Any, TypeVar

import structlog
from aiokafka.admin import AIOKafkaAdminClient

from plumbing.kafka import KafkaSettings, Topics, client_kwargs, ensure_topics, make_consumer
from qscore.client import QueryProducer, ScoreConsumer
from qscore.offline.checkpoint import ResumeRefused
from qscore.offline.fleetrun import FleetRun, FleetSummary, fleet_identity
from qscore.offline.outputs import Output
from qscore.offline.querylog import iter_query_log
from qscore.offline.replies import (
    FleetDeadLetter,
    FleetError,
    FleetTimeout,
    FleetVersionChanged,
    Replies,
)
from qscore.offline.rescore import OnProgress, RescoreSettings, Window, skip_done, windows
from qscore.offline.windowbatches import (
    EMBEDDING_FORMAT,
    WindowAnswers,
    batch_prefix,
    copy_rejects,
    envelope_bytes,
    plan_parts,
    sendable,
)
from schemas import QueryItem

__all__ = ["FleetDeadLetter", "FleetError", "FleetOptions", "FleetSummary", "FleetTimeout",
           "FleetVersionChanged", "rescore_via_fleet"]

log = structlog.get_logger(__name__)
T = TypeVar("T")

PROBE_QUERY = "qscore rescore probe"


@dataclass(frozen=True, slots=True)
class FleetOptions:
    reply_topic: str | None = None  # None: PREFIX.scores.rescore-<run id>, made for the run
    max_in_flight_windows: int = 16
    window_timeout_s: float = 600.0
    batch_items: int = 256  # items per QueryBatch at most
    allow_version_change: bool = False
    keep_reply_topic: bool = False  # keep the run's own reply topic once it has finished
    reply_partitions: int = 4
    reply_replication: int = 1
    watch_dead_letters: bool = True

    def __post_init__(self) -> None:
        if self.max_in_flight_windows < 1 or self.batch_items < 1:
            raise ValueError("max_in_flight_windows and batch_items must be >= 1")
        if self.window_timeout_s <= 0:
            raise ValueError("window_timeout_s must be > 0")


async def rescore_via_fleet(settings: RescoreSettings, kafka: KafkaSettings, topics: Topics,
                            options: FleetOptions | None = None, *,
                            on_progress: OnProgress | None = None) -> FleetSummary:
    """Score every good line of settings.input on the fleet behind `kafka`/`topics` into
    settings.output, as `rescore` does in process (module docstring). Raises FleetError
    subclasses, ResumeRefused, KafkaError; a cancellation leaves the checkpoint in place."""
    options = options or FleetOptions()
    run = FleetRun(settings, fleet_identity(settings, options.batch_items))
    if run.checkpoint is not None and run.checkpoint.finished:
        run.complete()  # killed while renaming into place: only that was left
        return run.summary
    job = _FleetJob(run, kafka, topics, options, on_progress)
    try:
        summary = await job.run()
    except Exception:
        if job.created_topic and run.durable is None:
            await _delete_topic(kafka, job.reply_topic)  # nothing published: no run to resume
        raise
    if job.created_topic and not options.keep_reply_topic:
        await _delete_topic(kafka, job.reply_topic)
    return summary


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a thread; a cancellation waits for it to end (it writes files that
    the cancelled run then closes), then goes on."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise


class _FleetJob:
    """One attempt: publish, collect, write, in order."""

    def __init__(self, run: FleetRun, kafka: KafkaSettings, topics: Topics,
                 options: FleetOptions, on_progress: OnProgress | None) -> None:
        self.files = run
        self.settings = run.settings
        self.kafka = kafka
        self.topics = topics
        self.options = options
        self.on_progress = on_progress
        self.summary = run.summary
        fleet = run.fleet
        if run.checkpoint is not None:
            stored = fleet["reply_topic"]
            if options.reply_topic is not None and options.reply_topic != stored:
                raise ResumeRefused(
                    f"the run's scores go to {stored!r}, not {options.reply_topic!r}: resume "
                    "without --reply-topic (or with that one), or start again with --restart")
        else:
            fleet["run_id"] = uuid.uuid4().hex[:16]
            fleet["reply_topic"] = (options.reply_topic or
                                    f"{topics.scores}.rescore-{fleet['run_id']}")
            fleet["created_reply_topic"] = options.reply_topic is None
            fleet["acked_line"] = 0
        self.reply_topic: str = fleet["reply_topic"]
        self.created_topic: bool = bool(fleet["created_reply_topic"])
        self.summary.reply_topic = self.reply_topic
        self.prefix = batch_prefix(fleet["run_id"])
        self.envelope = envelope_bytes(self.prefix, self.reply_topic)
        self.resume_acked = int(fleet.get("acked_line", 0)) if run.checkpoint else 0
        self.replies = Replies(self.prefix, self.reply_topic,
                               registered_through=run.lines_done,
                               allow_version_change=options.allow_version_change)
        self.started = time.perf_counter()

    # -- the attempt --------------------------------------------------------------------------
    async def run(self) -> FleetSummary:
        if self.created_topic:
            await ensure_topics(self.kafka, [self.reply_topic],
                                partitions=self.options.reply_partitions,
                                replication=self.options.reply_replication)
        from_beginning = self.created_topic or self.files.checkpoint is not None
        reply = replace(self.topics, scores=self.reply_topic)
        tasks: list[asyncio.Task[None]] = []
        dead = None
        try:
            async with QueryProducer(self.kafka, self.topics, limits=self.settings.limits
                                     ) as producer, \
                    ScoreConsumer(self.kafka, reply, from_beginning=from_beginning,
                                  limits=self.settings.limits) as consumer:
                if self.options.watch_dead_letters:
                    dead = await self.dead_letter_consumer()
                    tasks.append(asyncio.create_task(
                        self.replies.watch_dead_letters(dead, self.settings.limits)))
                tasks.append(asyncio.create_task(self.replies.collect(consumer)))
                await self.ask_probe(producer)
                return await self.score(producer)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if dead is not None:
                await dead.stop()

    async def dead_letter_consumer(self) -> Any:
        consumer = make_consumer(self.kafka, self.topics.dead_letter, group_id=None,
                                 auto_offset_reset="latest")
        try:
            await consumer.start()
            for tp in consumer.assignment():
                await consumer.position(tp)  # pinned now: only this attempt's era counts
        except BaseException:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise
        return consumer

    async def ask_probe(self, producer: QueryProducer) -> None:
        """What the fleet serves: model id, version and output width, before anything is
        published (a resume is refused here if it changed)."""
        loop, replies = asyncio.get_running_loop(), self.replies
        replies.probe_id = f"{self.prefix}probe-{uuid.uuid4().hex[:8]}"
        timeout_s = self.options.window_timeout_s
        ack = await producer.send([QueryItem("probe", PROBE_QUERY)], batch_id=replies.probe_id,
                                  priority="online", reply_topic=self.reply_topic,
                                  embedding_format=EMBEDDING_FORMAT)  # type: ignore[arg-type]
        await ack
        await replies.until(lambda: replies.probe is not None, loop.time() + timeout_s,
                            lambda: FleetTimeout(
                                f"the fleet did not answer a one-item probe on "
                                f"{self.reply_topic} within {timeout_s:g}s: is a fleet "
                                f"(tokenizer and worker) serving {self.topics.queries}? "
                                "See `qscore status`", {replies.probe_id: 1}))
        probe = replies.probe
        assert probe is not None
        if not probe.items or probe.items[0].error is not None:
            raise FleetError(f"the fleet could not score a probe: "
                             f"{probe.items[0].error if probe.items else 'no answer'}")
        item = probe.items[0]
        model_id, version = probe.model_id, item.model_version
        dim = len(item.embedding) if item.embedding is not None else 1
        run, summary = self.files, self.summary
        if run.checkpoint is not None:
            if model_id != run.checkpoint.model_id or (
                    version != run.checkpoint.model_version
                    and not self.options.allow_version_change):
                raise ResumeRefused(
                    f"the fleet now serves {model_id} {version}; the checkpoint's lines were "
                    f"scored with {run.checkpoint.model_id} {run.checkpoint.model_version}. "
                    "Resume once the fleet serves that version again, resume with "
                    "--allow-version-change (rows carry their version), or start again with "
                    "--restart")
            if dim != run.output_dim:
                raise ResumeRefused(f"the fleet's model gives {dim} outputs an item, the "
                                    f"checkpoint's {run.output_dim}; start again with --restart")
        else:
            summary.model_id, summary.model_version = model_id, version
            run.output_dim = run.fleet["output_dim"] = dim
        replies.model = (model_id, version)
        log.info("rescore.fleet_serves", model_id=model_id, version=version, output_dim=dim,
                 reply_topic=self.reply_topic)

    async def score(self, producer: QueryProducer) -> FleetSummary:
        run, settings, summary = self.files, self.settings, self.summary
        loop = asyncio.get_running_loop()
        digest = hashlib.sha256()
        records = iter_query_log(settings.input, settings.limits,
                                 fmt=settings.fmt,  # type: ignore[arg-type]
                                 dedupe_window=settings.dedupe_window, blank=True,
                                 digest=digest)
        if run.checkpoint is not None:
            records = skip_done(records, digest, run.lines_done, run.checkpoint.input_sha256)
            if self.on_progress is not None:
                self.on_progress(run.lines_done)
        records = sendable(records, settings.limits, self.envelope)
        spool_path = settings.rejected_path.with_name(settings.rejected_path.name + ".spool")
        output, rej = run.open()
        try:  # the read-ahead's rejected lines, until their window is written (copy_rejects)
            spool = spool_path.open("wb")
            spool_reader = spool_path.open("rb")
        except BaseException:
            output.close()
            rej.close()
            raise
        source = windows(records, settings, spool, digest)

        def read() -> Window | None:
            window = next(source, None)
            spool.flush()  # its rejected lines readable by spool_reader
            return window

        in_flight: deque[WindowAnswers] = deque()
        prev_line = run.lines_done
        next_first, spool_pos = run.lines_done + 1, 0
        last: Window | None = None
        exhausted = False
        written_at = loop.time()
        try:
            run.start()
            while True:
                while not exhausted and len(in_flight) < self.options.max_in_flight_windows:
                    window = await _in_thread(read)
                    if window is None:
                        exhausted = True
                        break
                    pending = WindowAnswers.of(window, next_first, spool_pos)
                    next_first, spool_pos = window.last_line + 1, window.rejected_end
                    await self.publish(producer, pending)
                    in_flight.append(pending)
                if not in_flight:
                    break
                head = in_flight[0]
                await self.wait(head, max(head.since, written_at))
                await _in_thread(self.write, head, output, rej, spool_reader)
                in_flight.popleft()
                written_at = loop.time()
                last = head.window
                if self.on_progress is not None and last.last_line > prev_line:
                    self.on_progress(last.last_line - prev_line)
                prev_line = last.last_line
                await self.note_acks(in_flight)
        except BaseException:
            output.close()
            rej.close()
            raise
        finally:
            spool.close()
            spool_reader.close()
            spool_path.unlink(missing_ok=True)
            for pending in in_flight:  # acks no one will look at
                for ack in pending.acks:
                    ack.cancel()  # type: ignore[attr-defined]
        summary.seconds = run.elapsed + time.perf_counter() - self.started
        await _in_thread(run.finish, last, output, rej)
        log.info("rescore.finished", input=str(settings.input), **summary.as_dict())
        return summary

    async def publish(self, producer: QueryProducer, pending: WindowAnswers) -> None:
        """Register the window's batches (and answers that came before), then send them,
        unless they were acknowledged before a resume."""
        window = pending.window
        pending.since = asyncio.get_running_loop().time()
        if not window.items:
            return
        parts = plan_parts(window, batch_items=self.options.batch_items,
                           limits=self.settings.limits, envelope=self.envelope)
        for k, indices in enumerate(parts):
            pending.add_part(f"{self.prefix}{window.last_line}-{k}", indices)
        self.replies.register(pending)
        if window.last_line <= self.resume_acked:
            pending.picked_up = True
            self.summary.picked_up_windows += 1
            return
        for part in pending.parts:
            if not part.missing:
                continue
            items = [window.items[i] for i in sorted(part.index.values())]
            ack = await producer.send(items, batch_id=part.batch_id, priority="offline",
                                      reply_topic=self.reply_topic,
                                      embedding_format=EMBEDDING_FORMAT)  # type: ignore[arg-type]
            ack.add_done_callback(lambda f, p=pending, b=part.batch_id: self.acked(f, p, b))
            pending.acks.append(ack)
            self.summary.published_batches += 1

    def acked(self, ack: asyncio.Future[Any], pending: WindowAnswers, batch_id: str) -> None:
        """A publication that failed fails the run, unless its window is answered anyway."""
        if ack.cancelled() or (exc := ack.exception()) is None:
            return
        if not pending.complete:
            self.replies.fail(FleetError(f"publishing batch {batch_id!r} failed: {exc!r}"))

    async def wait(self, head: WindowAnswers, since: float) -> None:
        timeout_s = self.options.window_timeout_s

        def timed_out() -> FleetTimeout:
            missing = head.missing_batches()
            listed = ", ".join(f"{b} ({n})" for b, n in list(missing.items())[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            return FleetTimeout(
                f"lines {head.first_line:,}-{head.window.last_line:,}: {head.missing:,} of "
                f"{len(head.answers):,} items unanswered after {timeout_s:g}s, in batches "
                f"{listed}{more} (items missing in parentheses). The fleet may be down, busy "
                f"with online traffic, or have dead-lettered them ({self.topics.dead_letter}); "
                f"lines 1-{self.files.lines_done:,} are written and checkpointed: continue "
                "with --resume (acknowledged batches are not published again), or allow more "
                "time with --window-timeout-s", missing)

        await self.replies.until(lambda: head.complete, since + timeout_s, timed_out)

    def write(self, pending: WindowAnswers, output: Output, rej: IO[bytes],
              spool_reader: IO[bytes]) -> None:
        """In a thread: the window's rows and rejected lines, then a checkpoint if due."""
        window, summary = pending.window, self.summary
        errors = pending.errors()
        copy_rejects(spool_reader, pending.spool_start, window.rejected_end, errors, rej)
        rows = pending.rows(self.replies.model[0])
        if len(rows):
            output.write(rows)
        summary.items += len(rows)
        summary.cached_items += pending.cached
        summary.rejected += window.rejected + len(errors)
        summary.blank += window.blank
        if window.owned:
            self.files.commit(window, output, rej, self.started)

    async def note_acks(self, in_flight: deque[WindowAnswers]) -> None:
        """Move `acked_line` past the windows now acknowledged, in the checkpoint too."""
        acked = max(int(self.files.fleet.get("acked_line", 0)), self.files.lines_done)
        for pending in in_flight:
            if not pending.acked:
                break
            acked = pending.window.last_line
        if acked != self.files.fleet.get("acked_line"):
            self.files.fleet["acked_line"] = acked
            await _in_thread(self.files.write)


async def _delete_topic(kafka: KafkaSettings, topic: str) -> None:
    """Best effort: the run's own reply topic, once it has finished."""
    admin = AIOKafkaAdminClient(**client_kwargs(kafka))
    try:
        await admin.start()
        await admin.delete_topics([topic])
    except Exception as exc:
        log.warning("rescore.reply_topic_not_deleted", topic=topic, error=repr(exc))
    finally:
        await admin.close()
