"""Choosing the engine a command uses: which artifact (given, promoted, or built now), on which
devices, loaded how; and the tokenizer that matches it. Settings come from the caller (the
command line builds them); nothing here reads the environment."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from engines.build import ensure_engine
from engines.errors import ArtifactError
from engines.loader import load_engine
from engines.manifest import Head, read_manifest
from engines.protocol import Engine
from engines.quantize import QuantSpec
from engines.registry import EngineRegistry
from engines.source import resolve_model
from engines.tokenizer import QueryTokenizer, artifact_tokenizer

log = structlog.get_logger(__name__)

CPU_BACKENDS = ("openvino", "onnxruntime")  # the default first (bench/engine_cpu.py)


def default_backend() -> str:
    """The backend an engine is built for when none is asked for and none is promoted:
    OpenVINO, which measured faster and closer to FP32 than ONNX Runtime (docs/benchmarks.md),
    or ONNX Runtime where OpenVINO is not installed."""
    import importlib.util

    return next((b for b in CPU_BACKENDS if importlib.util.find_spec(b) is not None),
                "onnxruntime")


@dataclass(frozen=True, slots=True)
class EngineSettings:
    model: str = "default"  # "default" (all-MiniLM-L6-v2) or a Hugging Face model directory
    # The engine cache; needed unless `artifact` is given (the command line passes
    # $QSCORE_HOME/engines, ~/.cache/qscore/engines by default).
    engine_dir: Path | None = None
    artifact: Path | None = None  # load this artifact instead of building from `model`
    head: Head | None = None  # None: from the model's config
    max_length: int | None = None  # None: from the model's config
    # None: openvino, onnxruntime: INT8 checked against FP32 for the similarity head, FP32 for
    # classifiers (whose INT8 selection is not built yet); torch: FP16.
    precision: str | None = None
    quant: QuantSpec = field(default_factory=QuantSpec)
    threads: int | None = None  # engine intra-op threads; None: all cores
    rebuild: bool = False
    backend: str | None = None  # None: the promoted engine's, else default_backend()
    devices: tuple[str, ...] = ()  # torch: where engines run; (): cuda:0 / every GPU / cpu
    # torch: streams per engine (None: 2 on a GPU, 1 on CPU); openvino: infer requests of the
    # one compiled model, each on its own CPU stream (None: 1)
    lanes: int | None = None
    graphs: bool = True  # torch: CUDA graphs per shape bucket
    spin: bool = True  # onnxruntime: idle intra-op threads spin (off: yield the core)

    def default_precision(self, head: str) -> str:
        if self.precision is not None:
            return self.precision
        if self.backend == "torch":
            return "fp16"
        if self.backend == "tensorrt":
            return "int8"
        return "int8" if head == "similarity" else "fp32"


def find_artifact(settings: EngineSettings,
                  progress: Callable[[str], None] | None = None) -> Path:
    """The artifact directory `settings` names: the given one, else the model's promoted
    (`current`) version in the engine directory, else one built (and cached) now."""
    if settings.artifact is not None:
        return settings.artifact
    if settings.engine_dir is None:
        raise ArtifactError("(none)", "no engine artifact given and no engine directory to "
                                      "find or build one in")
    source = resolve_model(settings.model, head=settings.head, max_length=settings.max_length)
    if not settings.rebuild and (current := _promoted(settings, settings.engine_dir,
                                                         source.model_id)) is not None:
        return current
    return ensure_engine(source, settings.engine_dir,
                         precision=settings.default_precision(source.head),
                         quant=settings.quant, rebuild=settings.rebuild, progress=progress,
                         backend=settings.backend or default_backend())


def _promoted(settings: EngineSettings, engine_dir: Path, model_id: str) -> Path | None:
    """The model's current version, if one is promoted and has the options asked for.

    Options left unset take whatever was promoted; an explicit --head/--max-length or
    precision the current one lacks means build (or find) the engine that has them."""
    registry = EngineRegistry(engine_dir)
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


def serving_devices(settings: EngineSettings, backend: str) -> list[str | None]:
    """One entry per engine to load: the devices asked for, else every visible GPU for a
    torch engine (cpu where there is none); [None] (the runtime's default) for CPU backends."""
    if backend in CPU_BACKENDS:
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
             threads: int | None = None, verify: bool = True, *,
             load_max_bytes_per_s: float | None = None,
             load_chunk_bytes: int | None = None) -> Engine:
    """`settings`' engine of `path` on `device`. A hot reload passes `load_max_bytes_per_s`
    (the torch runtime's host-to-device copy cap; engines.loader.load_engine)."""
    return load_engine(path, threads=threads or settings.threads, device=device,
                       lanes=settings.lanes, graphs=settings.graphs, spin=settings.spin,
                       verify=verify, load_max_bytes_per_s=load_max_bytes_per_s,
                       load_chunk_bytes=load_chunk_bytes)


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
