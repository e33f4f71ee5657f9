"""TensorRT runtime: one deserialized plan, one execution context and CUDA stream per lane.

Each lane owns its context (bound to its own optimisation profile: two contexts may not share
one while both run), its stream, an event, device buffers sized once at the profile's max shape
and page-locked host buffers, so a call allocates nothing and two lanes run side by side.
pycuda and TensorRT share the device's primary context; lanes run on worker threads, so every
call pushes it onto the calling thread and pops it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.batch import PaddedBatch, pad_sequences
from engines.buckets import BucketPlan
from engines.errors import ArtifactError, EngineError
from engines.export import INPUT_NAMES
from engines.manifest import Manifest, read_manifest, verify_artifact
from engines.memory import check_fits
from engines.tensorrt.availability import require_tensorrt
from engines.tensorrt.buffers import BufferSpec, TensorInfo, plan_buffers
from engines.tensorrt.build import PLAN_FILE

BACKEND = "tensorrt"


def engine_tensors(trt: Any, engine: Any) -> list[TensorInfo]:
    """The engine's I/O tensors as declared (names, TensorRT dtypes, shapes with -1)."""
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        out.append(TensorInfo(name, str(engine.get_tensor_dtype(name).name),
                              tuple(int(d) for d in engine.get_tensor_shape(name)),
                              engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT))
    return out


def bucket_plan_of(manifest: Manifest) -> BucketPlan:
    """The plan the engine was built for (manifest.build["bucket_plan"]), else the default."""
    raw = manifest.build.get("bucket_plan")
    if not raw:
        return BucketPlan.for_model(manifest.max_length)
    return BucketPlan(tuple(raw["batch_buckets"]), tuple(raw["length_buckets"]),
                      int(raw["max_tokens"]))


@dataclass(slots=True)
class _Lane:
    context: Any
    stream: Any
    event: Any
    device: dict[str, Any] = field(default_factory=dict)
    host: dict[str, np.ndarray] = field(default_factory=dict)


