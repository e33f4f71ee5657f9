"""Typed settings, built once at the edge (CLI flags / QSCORE_* env vars) and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from engines.manifest import Head
from engines.quantize import QuantSpec
from schemas import DEFAULT_LIMITS, Limits
from workers.scoring import BatchLimits


def default_home() -> Path:
    """Where built engines are cached: $QSCORE_HOME, else ~/.cache/qscore."""
    if home := os.environ.get("QSCORE_HOME"):
        return Path(home)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qscore"


DEFAULT_CHUNK_ITEMS = 2048


@dataclass(frozen=True, slots=True)
class EngineSettings:
    model: str = "default"  # "default" (all-MiniLM-L6-v2) or a Hugging Face model directory
    engine_dir: Path = field(default_factory=lambda: default_home() / "engines")
    artifact: Path | None = None  # load this artifact instead of building from `model`
    head: Head | None = None  # None: from the model's config
    max_length: int | None = None  # None: from the model's config
    # None: onnxruntime: INT8 chosen by measurement for the similarity head, FP32 for
    # classifiers (whose INT8 selection is not built yet); torch: FP16.
    precision: str | None = None
    quant: QuantSpec = field(default_factory=QuantSpec)
    threads: int | None = None  # engine intra-op threads; None: all cores
    rebuild: bool = False
    backend: str | None = None  # None: the promoted engine's, else onnxruntime
    devices: tuple[str, ...] = ()  # torch: where engines run; (): cuda:0 / every GPU / cpu
    lanes: int | None = None  # torch: streams per engine; None: 2 on a GPU, 1 on CPU
    graphs: bool = True  # torch: CUDA graphs per shape bucket

    def default_precision(self, head: str) -> str:
        if self.precision is not None:
            return self.precision
        if self.backend == "torch":
            return "fp16"
        if self.backend == "tensorrt":
            return "int8"
        return "int8" if head == "similarity" else "fp32"


@dataclass(frozen=True, slots=True)
class RescoreSettings:
    input: Path
    output: Path
    engine: EngineSettings = field(default_factory=EngineSettings)
    batch: BatchLimits = field(default_factory=BatchLimits)
    limits: Limits = DEFAULT_LIMITS
    # Items tokenized and length-sorted together: a wider window pads less (the long tail of
    # each window shares a batch); the next window tokenizes while this one is scored.
    chunk_items: int = DEFAULT_CHUNK_ITEMS
    fmt: str = "auto"
    progress: bool = True

    @property
    def rejected_path(self) -> Path:
        return self.output.with_name(self.output.name + ".rejected.jsonl")
