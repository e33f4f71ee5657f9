"""The TensorRT backend's parts that run without TensorRT: profiles, buffer sizing, calibration
batches from real queries, Q/DQ checks, and refusing cleanly where tensorrt/pycuda are absent.

TensorRT and pycuda are hidden (or faked) through sys.modules, so these tests behave the same
on a GPU host that has them installed.
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from engines.batch import pad_sequences
from engines.buckets import BucketPlan
from engines.errors import ArtifactError, BackendUnavailable, BuildError
from engines.export import INPUT_NAMES
from engines.manifest import Manifest, read_manifest, write_manifest
from engines.quantize import load_texts
from engines.source import default_model_path, default_sample_log, resolve_model
from engines.tensorrt import (
    PLAN_FILE,
    TENSORRT_FILES,
    CalibrationBatches,
    ProfileShapes,
    TensorInfo,
    TensorRTEngine,
    buffer_spec,
    build_plan,
    fixed_profile,
    inspect_qdq,
    numpy_dtype,
    plan_buffers,
    plan_profile,
    profiles_for_contexts,
    read_calibration_cache,
    require_tensorrt,
    tensorrt_status,
    total_bytes,
    write_calibration_cache,
)
from engines.tokenizer import QueryTokenizer

# --- availability ---------------------------------------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither tensorrt nor pycuda importable (a None entry makes import raise ImportError)."""
    for name in ("tensorrt", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)


def fake_gpu_stack(monkeypatch: pytest.MonkeyPatch, *, version: str = "10.3.0",
                   devices: int = 1, init_error: Exception | None = None) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    driver = types.ModuleType("pycuda.driver")

    def init() -> None:
        if init_error is not None:
            raise init_error

    driver.init = init  # type: ignore[attr-defined]
    driver.Device = types.SimpleNamespace(count=lambda: devices)  # type: ignore[attr-defined]
    package = types.ModuleType("pycuda")
    package.driver = driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    return trt


def test_status_names_both_missing_packages(no_tensorrt: None) -> None:
    status = tensorrt_status()
    assert not status.available
    assert status.tensorrt_version is None and status.pycuda is False
    assert "tensorrt is not importable" in status.reason
    assert "pycuda is not importable" in status.reason


def test_status_needs_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu_stack(monkeypatch, devices=0)
    status = tensorrt_status()
    assert (status.available, status.tensorrt_version, status.pycuda) == (False, "10.3.0", True)
    assert "no CUDA device" in status.reason
    fake_gpu_stack(monkeypatch, devices=2)
    assert tensorrt_status().available and tensorrt_status().reason == "ok"


def test_status_never_raises_when_the_driver_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu_stack(monkeypatch, init_error=RuntimeError("cuInit failed: no CUDA driver"))
    status = tensorrt_status()
    assert not status.available and "cuInit failed: no CUDA driver" in status.reason


def test_require_says_what_to_install_and_what_works_instead(no_tensorrt: None) -> None:
    with pytest.raises(BackendUnavailable) as caught:
        require_tensorrt()
    message = str(caught.value)
    assert "pip install tensorrt pycuda" in message and "NVIDIA GPU" in message
    assert "ONNX Runtime" in message and "torch" in message
    assert not isinstance(caught.value, ImportError)


def test_require_returns_the_module_when_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    trt = fake_gpu_stack(monkeypatch)
    assert require_tensorrt() is trt


# --- profiles -------------------------------------------------------------------------------


def test_profile_covers_the_plan_with_opt_at_typical_traffic() -> None:
    shapes = plan_profile(BucketPlan.for_model(256))
    assert (shapes.min, shapes.opt, shapes.max) == ((1, 1), (32, 64), (64, 256))
    for batch, length in ((1, 1), (64, 256), (33, 17)):
        assert shapes.contains(batch, length)
    assert not shapes.contains(65, 10) and not shapes.contains(1, 257)


