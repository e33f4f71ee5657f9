"""Is TensorRT usable here? Answered without raising, so CLIs and tests can ask first.

TensorRT needs three things: the `tensorrt` wheel (with its libnvinfer), `pycuda` for device
memory and streams, and a CUDA driver with at least one GPU. Any of them can be missing on a
build host or a CPU worker, and a missing shared library surfaces as OSError, not ImportError,
so every probe catches broadly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from engines.errors import BackendUnavailable

INSTALL_HINT = ("pip install tensorrt pycuda on a host with an NVIDIA GPU and driver "
                "(TensorRT 10.x wheels come from pypi.nvidia.com)")
FALLBACK_HINT = "the ONNX Runtime (CPU) and torch backends work without it"


@dataclass(frozen=True, slots=True)
class TensorRTStatus:
    available: bool
    tensorrt_version: str | None
    pycuda: bool
    reason: str  # what is missing, or "ok"


def tensorrt_status() -> TensorRTStatus:
    """Probe tensorrt, pycuda and the CUDA driver; never raises."""
    missing: list[str] = []
    version: str | None = None
    try:
        trt = importlib.import_module("tensorrt")
        version = str(getattr(trt, "__version__", "unknown"))
    except Exception as exc:  # ImportError, or OSError for a missing libnvinfer
        missing.append(f"tensorrt is not importable ({type(exc).__name__}: {exc})")
    try:
        cuda = importlib.import_module("pycuda.driver")
    except Exception as exc:
        cuda = None
        missing.append(f"pycuda is not importable ({type(exc).__name__}: {exc})")
    if missing:
        return TensorRTStatus(False, version, cuda is not None, "; ".join(missing))
    try:
        cuda.init()
        devices = int(cuda.Device.count())
    except Exception as exc:  # no driver, or a driver too old for this CUDA
        return TensorRTStatus(False, version, True, f"the CUDA driver failed to start: {exc}")
    if devices < 1:
        return TensorRTStatus(False, version, True, "no CUDA device is visible "
                              "(check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    return TensorRTStatus(True, version, True, "ok")


def require_tensorrt() -> ModuleType:
    """The tensorrt module, or BackendUnavailable saying what to install and what else works."""
    status = tensorrt_status()
    if not status.available:
        raise BackendUnavailable(f"the TensorRT backend cannot run here: {status.reason}. "
                                 f"To use it, {INSTALL_HINT}; {FALLBACK_HINT}.")
    return importlib.import_module("tensorrt")
