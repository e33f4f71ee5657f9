"""The OpenVINO backend: FP32 faithful to the reference, INT8 within its recorded budget, lanes
that run at once, artifacts that refuse to load when damaged or mislabelled, builds that refuse
what they cannot make."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest

from engines.accuracy import cosine_budget, cosines
from engines.batch import PaddedBatch, pad_sequences
from engines.build import ensure_engine
from engines.errors import ArtifactError, BuildError
from engines.golden import check_golden
from engines.loader import load_engine
from engines.manifest import read_manifest, verify_artifact, write_manifest
from engines.memory import InsufficientMemory
from engines.protocol import Engine
from engines.quantize import QuantSpec, split_texts
from engines.source import resolve_model
from engines.tokenizer import QueryTokenizer
from schemas import QueryItem
from tests.engines.test_classifier import ITEMS as CLASSIFIER_ITEMS
from tests.engines.test_onnx_engine import DATA, _embed, _sample_texts
from workers.scoring import BatchLimits, run_token_batch

pytestmark = pytest.mark.slow
PRECISIONS = ("fp32", "int8")


@pytest.fixture(scope="module")
def ov_engines(openvino_artifacts: dict[str, Path]) -> dict[str, Engine]:
    return {p: load_engine(path, threads=2) for p, path in openvino_artifacts.items()}


@pytest.fixture(scope="module")
def ov_tokenizer(openvino_artifacts: dict[str, Path]) -> QueryTokenizer:
    path = openvino_artifacts["fp32"]
    return QueryTokenizer(path / "tokenizer" / "tokenizer.json", read_manifest(path).max_length,
                          pairs=False)


@pytest.fixture(scope="module")
def reference(ov_tokenizer: QueryTokenizer) -> tuple[list[str], np.ndarray]:
    """300 sample texts (documents past 256 tokens among them) and their sentence-transformers
    embeddings: the reference test_onnx_engine holds the ONNX Runtime engine to."""
    from sentence_transformers import SentenceTransformer

    from engines.source import default_model_path

    texts = _sample_texts(300)
    assert any(len(ov_tokenizer._tok.encode(t).ids) >= 256 for t in texts)
    emb = SentenceTransformer(str(default_model_path()), device="cpu").encode(
        texts, batch_size=32, normalize_embeddings=True)
    return texts, np.asarray(emb, dtype=np.float32)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _batches(tokenizer: QueryTokenizer, texts: list[str]) -> PaddedBatch:
    enc = tokenizer.encode([QueryItem(id=str(i), query=t) for i, t in enumerate(texts)])
    return pad_sequences([enc.input_ids[enc.offsets[i]:enc.offsets[i + 1]]
                          for i in range(len(enc.seq_item))])


# -- accuracy on real text ---------------------------------------------------------------------

def test_fp32_matches_sentence_transformers(ov_engines: dict[str, Engine],
                                            ov_tokenizer: QueryTokenizer,
                                            reference: tuple[list[str], np.ndarray]) -> None:
    texts, want = reference
    got = _embed(ov_engines["fp32"], ov_tokenizer, texts)
    cos = cosines(want, got)
    assert cos.min() >= 0.9999, f"worst item cosine {cos.min():.6f}"


def test_int8_is_within_its_recorded_budget(ov_engines: dict[str, Engine],
                                            ov_tokenizer: QueryTokenizer,
                                            reference: tuple[list[str], np.ndarray]) -> None:
    texts, want = reference
    int8 = ov_engines["int8"]
    q = int8.manifest.build["quantization"]
    budget = q["budget"]
    assert budget == pytest.approx(QuantSpec(max_drop=q["max_drop"]).budget)
    got = _embed(int8, ov_tokenizer, texts)
    fp32 = _embed(ov_engines["fp32"], ov_tokenizer, texts)
    # Texts the build never measured on (documents too, and the truncated ones): the same
    # floors, against the FP32 engine it was quantized from and against the reference.
    for ref in (fp32, want):
        cos = cosines(ref, got)
        assert cos.mean() >= budget["mean_cosine"], f"mean cosine {cos.mean():.5f}"
        assert np.percentile(cos, 1) >= budget["p1_cosine"], f"p1 {np.percentile(cos, 1):.5f}"
    # Quantized for real: not the FP32 numbers.
    assert cosines(fp32, got).min() < 0.99999


@pytest.mark.parametrize("precision", PRECISIONS)
def test_relevant_docs_rank_above_unrelated(ov_engines: dict[str, Engine],
                                            ov_tokenizer: QueryTokenizer,
                                            precision: str) -> None:
    triples = [orjson.loads(line) for line in (DATA / "triples.jsonl").read_bytes().splitlines()
               if line.strip()]
    items = [QueryItem(id=str(i), query=t["query"], docs=(t["relevant"], t["unrelated"]))
             for i, t in enumerate(triples)]
    tb = ov_tokenizer.token_batch("triples", items, submitted_at=0.0)
    scores = [s.scores for s in run_token_batch(ov_engines[precision], tb, BatchLimits()).items]
    wins = sum(relevant > unrelated for relevant, unrelated in scores)
    assert wins / len(triples) >= 0.9, f"only {wins}/{len(triples)} ranked correctly"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_golden_set_checks_out(ov_engines: dict[str, Engine], precision: str) -> None:
    report = check_golden(ov_engines[precision])
    assert report.ok, report.summary()


# -- the manifest ------------------------------------------------------------------------------

def test_manifests_record_backend_files_memory_and_accuracy(
        openvino_artifacts: dict[str, Path]) -> None:
    fp32, int8 = (verify_artifact(openvino_artifacts[p]) for p in PRECISIONS)
    for m, precision in ((fp32, "fp32"), (int8, "int8")):
        assert (m.backend, m.precision, m.head, m.max_length, m.output_dim) == (
            "openvino", precision, "similarity", 256, 384)
        assert {"model.xml", "model.bin", "golden.npz", "tokenizer/tokenizer.json"} <= set(
            m.files)
        assert all(len(e.sha256) == 64 and e.bytes > 0 for e in m.files.values())
        assert m.model_file == "model.xml"
        assert m.build["inference_precision"] == "f32"
        assert m.build["openvino"] and m.build["converted_from"] == "pytorch"
        assert openvino_artifacts[precision].name == m.version
    assert fp32.version != int8.version and fp32.tokenizer_id == int8.tokenizer_id
    assert 0 < int8.memory_bytes < fp32.memory_bytes
    # The INT8 weights really are smaller than the FP32 ones.
    bin_bytes = {p: (openvino_artifacts[p] / "model.bin").stat().st_size for p in PRECISIONS}
    assert bin_bytes["int8"] < bin_bytes["fp32"] * 0.9
    assert fp32.accuracy["reference"] == "pytorch-fp32"
    assert fp32.accuracy["min_cosine"] >= 0.9999

    assert int8.build["from_fp32"] == fp32.version
    assert int8.accuracy["reference"] == f"fp32 engine {fp32.version}"
    for key in ("mean_cosine", "p1_cosine", "min_cosine", "spearman", "speedup",
                "items_per_s"):
        assert isinstance(int8.accuracy[key], float), key
    assert int8.accuracy["min_cosine"] <= int8.accuracy["p1_cosine"] <= int8.accuracy[
        "mean_cosine"] < 1
    q = int8.build["quantization"]
    assert (q["method"], q["name"], q["max_drop"]) == ("nncf-ptq", "nncf-ptq", 0.005)
    assert q["budget"] == pytest.approx({**cosine_budget(0.005), "spearman": 0.99})
    assert q["excluded_nodes"] == []
    assert q["calibration_file"] == "sample_queries.jsonl"
    assert len(q["calibration_sha256"]) == 64
    assert q["calibration_queries"] == 300 and q["validation_queries"] > 100
    assert q["pairs"] > 100 and q["fp32_items_per_s"] > 0
    assert [c["name"] for c in q["candidates"]] == ["nncf-ptq"]
    assert q["candidates"][0]["excluded_nodes"] == []
    # What the manifest says it met, it met.
    assert all(int8.accuracy[k] >= v for k, v in q["budget"].items())


def test_engine_is_built_once_and_reused(openvino_artifacts: dict[str, Path],
                                         engine_root: Path) -> None:
    source = resolve_model("default")
    for precision, path in openvino_artifacts.items():
        before = (path / "model.xml").stat().st_mtime_ns
        created = read_manifest(path).created_at
        messages: list[str] = []
        again = ensure_engine(source, engine_root, precision=precision, backend="openvino",
                              promote=False, progress=messages.append)
        assert again == path
        assert (path / "model.xml").stat().st_mtime_ns == before
        assert read_manifest(path).created_at == created
        assert messages == []  # nothing converted, measured or calibrated


def test_load_phases_are_timed(openvino_artifacts: dict[str, Path]) -> None:
    from engines.openvino_runtime import OpenVinoEngine

    engine = OpenVinoEngine(openvino_artifacts["int8"], threads=1)
    assert list(engine.load_phases) == ["verify", "read", "compile"]
    assert all(v >= 0 for v in engine.load_phases.values())
    engine.health()
    engine.close()
    unverified = OpenVinoEngine(openvino_artifacts["int8"], threads=1, verify=False)
    assert list(unverified.load_phases) == ["read", "compile"]


# -- lanes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS)
def test_two_lanes_run_at_once_and_match_one_lane(openvino_artifacts: dict[str, Path],
                                                  ov_engines: dict[str, Engine],
                                                  ov_tokenizer: QueryTokenizer,
                                                  precision: str) -> None:
    texts = _sample_texts(64)
    batches = [_batches(ov_tokenizer, texts[:32]), _batches(ov_tokenizer, texts[32:])]
    single = ov_engines[precision]
    want = [single.run(b) for b in batches]
    engine = load_engine(openvino_artifacts[precision], threads=2, lanes=2)
    assert engine.lanes == 2 and len(engine._requests) == 2  # type: ignore[attr-defined]
    start = threading.Barrier(2)
    spans: dict[int, tuple[float, float]] = {}

    def run(lane: int) -> np.ndarray:
        start.wait()  # both calls leave together
        began = time.perf_counter()
        out = engine.run(batches[lane], lane)
        spans[lane] = (began, time.perf_counter())
        return out

    overlapped = []
    try:
        with ThreadPoolExecutor(2) as pool:
            for _ in range(3):
                got = [f.result() for f in [pool.submit(run, lane) for lane in (0, 1)]]
                # Each lane gives exactly what one lane (one request, two threads) gives.
                for lane in (0, 1):
                    assert np.array_equal(got[lane], want[lane]), np.abs(
                        got[lane] - want[lane]).max()
                overlapped.append(max(s[0] for s in spans.values()) <
                                  min(s[1] for s in spans.values()))
                if overlapped[-1]:
                    break
        # Inference releases the GIL and each lane has its own request: the calls overlapped
        # (a busy host may delay one thread past the other's whole call once; not every time).
        assert any(overlapped)
        # A lane's output is its own copy: the next call on that lane does not rewrite it.
        kept = got[0].copy()
        engine.run(batches[1], 0)
        assert np.array_equal(got[0], kept)
    finally:
        engine.close()


# -- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["model.bin", "model.xml"])
def test_flipped_byte_is_refused(openvino_artifacts: dict[str, Path], tmp_path: Path,
                                 name: str) -> None:
    art = _copy(openvino_artifacts["int8"], tmp_path)
    data = bytearray((art / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (art / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{name}: checksum mismatch") as info:
        load_engine(art)
    assert str(art) in str(info.value)


def test_missing_weights_are_refused(openvino_artifacts: dict[str, Path],
                                     tmp_path: Path) -> None:
    from engines.openvino_runtime import OpenVinoEngine

    art = _copy(openvino_artifacts["fp32"], tmp_path)
    (art / "model.bin").unlink()
    with pytest.raises(ArtifactError, match=r"files listed in the manifest are missing: "
                                            r"\['model\.bin'\]"):
        load_engine(art)
    # Unverified: the weights are read (and hashed) before OpenVINO sees anything.
    with pytest.raises(ArtifactError, match=r"cannot read model\.bin") as info:
        OpenVinoEngine(art, verify=False)
    assert str(art) in str(info.value)


def test_files_not_in_the_manifest_are_refused(openvino_artifacts: dict[str, Path],
                                               tmp_path: Path) -> None:
    art = _copy(openvino_artifacts["fp32"], tmp_path)
    shutil.copy2(art / "model.xml", art / "model_old.xml")
    with pytest.raises(ArtifactError, match=r"files not in the manifest: \['model_old\.xml'\]"):
        load_engine(art)


def test_another_backends_artifact_is_refused(openvino_artifacts: dict[str, Path],
                                              tmp_path: Path) -> None:
    from engines.openvino_runtime import OpenVinoEngine

    art = _copy(openvino_artifacts["fp32"], tmp_path)
    write_manifest(art, replace(read_manifest(art), backend="onnxruntime"))
    with pytest.raises(ArtifactError,
                       match="backend 'onnxruntime' cannot be loaded by the openvino runtime"):
        OpenVinoEngine(art)


@pytest.mark.parametrize(("graph", "claims", "match"), [
    ("fp32", "int8", "the manifest says int8 but the graph is not quantized"),
    ("int8", "fp32", "the manifest says fp32 but the graph is quantized"),
])
def test_precision_the_graph_does_not_have_is_refused(openvino_artifacts: dict[str, Path],
                                                      tmp_path: Path, graph: str,
                                                      claims: str, match: str) -> None:
    from engines.openvino_runtime import OpenVinoEngine

    art = _copy(openvino_artifacts[graph], tmp_path)
    write_manifest(art, replace(read_manifest(art), precision=claims))
    with pytest.raises(ArtifactError, match=match):
        OpenVinoEngine(art, verify=False)  # past the checksums, to the graph check


def test_output_width_other_than_the_manifests_is_refused(
        openvino_artifacts: dict[str, Path], tmp_path: Path) -> None:
    from engines.openvino_runtime import OpenVinoEngine

    art = _copy(openvino_artifacts["fp32"], tmp_path)
    write_manifest(art, replace(read_manifest(art), output_dim=768))
    with pytest.raises(ArtifactError, match="output width 384 != output_dim 768"):
        OpenVinoEngine(art, verify=False)


def test_classifier_manifest_on_an_embedding_graph_is_refused(
        openvino_artifacts: dict[str, Path], tmp_path: Path) -> None:
    from engines.openvino_runtime import OpenVinoEngine

    art = _copy(openvino_artifacts["fp32"], tmp_path)
    write_manifest(art, replace(read_manifest(art), head="classifier", output_dim=1,
                                num_labels=2, positive_label=1))
    with pytest.raises(ArtifactError, match=r"does not fit the classifier head \(rank 1\)"):
        OpenVinoEngine(art, verify=False)


def test_model_xml_that_is_not_xml_is_refused(openvino_artifacts: dict[str, Path],
                                              tmp_path: Path) -> None:
    from dataclasses import replace

    from engines.manifest import hash_files, read_manifest, write_manifest
    from engines.openvino_runtime import OpenVinoEngine

    art = _copy(openvino_artifacts["fp32"], tmp_path)
    (art / "model.xml").write_text("this is not an OpenVINO model\n")
    with pytest.raises(ArtifactError, match=r"model\.xml: size \d+ != \d+ in the manifest"):
        load_engine(art)
    # Changed after a verification (a reload verifies early, then loads with verify off): the
    # bytes read for OpenVINO are hashed again, and never reach its reader.
    with pytest.raises(ArtifactError, match=r"model\.xml: checksum mismatch .*changed since "
                                            "it was verified"):
        OpenVinoEngine(art, verify=False)
    # A manifest that vouches for the junk: OpenVINO's own refusal, as an ArtifactError.
    manifest = read_manifest(art)
    write_manifest(art, replace(manifest, files={**manifest.files,
                                                 **hash_files(art, ["model.xml"])}))
    with pytest.raises(ArtifactError, match="OpenVINO cannot read the model") as info:
        load_engine(art)
    assert str(art) in str(info.value)


def test_engine_bigger_than_free_memory_is_refused(openvino_artifacts: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import engines.loader

    monkeypatch.setattr(engines.loader, "host_available_bytes", lambda: 64 * 2**20)
    with pytest.raises(InsufficientMemory, match=r"needs about .* but the host has 64 MiB free"):
        load_engine(openvino_artifacts["int8"])
    load_engine(openvino_artifacts["int8"], check_memory=False, threads=1).close()


# -- build refusals ----------------------------------------------------------------------------

def test_build_refuses_what_it_cannot_make(tmp_path: Path, tiny_classifier_dir: Path) -> None:
    source = resolve_model("default")
    with pytest.raises(BuildError, match=r"precision 'fp16' not supported by the openvino "
                                         r"backend; choose \('fp32', 'int8'\)"):
        ensure_engine(source, tmp_path, precision="fp16", backend="openvino")
    for quant in (QuantSpec(level="2"), QuantSpec(method="minmax")):
        with pytest.raises(BuildError, match="--level and --method"):
            ensure_engine(source, tmp_path, precision="int8", quant=quant, backend="openvino")
    classifier = resolve_model(tiny_classifier_dir, max_length=64)
    with pytest.raises(BuildError, match="only the similarity head can be built INT8"):
        ensure_engine(classifier, tmp_path, precision="int8", backend="openvino")
    assert list(tmp_path.iterdir()) == []  # refused before building anything


def test_classifier_fp32_matches_onnx_runtime(classifier_engine: Engine,
                                              tiny_classifier_dir: Path,
                                              engine_root: Path) -> None:
    source = resolve_model(tiny_classifier_dir, max_length=64)
    engine = load_engine(ensure_engine(source, engine_root, backend="openvino", promote=False),
                         threads=2)
    m = engine.manifest
    assert (m.backend, m.precision, m.head, m.num_labels, m.positive_label, m.output_dim) == (
        "openvino", "fp32", "classifier", 2, 1, 1)
    assert m.accuracy["max_abs_prob_diff"] <= 1e-4
    assert check_golden(engine).ok
    tok = QueryTokenizer(engine.path / "tokenizer" / "tokenizer.json", m.max_length,
                         pairs=True)
    tb = tok.token_batch("c", CLASSIFIER_ITEMS, submitted_at=0.0)
    limits = BatchLimits(max_batch=2, token_budget=128)
    got = [s.scores for s in run_token_batch(engine, tb, limits).items]
    want = [s.scores for s in run_token_batch(classifier_engine, tb, limits).items]
    assert [len(s) for s in got] == [len(s) for s in want] == [3, 1, 1]
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=1e-4)


# -- layers left in FP32 -----------------------------------------------------------------------

def test_fp32_layers_lists_every_layer_left_unquantized(
        openvino_artifacts: dict[str, Path]) -> None:
    import openvino as ov

    from engines.build_openvino import fp32_layers

    core = ov.Core()
    fp32 = fp32_layers(core.read_model(str(openvino_artifacts["fp32"] / "model.xml")))
    assert fp32 == sorted(fp32)
    # Q, K, V, attention out and the two FFN linears of 6 layers, 6 attention products, and
    # the 3 embedding tables (the shape Gathers are no layers).
    assert sum(name.endswith("aten::linear/MatMul") for name in fp32) == 36
    assert sum("attention.self/aten::matmul" in name for name in fp32) == 6
    assert sum(name.endswith("aten::embedding/Gather") for name in fp32) == 3
    assert len(fp32) == 45
    assert fp32_layers(core.read_model(str(openvino_artifacts["int8"] / "model.xml"))) == []


def test_refuses_int8_that_misses_the_budget(openvino_artifacts: dict[str, Path],
                                             engine_root: Path, tmp_path: Path) -> None:
    from tests.engines.test_onnx_engine import SAMPLE

    # A short query file (calibration, validation and pairs from it) keeps this quick.
    queries = tmp_path / "queries.jsonl"
    queries.write_bytes(b"\n".join(SAMPLE.read_bytes().splitlines()[:200]) + b"\n")
    spec = QuantSpec(max_drop=1e-6, max_exclude=0, calibration=queries, sample_pairs=queries)
    messages: list[str] = []
    with pytest.raises(BuildError, match=r"no INT8 engine meets max_drop 1e-06 \(mean cosine "
                                         r"0\.99\d+, p1 0\.9\d+, Spearman 0\.9\d+ with 0 "
                                         r"layers in FP32\); raise --max-drop"):
        ensure_engine(resolve_model("default"), engine_root, precision="int8", quant=spec,
                      backend="openvino", promote=False, progress=messages.append)
    calibration, _ = split_texts(queries)
    assert f"calibrating INT8 on {len(calibration)} queries (NNCF post-training quantization)" in (
        messages)
    assert not any("returning" in m for m in messages)  # max_exclude 0: no accuracy control
    # Nothing left behind: no artifact, no build directory.
    assert {p.name for p in openvino_artifacts["int8"].parent.iterdir()
            if p.name.startswith(".build-")} == set()


def test_accuracy_control_records_the_layers_it_returned_to_fp32(
        openvino_artifacts: dict[str, Path], engine_root: Path) -> None:
    """A budget plain calibration just misses (set from what it measured for the default
    build: the same calibration, so the same graph and numbers): NNCF's accuracy control returns
    layers to FP32 until it is met, and the manifest lists them as the graph has them."""
    import openvino as ov

    from engines.build_openvino import fp32_layers

    ptq = read_manifest(openvino_artifacts["int8"])
    max_drop = round(1 - ptq.accuracy["mean_cosine"] - 3e-5, 6)
    spec = QuantSpec(max_drop=max_drop, max_exclude=4)
    messages: list[str] = []
    path = ensure_engine(resolve_model("default"), engine_root, precision="int8", quant=spec,
                         backend="openvino", promote=False, progress=messages.append)
    assert "below the budget; returning layers to FP32 (4 steps at most)" in messages
    m = verify_artifact(path)
    q = m.build["quantization"]
    assert (q["name"], q["max_drop"], q["budget"]) == (
        "nncf-ptq-accuracy-control", max_drop, pytest.approx(spec.budget))
    first, chosen = q["candidates"]
    assert first["name"] == "nncf-ptq" and chosen["name"] == q["name"]
    assert first["mean_cosine"] == pytest.approx(ptq.accuracy["mean_cosine"], abs=2e-6)
    assert first["mean_cosine"] < spec.budget["mean_cosine"] <= chosen["mean_cosine"]
    assert all(m.accuracy[k] >= v for k, v in spec.budget.items())
    core = ov.Core()
    excluded = fp32_layers(core.read_model(str(path / "model.xml")))
    every = fp32_layers(core.read_model(str(openvino_artifacts["fp32"] / "model.xml")))
    assert q["excluded_nodes"] == chosen["excluded_nodes"] == excluded
    assert excluded and set(excluded) <= set(every)
    assert first["excluded_nodes"] == []
    assert any(line.startswith("nncf-ptq-accuracy-control:") and
               line.endswith(f", {len(excluded)} layers in FP32") for line in messages)
    engine = load_engine(path, threads=2)
    assert engine.manifest.precision == "int8"  # still a quantized graph
    assert check_golden(engine).ok
