"""TensorRT INT8/FP16 backend: plans built from the raw ONNX export on the GPU they run on.

Importing this package never imports tensorrt or pycuda; they load when a plan is built or an
engine is opened, and `tensorrt_status()` says beforehand whether that can work here.
See docs/tensorrt.md.
"""

from engines.tensorrt.availability import TensorRTStatus, require_tensorrt, tensorrt_status
from engines.tensorrt.buffers import (
    BufferSpec,
    TensorInfo,
    buffer_spec,
    numpy_dtype,
    plan_buffers,
    total_bytes,
)
from engines.tensorrt.build import (
    CALIBRATION_CACHE,
    ONNX_FILE,
    PLAN_FILE,
    TENSORRT_FILES,
    build_plan,
    inspect_qdq,
)
from engines.tensorrt.calibration import (
    CalibrationBatches,
    make_entropy_calibrator,
    read_calibration_cache,
    tokenizer_encoder,
    write_calibration_cache,
)
from engines.tensorrt.profiles import (
    ProfileShapes,
    fixed_profile,
    input_profile,
    plan_profile,
    profiles_for_contexts,
)
from engines.tensorrt.runtime import TensorRTEngine

__all__ = [
    "CALIBRATION_CACHE", "ONNX_FILE", "PLAN_FILE", "TENSORRT_FILES", "BufferSpec",
    "CalibrationBatches", "ProfileShapes", "TensorInfo", "TensorRTEngine", "TensorRTStatus",
    "buffer_spec", "build_plan", "fixed_profile", "input_profile", "inspect_qdq",
    "make_entropy_calibrator", "numpy_dtype", "plan_buffers", "plan_profile",
    "profiles_for_contexts", "read_calibration_cache", "require_tensorrt", "tensorrt_status",
    "tokenizer_encoder", "total_bytes", "write_calibration_cache",
]
