"""OpenVINO engine: the CPU backend that runs calibrated (static) INT8 on the integer
dot-product units (VNNI, AMX), FP32 artifacts too.

One compiled model serves every lane: OpenVINO splits the cores into `lanes` streams and each
lane owns an infer request, so two lanes run two batches at once on one copy of the weights
(ONNX Runtime needs a session, and a copy of the weights, per concurrent call).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from engines.batch import PaddedBatch, pad_sequences
from engines.errors import ArtifactError, EngineError
from engines.export import INPUT_NAMES
from engines.manifest import Manifest, read_manifest, verify_artifact

BACKEND = "openvino"
# The precision OpenVINO computes the non-quantized parts in. Pinned, not left to the device:
# on CPUs with AMX or AVX-512 BF16 the default is bf16, which would serve other numbers than
# the ones the build measured against FP32.
INFERENCE_PRECISION = "f32"


@contextlib.contextmanager
def telemetry_off() -> Iterator[None]:
    """OpenVINO (on import and in its converter) and NNCF (on import) start usage telemetry
    that writes a client id under ~/intel and sends events to Google Analytics unless a
    consent file there says no: opt-out, where qscore must not phone home or write to a home
    directory. Both skip it in CI, which they read from the environment (CI=true; NNCF_CI),
    so these steps run as if in CI; the variables are restored after."""
    saved = {name: os.environ.get(name) for name in ("CI", "NNCF_CI")}
    os.environ.update({"CI": "true", "NNCF_CI": "1"})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def import_openvino() -> ModuleType:
    """`import openvino`, without its telemetry (telemetry_off)."""
    with telemetry_off():
        import openvino

    return openvino


def inference_config(threads: int, lanes: int, pinning: bool = False) -> dict[str, Any]:
    """compile_model properties: `lanes` streams sharing `threads` threads.

    Pinning is off by default: a worker shares its host with the tokenizer processes and the
    broker, and threads pinned to cores the others are using stall rather than move."""
    return {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": lanes,
            "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION,
            "ENABLE_CPU_PINNING": pinning, "ENABLE_HYPER_THREADING": False}


def check_io(model: Any, manifest: Manifest, where: object) -> tuple[str, ...]:
    """The model's inputs, or ArtifactError if the graph is not the manifest's engine: inputs
    qscore cannot feed, or an output whose shape is not the head's."""
    names = []
    for port in model.inputs:
        name = port.get_any_name()
        if name not in INPUT_NAMES:
            raise ArtifactError(where, f"model input {name!r} is not one qscore feeds "
                                       f"({', '.join(INPUT_NAMES)})")
        names.append(name)
    if len(model.outputs) != 1:
        raise ArtifactError(where, f"model has {len(model.outputs)} outputs; an engine has one")
    shape = model.outputs[0].get_partial_shape()
    want = 2 if manifest.head == "similarity" else 1
    if shape.rank.is_dynamic or shape.rank.get_length() != want:
        raise ArtifactError(where, f"output shape {shape} does not fit the {manifest.head} "
                                   f"head (rank {want})")
    if want == 2 and shape[1].is_static and manifest.output_dim and \
            shape[1].get_length() != manifest.output_dim:
        raise ArtifactError(where, f"output width {shape[1].get_length()} != output_dim "
                                   f"{manifest.output_dim} in the manifest")
    quantized = any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
    if quantized != (manifest.precision == "int8"):
        raise ArtifactError(where, f"the manifest says {manifest.precision} but the graph is "
                                   f"{'quantized' if quantized else 'not quantized'}")
    return tuple(n for n in INPUT_NAMES if n in names)


class OpenVinoEngine:
    """One compiled OpenVINO model over a verified artifact, `lanes` infer requests."""

    device = "cpu"

    def __init__(self, path: Path, *, threads: int | None = None, lanes: int | None = None,
                 verify: bool = True, pinning: bool = False) -> None:
        ov = import_openvino()
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest.backend != BACKEND:
            raise ArtifactError(self.path, f"backend {manifest.backend!r} cannot be loaded by "
                                           f"the {BACKEND} runtime")
        self.load_phases: dict[str, float] = {}
        lap = time.perf_counter()
        if verify:
            verify_artifact(self.path, manifest)
            lap = self._phase("verify", lap)
        self.manifest: Manifest = manifest
        self.lanes = max(1, lanes or 1)
        self.threads = threads or os.cpu_count() or 1
        core = ov.Core()
        # Hashed here only when not just verified above (verify_artifact read them already).
        xml, weights = (self._checked(name, rehash=not verify)
                        for name in (manifest.model_file, "model.bin"))
        try:
            model = core.read_model(model=xml, weights=weights)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise ArtifactError(self.path, f"OpenVINO cannot read the model: {exc}") from exc
        del xml, weights
        self._inputs = check_io(model, manifest, self.path)
        lap = self._phase("read", lap)
        try:
            compiled = core.compile_model(
                model, "CPU", inference_config(self.threads, self.lanes, pinning))
        except Exception as exc:
            raise ArtifactError(self.path, f"OpenVINO cannot compile the model: {exc}") from exc
        self._phase("compile", lap)
        self._requests = [compiled.create_infer_request() for _ in range(self.lanes)]
        self._compiled = compiled

    def _checked(self, name: str, rehash: bool = True) -> bytes:
        """The file's bytes, hashed as read, even when `verify` is off (a reload verified them
        earlier, paced): what OpenVINO parses is exactly what the manifest lists. A corrupt IR
        can crash OpenVINO's reader instead of raising, so a file changed since it was
        verified must never reach it."""
        entry = self.manifest.files.get(name)
        try:
            data = (self.path / name).read_bytes()
        except OSError as exc:
            raise ArtifactError(self.path, f"cannot read {name}: {exc}") from exc
        if entry is None:
            raise ArtifactError(self.path, f"{name} is not in the manifest")
        if not rehash:
            return data
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != entry.bytes or digest != entry.sha256:
            raise ArtifactError(self.path, f"{name}: checksum mismatch (sha256 {digest[:12]}… "
                                           f"!= {entry.sha256[:12]}…): changed since it was "
                                           "verified")
        return data

    def _phase(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.load_phases[name] = now - since
        return now

    def run(self, batch: PaddedBatch, lane: int = 0) -> np.ndarray:
        arrays = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                  "token_type_ids": batch.token_type_ids}
        try:
            request = self._requests[lane]
            request.infer({name: arrays[name] for name in self._inputs}, share_inputs=True)
            # The output tensor is the request's own buffer, rewritten by its next call.
            return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        except Exception as exc:
            raise EngineError(f"inference failed on a {batch.size}x{batch.length} batch: "
                              f"{exc}") from exc

    def health(self) -> None:
        out = self.run(pad_sequences([np.array([101, 102], dtype=np.int64)]))
        if not np.all(np.isfinite(out)):
            raise EngineError(f"{self.path}: health check produced non-finite outputs")

    def close(self) -> None:
        self._requests = []
        self._compiled = None
