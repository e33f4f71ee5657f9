"""The ONNX Runtime FP32 engine: faithful to PyTorch, useful on labelled text, tamper-evident."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest

from engines.build import ensure_engine
from engines.errors import ArtifactError, BackendUnavailable
from engines.loader import load_engine
from engines.manifest import MANIFEST_NAME, read_manifest, verify_artifact
from engines.protocol import Engine
from engines.source import resolve_model
from engines.tokenizer import QueryTokenizer
from schemas import QueryItem
from workers.scoring import BatchLimits, run_token_batch

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLE = Path(__file__).resolve().parents[2] / "qscore" / "data" / "sample_queries.jsonl"


def _sample_texts(n: int) -> list[str]:
    texts: list[str] = []
    for line in SAMPLE.read_bytes().splitlines():
        row = orjson.loads(line)
        texts.append(row["query"])
        texts.extend(row.get("docs") or [])
        if len(texts) >= n:
            break
    return texts[:n]


def _embed(engine: Engine, tokenizer: QueryTokenizer, texts: list[str]) -> np.ndarray:
    items = [QueryItem(id=str(i), query=t) for i, t in enumerate(texts)]
    tb = tokenizer.token_batch("t", items, submitted_at=0.0)
    result = run_token_batch(engine, tb, BatchLimits(max_batch=32, token_budget=4096))
    return np.array([s.embedding for s in result.items], dtype=np.float32)


def test_matches_sentence_transformers_reference(default_engine: Engine,
                                                  default_tokenizer: QueryTokenizer) -> None:
    from sentence_transformers import SentenceTransformer

    from engines.source import default_model_path

    texts = _sample_texts(300)
    reference = SentenceTransformer(str(default_model_path()), device="cpu").encode(
        texts, batch_size=32, normalize_embeddings=True)
    ours = _embed(default_engine, default_tokenizer, texts)
    cosine = np.sum(ours * reference, axis=1) / np.linalg.norm(ours, axis=1)
    assert cosine.min() >= 0.9999, f"worst item cosine {cosine.min():.6f}"
    # The sample has documents past 256 tokens: the comparison covers truncation too.
    assert any(len(default_tokenizer._tok.encode(t).ids) >= 256 for t in texts)


def test_relevant_docs_rank_above_unrelated(default_engine: Engine,
                                            default_tokenizer: QueryTokenizer) -> None:
    triples = [orjson.loads(line) for line in (DATA / "triples.jsonl").read_bytes().splitlines()
               if line.strip()]
    assert len(triples) >= 20
    items = [QueryItem(id=str(i), query=t["query"], docs=(t["relevant"], t["unrelated"]))
             for i, t in enumerate(triples)]
    tb = default_tokenizer.token_batch("triples", items, submitted_at=0.0)
    scores = [s.scores for s in run_token_batch(default_engine, tb, BatchLimits()).items]
    wins = sum(relevant > unrelated for relevant, unrelated in scores)
    assert wins / len(triples) >= 0.9, f"only {wins}/{len(triples)} ranked correctly"


def test_manifest_records_identity_checksums_and_accuracy(default_engine_path: Path) -> None:
    m = verify_artifact(default_engine_path)
    assert m.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert (m.backend, m.precision, m.head, m.max_length, m.output_dim) == (
        "onnxruntime", "fp32", "similarity", 256, 384)
    assert {"model.onnx", "tokenizer/tokenizer.json"} <= set(m.files)
    assert m.tokenizer_id.startswith("sha256:")
    assert m.accuracy["min_cosine"] >= 0.9999
    # The optimiser really fused the graph (attention, skip-LayerNorm, GELU).
    assert m.build["fused_ops"].get("Attention", 0) == 6
    assert m.build["fused_ops"].get("SkipLayerNormalization", 0) >= 6
    assert default_engine_path.name == m.version


def test_engine_is_built_once_and_reused(default_engine_path: Path, engine_root: Path) -> None:
    before = read_manifest(default_engine_path).created_at
    again = ensure_engine(resolve_model("default"), engine_root)
    assert again == default_engine_path
    assert read_manifest(again).created_at == before


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_flipped_byte_is_refused(default_engine_path: Path, tmp_path: Path) -> None:
    art = _copy(default_engine_path, tmp_path)
    model = art / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.onnx: checksum mismatch") as info:
        load_engine(art)
    assert str(art) in str(info.value)


@pytest.mark.parametrize("damage", ["missing-manifest", "missing-file", "extra-file",
                                    "bad-manifest", "wrong-backend"])
def test_damaged_artifacts_fail_clearly(default_engine_path: Path, tmp_path: Path,
                                        damage: str) -> None:
    art = _copy(default_engine_path, tmp_path)
    expected: type[Exception] = ArtifactError
    if damage == "missing-manifest":
        (art / MANIFEST_NAME).unlink()
        match = "manifest.json is missing"
    elif damage == "missing-file":
        (art / "tokenizer" / "vocab.txt").unlink()
        match = "missing"
    elif damage == "extra-file":
        (art / "notes.txt").write_text("x")
        match = "not in the manifest"
    elif damage == "bad-manifest":
        (art / MANIFEST_NAME).write_bytes(b"{not json")
        match = "unreadable manifest"
    else:
        raw = orjson.loads((art / MANIFEST_NAME).read_bytes())
        raw["backend"] = "tensorrt"
        (art / MANIFEST_NAME).write_bytes(orjson.dumps(raw))
        expected, match = BackendUnavailable, "tensorrt"
    with pytest.raises(expected, match=match):
        load_engine(art)


def test_load_phases_are_timed(default_engine_path: Path, tmp_path: Path) -> None:
    from engines.onnx_runtime import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(default_engine_path, threads=1)
    assert list(engine.load_phases) == ["verify", "read", "session"]
    assert all(v >= 0 for v in engine.load_phases.values())
    assert list(OnnxRuntimeEngine(default_engine_path, threads=1, verify=False).load_phases) == [
        "read", "session"]
    # Unverified, a missing model file is still an artifact error that names the file.
    art = _copy(default_engine_path, tmp_path)
    (art / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"cannot read model\.onnx"):
        OnnxRuntimeEngine(art, verify=False)


def test_corrupt_cached_engine_is_rebuilt(default_engine_path: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    cached = root / default_engine_path.parent.name / default_engine_path.name
    shutil.copytree(default_engine_path, cached)
    (cached / "tokenizer" / "vocab.txt").write_text("tampered")
    messages: list[str] = []
    rebuilt = ensure_engine(resolve_model("default"), root, progress=messages.append)
    assert rebuilt == cached
    verify_artifact(rebuilt)
    assert any("rebuilding" in m for m in messages)