def test_opt_is_clamped_into_a_small_plan() -> None:
    shapes = plan_profile(BucketPlan.for_model(48, max_batch=8))
    assert (shapes.opt, shapes.max) == ((8, 48), (8, 48))
    assert plan_profile(BucketPlan.for_model(256), opt_batch=500, opt_length=3).opt == (64, 3)
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_profile(BucketPlan.for_model(256), opt_batch=0)


def test_one_identical_profile_per_context() -> None:
    profiles = profiles_for_contexts(BucketPlan.for_model(128), 3)
    assert len(profiles) == 3
    assert all(list(p) == list(INPUT_NAMES) for p in profiles)
    assert all(p == profiles[0] for p in profiles)
    assert profiles[0] is not profiles[1]  # separate dicts: one per profile index
    two = profiles_for_contexts(BucketPlan.for_model(128), 2, ["input_ids", "attention_mask"])
    assert list(two[1]) == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("contexts", [0, -1])
def test_contexts_must_be_positive(contexts: int) -> None:
    with pytest.raises(ValueError, match="contexts must be >= 1"):
        profiles_for_contexts(BucketPlan.for_model(128), contexts)


def test_profiles_refuse_unknown_inputs_and_impossible_ranges() -> None:
    with pytest.raises(ValueError, match="not BERT inputs"):
        profiles_for_contexts(BucketPlan.for_model(128), 1, ["pixel_values"])
    with pytest.raises(ValueError, match="batch range is impossible"):
        ProfileShapes((4, 1), (2, 8), (8, 16))
    with pytest.raises(ValueError, match="seq range is impossible"):
        ProfileShapes((1, 1), (2, 32), (8, 16))
    with pytest.raises(ValueError, match="two dims >= 1"):
        ProfileShapes((0, 1), (2, 8), (8, 16))
    fixed = fixed_profile(16, 24)
    assert fixed.min == fixed.opt == fixed.max == (16, 24)
    assert fixed.to_dict() == {"min": [16, 24], "opt": [16, 24], "max": [16, 24]}


# --- buffers --------------------------------------------------------------------------------


def test_buffer_bytes_at_the_max_shape_per_dtype() -> None:
    tensors = [TensorInfo("input_ids", "INT32", (-1, -1), True),
               TensorInfo("attention_mask", "INT64", (-1, -1), True),
               TensorInfo("output", "HALF", (-1, 384), False)]
    specs = plan_buffers(tensors, max_batch=64, max_length=256)
    assert [s.max_shape for s in specs] == [(64, 256), (64, 256), (64, 384)]
    assert [s.nbytes for s in specs] == [64 * 256 * 4, 64 * 256 * 8, 64 * 384 * 2]
    assert total_bytes(specs) == 65536 + 131072 + 49152
    assert specs[0].dtype == np.int32 and specs[2].dtype == np.float16
    assert specs[0].shape_for(3, 17) == (3, 17) and specs[0].nbytes_for(3, 17) == 3 * 17 * 4
    assert specs[2].shape_for(3, 17) == (3, 384)


def test_classifier_output_and_static_dims() -> None:
    probs = buffer_spec(TensorInfo("output", "FLOAT", (-1,), False), max_batch=64,
                        max_length=512)
    assert probs.max_shape == (64,) and probs.nbytes == 256
    static = buffer_spec(TensorInfo("input_ids", "INT32", (8, 128), True), max_batch=64,
                         max_length=512)
    assert static.max_shape == (8, 128)  # fixed dims are kept, not widened


def test_dynamic_output_dim_needs_the_manifest_dim() -> None:
    tensor = TensorInfo("output", "FLOAT", (-1, -1), False)
    with pytest.raises(ValueError, match="dynamic dim 1"):
        buffer_spec(tensor, max_batch=4, max_length=8)
    assert buffer_spec(tensor, max_batch=4, max_length=8, output_dim=384).max_shape == (4, 384)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        buffer_spec(TensorInfo("input_ids", "INT32", (-1,), True), max_batch=4, max_length=8)


