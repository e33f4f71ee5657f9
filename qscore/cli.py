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
from engines.quantize import QuantSpec
from engines.registry import EngineRegistry
from qscore.config import DEFAULT_CHUNK_ITEMS, EngineSettings, RescoreSettings
from qscore.logs import configure_logging
from qscore.settings import (
    DEFAULT_ENGINE_DIR,
    Backend,
    Calibration,
    CalibrationMethodOpt,
    Device,
    EngineArtifact,
    EngineDir,
    EngineModel,
    Graphs,
    LogLevel,
    MaxDrop,
    Precision,
    QuantLevel,
)
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
Smoke = Annotated[bool, typer.Option(help="Also load the engine and run one inference.")]
Threads = Annotated[int | None, typer.Option(
    envvar="QSCORE_THREADS", min=1, help="Engine threads (default: all cores).")]


def _engine_settings(model: str, engine_dir: Path, artifact: Path | None, head: str | None,
                     max_length: int | None, threads: int | None,
                     rebuild: bool = False, precision: str | None = None,
                     quant: QuantSpec | None = None, backend: str | None = None,
                     devices: tuple[str, ...] = (), lanes: int | None = None,
                     graphs: bool = True) -> EngineSettings:
    if head not in (None, "similarity", "classifier"):
        raise typer.BadParameter(f"--head must be similarity or classifier, not {head!r}")
    if backend not in (None, "onnxruntime", "torch", "tensorrt"):
        raise typer.BadParameter(f"--backend must be onnxruntime, torch or tensorrt, not "
                                 f"{backend!r}")
    allowed = {"torch": ("fp32", "fp16", "int8", "fp8"), "tensorrt": ("fp16", "int8")}.get(
        backend or "", ("fp32", "int8"))
    if precision not in (None, *allowed):
        raise typer.BadParameter(f"--precision must be one of {', '.join(allowed)} for the "
                                 f"{backend or 'onnxruntime'} backend, not {precision!r}")
    for device in devices:
        if device != "cpu" and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise typer.BadParameter(f"device {device!r}: use cuda:N or cpu")
    return EngineSettings(model=model, engine_dir=engine_dir, artifact=artifact,
                          head=head, max_length=max_length,  # type: ignore[arg-type]
                          threads=threads, rebuild=rebuild, precision=precision,
                          quant=quant or QuantSpec(), backend=backend, devices=devices,
                          lanes=lanes, graphs=graphs)


def device_list(text: str | None) -> tuple[str, ...]:
    """'cuda:0, cuda:1' -> ('cuda:0', 'cuda:1'); a bare index N means cuda:N."""
    if not text:
        return ()
    return tuple(f"cuda:{d}" if d.isdigit() else d
                 for d in (part.strip() for part in text.split(",")) if d)


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
        engine=_engine_settings(model, engine_dir, artifact, head, max_length, threads,
                                precision=precision, backend=backend,
                                devices=device_list(device), lanes=streams, graphs=graphs),
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
    precision: Precision = None,
    backend: Backend = None,
    device: Annotated[str | None, typer.Option(
        "--device", envvar="QSCORE_DEVICE", help="torch backend: where the accuracy check "
        "runs (default: cuda:0 if visible, else the CPU emulates FP16/INT8/FP8).")] = None,
    level: QuantLevel = "auto",
    max_drop: MaxDrop = 0.005,
    calibration: Calibration = None,
    calibration_method: CalibrationMethodOpt = "dynamic",
    log_level: LogLevel = "warning",
) -> None:
    """Export, optimise and check an engine; print its artifact directory.

    The first version of a model is promoted to current; later ones wait for `promote`."""
    from engines.build import ensure_engine
    from engines.loader import load_engine
    from engines.registry import EngineRegistry
    from engines.source import resolve_model

    configure_logging(log_level)
    try:
        quant = QuantSpec(level=level, max_drop=max_drop, method=calibration_method,
                          calibration=calibration)
        settings = _engine_settings(model, engine_dir, None, head, max_length, None, rebuild,
                                    precision, quant, backend=backend,
                                    devices=device_list(device))
        # Straight to ensure_engine, not find_artifact: building must not stop at `current`.
        source = resolve_model(settings.model, head=settings.head,
                               max_length=settings.max_length)
        with err.status("building the engine") as status:
            path = ensure_engine(source, engine_dir, rebuild=rebuild, progress=status.update,
                                 precision=settings.default_precision(source.head),
                                 quant=quant, backend=settings.backend or "onnxruntime",
                                 device=device)
            engine = load_engine(path, threads=1, device=device, lanes=1, graphs=False)
        current = EngineRegistry(engine_dir).current(source.model_id)
    except (EngineError, OSError, ValueError) as exc:
        _fail(exc)
    m = engine.manifest
    err.print(f"engine {m.model_id} {m.version} ({m.backend} {m.precision}, {m.head} head, "
              f"max_length {m.max_length}) accuracy: {m.accuracy}", soft_wrap=True)
    if current != m.version:
        err.print(f"current is {current}; serve this one with: qscore engine promote "
                  f"{m.model_id} {m.version}")
    print(engine.path)


