"""The torch engine on a CUDA GPU: graphs, lanes, accuracy and the memory pre-check.

What tests/engines/test_torch_engine.py cannot reach on CPU: CUDA graph replay, two streams
driven by two threads at once, FP16/INT8/FP8 arithmetic on tensor cores, and free device
memory as the GPU reports it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.accuracy import cosines
from engines.batch import PaddedBatch, pad_sequences
from engines.memory import InsufficientMemory
from engines.protocol import Engine
from engines.tokenizer import QueryTokenizer
from engines.torch_model import CONFIG_NAME, EncoderConfig
from engines.torch_runtime import TorchEngine, TorchOptions, memory_estimate
from schemas import QueryItem
from tests.engines.test_onnx_engine import _embed, _sample_texts

pytestmark = pytest.mark.slow

CUDA = "cuda:0"
# (sequences, longest length): several graph buckets, a full 256 and a split (80 > 64 rows).
SHAPES = ((1, 5), (3, 17), (10, 40), (16, 64), (24, 100), (64, 128), (10, 256), (64, 256),
          (80, 256))


def fp8_capable() -> bool:
    return torch.cuda.get_device_capability(0) >= (8, 9)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _sample_texts(300)


@pytest.fixture(scope="module")
def batches(gpu_tokenizer: QueryTokenizer, texts: list[str]) -> list[PaddedBatch]:
    """Real token ids cut to each shape; rows of a batch differ in length (real padding)."""
    tb = gpu_tokenizer.token_batch("s", [QueryItem(id=str(i), query=t)
                                         for i, t in enumerate(texts)], submitted_at=0.0)
    stream = np.concatenate([tb.sequence(i)[1:-1] for i in range(tb.n_sequences)])
    out = []
    for k, (size, length) in enumerate(SHAPES):
        seqs = []
        for row in range(size):
            body = max(length - 2 - row % 3, 0)
            start = (k * 1009 + row * 37) % (len(stream) - length)
            seqs.append(np.concatenate([[101], stream[start:start + body], [102]]))
        out.append(pad_sequences([np.asarray(s, dtype=np.int64) for s in seqs]))
    return out


@pytest.fixture(scope="module")
def reference(onnx_reference: Engine, gpu_tokenizer: QueryTokenizer,
              texts: list[str]) -> np.ndarray:
    return _embed(onnx_reference, gpu_tokenizer, texts)


def _engine(path: Path, **options: object) -> TorchEngine:
    return TorchEngine(path, options=TorchOptions(device=CUDA, **options))  # type: ignore[arg-type]


def test_graph_replay_matches_running_without_graphs(
        gpu_artifact: Callable[[str], Path], batches: list[PaddedBatch]) -> None:
    graphed = _engine(gpu_artifact("fp16"), lanes=1, graphs=True)
    eager = _engine(gpu_artifact("fp16"), lanes=1, graphs=False)
    try:
        assert graphed.graphs and not eager.graphs and graphed.dtype == torch.float16
        first = [graphed.run(b) for b in batches]
        for batch, got in zip(batches, first, strict=True):
            want = eager.run(batch)
            assert got.shape == want.shape == (batch.size, graphed.config.output_dim)
            assert np.all(np.isfinite(got))
            np.testing.assert_allclose(got, want, atol=1e-3)
        # Replayed again in the other order, with every other bucket run in between: the
        # static inputs are rewritten in full each call, so nothing of a previous batch leaks.
        again = [graphed.run(b) for b in reversed(batches)][::-1]
        for a, b in zip(first, again, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
    finally:
        graphed.close()
        eager.close()


def test_two_lanes_on_two_threads_match_one_lane(
        gpu_artifact: Callable[[str], Path], batches: list[PaddedBatch]) -> None:
    one = _engine(gpu_artifact("fp16"), lanes=1)
    two = _engine(gpu_artifact("fp16"), lanes=2)
    rounds = 5
    try:
        assert two.lanes == 2 and two.graphs
        want = [one.run(b) for b in batches]
        barrier = threading.Barrier(2)
        spans: list[list[tuple[float, float]]] = [[], []]
        got: list[list[tuple[int, np.ndarray]]] = [[], []]
        errors: list[BaseException] = []

        def drive(lane: int) -> None:
            order = list(range(len(batches)))
            if lane == 1:
                order.reverse()  # the lanes run different buckets at the same moment
            barrier.wait()
            try:
                for _ in range(rounds):
                    for i in order:
                        started = time.perf_counter()
                        out = two.run(batches[i], lane=lane)
                        spans[lane].append((started, time.perf_counter()))
                        got[lane].append((i, out))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=drive, args=(lane,)) for lane in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for lane in (0, 1):
            assert len(got[lane]) == rounds * len(batches)
            for i, out in got[lane]:
                np.testing.assert_allclose(out, want[i], atol=1e-3)
        overlapped = sum(1 for a0, a1 in spans[0] for b0, b1 in spans[1] if a0 < b1 and b0 < a1)
        assert overlapped > 0, "the two lanes never ran at the same time"
    finally:
        one.close()
        two.close()


def test_fp16_engine_matches_onnx_fp32_on_every_item(
        gpu_artifact: Callable[[str], Path], gpu_tokenizer: QueryTokenizer, texts: list[str],
        reference: np.ndarray) -> None:
    engine = TorchEngine(gpu_artifact("fp16"))  # the defaults: cuda:0, two lanes, graphs
    try:
        assert isinstance(engine, Engine)
        assert engine.device == CUDA and engine.lanes == 2 and engine.graphs
        engine.health()
        cos = cosines(_embed(engine, gpu_tokenizer, texts), reference)
        assert cos.min() >= 0.999, f"worst item {cos.min():.6f}"
        assert engine.manifest.accuracy["checked_on"].startswith("cuda")
    finally:
        engine.close()


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_engines_within_budget_on_the_gpu(
        precision: str, gpu_artifact: Callable[[str], Path], gpu_tokenizer: QueryTokenizer,
        texts: list[str], reference: np.ndarray) -> None:
    if precision == "fp8" and not fp8_capable():
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    engine = _engine(gpu_artifact(precision), lanes=2)
    try:
        cos = cosines(_embed(engine, gpu_tokenizer, texts), reference)
        assert cos.mean() >= 0.995 and np.percentile(cos, 1) >= 0.98, (cos.mean(), cos.min())
        assert cos.mean() < 0.99999  # really quantized, not the FP16 path under a new name
    finally:
        engine.close()


def test_memory_pre_check_refuses_when_the_gpu_is_nearly_full(
        gpu_artifact: Callable[[str], Path]) -> None:
    path = gpu_artifact("fp16")
    cfg = EncoderConfig.read(path / CONFIG_NAME)
    needed = memory_estimate(cfg, "fp16", max_tokens=64 * 256, lanes=2)
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(0)
    hog_bytes = (free - needed // 2) // 2**21 * 2**21  # leave about half the estimate free
    assert hog_bytes > 0
    hog = torch.empty(hog_bytes, dtype=torch.uint8, device=CUDA)
    try:
        with pytest.raises(InsufficientMemory, match="MiB free"):
            _engine(path, lanes=2)
    finally:
        del hog
        torch.cuda.empty_cache()
    engine = _engine(path, lanes=2)  # with the memory back, the same load goes through
    engine.close()