def test_tensorrt_dtype_names_map_to_numpy() -> None:
    assert numpy_dtype("INT32") == np.int32 and numpy_dtype("INT64") == np.int64
    assert numpy_dtype("DataType.HALF") == np.float16  # str() of the enum
    assert numpy_dtype(types.SimpleNamespace(name="BOOL")) == np.bool_
    assert numpy_dtype("int8") == np.int8 and numpy_dtype("FLOAT") == np.float32
    with pytest.raises(ValueError, match="BF16 has no numpy equivalent"):
        numpy_dtype("BF16")


# --- calibration ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_json() -> Path:
    return default_model_path() / "tokenizer.json"


@pytest.fixture(scope="module")
def query_tokenizer(tokenizer_json: Path) -> QueryTokenizer:
    # The default model's own tokenizer.json: the file every artifact of it copies.
    return QueryTokenizer(tokenizer_json, resolve_model("default").max_length, pairs=False)


@pytest.fixture(scope="module")
def real_queries() -> list[str]:
    return load_texts(default_sample_log())


def test_batches_of_real_queries_have_the_profile_shape(
        query_tokenizer: QueryTokenizer, real_queries: list[str], tokenizer_json: Path) -> None:
    from tokenizers import Tokenizer

    batches = CalibrationBatches(real_queries, query_tokenizer, batch_size=16, max_batches=5)
    out = list(batches)
    assert len(out) == len(batches) == 5 and len(batches.texts) == 80
    raw = Tokenizer.from_file(str(tokenizer_json))
    raw.no_padding()
    raw.no_truncation()
    expected = [raw.encode(t).ids for t in batches.texts]
    assert batches.shape == (16, max(len(ids) for ids in expected))
    for index, batch in enumerate(out):
        assert list(batch) == list(INPUT_NAMES)
        for name in INPUT_NAMES:
            assert batch[name].shape == batches.shape and batch[name].dtype == np.int64
        for row in range(16):
            ids = expected[index * 16 + row]
            n = len(ids)
            assert batch["input_ids"][row, :n].tolist() == ids  # exact tokens, CLS .. SEP
            assert ids[0] == 101 and ids[-1] == 102
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batches.length - n)
            assert not batch["input_ids"][row, n:].any()  # padding is id 0
        assert not batch["token_type_ids"].any()


def test_batches_do_not_depend_on_file_order(query_tokenizer: QueryTokenizer,
                                             real_queries: list[str]) -> None:
    a = CalibrationBatches(real_queries, query_tokenizer, batch_size=8, max_batches=3)
    b = CalibrationBatches(real_queries[::-1] + real_queries[:50], query_tokenizer,
                           batch_size=8, max_batches=3)
    c = CalibrationBatches(real_queries, query_tokenizer, batch_size=8, max_batches=3, seed=1)
    assert a.texts == b.texts and a.texts != c.texts
    for x, y in zip(a, b, strict=True):
        for name in INPUT_NAMES:
            np.testing.assert_array_equal(x[name], y[name])
    assert len(set(a.texts)) == len(a.texts)  # duplicates in the log are used once


def test_short_last_batch_is_topped_up_with_real_queries(query_tokenizer: QueryTokenizer,
                                                         real_queries: list[str]) -> None:
    texts = sorted(set(real_queries))[:10]
    batches = CalibrationBatches(texts, query_tokenizer, batch_size=4, max_batches=None)
    out = list(batches)
    assert len(out) == 3 and len(batches.texts) == 10
    # Rows 10 and 11 of the last batch are queries 0 and 1 again, never empty rows.
    np.testing.assert_array_equal(out[2]["input_ids"][2:], out[0]["input_ids"][:2])
    assert (out[2]["attention_mask"].sum(axis=1) > 1).all()


