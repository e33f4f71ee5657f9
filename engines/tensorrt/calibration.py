"""INT8 calibration data for TensorRT: real queries, tokenized, in fixed-shape batches.

Implicit INT8 (the entropy calibrator) measures activation ranges on what it is fed, so it is
fed real queries from a query log (engines.quantize.load_texts), never random ids. TensorRT
calibrates at one fixed shape (the calibration profile), so every batch has exactly
(batch_size, length); a short last batch is topped up from the start of the list rather than
with empty rows, which would skew the ranges. The batching is pure numpy and tested anywhere;
only `make_entropy_calibrator` needs tensorrt and pycuda.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.batch import PaddedBatch, pad_sequences
from engines.errors import BuildError
from engines.export import INPUT_NAMES

Encoder = Callable[[Sequence[str]], PaddedBatch]  # texts -> right-padded int64 arrays


def tokenizer_encoder(tokenizer: Any) -> Encoder:
    """Adapt a tokenizer_svc QueryTokenizer: one sequence per text, padded to the longest."""
    from schemas import QueryItem

    def encode(texts: Sequence[str]) -> PaddedBatch:
        enc = tokenizer.encode([QueryItem(id=str(i), query=t) for i, t in enumerate(texts)])
        bounds = enc.offsets.astype(np.int64)
        seqs = [enc.input_ids[bounds[i]:bounds[i + 1]].astype(np.int64)
                for i in range(len(bounds) - 1)]
        types = None
        if enc.token_type_ids is not None:
            types = [enc.token_type_ids[bounds[i]:bounds[i + 1]] for i in range(len(seqs))]
        return pad_sequences(seqs, types)

    return encode


class CalibrationBatches:
    """Deterministic fixed-shape calibration batches: {input name: int64 [batch, length]}.

    Texts are de-duplicated, sorted, then shuffled with `seed`: the batches depend on which
    queries there are, not on the file's order, and each batch mixes short and long ones.
    `length` defaults to the longest tokenized query, so nothing is cut; a smaller one
    truncates, a larger one pads with masked positions.
    """

    def __init__(self, texts: Sequence[str], encoder: Encoder | Any, *, batch_size: int = 16,
                 length: int | None = None, max_batches: int | None = 32, seed: int = 0,
                 names: Sequence[str] = INPUT_NAMES) -> None:
        if batch_size < 1:
            raise BuildError(f"calibration batch_size must be >= 1, got {batch_size}")
        if max_batches is not None and max_batches < 1:
            raise BuildError(f"max_batches must be >= 1 (or None for all), got {max_batches}")
        if length is not None and length < 1:
            raise BuildError(f"calibration length must be >= 1, got {length}")
        if unknown := sorted(set(names) - set(INPUT_NAMES)):
            raise BuildError(f"calibration inputs {unknown} are not among {INPUT_NAMES}")
        unique = sorted({t.strip() for t in texts if t and t.strip()})
        if not unique:
            raise BuildError("no calibration queries: INT8 calibration needs real query texts "
                             "(a TSV or JSONL query log, read with engines.quantize.load_texts)")
        order = np.random.default_rng(seed).permutation(len(unique))
        wanted = len(unique) if max_batches is None else min(len(unique),
                                                             max_batches * batch_size)
        self.texts: list[str] = [unique[i] for i in order[:wanted]]
        encode: Encoder = encoder if callable(encoder) else tokenizer_encoder(encoder)
        self._padded = encode(self.texts)
        if self._padded.size != len(self.texts):
            raise BuildError(f"the encoder returned {self._padded.size} rows for "
                             f"{len(self.texts)} texts; it must give one sequence per text")
        self.batch_size = batch_size
        self.length = int(length or self._padded.length)
        self.names = tuple(names)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.batch_size, self.length)

    def __len__(self) -> int:
        return -(-len(self.texts) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        arrays = {"input_ids": self._padded.input_ids,
                  "attention_mask": self._padded.attention_mask,
                  "token_type_ids": self._padded.token_type_ids}
        n = len(self.texts)
        keep = min(self.length, self._padded.length)
        for index in range(len(self)):
            # Wrap around: the last batch is topped up with the first queries again.
            rows = np.arange(index * self.batch_size, (index + 1) * self.batch_size) % n
            batch = {}
            for name in self.names:
                out = np.zeros(self.shape, dtype=np.int64)
                out[:, :keep] = arrays[name][rows, :keep]
                batch[name] = out
            yield batch


def read_calibration_cache(path: Path) -> bytes | None:
    """The cache's bytes, or None when absent or empty (TensorRT then calibrates afresh)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return data or None


def write_calibration_cache(path: Path, data: bytes) -> None:
    """Write atomically: a build killed mid-write must not leave a truncated cache behind
    that the next build would trust."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


def make_entropy_calibrator(batches: CalibrationBatches | None, cache_path: Path, *,
                            dtypes: Mapping[str, np.dtype] | None = None) -> Any:
    """A trt.IInt8EntropyCalibrator2 feeding `batches` through pycuda device buffers.

    With `batches` None it only replays the cache (a rebuild that skips calibration). Errors
    inside TensorRT's callbacks cannot propagate through C++, so they are kept in `.error`
    and the builder re-raises them. Call `.free()` with the CUDA context current when done.
    """
    from engines.tensorrt.availability import require_tensorrt

    trt = require_tensorrt()
    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        raise BuildError(f"TensorRT {trt.__version__} has no IInt8EntropyCalibrator2: implicit "
                         "INT8 calibration was removed (TensorRT 11); build with "
                         "calibration='qdq' from an ONNX that carries Q/DQ nodes")
    import pycuda.driver as cuda

    class EntropyCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # pybind11 trampolines must be initialised explicitly
            self._batches = iter(batches) if batches is not None else iter(())
            self._device: dict[str, Any] = {}
            self.fed = 0
            self.error: BaseException | None = None

        def get_batch_size(self) -> int:
            # Explicit-batch networks take the batch from the calibration profile's shape;
            # TensorRT ignores this value (Polygraphy returns 1 too).
            return 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                batch = next(self._batches, None)
                if batch is None:
                    return None
                pointers = []
                for name in names:
                    host = np.ascontiguousarray(
                        batch[name], dtype=(dtypes or {}).get(name, np.int64))
                    if name not in self._device:
                        self._device[name] = cuda.mem_alloc(host.nbytes)
                    cuda.memcpy_htod(self._device[name], host)
                    pointers.append(int(self._device[name]))
                self.fed += 1
                return pointers
            except BaseException as exc:  # ends calibration; build_plan re-raises it
                self.error = exc
                return None

        def read_calibration_cache(self) -> bytes | None:
            return read_calibration_cache(cache_path)

        def write_calibration_cache(self, cache: Any) -> None:
            try:
                write_calibration_cache(cache_path, bytes(cache))
            except BaseException as exc:
                self.error = exc

        def free(self) -> None:
            for allocation in self._device.values():
                allocation.free()
            self._device.clear()

    return EntropyCalibrator()
