"""Loading a new engine on a GPU while another engine serves on it: a hot swap's load.

What tests/engines/test_load_copy.py cannot reach on CPU: the page-locked staging buffer, the
copy and cast on a lowest-priority stream, the serving lanes at the highest, the byte-rate cap
against a real bus, graph capture without device-wide synchronisation while another engine's
graphs replay on other threads, and the weights on the device bit for bit those of a plain
`load_file(device="cuda")`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.batch import PaddedBatch, pad_sequences
from engines.load_copy import StagedCopier, byte_view, stream_priorities
from engines.tokenizer import QueryTokenizer
from engines.torch_model import load_encoder, read_weights
from engines.torch_quant import QUANT_PRECISIONS, quantize_linears
from engines.torch_runtime import TorchEngine, TorchOptions
from schemas import QueryItem
from tests.engines.test_onnx_engine import _sample_texts

pytestmark = pytest.mark.slow

CUDA = "cuda:0"
CAP = 200e6  # bytes/s: MiniLM's ~45 MB of FP16 weights take ~0.2 s
CHUNK = 4 * 2**20


@pytest.fixture(scope="module")
def batches(gpu_tokenizer: QueryTokenizer) -> list[PaddedBatch]:
    tb = gpu_tokenizer.token_batch("s", [QueryItem(id=str(i), query=t)
                                         for i, t in enumerate(_sample_texts(96))],
                                   submitted_at=0.0)
    seqs = [tb.sequence(i) for i in range(tb.n_sequences)]
    return [pad_sequences(seqs[i:i + 12]) for i in range(0, len(seqs), 12)]


def test_staged_copy_to_the_gpu_is_exact_low_priority_and_paced() -> None:
    g = torch.Generator().manual_seed(3)
    src = {"big": torch.randn(5 * 2**20, generator=g).to(torch.float16),  # 10 MiB: 3 chunks
           "empty": torch.empty(0), "scalar": torch.tensor(1.5),
           "int8": torch.randint(-128, 127, (999,), dtype=torch.int8, generator=g)}
    total = sum(t.numel() * t.element_size() for t in src.values())
    lowest, highest = stream_priorities()
    assert lowest >= 0 > highest  # CUDA: lower numbers run first
    copier = StagedCopier(CUDA, chunk_bytes=CHUNK, max_bytes_per_s=50e6)
    assert copier.stream.priority == lowest
    started = time.perf_counter()
    out = copier.copy(src)
    took = time.perf_counter() - started
    for name, t in src.items():
        assert out[name].device == torch.device(CUDA) and out[name].dtype == t.dtype
        assert torch.equal(byte_view(out[name].cpu()), byte_view(t)), name
    assert copier.stats.bytes == total and copier.stats.chunks == math.ceil(total / CHUNK)
    assert took >= 0.9 * (total - CHUNK) / 50e6, took  # the first chunk goes at once
    assert copier.stats.paced_s > 0


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_load_beside_a_serving_engine(precision: str, gpu_artifact: Callable[[str], Path],
                                      batches: list[PaddedBatch]) -> None:
    path = gpu_artifact(precision)
    old = TorchEngine(path, options=TorchOptions(device=CUDA, lanes=2))
    new: TorchEngine | None = None
    try:
        # Per lane: each lane replays its own graphs, and a graph replayed on the same
        # inputs gives the same floats.
        want = [[old.run(b, lane=lane) for b in batches] for lane in (0, 1)]
        stop = threading.Event()
        calls: list[list[tuple[float, float]]] = [[], []]
        errors: list[BaseException] = []

        def serve(lane: int) -> None:  # the old engine keeps serving, checked every call
            i = lane
            try:
                while not stop.is_set():
                    k = i % len(batches)
                    started = time.perf_counter()
                    got = old.run(batches[k], lane=lane)
                    calls[lane].append((started, time.perf_counter()))
                    np.testing.assert_array_equal(got, want[lane][k])
                    i += 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=serve, args=(lane,)) for lane in (0, 1)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # steady serving first
        started = time.perf_counter()
        new = TorchEngine(path, options=TorchOptions(  # as the reloader's thread loads it
            device=CUDA, lanes=2, load_max_bytes_per_s=CAP, load_chunk_bytes=CHUNK),
            verify=False)
        loaded = time.perf_counter()
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors

        # Phases: each step timed, together no longer than the load; the copy held the cap.
        phases = new.load_phases
        assert set(phases) == {"read", "copy", "build", "capture"}, phases
        assert all(v >= 0 for v in phases.values())
        assert sum(phases.values()) <= loaded - started + 1e-3
        weights = sum(t.numel() * t.element_size() for t in read_weights(path).values())
        assert new.load_copy["bytes"] == weights
        assert new.load_copy["chunks"] == math.ceil(weights / CHUNK)
        assert phases["copy"] >= 0.9 * (weights - CHUNK) / CAP, (phases, weights)
        assert new.describe()["load_phases_s"].keys() == phases.keys()
        # Serving lanes outrank the loading stream.
        highest = stream_priorities()[1]
        assert all(lane.stream.priority == highest for lane in new._lanes + old._lanes)

        # The old engine served all along (never stalled for the load), exactly.
        during = [(a, b) for lane in calls for a, b in lane if a < loaded and b > started]
        before = sorted(b - a for lane in calls for a, b in lane if b <= started)
        assert during, "the old engine served nothing while the new one loaded"
        worst = max(b - a for a, b in during)
        print(f"{precision}: load {loaded - started:.2f} s {phases}; serving p50 before "
              f"{before[len(before) // 2] * 1e3:.2f} ms, worst during {worst * 1e3:.2f} ms "
              f"over {len(during)} calls")
        assert worst < 1.0, f"a serving call took {worst:.2f} s during the load"

        # The new engine: weights bit for bit those of a plain load onto the device, and
        # the old engine's outputs (same weights, same shapes: the same kernels; the margin
        # is for a GEMM algorithm chosen differently, far below any wrong byte's effect).
        direct = load_encoder(path, dtype=new.dtype, device=CUDA)
        if precision in QUANT_PRECISIONS:
            keep = set(new.manifest.build.get("quantization", {}).get("excluded", []))
            quantize_linears(direct, precision, [n for n in new.config.linear_names()
                                                 if n not in keep], out_dtype=new.dtype)
        ours, ref = new.model.state_dict(), direct.state_dict()
        assert ours.keys() == ref.keys()
        for name in ref:
            assert torch.equal(ours[name], ref[name]), name
        for lane in (0, 1):
            for batch, expected in zip(batches, want[lane], strict=True):
                np.testing.assert_allclose(new.run(batch, lane=lane), expected, rtol=0,
                                           atol=1e-5)
    finally:
        old.close()
        if new is not None:
            new.close()


def test_cold_load_is_unpaced(gpu_artifact: Callable[[str], Path]) -> None:
    path = gpu_artifact("fp16")
    cold = TorchEngine(path, options=TorchOptions(device=CUDA, lanes=1))
    try:
        assert cold.load_copy["paced_s"] == 0.0
        weights = cold.load_copy["bytes"]
        assert cold.load_phases["copy"] < weights / CAP  # faster than the hot-load cap
        assert set(cold.load_phases) == {"verify", "read", "copy", "build", "capture"}
    finally:
        cold.close()
