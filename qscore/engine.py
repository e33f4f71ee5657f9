"""Opening the engine a command should use: build or find the artifact, load it, and the
tokenizer that matches it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog

from engines.build import ensure_engine
from engines.errors import ArtifactError
from engines.loader import load_engine
from engines.manifest import Manifest, read_manifest
from engines.protocol import Engine
from engines.registry import EngineRegistry
from engines.source import resolve_model
from qscore.config import EngineSettings
from tokenizer_svc.tokenization import QueryTokenizer

log = structlog.get_logger(__name__)


def find_artifact(settings: EngineSettings,
                  progress: Callable[[str], None] | None = None) -> Path:
    """The artifact directory `settings` names: the given one, else the model's promoted
    (`current`) version in the engine directory, else one built (and cached) now."""
    if settings.artifact is not None:
        return settings.artifact
    source = resolve_model(settings.model, head=settings.head, max_length=settings.max_length)
    if not settings.rebuild and (current := _promoted(settings, source.model_id)) is not None:
        return current
    return ensure_engine(source, settings.engine_dir,
                         precision=settings.default_precision(source.head),
                         quant=settings.quant, rebuild=settings.rebuild, progress=progress,
                         backend=settings.backend or "onnxruntime")


def _promoted(settings: EngineSettings, model_id: str) -> Path | None:
    """The model's current version, if one is promoted and has the options asked for.

    Options left unset take whatever was promoted; an explicit --head/--max-length or
    precision the current one lacks means build (or find) the engine that has them."""
    registry = EngineRegistry(settings.engine_dir)
    if registry.current(model_id) is None:
        return None
    path = registry.get(model_id)
    manifest = read_manifest(path)
    wanted = {"head": settings.head, "max_length": settings.max_length,
              "precision": settings.precision, "backend": settings.backend}
    if any(value is not None and getattr(manifest, name) != value
           for name, value in wanted.items()):
        log.info("engine.current_skipped", model_id=model_id, version=manifest.version,
                 reason="options differ", **{k: v for k, v in wanted.items() if v is not None})
        return None
    return path


def artifact_tokenizer(path: Path, manifest: Manifest) -> QueryTokenizer:
    """The tokenizer an artifact was built with; refuses one whose files changed since."""
    tokenizer = QueryTokenizer(path / "tokenizer" / "tokenizer.json", manifest.max_length,
                               pairs=manifest.head == "classifier")
    if tokenizer.tokenizer_id != manifest.tokenizer_id:
        raise ArtifactError(path, f"tokenizer {tokenizer.tokenizer_id} differs from the one "
                                  f"the engine was built with ({manifest.tokenizer_id})")
    return tokenizer


def serving_devices(settings: EngineSettings, backend: str) -> list[str | None]:
    """One entry per engine to load: the devices asked for, else every visible GPU for a
    torch engine (cpu where there is none); [None] (the runtime's default) for onnxruntime."""
    if backend == "onnxruntime":
        return [None]
    if settings.devices:
        return list(settings.devices)
    try:
        import torch
    except ImportError:
        return [None]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def load_for(settings: EngineSettings, path: Path, device: str | None = None,
             threads: int | None = None) -> Engine:
    return load_engine(path, threads=threads or settings.threads, device=device,
                       lanes=settings.lanes, graphs=settings.graphs)


def open_engine(settings: EngineSettings,
                progress: Callable[[str], None] | None = None) -> tuple[Engine, QueryTokenizer]:
    """The one engine an in-process command (rescore) uses: the first of `devices`."""
    path = find_artifact(settings, progress)
    engine = load_for(settings, path, serving_devices(settings, read_manifest(path).backend)[0])
    manifest = engine.manifest
    tokenizer = artifact_tokenizer(path, manifest)
    log.info("engine.ready", model_id=manifest.model_id, version=manifest.version,
             backend=manifest.backend, precision=manifest.precision, head=manifest.head,
             device=engine.device, lanes=engine.lanes, path=str(path))
    return engine, tokenizer
