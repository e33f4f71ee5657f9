"""Fleet status: what the running services report (heartbeats, plumbing.status) and
`qscore status`, which prints the live ones.

The samples read a service from the outside, through what it already exposes (its stats, its
pipelines, its batcher, its engine pools, its reloader's stats), and reset nothing: the rates
in a heartbeat come from differences of running totals (plumbing.status)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import orjson
import typer
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.table import Table

from plumbing.kafka import KafkaSettings, Topics
from plumbing.logs import configure_logging
from plumbing.status import (
    DEFAULT_PER_PARTITION,
    MIN_STALE_S,
    FleetStatus,
    Heartbeat,
    Kind,
    RunningTotal,
    Sample,
    StatusPublisher,
    read_status,
)
from qscore.cli.options import LogLevel, ServiceOptions
from qscore.cli.output import err, fail

if TYPE_CHECKING:
    from tokenizer_svc.service import TokenizerService
    from workers.service import ScoringWorker


def status_publisher(kind: Kind, name: str, sample: Callable[[], Sample], kafka: KafkaSettings,
                     topics: Topics, options: ServiceOptions) -> StatusPublisher | None:
    """The heartbeats of a service (None: turned off with --status-interval-s 0)."""
    if not options.status_interval_s:
        return None
    return StatusPublisher(kafka, topics.status, kind=kind, name=name, sample=sample,
                           interval_s=options.status_interval_s)


def worker_sample(worker: ScoringWorker) -> Callable[[], Sample]:
    busy = RunningTotal()  # engine call seconds of every generation's pool, across swaps

    def sample() -> Sample:
        m, pipelines = worker.manifest, (worker.online, worker.offline)
        reload = worker.reloader.stats if worker.reloader is not None else None
        return Sample(
            model_id=m.model_id, serving=m.version,
            pending=reload.pending if reload else None,
            reload_state=reload.state if reload else "pinned",
            last_refusal=reload.last_reason if reload else None,
            arrived=worker.batcher.submitted, queue_depth=worker.batcher.depth(),
            busy_s=busy({generation: sum(s.busy_s for s in pool.slot_stats)
                         for generation, pool in worker.pools.items()}),
            slots=worker.pool.size,
            in_flight=sum(p.tracker.in_flight() for p in pipelines), items=worker.stats.items,
            dead_letters=sum(p.stats.dead_letters for p in pipelines))

    return sample


def tokenizer_sample(tokenizer: TokenizerService) -> Callable[[], Sample]:
    def sample() -> Sample:
        m, stats = tokenizer.manifest, tokenizer.stats
        return Sample(
            model_id=m.model_id, serving=m.version,
            reload_state="serving" if tokenizer.follow is not None else "pinned",
            last_refusal=tokenizer.follow_stats.last_refusal or None,
            arrived=stats.items, in_flight=tokenizer.pipeline.tracker.in_flight(),
            items=stats.items, dead_letters=stats.dead_letters)

    return sample


# -- qscore status --------------------------------------------------------------------------

def status(
    kafka: KafkaSettings,
    topics: Topics,
    json: Annotated[bool, typer.Option("--json", help=(
        "One JSON object a line per live service (the heartbeat, its instance id and age_s) "
        "instead of the table."))] = False,
    stale_s: Annotated[float | None, typer.Option(
        "--stale-s", envvar="QSCORE_STATUS_STALE_S", min=0.1, show_default=False, help=(
            "Leave out services whose last heartbeat is older than this (default: 3 of the "
            f"service's heartbeat intervals, at least {MIN_STALE_S:g} s)."))] = None,
    per_partition: Annotated[int, typer.Option(
        "--records-per-partition", envvar="QSCORE_STATUS_RECORDS", min=1, help=(
            "Heartbeats read back from the end of each partition of PREFIX.status: at least "
            "(services x staleness / interval) for a broker that does not compact it."))]
    = DEFAULT_PER_PARTITION,
    timeout_s: Annotated[float, typer.Option(
        "--timeout-s", envvar="QSCORE_STATUS_TIMEOUT_S", min=0.1, help=(
            "Give up reading the status topic after this long."))] = 15.0,
    log_level: LogLevel = "warning",
) -> None:
    """Print every live service of the fleet (from their heartbeats on PREFIX.status): model,
    serving and pending versions, reload state, arrivals/s, queue depth, engine busy %."""
    from plumbing import aio

    configure_logging(log_level)
    try:
        view = aio.run(read_status(kafka, topics.status, stale_s=stale_s,
                                   per_partition=per_partition, timeout_s=timeout_s))
    except TimeoutError:
        fail(f"reading {topics.status} took over {timeout_s:g} s; check --bootstrap-servers "
             "and the security options")
    except KafkaError as exc:
        fail(f"reading {topics.status} failed: {exc!r}. Check --bootstrap-servers and the "
             "security options.")
    now = time.time()
    if json:
        for beat in view.services:
            line = beat.to_obj() | {"instance": beat.instance, "age_s": round(beat.age_s(now), 3)}
            sys.stdout.write(orjson.dumps(line).decode() + "\n")
    elif view.services:
        Console(width=200).print(_table(view.services, now, topics.status))
    _report(view, topics.status)


def _table(services: tuple[Heartbeat, ...], now: float, topic: str) -> Table:
    table = Table("kind", "name", "host", "pid", "model", "serving", "pending", "reload",
                  "in/s", "queue", "busy %", "in flight", "items", "dead", "age s",
                  title=f"live services on {topic}")
    for b in services:
        reload = b.reload_state + (f" (refused: {b.last_refusal})" if b.last_refusal else "")
        table.add_row(
            b.kind, b.name, b.host, str(b.pid), b.model_id, b.serving, b.pending or "",
            reload, f"{b.arrival_per_s:,.1f}", "" if b.queue_depth is None else str(b.queue_depth),
            "" if b.busy is None else f"{b.busy * 100:.0f}", str(b.in_flight),
            f"{b.items:,}", str(b.dead_letters), f"{b.age_s(now):.1f}")
    return table


def _report(view: FleetStatus, topic: str) -> None:
    """What the table does not say, on stderr."""
    if not view.topic_found:
        err.print(f"no live service: {topic} does not exist (no service has published a "
                  "heartbeat; `qscore topics create` or `qscore up` creates it)",
                  soft_wrap=True, highlight=False)
        return
    if not view.services:
        err.print(f"no live service on {topic}", highlight=False)
    notes = [f"{n} {what}" for n, what in ((view.stopped, "stopped cleanly"),
                                           (view.stale, "stale (no heartbeat lately)"),
                                           (view.malformed, "malformed records skipped"))
             if n]
    if notes:
        err.print(f"{len(view.services)} live; " + ", ".join(notes), highlight=False)
