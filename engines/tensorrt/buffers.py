"""Buffer sizing for a TensorRT execution context: one device and one pinned host buffer per
I/O tensor, allocated once at the profile's max shape and reused for every smaller batch.

Engines often declare int32 token ids even though the ONNX export takes int64 (the ONNX
parser narrows them), so sizes come from the dtype the engine declares and the runtime casts
PaddedBatch's int64 arrays into it. Pure logic: dtypes arrive as TensorRT enum names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# tensorrt.DataType member names -> numpy; BF16/FP8/INT4 have no numpy type and are refused.
TRT_DTYPES: dict[str, type[np.generic]] = {
    "INT32": np.int32, "INT64": np.int64, "FLOAT": np.float32, "HALF": np.float16,
    "INT8": np.int8, "BOOL": np.bool_, "UINT8": np.uint8,
}


def numpy_dtype(trt_dtype: object) -> np.dtype:
    """numpy dtype for a tensorrt.DataType, its name ("HALF") or str() ("DataType.HALF")."""
    name = str(getattr(trt_dtype, "name", trt_dtype)).rsplit(".", 1)[-1].upper()
    try:
        return np.dtype(TRT_DTYPES[name])
    except KeyError:
        raise ValueError(f"TensorRT dtype {name} has no numpy equivalent; qscore's I/O "
                         f"tensors must be one of {sorted(TRT_DTYPES)}") from None


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """An I/O tensor as the engine declares it (-1 for a dynamic dim)."""

    name: str
    dtype: str  # TensorRT dtype name
    shape: tuple[int, ...]
    is_input: bool


@dataclass(frozen=True, slots=True)
class BufferSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # declared, -1 = dynamic
    max_shape: tuple[int, ...]  # at the profile's max (batch, seq)
    is_input: bool

    @property
    def max_elements(self) -> int:
        return math.prod(self.max_shape)

    @property
    def nbytes(self) -> int:
        """Bytes to allocate: the largest shape the profile admits."""
        return self.max_elements * self.dtype.itemsize

    def shape_for(self, batch: int, length: int) -> tuple[int, ...]:
        """The shape for one call: batch (and seq, for inputs) at their actual sizes."""
        return _resolve(self.name, self.shape, self.is_input, batch, length,
                        self.max_shape[1:] if len(self.max_shape) > 1 else ())

    def nbytes_for(self, batch: int, length: int) -> int:
        return math.prod(self.shape_for(batch, length)) * self.dtype.itemsize


def _resolve(name: str, shape: tuple[int, ...], is_input: bool, batch: int, length: int,
             known_tail: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for axis, dim in enumerate(shape):
        if dim >= 0:
            out.append(int(dim))
        elif axis == 0:
            out.append(batch)
        elif axis == 1 and is_input:
            out.append(length)
        elif axis - 1 < len(known_tail):
            out.append(int(known_tail[axis - 1]))
        else:
            raise ValueError(f"tensor {name!r} has dynamic dim {axis} in shape {shape}; only "
                             "batch (and seq, for inputs) may be dynamic here")
    return tuple(out)


def buffer_spec(tensor: TensorInfo, *, max_batch: int, max_length: int,
                output_dim: int | None = None) -> BufferSpec:
    """Size one tensor at (max_batch, max_length). An output's dynamic dim 1 (never the case
    for qscore's [batch, dim] / [batch] exports, but TensorRT may report it) is `output_dim`."""
    if max_batch < 1 or max_length < 1:
        raise ValueError(f"max shape ({max_batch}, {max_length}) must be >= 1 in both dims")
    if tensor.is_input and len(tensor.shape) != 2:
        raise ValueError(f"input {tensor.name!r} has shape {tensor.shape}; BERT inputs are "
                         "[batch, seq]")
    tail: tuple[int, ...] = ()
    if not tensor.is_input and output_dim is not None:
        tail = (output_dim,)
    max_shape = _resolve(tensor.name, tuple(tensor.shape), tensor.is_input, max_batch,
                         max_length, tail)
    return BufferSpec(tensor.name, numpy_dtype(tensor.dtype), tuple(tensor.shape), max_shape,
                      tensor.is_input)


def plan_buffers(tensors: Iterable[TensorInfo], *, max_batch: int, max_length: int,
                 output_dim: int | None = None) -> list[BufferSpec]:
    return [buffer_spec(t, max_batch=max_batch, max_length=max_length, output_dim=output_dim)
            for t in tensors]


def total_bytes(specs: Iterable[BufferSpec]) -> int:
    """Device bytes one execution context's I/O buffers take (host pinned memory: the same)."""
    return sum(spec.nbytes for spec in specs)
