"""ONNX Runtime engine: the CPU backend, FP32 (and later INT8) artifacts."""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from pathlib import Path

import numpy as np

from engines.batch import PaddedBatch, pad_sequences
from engines.errors import ArtifactError, EngineError
from engines.export import INPUT_NAMES
from engines.manifest import Manifest, read_manifest, verify_artifact

BACKEND = "onnxruntime"


def ort_feed(batch: PaddedBatch, names: Collection[str]) -> dict[str, np.ndarray]:
    """The inputs a session declares, from a padded batch (exports may drop unused ones)."""
    arrays = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "token_type_ids": batch.token_type_ids}
    return {name: arrays[name] for name in INPUT_NAMES if name in names}


class OnnxRuntimeEngine:
    """One ONNX Runtime session over a verified artifact."""

    def __init__(self, path: Path, *, threads: int | None = None, verify: bool = True,
                 spin: bool = True) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest.backend != BACKEND:
            raise ArtifactError(self.path, f"backend {manifest.backend!r} cannot be loaded by "
                                           f"the {BACKEND} runtime")
        # Seconds per loading step: verify (if asked), read (the model file into memory),
        # session (ONNX Runtime parses, optimises and plans the graph).
        self.load_phases: dict[str, float] = {}
        lap = time.perf_counter()
        if verify:
            verify_artifact(self.path, manifest)
            lap = self._phase("verify", lap)
        self.manifest: Manifest = manifest
        try:  # read apart from the session build, so each is timed (one file: qscore's
            # exports keep no external weights, which a model given as bytes could not find)
            model = (self.path / manifest.model_file).read_bytes()
        except OSError as exc:
            raise ArtifactError(self.path, f"cannot read {manifest.model_file}: {exc}") from exc
        lap = self._phase("read", lap)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(model, sess_options=options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own types for bad graphs
            raise ArtifactError(self.path, f"ONNX Runtime cannot load the model: {exc}") from exc
        del model
        self._phase("session", lap)
        names = {i.name for i in self._session.get_inputs()}
        self._inputs = tuple(n for n in INPUT_NAMES if n in names)

    def _phase(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.load_phases[name] = now - since
        return now

    lanes = 1  # a session per slot on CPU: EnginePool runs several sessions, not lanes
    device = "cpu"

    def run(self, batch: PaddedBatch, lane: int = 0) -> np.ndarray:
        try:
            (out,) = self._session.run(None, ort_feed(batch, self._inputs))
        except Exception as exc:
            raise EngineError(f"inference failed on a {batch.size}x{batch.length} batch: "
                              f"{exc}") from exc
        return np.asarray(out, dtype=np.float32)

    def health(self) -> None:
        out = self.run(pad_sequences([np.array([101, 102], dtype=np.int64)]))
        if not np.all(np.isfinite(out)):
            raise EngineError(f"{self.path}: health check produced non-finite outputs")

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