def test_explicit_length_pads_or_truncates(query_tokenizer: QueryTokenizer,
                                           real_queries: list[str]) -> None:
    natural = CalibrationBatches(real_queries, query_tokenizer, batch_size=8, max_batches=2)
    wide = CalibrationBatches(real_queries, query_tokenizer, batch_size=8, max_batches=2,
                              length=natural.length + 10)
    cut = CalibrationBatches(real_queries, query_tokenizer, batch_size=8, max_batches=2,
                             length=4)
    for n, w, c in zip(natural, wide, cut, strict=True):
        assert w["input_ids"].shape == (8, natural.length + 10)
        np.testing.assert_array_equal(w["input_ids"][:, : natural.length], n["input_ids"])
        assert not w["attention_mask"][:, natural.length:].any()
        assert c["input_ids"].shape == (8, 4)
        np.testing.assert_array_equal(c["input_ids"], n["input_ids"][:, :4])


def test_any_encoder_callable_works() -> None:
    def encode(texts: list[str]) -> object:
        return pad_sequences([np.arange(1, len(t) + 1, dtype=np.int64) for t in texts])

    batches = CalibrationBatches(["bb", "a", "ccc"], encode, batch_size=2, seed=0,
                                 names=["input_ids", "attention_mask"])
    out = list(batches)
    assert batches.shape == (2, 3) and list(out[0]) == ["input_ids", "attention_mask"]
    assert sorted(batches.texts) == ["a", "bb", "ccc"]


@pytest.mark.parametrize("texts", [[], ["", "   "]])
def test_empty_query_list_is_refused(texts: list[str], query_tokenizer: QueryTokenizer) -> None:
    with pytest.raises(BuildError, match="no calibration queries"):
        CalibrationBatches(texts, query_tokenizer)


def test_bad_batch_settings_are_refused(query_tokenizer: QueryTokenizer) -> None:
    with pytest.raises(BuildError, match="batch_size must be >= 1"):
        CalibrationBatches(["q"], query_tokenizer, batch_size=0)
    with pytest.raises(BuildError, match="max_batches must be >= 1"):
        CalibrationBatches(["q"], query_tokenizer, max_batches=0)
    with pytest.raises(BuildError, match="not among"):
        CalibrationBatches(["q"], query_tokenizer, names=["pixel_values"])


def test_calibration_cache_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "calibration.cache"
    assert read_calibration_cache(path) is None
    data = b"TRT-100300-EntropyCalibration2\ninput_ids: 3c010a14\n"
    write_calibration_cache(path, data)
    assert read_calibration_cache(path) == data
    assert not (tmp_path / "calibration.cache.tmp").exists()
    write_calibration_cache(path, memoryview(b"new"))  # TensorRT hands over a buffer
    assert read_calibration_cache(path) == b"new"
    path.write_bytes(b"")
    assert read_calibration_cache(path) is None  # empty: calibrate again


# --- Q/DQ ONNX check ------------------------------------------------------------------------


def _qdq_model(path: Path, *, zero_dtype: str = "int8", zero: int = 0, domain: str = "",
               with_qdq: bool = True) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    inits = [numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale"),
             numpy_helper.from_array(np.array(zero, dtype=zero_dtype), "zero")]
    if with_qdq:
        nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="q0"),
                 helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], name="dq0")]
    else:
        nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu", domain=domain)]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_qdq_check_accepts_symmetric_signed_int8(tmp_path: Path) -> None:
    assert inspect_qdq(_qdq_model(tmp_path / "ok.onnx")) == {"quantize_nodes": 1,
                                                            "dequantize_nodes": 1}


def test_qdq_check_refuses_what_tensorrt_cannot_build(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"unsigned or non-zero zero points .*QInt8"):
        inspect_qdq(_qdq_model(tmp_path / "u8.onnx", zero_dtype="uint8", zero=128))
    with pytest.raises(BuildError, match="unsigned or non-zero"):
        inspect_qdq(_qdq_model(tmp_path / "asym.onnx", zero=3))
    with pytest.raises(BuildError, match="no QuantizeLinear/DequantizeLinear"):
        inspect_qdq(_qdq_model(tmp_path / "fp32.onnx", with_qdq=False))
    with pytest.raises(BuildError, match=r"com\.microsoft"):
        inspect_qdq(_qdq_model(tmp_path / "fused.onnx", with_qdq=False,
                               domain="com.microsoft"))


