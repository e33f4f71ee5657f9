"""The `qscore` command line. Every option is a flag that can also come from QSCORE_* env."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from engines.errors import EngineError
from qscore.config import DEFAULT_CHUNK_ITEMS, EngineSettings, RescoreSettings
from qscore.logs import configure_logging
from qscore.settings import DEFAULT_ENGINE_DIR, EngineArtifact, EngineDir, EngineModel, LogLevel
from schemas import Limits
from workers.scoring import BatchLimits

app = typer.Typer(help="qscore: score search queries with quantized BERT-class engines.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
engine_app = typer.Typer(help="Build and check engine artifacts.", no_args_is_help=True)
app.add_typer(engine_app, name="engine")
err = Console(stderr=True)

_DEFAULT = Limits()
_BATCH = BatchLimits()

Head = Annotated[str | None, typer.Option(
    envvar="QSCORE_HEAD", help="similarity | classifier (default: from the model's config).")]
MaxLength = Annotated[int | None, typer.Option(
    envvar="QSCORE_MAX_LENGTH", min=2, help="Max tokens per sequence; longer ones are "
    "truncated and counted (default: the model's).")]
Threads = Annotated[int | None, typer.Option(
    envvar="QSCORE_THREADS", min=1, help="Engine threads (default: all cores).")]


def _engine_settings(model: str, engine_dir: Path, artifact: Path | None, head: str | None,
                     max_length: int | None, threads: int | None,
                     rebuild: bool = False) -> EngineSettings:
    if head not in (None, "similarity", "classifier"):
        raise typer.BadParameter(f"--head must be similarity or classifier, not {head!r}")
    return EngineSettings(model=model, engine_dir=engine_dir, artifact=artifact,
                          head=head, max_length=max_length,  # type: ignore[arg-type]
                          threads=threads, rebuild=rebuild)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(2)


@app.command()
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
    threads: Threads = None,
    fmt: Annotated[str, typer.Option("--format", envvar="QSCORE_FORMAT",
                                     help="auto | jsonl | tsv")] = "auto",
    batch_size: Annotated[int, typer.Option(envvar="QSCORE_BATCH_SIZE", min=1, help=(
        "Max sequences per engine call."))] = _BATCH.max_batch,
    token_budget: Annotated[int, typer.Option(envvar="QSCORE_TOKEN_BUDGET", min=1, help=(
        "Max padded tokens (count x longest) per engine call."))] = _BATCH.token_budget,
    chunk_items: Annotated[int, typer.Option(envvar="QSCORE_CHUNK_ITEMS", min=1, help=(
        "Items tokenized and length-sorted together."))] = DEFAULT_CHUNK_ITEMS,
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
    from qscore.engine import open_engine
    from qscore.querylog import count_lines
    from qscore.rescore import rescore as run_rescore

    configure_logging(log_level)
    limits = Limits(max_query_chars=max_query_chars, max_doc_chars=max_doc_chars,
                    max_docs_per_item=max_docs, max_message_bytes=max_line_bytes)
    settings = RescoreSettings(
        input=input, output=output,
        engine=_engine_settings(model, engine_dir, artifact, head, max_length, threads),
        batch=BatchLimits(max_batch=batch_size, token_budget=token_budget),
        limits=limits, chunk_items=chunk_items, fmt=fmt, progress=progress)
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
        _fail(exc)
    _print_summary(summary.as_dict())


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.finished_time or task.elapsed
        if not elapsed or not task.completed:
            return Text("-- lines/s", style="cyan")
        return Text(f"{task.completed / elapsed:,.0f} lines/s", style="cyan")


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TaskProgressColumn(),
        _RateColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err, disable=not enabled, transient=False,
    )


def _print_summary(summary: dict[str, object]) -> None:
    table = Table(title="rescore summary", show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    err.print(table)
    # Machine-readable too, for scripts: one JSON line on stdout.
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")


@engine_app.command("build")
def engine_build(
    model: EngineModel = "default",
    engine_dir: EngineDir = DEFAULT_ENGINE_DIR,
    head: Head = None,
    max_length: MaxLength = None,
    rebuild: Annotated[bool, typer.Option(help="Build even if an intact one is cached.")]
    = False,
    log_level: LogLevel = "warning",
) -> None:
    """Export, optimise and check an engine; print its artifact directory."""
    from qscore.engine import open_engine

    configure_logging(log_level)
    try:
        with err.status("building the engine") as status:
            engine, _ = open_engine(
                _engine_settings(model, engine_dir, None, head, max_length, None, rebuild),
                progress=status.update)
    except (EngineError, OSError, ValueError) as exc:
        _fail(exc)
    m = engine.manifest
    err.print(f"engine {m.model_id} {m.version} ({m.backend} {m.precision}, {m.head} head, "
              f"max_length {m.max_length}) accuracy vs PyTorch: {m.accuracy}")
    print(engine.path)


@engine_app.command("verify")
def engine_verify(
    artifact: Annotated[Path, typer.Argument(help="Engine artifact directory.")],
    smoke: Annotated[bool, typer.Option(help="Also load it and run one inference.")] = True,
) -> None:
    """Check an artifact's manifest and every file's checksum (exit 2 on any problem)."""
    from engines.loader import load_engine
    from engines.manifest import verify_artifact

    try:
        manifest = verify_artifact(artifact)
        if smoke:
            load_engine(artifact, verify=False).health()
    except (EngineError, OSError) as exc:
        _fail(exc)
    err.print(f"[green]ok[/] {manifest.model_id} {manifest.version}: "
              f"{len(manifest.files)} files verified" + (", inference ok" if smoke else ""))


@app.command()
def version() -> None:
    """Print the qscore version."""
    from importlib.metadata import version as dist_version

    print(dist_version("qscore"))


from qscore.cli_kafka import register  # noqa: E402  (fleet client commands: publish, consume, topics)

register(app)

from qscore.cli_worker import register as _register_worker  # noqa: E402

_register_worker(app)

from qscore.cli_fleet import register as _register_fleet  # noqa: E402

_register_fleet(app)
