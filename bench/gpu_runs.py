"""Timing and reference pieces of bench/engine_gpu.py: timed calls, lanes on threads, HF rows.

Every timed call ends synchronised: `TorchEngine.run` returns host arrays (it waits for its
lane's copy out), and `HfEncoder` ends in `.cpu()`. So wall clock around one call is that
call's latency, and total items over elapsed wall clock is throughput, on CPU and GPU alike.
"""

from __future__ import annotations

import gc
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.batch import PaddedBatch


@dataclass(slots=True)
class Timing:
    """Items finished, wall-clock seconds for all of them, and each call's milliseconds."""

    items: int = 0
    elapsed_s: float = 0.0
    call_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.items / self.elapsed_s if self.elapsed_s else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.call_ms, q)) if self.call_ms else float("nan")


def time_calls(call: Callable[[], int], calls: int, warmup: int) -> Timing:
    """`calls` sequential calls after `warmup` untimed ones; `call` returns items done."""
    for _ in range(warmup):
        call()
    out = Timing()
    started = time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter()
        out.items += call()
        out.call_ms.append((time.perf_counter() - t0) * 1000)
    out.elapsed_s = time.perf_counter() - started
    return out


def time_lanes(lane_call: Callable[[int], int], lanes: int, calls: int,
               warmup: int) -> Timing:
    """`calls` calls in all, shared out over `lanes` threads (thread i drives lane i), all
    released together by a barrier; throughput is total items over the wall clock from the
    release until the last thread ends."""
    if lanes == 1:
        return time_calls(lambda: lane_call(0), calls, warmup)
    for lane in range(lanes):
        for _ in range(warmup):
            lane_call(lane)
    share = [calls // lanes + (1 if i < calls % lanes else 0) for i in range(lanes)]
    per_lane = [Timing() for _ in range(lanes)]

    def drive(lane: int) -> None:
        for _ in range(share[lane]):
            t0 = time.perf_counter()
            per_lane[lane].items += lane_call(lane)
            per_lane[lane].call_ms.append((time.perf_counter() - t0) * 1000)

    elapsed = _run_threads(drive, lanes, "bench-lane")
    return _merged(per_lane, elapsed)


def _run_threads(body: Callable[[int], None], lanes: int, name: str) -> float:
    """`body(i)` on `lanes` threads released together by a barrier; returns the wall seconds
    from the release until the last one ends, or raises the first error any of them hit."""
    barrier = threading.Barrier(lanes + 1)
    errors: list[BaseException] = []

    def drive(lane: int) -> None:
        barrier.wait()
        try:
            body(lane)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(i,), name=f"{name}-{i}")
               for i in range(lanes)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed


def _merged(per_lane: list[Timing], elapsed: float) -> Timing:
    return Timing(items=sum(t.items for t in per_lane), elapsed_s=elapsed,
                  call_ms=[ms for t in per_lane for ms in t.call_ms])


def drain_batches(run: Callable[[PaddedBatch, int], np.ndarray],
                  batches: Sequence[tuple[np.ndarray, PaddedBatch]], n_items: int,
                  lanes: int, dim: int) -> tuple[np.ndarray, Timing]:
    """Every batch once, pulled from one shared queue by `lanes` threads (thread i calls
    `run(batch, i)`); outputs land at their rows. Returns outputs [n_items, dim] and timing."""
    work: queue.SimpleQueue[tuple[np.ndarray, PaddedBatch] | None] = queue.SimpleQueue()
    for item in batches:
        work.put(item)
    for _ in range(lanes):
        work.put(None)
    outputs = np.zeros((n_items, dim), dtype=np.float32)
    per_lane = [Timing() for _ in range(lanes)]

    def drive(lane: int) -> None:
        while (item := work.get()) is not None:
            rows, batch = item
            t0 = time.perf_counter()
            out = run(batch, lane)
            per_lane[lane].call_ms.append((time.perf_counter() - t0) * 1000)
            per_lane[lane].items += len(rows)
            outputs[rows] = out.reshape(len(rows), -1)

    elapsed = _run_threads(drive, lanes, "bench-drain")
    return outputs, _merged(per_lane, elapsed)


class HfEncoder:
    """Hugging Face AutoModel plus mean pooling and L2 normalisation (engines/export.py's
    SimilarityHead): numpy batch in, host float32 embeddings out, on `device` in `dtype`.
    Pooling runs in float32, as the torch engine's does."""

    def __init__(self, model_dir: Path, *, device: str, dtype: Any,
                 attn_implementation: str = "eager") -> None:
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # dtype explicitly: transformers 5 otherwise keeps a checkpoint's own (fp16) dtype.
        model = AutoModel.from_pretrained(str(model_dir), attn_implementation=attn_implementation,
                                          dtype=torch.float32)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = device
        self.label = f"{attn_implementation} {str(dtype).removeprefix('torch.')}"

    def __call__(self, batch: PaddedBatch) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            ids, mask, types = (torch.from_numpy(a).to(self.device) for a in (
                batch.input_ids, batch.attention_mask, batch.token_type_ids))
            hidden = self.model(input_ids=ids, attention_mask=mask,
                                token_type_ids=types).last_hidden_state
            m = mask.unsqueeze(-1).to(torch.float32)
            pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return F.normalize(pooled, p=2.0, dim=-1).cpu().numpy()

    def close(self) -> None:
        self.model = None


class GpuMemory:
    """Device memory taken by loading something, as deltas from before the load: the caching
    allocator's peak (max_memory_allocated, transients included), what stays allocated, and
    what the allocator holds from the device (memory_reserved)."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        self.device = device
        self.peak = self.held = self.reserved = 0
        if self.cuda:
            gc.collect()  # engines and models closed just before must be gone from the count
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            self._allocated0 = torch.cuda.memory_allocated(device)
            self._reserved0 = torch.cuda.memory_reserved(device)

    def measure(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._allocated0
            self.held = torch.cuda.memory_allocated(self.device) - self._allocated0
            self.reserved = torch.cuda.memory_reserved(self.device) - self._reserved0
