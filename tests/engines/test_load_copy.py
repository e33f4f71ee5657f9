"""Loading weights off the serving path: the chunk plan, the pacing, the staged copy (on CPU).

The CUDA side (page-locked staging, the low-priority stream, a load beside a serving engine)
is tests/gpu/test_hot_load.py; here the same copier runs with ordinary memory, so every byte
offset and every pause is checked without a GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from engines.batch import PaddedBatch, pad_sequences
from engines.build import ensure_engine
from engines.load_copy import (
    BytePace,
    StagedCopier,
    byte_view,
    chunk_plan,
    host_copy,
    pace_delay,
    stream_priorities,
)
from engines.loader import load_engine
from engines.select import EngineSettings, load_for
from engines.source import resolve_model
from engines.torch_model import (
    CONFIG_NAME,
    EncoderConfig,
    encoder_from_state,
    load_encoder,
    read_weights,
)
from engines.torch_quant import quantize_linears
from engines.torch_runtime import TorchEngine, TorchOptions


def covered(sizes: list[int], chunk_bytes: int) -> None:
    """Every byte of every tensor exactly once, in order; chunks full but the last; pieces
    packed from the start of the staging buffer."""
    plan = chunk_plan(sizes, chunk_bytes)
    assert len(plan) == -(-sum(sizes) // chunk_bytes)
    seen: dict[int, int] = {}  # tensor -> bytes so far
    for n, chunk in enumerate(plan):
        offset = 0
        for piece in chunk:
            assert piece.size > 0 and piece.offset == offset
            assert piece.start == seen.get(piece.tensor, 0)
            seen[piece.tensor] = piece.start + piece.size
            offset += piece.size
        assert offset <= chunk_bytes
        assert offset == chunk_bytes or n == len(plan) - 1
    assert seen == {i: size for i, size in enumerate(sizes) if size}


def test_chunk_plan_spans_packs_and_skips() -> None:
    plan = chunk_plan([0, 5, 20, 0, 3, 8], 8)
    assert [[(p.tensor, p.start, p.size, p.offset) for p in chunk] for chunk in plan] == [
        [(1, 0, 5, 0), (2, 0, 3, 5)],  # a small tensor shares its chunk with the next
        [(2, 3, 8, 0)],  # a tensor larger than a chunk spans three
        [(2, 11, 8, 0)],
        [(2, 19, 1, 0), (4, 0, 3, 1), (5, 0, 4, 4)],  # zero-size tensors 0 and 3: no piece
        [(5, 4, 4, 0)],
    ]
    assert chunk_plan([], 8) == [] and chunk_plan([0, 0], 8) == []
    assert [len(c) for c in chunk_plan([8, 8], 8)] == [1, 1]  # exact fits: no empty chunk
    for bad in (0, -1):
        with pytest.raises(ValueError, match="chunk_bytes"):
            chunk_plan([1], bad)
    with pytest.raises(ValueError, match="negative"):
        chunk_plan([1, -2], 8)


@given(st.lists(st.integers(0, 5000), max_size=30), st.integers(1, 4096))
def test_chunk_plan_covers_any_sizes(sizes: list[int], chunk_bytes: int) -> None:
    covered(sizes, chunk_bytes)


def test_pace_delay() -> None:
    assert pace_delay(10**9, None, 0.0) == 0.0  # no cap
    assert pace_delay(50, 100.0, 0.2) == pytest.approx(0.3)  # ahead of 100 B/s: wait
    assert pace_delay(50, 100.0, 0.9) == 0.0  # behind the rate: go on


class FakeTime:
    """A clock that moves only when slept on, or by `tick` per reading (the copy's own cost)."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now, self.tick, self.sleeps = 100.0, tick, []

    def clock(self) -> float:
        self.now += self.tick
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def test_byte_pace_holds_the_average_rate() -> None:
    t = FakeTime()
    pace = BytePace(1000.0, t.clock, t.sleep)
    pace.begin()
    for _ in range(4):
        pace.advance(250)
    assert t.sleeps == pytest.approx([0.25, 0.25, 0.25, 0.25])
    assert t.now - 100.0 == pytest.approx(1.0) and pace.slept_s == pytest.approx(1.0)
    # A transfer slower than the cap is never paused.
    slow = FakeTime(tick=1.0)
    pace = BytePace(1000.0, slow.clock, slow.sleep)
    pace.begin()
    for _ in range(3):
        assert pace.advance(100) == 0.0
    assert slow.sleeps == []
    with pytest.raises(ValueError, match="max_bytes_per_s"):
        BytePace(0.0)
    assert BytePace(None).advance(10**12) == 0.0


def odd_tensors() -> dict[str, torch.Tensor]:
    """Every shape and dtype the plan must handle: scalars, empties, tensors spanning chunks."""
    g = torch.Generator().manual_seed(7)
    return {
        "big": torch.randn(3000, generator=g).to(torch.float16),  # 6000 B: several chunks
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5),
        "bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "int8": torch.randint(-128, 127, (33,), dtype=torch.int8, generator=g),
        "mask": torch.rand(17, generator=g) > 0.5,
        "fp32": torch.randn(5, 129, generator=g),
        "strided": torch.randn(6, 8, generator=g).t(),  # not contiguous
    }


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1024, 2**20])
def test_staged_copy_is_bit_identical(chunk_bytes: int) -> None:
    src = odd_tensors()
    copier = StagedCopier("cpu", chunk_bytes=chunk_bytes)
    out = copier.copy(src)
    assert list(out) == list(src)
    for name, t in src.items():
        got = out[name]
        assert got.shape == t.shape and got.dtype == t.dtype and got.device.type == "cpu"
        assert got.data_ptr() != t.data_ptr() or t.numel() == 0
        assert torch.equal(byte_view(got.contiguous()), byte_view(t.contiguous())), name
    total = sum(t.numel() * t.element_size() for t in src.values())
    assert copier.stats.bytes == total
    assert copier.stats.chunks == -(-total // chunk_bytes)
    assert copier.stream is None and copier.stats.paced_s == 0.0


def test_staged_copy_is_paced_chunk_by_chunk() -> None:
    t = FakeTime()
    src = {"w": torch.zeros(10_000, dtype=torch.uint8), "b": torch.zeros(0)}
    copier = StagedCopier("cpu", chunk_bytes=4096, max_bytes_per_s=10_000.0, clock=t.clock,
                          sleep=t.sleep)
    copier.copy(src)
    # 4096, 4096, 1808 bytes at 10 kB/s: a pause after each chunk, 1 s in all.
    assert t.sleeps == pytest.approx([0.4096, 0.4096, 0.1808])
    assert copier.stats.paced_s == pytest.approx(1.0) and copier.stats.chunks == 3


def test_staged_copy_paces_in_real_time() -> None:
    src = {"w": torch.ones(2_000_000, dtype=torch.uint8)}
    started = time.perf_counter()
    out = StagedCopier("cpu", chunk_bytes=256 * 1024, max_bytes_per_s=20e6).copy(src)
    took = time.perf_counter() - started
    assert took >= 0.09  # 2 MB at 20 MB/s, less the first chunk's head start
    assert torch.equal(out["w"], src["w"])


def test_copier_refuses_bad_options_and_device_tensors() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        StagedCopier("cpu", chunk_bytes=0)
    with pytest.raises(ValueError, match="max_bytes_per_s"):
        StagedCopier("cpu", max_bytes_per_s=-1.0)
    with pytest.raises(ValueError, match="host"):
        StagedCopier("cpu").copy({"m": torch.empty(2, device="meta")})
    if not torch.cuda.is_available():
        assert stream_priorities() == (0, 0)


def test_host_copy_owns_its_bytes() -> None:
    src = odd_tensors()
    for name, t in src.items():
        out = host_copy(t)
        assert torch.equal(out, t), name
        assert out.is_contiguous() and (out.numel() == 0 or out.data_ptr() != t.data_ptr())


# -- the encoder: loaded through the staged copy, exactly what the direct load gives ---------

@pytest.fixture(scope="module")
def tiny_torch_artifact(tiny_classifier_dir: Path, engine_root: Path) -> Path:
    """The tiny 2-layer classifier as a torch artifact (FP16 weights)."""
    source = resolve_model(tiny_classifier_dir, max_length=64)
    return ensure_engine(source, engine_root, precision="fp16", backend="torch", promote=False)


def _batch() -> PaddedBatch:
    rows = [np.array([101, 7592, 2088, 102], dtype=np.int64),
            np.array([101, 2054, 2003, 1037, 3899, 1029, 102], dtype=np.int64)]
    return pad_sequences(rows)


def _inputs(batch: PaddedBatch) -> list[torch.Tensor]:
    return [torch.from_numpy(a) for a in (batch.input_ids, batch.attention_mask,
                                          batch.token_type_ids)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_staged_load_is_bit_identical_to_the_direct_load(tiny_torch_artifact: Path,
                                                         dtype: torch.dtype) -> None:
    cfg = EncoderConfig.read(tiny_torch_artifact / CONFIG_NAME)
    direct = load_encoder(tiny_torch_artifact, dtype=dtype)
    host = read_weights(tiny_torch_artifact, resident=True)
    state = StagedCopier("cpu", chunk_bytes=4096).copy(host)  # tensors span chunks
    staged = encoder_from_state(cfg, state, dtype=dtype, device="cpu")
    want, got = direct.state_dict(), staged.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].dtype == got[name].dtype == dtype or name == "position_ids"
        assert torch.equal(want[name], got[name]), name
    inputs = _inputs(_batch())
    with torch.inference_mode():
        assert torch.equal(direct(*inputs), staged(*inputs))
        # Quantized at load from the same bytes: the same INT8 weights and scales.
        names = cfg.linear_names()
        quantize_linears(direct, "int8", names, out_dtype=dtype)
        quantize_linears(staged, "int8", names, out_dtype=dtype)
        for (n1, b1), (n2, b2) in zip(direct.named_buffers(), staged.named_buffers(),
                                      strict=True):
            assert n1 == n2 and torch.equal(b1, b2), n1
        assert torch.equal(direct(*inputs), staged(*inputs))


@pytest.mark.slow
def test_engine_records_its_load_phases(tiny_torch_artifact: Path) -> None:
    engine = TorchEngine(tiny_torch_artifact, options=TorchOptions(device="cpu"))
    assert set(engine.load_phases) == {"verify", "read", "copy", "build"}  # no graphs on CPU
    assert all(v >= 0 for v in engine.load_phases.values())
    assert engine.describe()["load_phases_s"].keys() == engine.load_phases.keys()
    assert "load_copy" not in engine.describe()  # nothing crosses a bus on CPU
    # The engine serves exactly what the direct load computes.
    direct = load_encoder(tiny_torch_artifact, dtype=engine.dtype)
    batch = _batch()
    with torch.inference_mode():
        want = direct(*_inputs(batch)).numpy()
    np.testing.assert_array_equal(engine.run(batch), want)
    unverified = TorchEngine(tiny_torch_artifact, options=TorchOptions(device="cpu"),
                             verify=False)
    assert "verify" not in unverified.load_phases


@pytest.mark.slow
def test_load_options_reach_the_torch_engine(tiny_torch_artifact: Path) -> None:
    engine = load_engine(tiny_torch_artifact, device="cpu", load_max_bytes_per_s=5e8,
                         load_chunk_bytes=1 << 20)
    assert isinstance(engine, TorchEngine)
    assert (engine._opts.load_max_bytes_per_s, engine._opts.load_chunk_bytes) == (5e8, 1 << 20)
    reloaded = load_for(EngineSettings(), tiny_torch_artifact, "cpu", threads=1, verify=False,
                        load_max_bytes_per_s=2e8)
    assert isinstance(reloaded, TorchEngine)
    assert reloaded._opts.load_max_bytes_per_s == 2e8 and "verify" not in reloaded.load_phases
    cold = load_for(EngineSettings(), tiny_torch_artifact, "cpu")
    assert cold._opts.load_max_bytes_per_s is None  # type: ignore[attr-defined]


def test_torch_options_check_the_load_settings() -> None:
    assert TorchOptions().load_max_bytes_per_s is None  # a cold start is not paced
    assert TorchOptions().load_chunk_bytes == 8 * 2**20
    with pytest.raises(ValueError, match="load_chunk_bytes"):
        TorchOptions(load_chunk_bytes=0)
    with pytest.raises(ValueError, match="load_max_bytes_per_s"):
        TorchOptions(load_max_bytes_per_s=0.0)
