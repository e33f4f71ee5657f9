"""`qscore rescore`: score a query log in process, on one machine, with no broker; or, with
--fleet, on a running fleet (qscore.offline.fleet), into the same output."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import orjson
import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from engines.errors import EngineError
from plumbing.kafka import KafkaSettings, Topics
from plumbing.logs import configure_logging
from qscore.cli.options import (
    DEFAULT_ENGINE_DIR,
    Backend,
    Device,
    EngineArtifact,
    EngineDir,
    EngineModel,
    Graphs,
    Head,
    LogLevel,
    MaxLength,
    Precision,
    Threads,
    device_list,
    engine_settings,
)
from qscore.cli.output import RateColumn, err, fail, print_summary
from qscore.offline.querylog import DEFAULT_DEDUPE_WINDOW
from qscore.offline.rescore import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CHUNK_ITEMS,
    OnProgress,
    RescoreSettings,
    RescoreSummary,
)
from schemas import Limits
from workers.scoring import BatchLimits

if TYPE_CHECKING:
    from qscore.offline.fleet import FleetOptions

_DEFAULT = Limits()
_BATCH = BatchLimits()
_FLEET = "Fleet (--fleet)"


def rescore(
    kafka: KafkaSettings,
    topics: Topics,
    input: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help=(
        "Query log: JSONL {id, query, docs?} or TSV id<TAB>query[<TAB>doc...]; .gz is read "
        "transparently."))],
    output: Annotated[Path, typer.Option("--output", "-o", help=(
        "Scores in input order (JSONL, or Parquet for --format parquet or a .parquet name). "
        "Bad lines go to OUTPUT.rejected.jsonl; a checkpoint beside it while the run goes."))],
    model: EngineModel = "default",
    engine_dir: EngineDir = DEFAULT_ENGINE_DIR,
    artifact: EngineArtifact = None,
    head: Head = None,
    max_length: MaxLength = None,
    precision: Precision = None,
    backend: Backend = None,
    device: Device = None,
    streams: Annotated[int | None, typer.Option(
        "--streams", envvar="QSCORE_STREAMS", min=1, max=8, help="torch backend: CUDA streams "
        "per engine (rescore drives one).")] = None,
    graphs: Graphs = True,
    threads: Threads = None,
    out_format: Annotated[str | None, typer.Option("--format", envvar="QSCORE_FORMAT", help=(
        "Output format: jsonl or parquet (default: parquet for a .parquet output, else "
        "jsonl)."))] = None,
    fmt: Annotated[str, typer.Option("--input-format", envvar="QSCORE_INPUT_FORMAT",
                                     help="The input's format: auto | jsonl | tsv")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help=(
        "Continue an interrupted run from its checkpoint (OUTPUT.checkpoint.json). Refused "
        "if the input, the engine version or the settings differ."))] = False,
    restart: Annotated[bool, typer.Option("--restart", help=(
        "Discard an interrupted run's checkpoint and start again."))] = False,
    shard: Annotated[str | None, typer.Option("--shard", envvar="QSCORE_SHARD", help=(
        "I/N: score only blocks b (of --chunk-items lines) with b % N = I - 1, so N machines "
        "split one log with no coordination; join the outputs with `qscore merge`."))]
    = None,
    dedupe_window: Annotated[int, typer.Option(envvar="QSCORE_DEDUPE_WINDOW", min=1, help=(
        "A line whose id is on one of this many previous good lines is rejected as a "
        "duplicate (memory: ~100 B an id; farther duplicates are scored)."))]
    = DEFAULT_DEDUPE_WINDOW,
    batch_size: Annotated[int, typer.Option(envvar="QSCORE_BATCH_SIZE", min=1, help=(
        "Max sequences per engine call."))] = _BATCH.max_batch,
    token_budget: Annotated[int, typer.Option(envvar="QSCORE_TOKEN_BUDGET", min=1, help=(
        "Max padded tokens (count x longest) per engine call."))] = _BATCH.token_budget,
    chunk_items: Annotated[int, typer.Option(envvar="QSCORE_CHUNK_ITEMS", min=1, help=(
        "Lines in a block: items tokenized and length-sorted together at most, and the unit "
        "--shard splits by."))] = DEFAULT_CHUNK_ITEMS,
    chunk_bytes: Annotated[int, typer.Option(envvar="QSCORE_CHUNK_BYTES", min=1, help=(
        "Input bytes tokenized together, at most: a window closes at --chunk-items or "
        "this, whichever comes first (bounds memory)."))]
    = DEFAULT_CHUNK_BYTES,
    max_query_chars: Annotated[int, typer.Option(envvar="QSCORE_MAX_QUERY_CHARS", min=1)]
    = _DEFAULT.max_query_chars,
    max_doc_chars: Annotated[int, typer.Option(envvar="QSCORE_MAX_DOC_CHARS", min=1)]
    = _DEFAULT.max_doc_chars,
    max_docs: Annotated[int, typer.Option(envvar="QSCORE_MAX_DOCS", min=1, help=(
        "Max docs per item."))] = _DEFAULT.max_docs_per_item,
    max_line_bytes: Annotated[int, typer.Option(envvar="QSCORE_MAX_LINE_BYTES", min=1)]
    = _DEFAULT.max_message_bytes,
    progress: Annotated[bool, typer.Option(envvar="QSCORE_PROGRESS", help=(
        "Show a progress bar (on a terminal)."))] = True,
    log_level: LogLevel = "warning",
    fleet: Annotated[bool, typer.Option("--fleet", envvar="QSCORE_RESCORE_FLEET",
                                        rich_help_panel=_FLEET, help=(
        "Score on a running fleet (the Kafka options say where) instead of in process: the "
        "log goes to its offline topic, so online traffic keeps priority, and every GPU host "
        "of the fleet takes part. Same output, rejected file, checkpoint and --resume; the "
        "engine options are the fleet's own and ignored here."))] = False,
    reply_topic: Annotated[str | None, typer.Option(
        envvar="QSCORE_REPLY_TOPIC", rich_help_panel=_FLEET, help=(
            "Where the fleet writes the scores (must match its --reply-topics). Default: "
            "PREFIX.scores.rescore-RUN, made for the run and deleted once it has finished. "
            "A resumed run reads the whole topic: prefer the default for big logs."))] = None,
    max_in_flight_windows: Annotated[int, typer.Option(
        envvar="QSCORE_MAX_IN_FLIGHT_WINDOWS", min=1, rich_help_panel=_FLEET, help=(
            "Windows published and not yet written, at most: bounds memory, and sets the "
            "throughput (in flight / the fleet's latency); raise it for a large fleet."))] = 16,
    window_timeout_s: Annotated[float, typer.Option(
        envvar="QSCORE_WINDOW_TIMEOUT_S", min=0.001, rich_help_panel=_FLEET, help=(
            "The run fails, checkpointed, when the oldest window is not fully answered this "
            "long after it was published (or the previous one written)."))] = 600.0,
    fleet_batch_items: Annotated[int, typer.Option(
        envvar="QSCORE_FLEET_BATCH_ITEMS", min=1, max=_DEFAULT.max_items,
        rich_help_panel=_FLEET, help="Items per QueryBatch, at most.")] = 256,
    allow_version_change: Annotated[bool, typer.Option(
        "--allow-version-change", envvar="QSCORE_ALLOW_VERSION_CHANGE", rich_help_panel=_FLEET,
        help=("Go on when the fleet's model version changes mid-run or since the "
              "checkpoint (each row carries its version); by default the run stops."))]
    = False,
    keep_reply_topic: Annotated[bool, typer.Option(
        "--keep-reply-topic", envvar="QSCORE_KEEP_REPLY_TOPIC", rich_help_panel=_FLEET,
        help="Keep the run's own reply topic once it has finished.")] = False,
    reply_replication: Annotated[int, typer.Option(
        envvar="QSCORE_REPLY_REPLICATION", min=1, rich_help_panel=_FLEET, help=(
            "Copies of each partition of the run's own reply topic (3 for production)."))]
    = 1,
) -> None:
    """Score a query log in process (no broker needed), or on a running fleet (--fleet), and
    print a summary.

    Resumable: the output grows window by window with a checkpoint beside it; after any
    interruption (Ctrl-C, SIGTERM, SIGKILL, a crash) the same command with --resume continues,
    and the output is what one uninterrupted run writes. With --fleet, the engine counters of
    the summary (sequences, batches, padding, batch latencies) are 0 and `truncated` is never
    set: the fleet does not report them."""
    from engines.select import open_engine
    from qscore.offline.checkpoint import ResumeRefused
    from qscore.offline.outputs import format_for
    from qscore.offline.querylog import count_lines
    from qscore.offline.rescore import Interrupted, Shard
    from qscore.offline.rescore import rescore as run_rescore

    configure_logging(log_level)
    if resume and restart:
        raise typer.BadParameter("--resume and --restart exclude each other")
    try:
        format_for(output, out_format)
        parsed_shard = Shard.parse(shard) if shard else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    limits = Limits(max_query_chars=max_query_chars, max_doc_chars=max_doc_chars,
                    max_docs_per_item=max_docs, max_message_bytes=max_line_bytes)
    settings = RescoreSettings(
        input=input, output=output,
        engine=engine_settings(model, engine_dir, artifact, head, max_length, threads,
                                precision=precision, backend=backend,
                                devices=device_list(device), lanes=streams, graphs=graphs),
        batch=BatchLimits(max_batch=batch_size, token_budget=token_budget),
        limits=limits, chunk_items=chunk_items, chunk_bytes=chunk_bytes, fmt=fmt,
        progress=progress, out_format=out_format, resume=resume, restart=restart,
        shard=parsed_shard, dedupe_window=dedupe_window)
    if fmt not in ("auto", "jsonl", "tsv"):
        raise typer.BadParameter(f"--input-format must be auto, jsonl or tsv, not {fmt!r}")
    if fleet:
        from qscore.offline.fleet import FleetOptions

        options = FleetOptions(
            reply_topic=reply_topic, max_in_flight_windows=max_in_flight_windows,
            window_timeout_s=window_timeout_s, batch_items=fleet_batch_items,
            allow_version_change=allow_version_change, keep_reply_topic=keep_reply_topic,
            reply_replication=reply_replication)
        _print_summary(_rescore_on_fleet(settings, kafka, topics, options).as_dict())
        return
    try:
        with err.status("preparing the engine") as status:
            engine, tokenizer = open_engine(settings.engine, progress=status.update)
        total = count_lines(input)
        with _progress_bar(enabled=progress) as bar, sigterm_interrupts():
            task = bar.add_task("scoring", total=total)
            summary = run_rescore(settings, engine, tokenizer,
                                  on_progress=lambda n: bar.advance(task, n))
            bar.update(task, completed=total)
    except Interrupted as exc:
        err.print(f"{exc}\nresume with the same command and --resume:\n  "
                  + " ".join(_resume_command()), soft_wrap=True)
        raise typer.Exit(130) from None
    except ResumeRefused as exc:
        fail(exc)
    except (EngineError, OSError, ValueError) as exc:
        fail(exc)
    _print_summary(summary.as_dict())


def _rescore_on_fleet(settings: RescoreSettings, kafka: KafkaSettings, topics: Topics,
                      options: FleetOptions) -> RescoreSummary:
    """`rescore --fleet`: Ctrl-C and SIGTERM stop it with the checkpoint in place."""
    from aiokafka.errors import KafkaError

    from plumbing import aio
    from qscore.offline.checkpoint import ResumeRefused, read_checkpoint
    from qscore.offline.fleet import FleetError, rescore_via_fleet
    from qscore.offline.querylog import count_lines
    from qscore.offline.rescore import Interrupted

    async def main(advance: OnProgress) -> RescoreSummary:
        loop, me = asyncio.get_running_loop(), asyncio.current_task()
        assert me is not None
        stopped: list[int] = []

        def stop(sig: signal.Signals) -> None:
            stopped.append(sig)
            me.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        try:
            return await rescore_via_fleet(settings, kafka, topics, options,
                                           on_progress=advance)
        except asyncio.CancelledError:
            if not stopped:
                raise
            found = read_checkpoint(settings.checkpoint_path)
            raise Interrupted(found.lines_done if found else 0,
                              settings.checkpoint_path) from None
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        total = count_lines(settings.input)
        with _progress_bar(enabled=settings.progress) as bar:
            task = bar.add_task("scoring on the fleet", total=total)
            summary = aio.run(main(lambda n: bar.advance(task, n)))
            bar.update(task, completed=total)
    except Interrupted as exc:
        err.print(f"{exc}\nresume with the same command and --resume:\n  "
                  + " ".join(_resume_command()), soft_wrap=True)
        raise typer.Exit(130) from None
    except (ResumeRefused, FleetError) as exc:
        fail(exc)
    except KafkaError as exc:
        fail(f"rescore --fleet: {exc!r}. Check --bootstrap-servers, --topic-prefix and the "
             "security options; the checkpoint (if any) is in place for --resume.")
    except (OSError, ValueError) as exc:
        fail(exc)
    return summary


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job) stops the run as Ctrl-C does: at a checkpoint."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resume_command() -> list[str]:
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--restart")]
    return [shlex.quote(a) for a in ["qscore", *args, "--resume"]]


def merge(
    shards: Annotated[list[Path], typer.Argument(dir_okay=False, help=(
        "The outputs of every `qscore rescore --shard I/N` run of one log."))],
    output: Annotated[Path, typer.Option("--output", "-o", help=(
        "The joined output (and OUTPUT.rejected.jsonl): what one unsharded run writes."))],
    log_level: LogLevel = "warning",
) -> None:
    """Join shard outputs in input order, checking no line is missing or doubled."""
    from qscore.offline.merge import MergeError
    from qscore.offline.merge import merge as run_merge

    configure_logging(log_level)
    try:
        summary = run_merge(shards, output)
    except (MergeError, OSError, ValueError) as exc:
        fail(exc)
    _print_summary(summary.as_dict(), title="merge summary")


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TaskProgressColumn(), RateColumn("lines"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err, disable=not enabled, transient=False,
    )


def _print_summary(summary: dict[str, object], title: str = "rescore summary") -> None:
    print_summary(title, summary)
    # Machine-readable too, for scripts: one JSON line on stdout.
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
