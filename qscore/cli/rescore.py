"""`qscore rescore`: score a query log in process, on one machine, with no broker."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

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
from qscore.offline.rescore import DEFAULT_CHUNK_BYTES, DEFAULT_CHUNK_ITEMS, RescoreSettings
from schemas import Limits
from workers.scoring import BatchLimits

_DEFAULT = Limits()
_BATCH = BatchLimits()


def rescore(
    input: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help=(
        "Query log: JSONL {id, query, docs?} or TSV id<TAB>query[<TAB>doc...]; .gz is read "
        "transparently."))],
    output: Annotated[Path, typer.Option("--output", "-o", help=(
        "Scores as JSONL, in input order. Bad lines go to OUTPUT.rejected.jsonl."))],
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
    fmt: Annotated[str, typer.Option("--format", envvar="QSCORE_FORMAT",
                                     help="auto | jsonl | tsv")] = "auto",
    batch_size: Annotated[int, typer.Option(envvar="QSCORE_BATCH_SIZE", min=1, help=(
        "Max sequences per engine call."))] = _BATCH.max_batch,
    token_budget: Annotated[int, typer.Option(envvar="QSCORE_TOKEN_BUDGET", min=1, help=(
        "Max padded tokens (count x longest) per engine call."))] = _BATCH.token_budget,
    chunk_items: Annotated[int, typer.Option(envvar="QSCORE_CHUNK_ITEMS", min=1, help=(
        "Items tokenized and length-sorted together."))] = DEFAULT_CHUNK_ITEMS,
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
) -> None:
    """Score a query log in process (no broker needed) and print a summary."""
    from engines.select import open_engine
    from qscore.offline.querylog import count_lines
    from qscore.offline.rescore import rescore as run_rescore

    configure_logging(log_level)
    limits = Limits(max_query_chars=max_query_chars, max_doc_chars=max_doc_chars,
                    max_docs_per_item=max_docs, max_message_bytes=max_line_bytes)
    settings = RescoreSettings(
        input=input, output=output,
        engine=engine_settings(model, engine_dir, artifact, head, max_length, threads,
                                precision=precision, backend=backend,
                                devices=device_list(device), lanes=streams, graphs=graphs),
        batch=BatchLimits(max_batch=batch_size, token_budget=token_budget),
        limits=limits, chunk_items=chunk_items, chunk_bytes=chunk_bytes, fmt=fmt,
        progress=progress)
    if fmt not in ("auto", "jsonl", "tsv"):
        raise typer.BadParameter(f"--format must be auto, jsonl or tsv, not {fmt!r}")
    try:
        with err.status("preparing the engine") as status:
            engine, tokenizer = open_engine(settings.engine, progress=status.update)
        total = count_lines(input)
        with _progress_bar(enabled=progress) as bar:
            task = bar.add_task("scoring", total=total)
            summary = run_rescore(settings, engine, tokenizer,
                                  on_progress=lambda n: bar.advance(task, n))
            bar.update(task, completed=total)
    except (EngineError, OSError, ValueError) as exc:
        fail(exc)
    _print_summary(summary.as_dict())


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TaskProgressColumn(), RateColumn("lines"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err, disable=not enabled, transient=False,
    )


def _print_summary(summary: dict[str, object]) -> None:
    print_summary("rescore summary", summary)
    # Machine-readable too, for scripts: one JSON line on stdout.
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
