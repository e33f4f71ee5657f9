"""Picks the runtime for an artifact from its manifest (vLLM's Executor.get_class, in small)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines.errors import BackendUnavailable
from engines.manifest import read_manifest
from engines.memory import check_fits, host_available_bytes
from engines.protocol import Engine


def load_engine(path: Path, *, threads: int | None = None, verify: bool = True,
                check_memory: bool = True, device: str | None = None,
                lanes: int | None = None, graphs: bool = True, spin: bool = True,
                load_max_bytes_per_s: float | None = None,
                load_chunk_bytes: int | None = None) -> Engine:
    """Load an artifact on its backend's runtime.

    `device`, `lanes` and `graphs` apply to GPU runtimes (torch, tensorrt); they check the
    device's own free memory, the CPU runtimes the host's. `lanes` also applies to OpenVINO:
    infer requests (and CPU streams) of one compiled model, sharing `threads`. `spin` off
    makes ONNX Runtime's idle threads yield their cores (for hosts shared with other busy
    processes).
    `load_max_bytes_per_s` caps the torch runtime's host-to-device weight copies, made in
    chunks of `load_chunk_bytes` (None: 8 MiB): a hot reload beside a serving engine passes
    a cap, a cold start none (see docs/gpu.md). The engine's `load_phases` says how long each
    step of the load took."""
    manifest = read_manifest(Path(path))
    if manifest.backend == "onnxruntime":
        if check_memory:
            check_fits(Path(path), manifest.memory_bytes, host_available_bytes())
        try:
            from engines.onnx_runtime import OnnxRuntimeEngine
        except ImportError as exc:
            raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime"
                                     ) from exc
        return OnnxRuntimeEngine(Path(path), threads=threads, verify=verify, spin=spin)
    if manifest.backend == "openvino":
        if check_memory:  # every lane (infer request) has its own activations
            weights = manifest.files["model.bin"].bytes if "model.bin" in manifest.files else 0
            needed = manifest.memory_bytes + (max(1, lanes or 1) - 1) * max(
                0, manifest.memory_bytes - weights)
            check_fits(Path(path), needed, host_available_bytes())
        try:
            from engines.openvino_runtime import OpenVinoEngine
        except ImportError as exc:
            raise BackendUnavailable("openvino is not installed: pip install openvino") from exc
        return OpenVinoEngine(Path(path), threads=threads, lanes=lanes, verify=verify)
    if manifest.backend == "torch":
        try:
            from engines.torch_runtime import TorchEngine, TorchOptions
        except ImportError as exc:
            raise BackendUnavailable("the torch backend needs PyTorch: pip install torch (a "
                                     "CUDA build on GPU hosts)") from exc
        chunk = {} if load_chunk_bytes is None else {"load_chunk_bytes": load_chunk_bytes}
        options = TorchOptions(device=device, lanes=lanes, graphs=graphs,
                               load_max_bytes_per_s=load_max_bytes_per_s, **chunk)
        return TorchEngine(Path(path), options=options, verify=verify,
                           check_memory=check_memory)
    if manifest.backend == "tensorrt":
        from engines.tensorrt.runtime import TensorRTEngine

        index = _cuda_index(device)
        trt: dict[str, Any] = {"device": index, "verify": verify}
        if lanes is not None:
            trt["lanes"] = lanes
        return TensorRTEngine(Path(path), **trt)
    raise BackendUnavailable(
        f"{path}: backend {manifest.backend!r} is not available in this qscore build"
    )


def _cuda_index(device: str | None) -> int:
    if device is None or device == "cuda":
        return 0
    if not device.startswith("cuda:") or not device[5:].isdigit():
        raise BackendUnavailable(f"TensorRT runs on a CUDA device (cuda:N), not {device!r}")
    return int(device[5:])