# --- build and runtime entry points ---------------------------------------------------------


def test_build_plan_raises_backend_unavailable_not_import_error(no_tensorrt: None,
                                                                tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"not parsed before tensorrt is found")
    with pytest.raises(BackendUnavailable, match="pip install tensorrt pycuda"):
        build_plan(onnx_path, tmp_path / "model.plan", plan=BucketPlan.for_model(128),
                   precision="fp16")
    cache = tmp_path / "calibration.cache"
    cache.write_bytes(b"scales")  # entropy with a cache: valid arguments, still no TensorRT
    with pytest.raises(BackendUnavailable):
        build_plan(onnx_path, tmp_path / "model.plan", plan=BucketPlan.for_model(128),
                   cache_path=cache)
    assert not (tmp_path / "model.plan").exists()


def test_build_plan_checks_its_arguments_first(no_tensorrt: None, tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"x")
    plan = BucketPlan.for_model(128)
    cases = [({"precision": "fp8"}, "precision 'fp8' not supported"),
             ({"calibration": "minmax"}, "calibration 'minmax' unknown"),
             ({"contexts": 0}, "contexts must be >= 1"),
             ({}, "needs cache_path"),
             ({"cache_path": tmp_path / "none.cache"}, "needs calibration batches")]
    for kwargs, match in cases:
        with pytest.raises(BuildError, match=match):
            build_plan(onnx_path, tmp_path / "p.plan", plan=plan, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(BuildError, match="no such ONNX file"):
        build_plan(tmp_path / "missing.onnx", tmp_path / "p.plan", plan=plan, precision="fp16")


def _artifact(root: Path, backend: str, built_with: str = "10.3.0") -> Path:
    root.mkdir()
    write_manifest(root, Manifest(
        model_id="m", version="abc", content_hash="abc" * 4, precision="int8",
        backend=backend, head="similarity", max_length=128, output_dim=384,
        tokenizer_id="sha256:x", files={}, created_at=time.time(),
        build={"tensorrt": built_with}))
    return root


def test_a_tensorrt_manifest_names_the_plan_the_runtime_loads(tmp_path: Path) -> None:
    # engines.manifest keeps its own table of each backend's model file; it must agree with
    # the file TensorRTEngine deserializes, which is one of the artifact's TensorRT files.
    manifest = read_manifest(_artifact(tmp_path / "art", "tensorrt"))
    assert manifest.model_file == PLAN_FILE
    assert manifest.model_file in TENSORRT_FILES


def test_engine_raises_backend_unavailable_without_tensorrt(no_tensorrt: None,
                                                            tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="pip install tensorrt pycuda") as caught:
        TensorRTEngine(_artifact(tmp_path / "art", "tensorrt"))
    assert not isinstance(caught.value, ImportError)


def test_engine_refuses_other_backends(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="cannot be loaded by the tensorrt runtime"):
        TensorRTEngine(_artifact(tmp_path / "art", "onnxruntime"))


def test_engine_refuses_a_plan_from_another_tensorrt(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    fake_gpu_stack(monkeypatch, version="10.4.0")
    art = _artifact(tmp_path / "art", "tensorrt", built_with="10.3.0")
    with pytest.raises(ArtifactError, match=r"built with TensorRT 10\.3\.0.*10\.4\.0.*rebuild"):
        TensorRTEngine(art)


def test_building_a_tensorrt_artifact_without_tensorrt_fails_fast_and_leaves_nothing(
        no_tensorrt: None, tmp_path: Path) -> None:
    from engines.build import ensure_engine

    with pytest.raises(BackendUnavailable, match="pip install tensorrt pycuda"):
        ensure_engine(resolve_model("default"), tmp_path, precision="int8",
                      backend="tensorrt")
    assert not any(tmp_path.rglob("*"))  # refused before any export or temp directory
