"""Build an engine artifact from a model directory, once: later calls find it by content hash.

This module only dispatches: `ensure_engine` validates the backend and hands the request to
that backend's builder from `BUILDERS` (engines.build_onnx, engines.build_openvino,
engines.build_torch, engines.build_tensorrt), which share engines.build_common. Builders never
import this module, so the import graph runs one way: build -> builders -> build_common.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from engines.build_common import Progress, quiet
from engines.build_onnx import ensure_onnx
from engines.build_openvino import ensure_openvino
from engines.build_tensorrt import ensure_tensorrt
from engines.build_torch import ensure_torch
from engines.errors import BuildError
from engines.quantize import QuantSpec
from engines.source import ModelSource


class Builder(Protocol):
    """A backend's entry: the intact artifact for these options, built if there is none."""

    def __call__(self, source: ModelSource, root: Path, *, precision: str, quant: QuantSpec,
                 rebuild: bool, progress: Progress, promote: bool,
                 device: str | None) -> Path: ...


BUILDERS: dict[str, Builder] = {
    "onnxruntime": ensure_onnx,
    "openvino": ensure_openvino,  # CPU, calibrated (static) INT8
    "torch": ensure_torch,  # GPU runtime; builds on CPU too
    "tensorrt": ensure_tensorrt,
}
BACKENDS = tuple(BUILDERS)


def ensure_engine(
    source: ModelSource,
    root: Path,
    *,
    precision: str = "fp32",
    quant: QuantSpec | None = None,
    rebuild: bool = False,
    progress: Progress | None = None,
    promote: bool = True,
    backend: str = "onnxruntime",
    device: str | None = None,
) -> Path:
    """Return the artifact for `source`, building it if no intact one exists.

    ONNX Runtime INT8 engines are made from the FP32 one (built first if needed) by
    `engines.quantize`. The first version of a model in `root` is promoted to its registry
    `current`; later ones wait for an explicit `EngineRegistry.promote` (qscore engine
    promote). `device` only matters to the torch backend (where its precision check runs)."""
    if backend not in BUILDERS:
        raise BuildError(f"backend {backend!r} not supported; choose {BACKENDS}")
    return BUILDERS[backend](source, root, precision=precision, quant=quant or QuantSpec(),
                             rebuild=rebuild, progress=progress or quiet, promote=promote,
                             device=device)
