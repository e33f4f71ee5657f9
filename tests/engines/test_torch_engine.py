"""The PyTorch runtime on CPU: same scores as FP32, quantized within budget, shapes bucketed.

Everything but CUDA itself (graphs, streams, page-locked copies) runs here; tests/gpu/ covers
those on a GPU host.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.accuracy import cosines
from engines.batch import PaddedBatch, pad_sequences
from engines.buckets import BucketPlan, pad_to_bucket
from engines.build import ensure_engine
from engines.errors import ArtifactError, BackendUnavailable, BuildError, EngineError
from engines.loader import load_engine
from engines.manifest import read_manifest
from engines.memory import InsufficientMemory
from engines.protocol import Engine
from engines.source import resolve_model
from engines.tokenizer import QueryTokenizer
from engines.torch_model import WEIGHTS_NAME, EncoderConfig
from engines.torch_runtime import TorchEngine, TorchOptions, memory_estimate
from tests.engines.test_onnx_engine import _embed, _sample_texts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _sample_texts(400)


@pytest.fixture(scope="module")
def reference(default_engine: Engine, default_tokenizer: QueryTokenizer,
              texts: list[str]) -> np.ndarray:
    return _embed(default_engine, default_tokenizer, texts)


def test_fp16_engine_matches_fp32_on_every_item(torch_artifacts: dict[str, Path],
                                                default_tokenizer: QueryTokenizer,
                                                texts: list[str], reference: np.ndarray) -> None:
    # dtype fp16 on CPU: the same half-precision rounding the GPU engine does.
    engine = TorchEngine(torch_artifacts["fp16"], options=TorchOptions(device="cpu",
                                                                       dtype="fp16"))
    assert isinstance(engine, Engine) and engine.device == "cpu" and engine.lanes == 1
    cos = cosines(_embed(engine, default_tokenizer, texts), reference)
    assert cos.min() >= 0.999, f"worst item {cos.min():.6f}"
    accuracy = engine.manifest.accuracy
    assert accuracy["implementation_min_cosine"] >= 0.9999
    assert accuracy["min_cosine"] >= 0.999 and accuracy["queries"] >= 300


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_engines_within_budget(precision: str, torch_artifacts: dict[str, Path],
                                         default_tokenizer: QueryTokenizer, texts: list[str],
                                         reference: np.ndarray) -> None:
    engine = TorchEngine(torch_artifacts[precision], options=TorchOptions(device="cpu",
                                                                          dtype="fp16"))
    cos = cosines(_embed(engine, default_tokenizer, texts), reference)
    assert cos.mean() >= 0.995 and np.percentile(cos, 1) >= 0.98, (cos.mean(), cos.min())
    assert cos.mean() < 0.99999  # it really is quantized: not the FP16 path under a new name
    manifest = engine.manifest
    assert manifest.precision == precision and manifest.backend == "torch"
    assert manifest.accuracy["mean_cosine"] >= manifest.accuracy["budget"]["mean_cosine"]
    quantized = manifest.build["quantization"]["quantized"]
    assert quantized + len(manifest.build["quantization"]["excluded"]) == 24


def test_bucket_padding_and_splitting_do_not_change_scores(
        torch_artifacts: dict[str, Path], default_tokenizer: QueryTokenizer,
        texts: list[str]) -> None:
    # fp32 on CPU: any difference would come from padding or splitting, not rounding.
    engine = TorchEngine(torch_artifacts["fp16"], options=TorchOptions(
        device="cpu", dtype="fp32", max_batch=8, max_tokens=8 * 64))
    seqs = [default_tokenizer._tok.encode(t).ids[:60] for t in texts[:19]]
    batch = pad_sequences([np.array(s, dtype=np.int64) for s in seqs])
    together = engine.run(batch)  # 19 rows > max_batch 8: split into 3 bucketed chunks
    one_by_one = np.concatenate([engine.run(pad_sequences([np.array(s, dtype=np.int64)]))
                                 for s in seqs])
    assert together.shape == (19, 384)
    np.testing.assert_allclose(together, one_by_one, atol=2e-5)
    # What graphs replay: the batch padded to its bucket, filler rows included.
    part = pad_sequences([np.array(s, dtype=np.int64) for s in seqs[:5]])
    bucket = engine.plan.bucket_for(part.size, part.length)
    assert bucket.batch == 6 and bucket.length >= part.length  # a filler row
    with torch.inference_mode():
        padded = engine.model(*torch.from_numpy(pad_to_bucket(part, bucket))).numpy()
    assert np.isfinite(padded).all()  # filler rows attend to one token: no NaN
    np.testing.assert_allclose(padded[:5], one_by_one[:5], atol=2e-5)


def test_lanes_share_one_engine_and_are_checked(torch_artifacts: dict[str, Path]) -> None:
    engine = load_engine(torch_artifacts["fp16"], device="cpu", lanes=2)
    batch = pad_sequences([np.array([101, 7592, 2088, 102], dtype=np.int64)])
    np.testing.assert_array_equal(engine.run(batch, lane=0), engine.run(batch, lane=1))
    with pytest.raises(ValueError, match="lane 2"):
        engine.run(batch, lane=2)
    engine.health()


def test_out_of_range_ids_fail_the_batch_not_the_engine(
        torch_artifacts: dict[str, Path]) -> None:
    engine = TorchEngine(torch_artifacts["fp16"], options=TorchOptions(device="cpu"))
    bad = pad_sequences([np.array([101, 40_000, 102], dtype=np.int64)])
    with pytest.raises(EngineError, match=r"input_ids outside 0\.\.30521"):
        engine.run(bad)
    types = np.full((1, 3), 7, dtype=np.int64)
    ok = pad_sequences([np.array([101, 2000, 102], dtype=np.int64)])
    with pytest.raises(EngineError, match="token_type_ids"):
        engine.run(PaddedBatch(ok.input_ids, ok.attention_mask, types))
    assert engine.run(ok).shape == (1, 384)  # still serving


def test_too_long_batch_is_refused(torch_artifacts: dict[str, Path]) -> None:
    engine = TorchEngine(torch_artifacts["fp16"], options=TorchOptions(device="cpu"))
    long = pad_sequences([np.full(engine.manifest.max_length + 1, 2000, dtype=np.int64)])
    with pytest.raises(EngineError, match="longer than the engine's max length"):
        engine.run(long)


def test_cuda_device_without_a_gpu_is_a_clear_error(torch_artifacts: dict[str, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    with pytest.raises(BackendUnavailable, match="sees no CUDA GPU"):
        load_engine(torch_artifacts["fp16"], device="cuda:0")


def test_memory_pre_check_refuses_before_loading(torch_artifacts: dict[str, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[bool] = []
    monkeypatch.setattr(TorchEngine, "_free_bytes", lambda self: 64 * 2**20)
    monkeypatch.setattr(TorchEngine, "_load_model", lambda self: loaded.append(True))
    with pytest.raises(InsufficientMemory, match="MiB free"):
        TorchEngine(torch_artifacts["int8"], options=TorchOptions(device="cpu", lanes=2))
    assert not loaded


def test_memory_estimate_scales_with_lanes_and_model() -> None:
    small = EncoderConfig(30522, 384, 6, 12, 1536, 512, 2, 1e-12, "similarity")
    big = EncoderConfig(30522, 768, 6, 12, 3072, 512, 2, 1e-12, "similarity")
    one = memory_estimate(big, "fp16", max_tokens=16384, lanes=1)
    two = memory_estimate(big, "fp16", max_tokens=16384, lanes=2)
    assert two > one > memory_estimate(small, "fp16", max_tokens=16384, lanes=1)
    weights_fp16 = big.parameter_count() * 2
    assert one > weights_fp16
    # INT8 linears take a byte a weight: the weight part of the estimate shrinks.
    tiny_tokens = 1
    assert (memory_estimate(big, "int8", max_tokens=tiny_tokens, lanes=1)
            < memory_estimate(big, "fp16", max_tokens=tiny_tokens, lanes=1))


def test_corrupt_weights_are_refused(torch_artifacts: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "engine"
    shutil.copytree(torch_artifacts["fp16"], copy)
    data = bytearray((copy / WEIGHTS_NAME).read_bytes())
    data[-100] ^= 0xFF
    (copy / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_engine(copy, device="cpu")


def test_classifier_on_torch_backend_matches_onnx(tiny_classifier_dir: Path,
                                                  engine_root: Path,
                                                  classifier_engine: Engine) -> None:
    source = resolve_model(tiny_classifier_dir, max_length=64)
    path = ensure_engine(source, engine_root, precision="fp16", backend="torch")
    engine = TorchEngine(path, options=TorchOptions(device="cpu", dtype="fp16"))
    tokenizer = QueryTokenizer(path / "tokenizer" / "tokenizer.json", 64, pairs=True)
    enc = tokenizer._tok.encode_batch([("cheap flights", "flights to lisbon"),
                                       ("egg", "boil an egg for nine minutes")])
    batch = pad_sequences([np.array(e.ids) for e in enc], [np.array(e.type_ids) for e in enc])
    got, want = engine.run(batch), classifier_engine.run(batch)
    assert got.shape == (2,)
    np.testing.assert_allclose(got, want, atol=1e-2)
    with pytest.raises(BuildError, match="classifier heads"):
        ensure_engine(source, engine_root, precision="int8", backend="torch")


def test_non_bert_models_are_refused_by_name() -> None:
    with pytest.raises(BuildError, match="BERT-architecture"):
        EncoderConfig.from_hf({"model_type": "roberta"}, head="similarity")


def test_wrong_backend_artifact_is_refused(default_engine_path: Path) -> None:
    with pytest.raises(ArtifactError, match="cannot be loaded by the torch runtime"):
        TorchEngine(default_engine_path, options=TorchOptions(device="cpu"))
    assert read_manifest(default_engine_path).backend == "onnxruntime"


def test_bucket_plan_covers_every_length() -> None:
    plan = BucketPlan.for_model(256, max_batch=64, max_tokens=64 * 256)
    for length in (1, 15, 16, 17, 200, 256):
        assert plan.length_for(length) >= length
    assert plan.bucket_for(10, 100).batch == 10 and plan.bucket_for(10, 100).length == 128
    assert plan.bucket_for(11, 16).batch == 12
    assert all(b.tokens <= plan.max_tokens for b in plan.buckets())
    assert plan.split(150, 256) == [(0, 64), (64, 128), (128, 150)]
    with pytest.raises(ValueError, match=r"outside 1\.\.256"):
        plan.length_for(257)


def test_cli_runs_torch_engines_and_refuses_bad_options(
        torch_artifacts: dict[str, Path], engine_root: Path, tmp_path: Path) -> None:
    import orjson
    from typer.testing import CliRunner

    from qscore.cli.app import app
    from tests.engines.test_onnx_engine import SAMPLE

    run = CliRunner().invoke
    dirs = ["--engine-dir", str(engine_root)]
    small = tmp_path / "in.jsonl"
    small.write_bytes(b"\n".join(SAMPLE.read_bytes().splitlines()[:30]) + b"\n")
    out = tmp_path / "out.jsonl"
    bad = run(app, ["rescore", str(small), "-o", str(out), "--backend", "torch",
                    "--precision", "int4", *dirs])
    assert bad.exit_code == 2 and "fp32, fp16, int8, fp8" in bad.output
    ok = run(app, ["rescore", str(small), "-o", str(out), "--backend", "torch", "--device",
                   "cpu", "--no-progress", *dirs])
    assert ok.exit_code == 0, ok.output
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(rows) == 30
    # The fp16 artifact the fixture built: found by content hash, not built again.
    assert {r["model_version"] for r in rows} == {torch_artifacts["fp16"].name}
    if not torch.cuda.is_available():
        gpu = run(app, ["worker", "--backend", "torch", "--devices", "cuda:0", *dirs,
                        "--bootstrap-servers", "127.0.0.1:9"])
        assert gpu.exit_code == 2 and "sees no CUDA GPU" in gpu.output
