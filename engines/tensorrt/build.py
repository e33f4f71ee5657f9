"""Build a TensorRT plan (serialized engine) from the raw ONNX export, on the GPU it will run on.

Precision paths:
  fp16            FP16 flag, no calibration.
  int8 + entropy  implicit INT8: INT8 + FP16 flags, TensorRT's entropy calibrator fed real
                  queries; the scales go to `calibration.cache` in the artifact, and a rebuild
                  that finds the cache skips calibration (deprecated in TensorRT 10.1, removed
                  in 11: refused there with a BuildError).
  int8 + qdq      explicit INT8: the ONNX already carries Q/DQ nodes (symmetric signed INT8,
                  see `inspect_qdq`); built strongly typed where TensorRT has the flag (precision
                  comes from the graph, precision flags are then not allowed), else with INT8.
The plan gets one optimisation profile per execution context (engines.tensorrt.profiles).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engines.buckets import BucketPlan
from engines.errors import BuildError
from engines.tensorrt.availability import require_tensorrt
from engines.tensorrt.buffers import numpy_dtype
from engines.tensorrt.calibration import (
    CalibrationBatches,
    make_entropy_calibrator,
    read_calibration_cache,
)
from engines.tensorrt.profiles import (
    DEFAULT_OPT_BATCH,
    DEFAULT_OPT_LENGTH,
    fixed_profile,
    profiles_for_contexts,
)

PLAN_FILE = "model.plan"
ONNX_FILE = "model.onnx"
CALIBRATION_CACHE = "calibration.cache"
# The artifact beside manifest.json and tokenizer/ (engines.manifest lists and hashes them all).
TENSORRT_FILES: dict[str, str] = {
    PLAN_FILE: "the serialized engine; valid only for the GPU architecture and TensorRT "
               "version it was built with",
    ONNX_FILE: "the raw export the plan was built from (standard ONNX, or Q/DQ ONNX for "
               "calibration='qdq'): a plan is rebuilt from it on a new GPU or TensorRT",
    CALIBRATION_CACHE: "INT8 entropy-calibration scales (calibration='entropy' only); a "
                       "rebuild that finds it skips calibration",
}
PRECISIONS = ("int8", "fp16")
CALIBRATIONS = ("entropy", "qdq")
DEFAULT_WORKSPACE_BYTES = 4 << 30

Progress = Callable[[str], None]


def inspect_qdq(onnx_path: Path) -> dict[str, int]:
    """Check an explicitly quantized ONNX is one TensorRT can build; count its Q/DQ nodes.

    TensorRT reads standard ONNX only (not ONNX Runtime's fused com.microsoft ops) and
    supports symmetric signed INT8 Q/DQ only: a uint8 or non-zero zero point is refused by
    its parser mid-build, so it is refused here first, with the quantize_static settings
    that produce a usable graph.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    nodes = list(model.graph.node)
    if custom := sorted({n.domain for n in nodes if n.domain not in ("", "ai.onnx")}):
        raise BuildError(f"{onnx_path} uses operator domains {custom} (ONNX Runtime's fused "
                         "graph?); TensorRT parses standard ONNX only: quantize the raw export")
    quant = [n for n in nodes if n.op_type == "QuantizeLinear"]
    dequant = [n for n in nodes if n.op_type == "DequantizeLinear"]
    if not quant and not dequant:
        raise BuildError(f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes; "
                         "calibration='qdq' needs an explicitly quantized ONNX "
                         "(onnxruntime.quantization.quantize_static, QuantFormat.QDQ), or "
                         "use calibration='entropy'")
    inits = {i.name: i for i in model.graph.initializer}
    bad = []
    for node in quant + dequant:
        if len(node.input) >= 3 and node.input[2] in inits:
            zero = numpy_helper.to_array(inits[node.input[2]])
            if zero.dtype == np.uint8 or np.any(zero != 0):
                bad.append(node.name or node.output[0])
    if bad:
        raise BuildError(f"{len(bad)} Q/DQ nodes have unsigned or non-zero zero points (e.g. "
                         f"{bad[:3]}); TensorRT supports symmetric signed INT8 only: quantize "
                         "with activation_type=weight_type=QuantType.QInt8 and extra_options="
                         "{'ActivationSymmetric': True, 'WeightSymmetric': True}")
    return {"quantize_nodes": len(quant), "dequantize_nodes": len(dequant)}


def build_plan(onnx_path: Path, plan_path: Path, *, plan: BucketPlan, precision: str = "int8",
               calibration: str = "entropy", batches: CalibrationBatches | None = None,
               cache_path: Path | None = None, contexts: int = 2,
               workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
               opt_batch: int = DEFAULT_OPT_BATCH, opt_length: int = DEFAULT_OPT_LENGTH,
               progress: Progress | None = None) -> dict[str, Any]:
    """Build `plan_path` from `onnx_path` on CUDA device 0; return the facts for the
    manifest's `build` (its "tensorrt" key is the version the runtime insists on)."""
    say = progress or (lambda _: None)
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if precision not in PRECISIONS:
        raise BuildError(f"TensorRT precision {precision!r} not supported; choose {PRECISIONS}")
    if precision == "int8" and calibration not in CALIBRATIONS:
        raise BuildError(f"calibration {calibration!r} unknown; choose {CALIBRATIONS}")
    if contexts < 1:
        raise BuildError(f"contexts must be >= 1, got {contexts}")
    if not onnx_path.is_file():
        raise BuildError(f"{onnx_path}: no such ONNX file")
    entropy = precision == "int8" and calibration == "entropy"
    cached = entropy and cache_path is not None and read_calibration_cache(cache_path) is not None
    if entropy and cache_path is None:
        raise BuildError("calibration='entropy' needs cache_path (the artifact's "
                         f"{CALIBRATION_CACHE}) to store the scales")
    if entropy and batches is None and not cached:
        raise BuildError(f"calibration='entropy' needs calibration batches (none given and no "
                         f"cache at {cache_path})")
    qdq = inspect_qdq(onnx_path) if precision == "int8" and calibration == "qdq" else None

    trt = require_tensorrt()
    import pycuda.driver as cuda

    started = time.perf_counter()
    cuda.init()
    device = cuda.Device(0)
    cuda_context = device.retain_primary_context()
    cuda_context.push()  # TensorRT (runtime API) and pycuda share the primary context
    calibrator = None
    try:
        log = _build_logger(trt)
        builder = trt.Builder(log)
        typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        strongly_typed = qdq is not None and typed is not None
        network = builder.create_network(1 << int(typed) if strongly_typed else 0)
        parser = trt.OnnxParser(network, log)
        say(f"parsing {onnx_path.name} with TensorRT {trt.__version__}")
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or log.errors
            raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path} "
                             f"({len(errors)} errors):\n  " + "\n  ".join(errors))
        inputs = {network.get_input(i).name: network.get_input(i)
                  for i in range(network.num_inputs)}
        try:
            profiles = profiles_for_contexts(plan, contexts, list(inputs),
                                             opt_batch=opt_batch, opt_length=opt_length)
        except ValueError as exc:
            raise BuildError(f"cannot make optimisation profiles: {exc}") from exc
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        for shapes in profiles:
            profile = builder.create_optimization_profile()
            for name, s in shapes.items():
                profile.set_shape(name, s.min, s.opt, s.max)
            config.add_optimization_profile(profile)
        if precision == "fp16":
            _set_flags(trt, config, "FP16")
        elif qdq is not None:
            if not strongly_typed:  # strongly typed networks refuse precision flags
                _set_flags(trt, config, "INT8")
        else:
            _set_flags(trt, config, "INT8", "FP16")
            dtypes = {name: numpy_dtype(tensor.dtype) for name, tensor in inputs.items()}
            calibrator = make_entropy_calibrator(batches, cache_path, dtypes=dtypes)
            _require(config, "int8_calibrator", trt)
            config.int8_calibrator = calibrator
            if batches is not None:
                calib = builder.create_optimization_profile()
                shape = fixed_profile(*batches.shape)
                for name in inputs:
                    calib.set_shape(name, shape.min, shape.opt, shape.max)
                _require(config, "set_calibration_profile", trt)
                config.set_calibration_profile(calib)
        say(f"building the {precision} plan ({calibration if precision == 'int8' else 'no'} "
            f"calibration, {contexts} profiles); this takes minutes")
        serialized = builder.build_serialized_network(network, config)
        if calibrator is not None and calibrator.error is not None:
            raise BuildError(f"INT8 calibration failed: {calibrator.error}") from calibrator.error
        if serialized is None:
            raise BuildError("TensorRT could not build the plan: "
                             + ("; ".join(log.errors) or "no error was logged"))
        tmp = plan_path.with_name(plan_path.name + ".tmp")
        with tmp.open("wb") as fh:
            fh.write(serialized)  # IHostMemory exposes the buffer protocol
        os.replace(tmp, plan_path)
        device_memory = _device_memory(trt, log, serialized)
        major, minor = device.compute_capability()
        facts: dict[str, Any] = {
            "tensorrt": trt.__version__, "gpu": device.name(),
            "compute_capability": f"{major}.{minor}", "precision": precision,
            "calibration": calibration if precision == "int8" else None,
            "strongly_typed": strongly_typed, "contexts": contexts,
            "profiles": [{n: s.to_dict() for n, s in p.items()} for p in profiles],
            "bucket_plan": {"batch_buckets": list(plan.batch_buckets),
                            "length_buckets": list(plan.length_buckets),
                            "max_tokens": plan.max_tokens},
            "inputs": {n: numpy_dtype(t.dtype).name for n, t in inputs.items()},
            "workspace_bytes": int(workspace_bytes), "plan_bytes": plan_path.stat().st_size,
            "device_memory_bytes": device_memory,
        }
        if qdq is not None:
            facts["qdq"] = qdq
        if calibrator is not None:
            facts["calibration_batches"] = calibrator.fed
            facts["calibration_cache"] = "reused" if cached and not calibrator.fed else "written"
        facts["seconds"] = round(time.perf_counter() - started, 2)
        return facts
    finally:
        if calibrator is not None:
            calibrator.free()
        cuda_context.pop()
        cuda_context.detach()


def _build_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps errors, so a failed build can say why."""

    class BuildLog(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)

    return BuildLog()


def _set_flags(trt: Any, config: Any, *names: str) -> None:
    for name in names:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise BuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{name} (TensorRT "
                             "11 removed precision flags: networks are strongly typed); build "
                             "with precision='int8', calibration='qdq'")
        config.set_flag(flag)


def _require(obj: Any, attribute: str, trt: Any) -> None:
    if not hasattr(obj, attribute):
        raise BuildError(f"TensorRT {trt.__version__} has no {type(obj).__name__}.{attribute}: "
                         "implicit INT8 calibration was removed (TensorRT 11); build with "
                         "calibration='qdq'")


def _device_memory(trt: Any, log: Any, serialized: Any) -> int | None:
    """Activation memory one execution context needs (for the manifest's memory estimate)."""
    engine = trt.Runtime(log).deserialize_cuda_engine(serialized)
    if engine is None:
        raise BuildError("the plan TensorRT just built does not deserialize: "
                         + "; ".join(log.errors))
    size = getattr(engine, "device_memory_size_v2", None)  # TensorRT >= 10.1
    if size is None:
        size = getattr(engine, "device_memory_size", None)
    return int(size) if size is not None else None
