"""PyTorch runtime: FP16, INT8 or FP8 on a CUDA GPU, with CUDA graphs and one stream per lane.

One engine per GPU holds the weights once. Each lane (two by default) owns a CUDA stream,
page-locked host buffers, a device input slab and one CUDA graph per shape bucket, captured at
load so no capture ever happens under traffic. A lane's call copies its batch in, replays the
graph and copies the result out, all queued on its own stream, so while one lane computes
batch n the other copies batch n+1: the two-stream overlap of the 360 Search and Bing articles.

Loading stays off the serving path of another engine on the same GPU (a hot swap): weights are
read to host, copied in paced chunks on a low-priority stream (engines.load_copy), cast and
quantized on that stream, and each lane warms up and captures its graphs on its own stream,
without the device-wide synchronisations `torch.cuda.graph` makes. Serving lanes take the
highest stream priority. `load_phases` says how long each step took.

The same class runs on CPU (no graphs, no streams) so every path short of CUDA itself is tested
on machines without a GPU, and the build measures quantized accuracy there.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.batch import PaddedBatch, pad_sequences
from engines.buckets import Bucket, BucketPlan, pad_to_bucket
from engines.errors import ArtifactError, BackendUnavailable, EngineDead, EngineError
from engines.load_copy import DEFAULT_CHUNK_BYTES, StagedCopier, stream_priorities
from engines.manifest import Manifest, read_manifest, verify_artifact
from engines.memory import check_fits, host_available_bytes
from engines.torch_model import (
    CONFIG_NAME,
    Encoder,
    EncoderConfig,
    encoder_from_state,
    read_weights,
)
from engines.torch_quant import QUANT_PRECISIONS, fp8_supported, quantize_linears

BACKEND = "torch"
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
DEFAULT_LANES = 2


@dataclass(frozen=True, slots=True)
class TorchOptions:
    device: str | None = None  # None: cuda:0 when there is a GPU, else cpu
    lanes: int | None = None  # None: 2 on a GPU (two streams), 1 on CPU
    graphs: bool = True  # CUDA graphs per bucket (GPU only)
    max_batch: int = 64
    max_tokens: int = 64 * 256  # padded tokens of the largest prepared shape
    dtype: str | None = None  # float dtype of activations; None: fp16 on GPU, fp32 on CPU
    # Host-to-device weight copies (GPU only): chunk size through the page-locked staging
    # buffer, and the average byte rate (None: unpaced, for a cold start; a hot reload caps it
    # so the serving engine's own copies keep the bus).
    load_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    load_max_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        if self.load_chunk_bytes < 1:
            raise ValueError(f"load_chunk_bytes must be >= 1, not {self.load_chunk_bytes}")
        if self.load_max_bytes_per_s is not None and self.load_max_bytes_per_s <= 0:
            raise ValueError("load_max_bytes_per_s must be > 0, or None for no cap")

    def resolved_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendUnavailable(
                    f"device {self.device} asked for, but this torch ({torch.__version__}) "
                    "sees no CUDA GPU; install a CUDA build of torch on a GPU host, or use "
                    "--device cpu / the onnxruntime backend")
            index = device.index or 0
            if index >= torch.cuda.device_count():
                raise BackendUnavailable(f"device {self.device} asked for, but only "
                                         f"{torch.cuda.device_count()} GPU(s) are visible")
            device = torch.device("cuda", index)
        return device


def compute_dtype(device: torch.device, precision: str, override: str | None) -> torch.dtype:
    if override is not None:
        return {"fp32": torch.float32, "fp16": torch.float16,
                "bf16": torch.bfloat16}[override]
    if precision == "fp32":
        return torch.float32
    return torch.float16 if device.type == "cuda" else torch.float32


def memory_estimate(cfg: EncoderConfig, precision: str, *, max_tokens: int, lanes: int,
                    dtype_bytes: int = 2) -> int:
    """Upper estimate of device bytes: weights once, plus each lane's activation pool.

    A lane's pool holds the largest bucket's live activations: the residual stream, QKV, the
    attention output and the FFN intermediate (in the float dtype, plus fp32/int8 copies the
    quantized linears make of their input), attention's per-head working set and the lane's
    input slab. Graphs of one lane share the pool, so buckets do not add up.
    """
    params = cfg.parameter_count()
    linear = cfg.num_layers * (4 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size
                               * cfg.intermediate_size)
    weight_bytes = 4 if precision == "fp32" else dtype_bytes
    if precision in QUANT_PRECISIONS:
        weights = linear * 1 + (params - linear) * weight_bytes
    else:
        weights = params * weight_bytes
    act_bytes = 4 if precision == "fp32" else dtype_bytes
    per_token = (cfg.hidden_size * 6 + cfg.intermediate_size * 2) * act_bytes
    if precision in QUANT_PRECISIONS:
        per_token += cfg.intermediate_size * (4 + 1 + 4)  # fp32 input copy, int8 copy, acc
    workspace = max_tokens * per_token + 3 * max_tokens * 8 * 2
    return int(weights + lanes * workspace)


@dataclass
class _Lane:
    index: int
    stream: Any = None  # torch.cuda.Stream on a GPU
    host_in: torch.Tensor | None = None  # page-locked [3 * max_tokens] int64
    dev_in: torch.Tensor | None = None  # device [3 * max_tokens] int64
    host_out: torch.Tensor | None = None  # page-locked [max_batch, out_dim] float32
    done: Any = None  # torch.cuda.Event
    graphs: dict[Bucket, tuple[Any, torch.Tensor]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class TorchEngine:
    """An artifact of backend "torch", loaded onto one device with `lanes` streams."""

    def __init__(self, path: Path, *, options: TorchOptions | None = None,
                 verify: bool = True, check_memory: bool = True) -> None:
        opts = options or TorchOptions()
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest.backend != BACKEND:
            raise ArtifactError(self.path, f"backend {manifest.backend!r} cannot be loaded by "
                                           f"the {BACKEND} runtime")
        if manifest.precision not in PRECISIONS:
            raise ArtifactError(self.path, f"precision {manifest.precision!r} is not one of "
                                           f"{PRECISIONS}")
        # Seconds per loading step: verify (if asked), read, copy, build, capture (graphs).
        self.load_phases: dict[str, float] = {}
        self.load_copy: dict[str, float] = {}  # GPU: bytes, chunks, paced_s of the copy
        self._lap = time.perf_counter()
        if verify:
            verify_artifact(self.path, manifest)
            self._phase("verify")
        self.manifest: Manifest = manifest
        self._opts = opts
        self._device = opts.resolved_device()
        self.device = str(self._device)
        self.cuda = self._device.type == "cuda"
        self.lanes = opts.lanes or (DEFAULT_LANES if self.cuda else 1)
        if self.lanes < 1:
            raise ValueError("lanes must be >= 1")
        if manifest.precision == "fp8" and not fp8_supported(self._device):
            raise BackendUnavailable(f"{self.path}: FP8 needs a GPU of compute capability 8.9 "
                                     f"or newer (Ada, Hopper); {self.device} is older")
        self.config = EncoderConfig.read(self.path / CONFIG_NAME)
        self.plan = BucketPlan.for_model(manifest.max_length, max_batch=opts.max_batch,
                                         max_tokens=max(opts.max_tokens, manifest.max_length))
        self.dtype = compute_dtype(self._device, manifest.precision, opts.dtype)
        self.memory_bytes = memory_estimate(self.config, manifest.precision,
                                            max_tokens=self.plan.max_tokens, lanes=self.lanes,
                                            dtype_bytes=self.dtype.itemsize)
        if check_memory:
            check_fits(self.path, self.memory_bytes, self._free_bytes(), device=self.device)
        self.model = self._load_model()  # read, copy, build
        self._lanes = [self._make_lane(i) for i in range(self.lanes)]
        self._phase("build")
        self.graphs = bool(opts.graphs and self.cuda)
        if self.graphs:
            for lane in self._lanes:
                self._capture(lane)
            self._phase("capture")

    # -- loading -------------------------------------------------------------------------

    def _phase(self, name: str) -> None:
        """Charge the time since the previous step to `name`."""
        now = time.perf_counter()
        self.load_phases[name] = self.load_phases.get(name, 0.0) + now - self._lap
        self._lap = now

    def _free_bytes(self) -> int | None:
        if self.cuda:
            free, _total = torch.cuda.mem_get_info(self._device)
            return int(free)
        return host_available_bytes()

    def _load_model(self) -> Encoder:
        """Weights read to host ("read"), copied to the device ("copy"), cast and quantized
        there ("build"). On a GPU the copy is chunked and paced on a low-priority stream, and
        the casts and quantization kernels run on that stream too; on CPU the host tensors
        are the engine's (mapped from the file, as `load_encoder` does)."""
        self._lap = time.perf_counter()  # the memory check is not loading
        host = read_weights(self.path, resident=self.cuda)
        self._phase("read")
        copier = None
        try:
            if self.cuda:
                copier = StagedCopier(self._device, chunk_bytes=self._opts.load_chunk_bytes,
                                      max_bytes_per_s=self._opts.load_max_bytes_per_s)
                state = copier.copy(host)
                self.load_copy = {"bytes": copier.stats.bytes, "chunks": copier.stats.chunks,
                                  "paced_s": round(copier.stats.paced_s, 3)}
            else:
                state = host
            del host
            self._phase("copy")
            with copier.on_stream() if copier is not None else nullcontext():
                model = encoder_from_state(self.config, state, dtype=self.dtype,
                                           device=self._device, where=self.path)
                del state
                if self.manifest.precision in QUANT_PRECISIONS:
                    keep = set(self.manifest.build.get("quantization", {}).get("excluded", []))
                    names = [n for n in self.config.linear_names() if n not in keep]
                    quantize_linears(model, self.manifest.precision, names,
                                     out_dtype=self.dtype)
            if copier is not None:
                copier.synchronize()  # the lanes' streams read finished weights
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError(f"{self.path}: out of GPU memory loading weights on "
                              f"{self.device}: {exc}") from exc
        return model

    def _make_lane(self, index: int) -> _Lane:
        lane = _Lane(index)
        if not self.cuda:
            return lane
        slab = 3 * self.plan.max_tokens
        # The highest priority: the GPU runs serving kernels ahead of a loading engine's
        # (engines.load_copy), and graphs replay at the priority of the stream they run on.
        _lowest, highest = stream_priorities()
        lane.stream = torch.cuda.Stream(self._device, priority=highest)
        lane.host_in = torch.empty(slab, dtype=torch.int64, pin_memory=True)
        with torch.cuda.stream(lane.stream):  # allocated and zeroed in the lane's own order
            lane.dev_in = torch.zeros(slab, dtype=torch.int64, device=self._device)
        lane.host_out = torch.empty((self.plan.max_batch, self.config.output_dim),
                                    dtype=torch.float32, pin_memory=True)
        lane.done = torch.cuda.Event()
        return lane

    def _static_inputs(self, lane: _Lane, bucket: Bucket) -> torch.Tensor:
        assert lane.dev_in is not None
        return lane.dev_in[: 3 * bucket.tokens].view(3, bucket.batch, bucket.length)

    def _capture(self, lane: _Lane) -> None:
        """One graph per bucket on this lane's stream, sharing one memory pool.

        Largest first, so smaller captures reuse the pool's blocks. The lane's graphs never
        replay concurrently (one thread per lane, each call synchronised), which is what makes
        sharing a pool safe. Thread-local capture mode lets another engine keep serving on
        other threads while this one loads (a hot swap). `capture_begin`/`capture_end` rather
        than `torch.cuda.graph`, whose every capture synchronises the whole device and empties
        the allocator's caches (cudaFree, itself a device-wide synchronisation), one per bucket
        and lane beside a serving engine; this lane's stream is all that must be idle, and the
        warm-up leaves it so.
        """
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.stream(lane.stream):
            for bucket in sorted(self.plan.buckets(), key=lambda b: -b.tokens):
                static = self._static_inputs(lane, bucket)
                static.zero_()
                static[1].fill_(1)  # valid ids and a full mask for the warm-up runs
                for _ in range(2):  # warm-up on the side stream, as capture requires
                    self.model(static[0], static[1], static[2])
                lane.stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    out = self.model(static[0], static[1], static[2])
                finally:
                    graph.capture_end()
                lane.graphs[bucket] = (graph, out)
        lane.stream.synchronize()

    # -- serving -------------------------------------------------------------------------

    def run(self, batch: PaddedBatch, lane: int = 0) -> np.ndarray:
        if not 0 <= lane < self.lanes:
            raise ValueError(f"lane {lane} outside 0..{self.lanes - 1}")
        if batch.length > self.plan.max_length:
            raise EngineError(f"a {batch.size}x{batch.length} batch is longer than the "
                              f"engine's max length {self.plan.max_length}")
        self._check_ids(batch)
        the_lane = self._lanes[lane]
        parts = []
        with the_lane.lock:
            for start, end in self.plan.split(batch.size, batch.length):
                chunk = batch if (start, end) == (0, batch.size) else PaddedBatch(
                    batch.input_ids[start:end], batch.attention_mask[start:end],
                    batch.token_type_ids[start:end])
                parts.append(self._run_chunk(the_lane, chunk))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _check_ids(self, batch: PaddedBatch) -> None:
        """Out-of-range ids fail one batch here; on a GPU they would trip a device-side
        assert that poisons the CUDA context and takes the whole engine down."""
        for name, array, limit in (("input_ids", batch.input_ids, self.config.vocab_size),
                                   ("token_type_ids", batch.token_type_ids,
                                    self.config.type_vocab_size)):
            if array.size and (int(array.min()) < 0 or int(array.max()) >= limit):
                raise EngineError(f"{name} outside 0..{limit - 1} in a {batch.size}x"
                                  f"{batch.length} batch (values {int(array.min())}.."
                                  f"{int(array.max())}); not this engine's tokenizer?")

    def _run_chunk(self, lane: _Lane, batch: PaddedBatch) -> np.ndarray:
        # Graphs need their captured shapes; eager runs take the batch as it is (padding to a
        # bucket would only add work).
        bucket = (self.plan.bucket_for(batch.size, batch.length) if self.graphs
                  else Bucket(batch.size, batch.length))
        slab = pad_to_bucket(batch, bucket)
        try:
            if not self.cuda:
                with torch.inference_mode():
                    out = self.model(*torch.from_numpy(slab))
                return out.float().numpy()[: batch.size].copy()
            return self._run_cuda(lane, bucket, slab, batch.size)
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError(f"out of GPU memory on a {batch.size}x{batch.length} batch "
                              f"(bucket {bucket.batch}x{bucket.length}): {exc}") from exc
        except RuntimeError as exc:
            # A CUDA error poisons the context: every later call fails too, so the pool must
            # take this device out of service rather than retry on it.
            if "CUDA" in str(exc) or "cuda" in str(exc):
                raise EngineDead(f"{self.device}: {exc}") from exc
            raise EngineError(f"inference failed on a {batch.size}x{batch.length} batch: "
                              f"{exc}") from exc

    def _run_cuda(self, lane: _Lane, bucket: Bucket, slab: np.ndarray, n: int) -> np.ndarray:
        assert lane.host_in is not None and lane.host_out is not None
        k = slab.size
        lane.host_in[:k].numpy()[:] = slab.reshape(-1)
        with torch.cuda.stream(lane.stream), torch.inference_mode():
            static = self._static_inputs(lane, bucket)
            static.view(-1).copy_(lane.host_in[:k], non_blocking=True)
            if self.graphs:
                graph, out = lane.graphs[bucket]
                graph.replay()
            else:
                out = self.model(static[0], static[1], static[2])
            dest = lane.host_out[: bucket.batch]
            dest.view(out.shape).copy_(out, non_blocking=True)
            lane.done.record(lane.stream)
        lane.done.synchronize()
        return dest.numpy()[:n].reshape((n, *out.shape[1:])).copy()

    def health(self) -> None:
        for lane in range(self.lanes):
            out = self.run(pad_sequences([np.array([101, 102], dtype=np.int64)]), lane)
            if not np.all(np.isfinite(out)):
                raise EngineError(f"{self.path}: health check on lane {lane} produced "
                                  "non-finite outputs")

    def close(self) -> None:
        for lane in self._lanes:
            lane.graphs.clear()
        self._lanes = []
        self.model = None  # type: ignore[assignment]
        if self.cuda:
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        return {"device": self.device, "lanes": self.lanes, "graphs": self.graphs,
                "dtype": str(self.dtype).removeprefix("torch."),
                "precision": self.manifest.precision, "buckets": len(self.plan.buckets()),
                "memory_estimate_mib": round(self.memory_bytes / 2**20, 1),
                "load_phases_s": {k: round(v, 3) for k, v in self.load_phases.items()},
                **({"load_copy": dict(self.load_copy)} if self.load_copy else {})}