@engine_app.command("verify")
def engine_verify(
    artifact: Annotated[Path, typer.Argument(help="Engine artifact directory.")],
    smoke: Smoke = True,
) -> None:
    """Check an artifact's manifest and every file's checksum (exit 2 on any problem)."""
    from engines.registry import EngineRegistry

    try:
        manifest = EngineRegistry.verify(artifact, smoke=smoke)
    except (EngineError, OSError) as exc:
        _fail(exc)
    err.print(f"[green]ok[/] {manifest.model_id} {manifest.version}: "
              f"{len(manifest.files)} files verified" + (", inference ok" if smoke else ""))


# -- the registry: versions under --engine-dir, and which one each model serves -------------

ModelId = Annotated[str, typer.Argument(
    help="Model id as in the manifest, e.g. sentence-transformers/all-MiniLM-L6-v2 "
    "('default' for that one).", show_default=False)]
Version = Annotated[str, typer.Argument(help="Version (short content hash).",
                                        show_default=False)]


def _registry(engine_dir: Path) -> EngineRegistry:
    return EngineRegistry(engine_dir)


def _model_id(model_id: str) -> str:
    from engines.source import DEFAULT_MODEL, DEFAULT_MODEL_ID

    return DEFAULT_MODEL_ID if model_id == DEFAULT_MODEL else model_id


@engine_app.command("list")
def engine_list(
    model_id: Annotated[str | None, typer.Argument(
        help="Only this model's versions.", show_default=False)] = None,
    engine_dir: EngineDir = DEFAULT_ENGINE_DIR,
    json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
) -> None:
    """List engine versions, oldest first per model; `*` marks each model's current one."""
    entries = _registry(engine_dir).list(_model_id(model_id) if model_id else None)
    if json:
        for entry in entries:
            sys.stdout.write(orjson.dumps(entry.as_dict()).decode() + "\n")
        return
    table = Table("", "model", "version", "head", "backend", "precision", "max len",
                  "memory MB", "problem", title=f"engines in {engine_dir}")
    for e in entries:
        m = e.manifest
        table.add_row("*" if e.current else "", e.model_id, e.version,
                      *((m.head, m.backend, m.precision, str(m.max_length),
                         f"{m.memory_bytes / 1e6:,.0f}" if m.memory_bytes else "?", "")
                        if m else ("", "", "", "", "", e.problem or "")))
    Console(width=160).print(table)


@engine_app.command("show")
def engine_show(
    model_id: ModelId,
    version: Annotated[str | None, typer.Argument(
        help="Version (default: the current one).", show_default=False)] = None,
    engine_dir: EngineDir = DEFAULT_ENGINE_DIR,
) -> None:
    """Print a version's manifest as JSON (default: the model's current version)."""
    try:
        manifest = _registry(engine_dir).show(_model_id(model_id), version)
    except EngineError as exc:
        _fail(exc)
    sys.stdout.write(manifest.to_json().decode() + "\n")


@engine_app.command("promote")
def engine_promote(
    model_id: ModelId,
    version: Version,
    engine_dir: EngineDir = DEFAULT_ENGINE_DIR,
    smoke: Smoke = True,
) -> None:
    """Make VERSION the model's current engine, once it verifies (atomic for readers)."""
    try:
        path = _registry(engine_dir).promote(_model_id(model_id), version, smoke=smoke)
    except (EngineError, OSError) as exc:
        _fail(exc)
    err.print(f"[green]promoted[/] {_model_id(model_id)} {version}")
    print(path)


@engine_app.command("remove")
def engine_remove(
    model_id: ModelId,
    version: Version,
    engine_dir: EngineDir = DEFAULT_ENGINE_DIR,
    force: Annotated[bool, typer.Option(
        "--force", help="Remove it even if it is current (the model is left unpromoted).")]
    = False,
) -> None:
    """Delete a version (not the current one, unless --force)."""
    try:
        _registry(engine_dir).remove(_model_id(model_id), version, force=force)
    except (EngineError, OSError) as exc:
        _fail(exc)
    err.print(f"removed {_model_id(model_id)} {version}")


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