class TensorRTEngine:
    """A verified TensorRT artifact on one CUDA device, `lanes` calls at a time."""

    def __init__(self, path: Path, *, device: int = 0, lanes: int = 2,
                 verify: bool = True) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest.backend != BACKEND:
            raise ArtifactError(self.path, f"backend {manifest.backend!r} cannot be loaded by "
                                           f"the {BACKEND} runtime")
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        trt = require_tensorrt()
        built_with = manifest.build.get("tensorrt")
        if built_with != trt.__version__:
            raise ArtifactError(self.path, f"the plan was built with TensorRT {built_with}, "
                                f"this host has {trt.__version__}; plans only load on the "
                                "TensorRT version that built them: rebuild it from the "
                                "artifact's model.onnx (docs/tensorrt.md)")
        if verify:
            verify_artifact(self.path, manifest)
        import pycuda.driver as cuda

        self.manifest: Manifest = manifest
        self.lanes = lanes
        self.device = f"cuda:{device}"
        self._cuda = cuda
        self._lanes: list[_Lane] = []
        self._engine: Any = None
        cuda.init()
        if not 0 <= device < cuda.Device.count():
            raise EngineError(f"{self.device} does not exist ({cuda.Device.count()} CUDA "
                              "devices visible)")
        gpu = cuda.Device(device)
        self._ctx: Any = gpu.retain_primary_context()
        try:
            self._ctx.push()
            try:
                self._check_device(gpu)
                free, _total = cuda.mem_get_info()
                check_fits(self.path, manifest.memory_bytes, free, device=self.device)
                self._load(trt)
            except BaseException:
                self._free()
                raise
            finally:
                cuda.Context.pop()
        except BaseException:
            self._detach()
            raise

    def _check_device(self, gpu: Any) -> None:
        built_for = self.manifest.build.get("compute_capability")
        here = "{}.{}".format(*gpu.compute_capability())
        if built_for and built_for != here:
            raise ArtifactError(self.path, f"the plan was built for compute capability "
                                f"{built_for} ({self.manifest.build.get('gpu')}), {self.device} "
                                f"is {here} ({gpu.name()}); rebuild it on this GPU from the "
                                "artifact's model.onnx")

    def _load(self, trt: Any) -> None:
        cuda = self._cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine((self.path / PLAN_FILE).read_bytes())
        if self._engine is None:
            raise ArtifactError(self.path, f"TensorRT cannot deserialize {PLAN_FILE} (see its "
                                "log above); rebuild it from model.onnx")
        profiles = self._engine.num_optimization_profiles
        if self.lanes > profiles:
            raise ArtifactError(self.path, f"the plan has {profiles} optimisation profiles and "
                                f"each of {self.lanes} lanes needs its own: load with "
                                f"lanes<={profiles} or rebuild with contexts={self.lanes}")
        tensors = engine_tensors(trt, self._engine)
        self._inputs = tuple(t.name for t in tensors if t.is_input)
        outputs = [t.name for t in tensors if not t.is_input]
        if unknown := sorted(set(self._inputs) - set(INPUT_NAMES)) or len(outputs) != 1:
            raise ArtifactError(self.path, f"the plan's inputs {self._inputs} / outputs "
                                f"{outputs} are not qscore's export ({INPUT_NAMES} -> one "
                                f"output){f'; unknown {unknown}' if unknown else ''}")
        self._output = outputs[0]
        # Size everything at the largest shape the engine accepts, read from the engine itself.
        _, _, top = self._engine.get_tensor_profile_shape(self._inputs[0], 0)
        max_batch, max_length = int(top[0]), int(top[1])
        self.plan = bucket_plan_of(self.manifest)
        if self.plan.max_batch > max_batch or self.plan.max_length > max_length:
            raise ArtifactError(self.path, f"bucket plan up to {self.plan.max_batch}x"
                                f"{self.plan.max_length} exceeds the plan's profile "
                                f"{max_batch}x{max_length}")
        self._specs: dict[str, BufferSpec] = {
            s.name: s for s in plan_buffers(tensors, max_batch=max_batch, max_length=max_length,
                                            output_dim=self.manifest.output_dim or None)}
        for index in range(self.lanes):
            lane = _Lane(self._engine.create_execution_context(), cuda.Stream(), cuda.Event())
            self._lanes.append(lane)  # before anything can fail, so _free frees it
            if lane.context is None:
                raise EngineError(f"{self.path}: TensorRT could not create execution context "
                                  f"{index} (device memory?)")
            lane.context.set_optimization_profile_async(index, lane.stream.handle)
            for spec in self._specs.values():
                lane.device[spec.name] = cuda.mem_alloc(spec.nbytes)
                lane.host[spec.name] = cuda.pagelocked_empty(spec.max_elements, spec.dtype)
                # Addresses are fixed for the context's life: set once, not per call.
                lane.context.set_tensor_address(spec.name, int(lane.device[spec.name]))
            lane.stream.synchronize()

    def run(self, batch: PaddedBatch, lane: int = 0) -> np.ndarray:
        if not self._lanes:
            raise EngineError(f"{self.path}: the engine is closed")
        if not 0 <= lane < len(self._lanes):
            raise EngineError(f"lane {lane} out of range 0..{len(self._lanes) - 1}")
        try:
            chunks = self.plan.split(batch.size, batch.length)
        except ValueError as exc:
            raise EngineError(f"cannot run a {batch.size}x{batch.length} batch: {exc}") from exc
        if len(chunks) == 1:
            return self._run_chunk(batch, self._lanes[lane], lane)
        return np.concatenate([self._run_chunk(_rows(batch, start, end), self._lanes[lane], lane)
                               for start, end in chunks], axis=0)

    def _run_chunk(self, batch: PaddedBatch, lane: _Lane, index: int) -> np.ndarray:
        cuda = self._cuda
        n, length = batch.size, batch.length
        arrays = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                  "token_type_ids": batch.token_type_ids}
        self._ctx.push()
        try:
            for name in self._inputs:
                host = lane.host[name][: n * length].reshape(n, length)
                np.copyto(host, arrays[name], casting="unsafe")  # int64 -> the engine's dtype
                cuda.memcpy_htod_async(lane.device[name], host, lane.stream)
                if not lane.context.set_input_shape(name, (n, length)):
                    raise EngineError(f"TensorRT refused input shape {n}x{length} for {name}")
            shape = tuple(int(d) for d in lane.context.get_tensor_shape(self._output))
            if not lane.context.execute_async_v3(lane.stream.handle):
                raise EngineError("execute_async_v3 returned false (see the TensorRT log)")
            out = lane.host[self._output][: math.prod(shape)]
            cuda.memcpy_dtoh_async(out, lane.device[self._output], lane.stream)
            lane.event.record(lane.stream)
            lane.event.synchronize()
            # A copy: the pinned buffer is overwritten by this lane's next call.
            return out.reshape(shape)[:n].astype(np.float32, copy=True)
        except EngineError as exc:
            raise EngineError(f"inference failed on a {n}x{length} batch (lane {index}): "
                              f"{exc}") from exc
        except Exception as exc:
            raise EngineError(f"inference failed on a {n}x{length} batch (lane {index}): "
                              f"{type(exc).__name__}: {exc}") from exc
        finally:
            cuda.Context.pop()

    def health(self) -> None:
        out = self.run(pad_sequences([np.array([101, 102], dtype=np.int64)]))
        if not np.all(np.isfinite(out)):
            raise EngineError(f"{self.path}: health check produced non-finite outputs")

    def close(self) -> None:
        if getattr(self, "_ctx", None) is None:
            return
        self._ctx.push()
        try:
            self._free()
        finally:
            self._cuda.Context.pop()
            self._detach()

    def _free(self) -> None:
        """Free buffers, then contexts before the engine (TensorRT's order); runs with the
        CUDA context current."""
        for lane in self._lanes:
            for allocation in lane.device.values():
                allocation.free()
            for array in lane.host.values():
                base = getattr(array, "base", None)
                if hasattr(base, "free"):
                    base.free()  # the pycuda HostAllocation behind pagelocked_empty
            lane.device.clear()
            lane.host.clear()
            lane.context = None
        self._lanes = []
        self._engine = None

    def _detach(self) -> None:
        """Release our hold on the primary context (after it is popped: detach pops a
        current context itself, and a second pop would fail)."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.detach()


def _rows(batch: PaddedBatch, start: int, end: int) -> PaddedBatch:
    return PaddedBatch(batch.input_ids[start:end], batch.attention_mask[start:end],
                       batch.token_type_ids[start:end])
