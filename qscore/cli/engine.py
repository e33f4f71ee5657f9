"""`qscore engine ...`: build, verify and manage engine artifacts in the registry."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from engines.errors import EngineError
from engines.quantize import QuantSpec
from engines.registry import EngineRegistry
from plumbing.logs import configure_logging
from qscore.cli.options import (
    DEFAULT_ENGINE_DIR,
    Backend,
    Calibration,
    CalibrationMethodOpt,
    EngineDir,
    EngineModel,
    Head,
    LogLevel,
    MaxDrop,
    MaxLength,
    Precision,
    QuantLevel,
    device_list,
    engine_settings,
)
from qscore.cli.output import err, fail

engine_app = typer.Typer(help="Build and check engine artifacts.", no_args_is_help=True)

Smoke = Annotated[bool, typer.Option(help="Also load the engine and run one inference.")]


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
    from engines.select import default_backend
    from engines.source import resolve_model

    configure_logging(log_level)
    try:
        quant = QuantSpec(level=level, max_drop=max_drop, method=calibration_method,
                          calibration=calibration)
        settings = engine_settings(model, engine_dir, None, head, max_length, None, rebuild,
                                    precision, quant, backend=backend,
                                    devices=device_list(device))
        # Straight to ensure_engine, not find_artifact: building must not stop at `current`.
        source = resolve_model(settings.model, head=settings.head,
                               max_length=settings.max_length)
        with err.status("building the engine") as status:
            path = ensure_engine(source, engine_dir, rebuild=rebuild, progress=status.update,
                                 precision=settings.default_precision(source.head),
                                 quant=quant, backend=settings.backend or default_backend(),
                                 device=device)
            engine = load_engine(path, threads=1, device=device, lanes=1, graphs=False)
        current = EngineRegistry(engine_dir).current(source.model_id)
    except (EngineError, OSError, ValueError) as exc:
        fail(exc)
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
        fail(exc)
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
        fail(exc)
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
        fail(exc)
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
        fail(exc)
    err.print(f"removed {_model_id(model_id)} {version}")
