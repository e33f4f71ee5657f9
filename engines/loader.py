"""Picks the runtime for an artifact from its manifest (vLLM's Executor.get_class, in small)."""

from __future__ import annotations

from pathlib import Path

from engines.errors import BackendUnavailable
from engines.manifest import read_manifest
from engines.memory import check_fits, host_available_bytes
from engines.protocol import Engine


def load_engine(path: Path, *, threads: int | None = None, verify: bool = True,
                check_memory: bool = True) -> Engine:
    manifest = read_manifest(Path(path))
    if check_memory:
        check_fits(Path(path), manifest.memory_bytes, host_available_bytes())
    if manifest.backend == "onnxruntime":
        try:
            from engines.onnx_runtime import OnnxRuntimeEngine
        except ImportError as exc:
            raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime"
                                     ) from exc
        return OnnxRuntimeEngine(Path(path), threads=threads, verify=verify)
    raise BackendUnavailable(
        f"{path}: backend {manifest.backend!r} is not available in this qscore build"
    )
