"""INT8 engines: built from the FP32 one, measured against it, recorded in the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from engines.build import ensure_engine
from engines.errors import BuildError
from engines.golden import check_golden
from engines.loader import load_engine
from engines.quantize import QuantSpec, spearman
from engines.source import resolve_model
from engines.tokenizer import QueryTokenizer
from schemas import QueryItem
from workers.scoring import BatchLimits, run_token_batch

DATA = Path(__file__).resolve().parent.parent / "data"


def test_spec_validation_and_budget() -> None:
    assert QuantSpec(max_drop=0.005).budget == pytest.approx(
        {"mean_cosine": 0.995, "p1_cosine": 0.98, "spearman": 0.99})
    for bad in ({"level": "4"}, {"method": "magic"}, {"max_drop": 0.0}):
        with pytest.raises(BuildError):
            QuantSpec(**bad)  # type: ignore[arg-type]


def test_spearman_is_rank_correlation() -> None:
    a = np.array([0.1, 0.5, 0.3, 0.9])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


@pytest.mark.slow
def test_level_2_engine_is_recorded_and_close_to_fp32(default_engine_path: Path,
                                                      engine_root: Path) -> None:
    path = ensure_engine(resolve_model("default"), engine_root, precision="int8",
                         quant=QuantSpec(level="2"), promote=False)
    engine = load_engine(path, threads=2)
    m = engine.manifest
    q = m.build["quantization"]
    assert (m.precision, q["level"], q["method"], q["excluded_nodes"]) == (
        "int8", "2", "dynamic", [])
    assert len(q["calibration_sha256"]) == 64 and q["validation_queries"] > 100
    assert {"mean_cosine", "p1_cosine", "spearman", "items_per_s"} <= set(m.accuracy)
    assert m.build["from_fp32"] == default_engine_path.name
    assert m.version != default_engine_path.name and path.name == m.version
    # Its golden set: a dynamically quantized engine reproduces its own build-time outputs
    # when run on the same batch, in a fresh session with other threads.
    report = check_golden(engine)
    assert report.ok and report.worst > 0.9999, report.summary()

    # Measured again here, on labelled texts the build never saw.
    fp32 = load_engine(default_engine_path, threads=2)
    tok = QueryTokenizer(path / "tokenizer" / "tokenizer.json", m.max_length, pairs=False)
    rows = [orjson.loads(line) for line in (DATA / "triples.jsonl").read_bytes().splitlines()]
    items = [QueryItem(id=str(i), query=r["query"], docs=(r["relevant"], r["unrelated"]))
             for i, r in enumerate(rows)]
    tb = tok.token_batch("t", items, submitted_at=0.0)
    got = run_token_batch(engine, tb, BatchLimits()).items
    want = run_token_batch(fp32, tb, BatchLimits()).items
    diffs = [abs(a - b) for g, w in zip(got, want, strict=True)
             for a, b in zip(g.scores, w.scores, strict=True)]
    assert max(diffs) < 0.05
    assert sum(g.scores[0] > g.scores[1] for g in got) >= 0.9 * len(got)


@pytest.mark.slow
def test_auto_refuses_when_no_candidate_meets_the_budget(default_engine_path: Path,
                                                         engine_root: Path) -> None:
    with pytest.raises(BuildError, match="no INT8 candidate meets max_drop"):
        ensure_engine(resolve_model("default"), engine_root, precision="int8",
                      quant=QuantSpec(level="auto", max_drop=1e-6, max_exclude=0),
                      promote=False)


@pytest.mark.slow
def test_static_calibrated_level_1_builds_and_records_its_method(
        default_engine_path: Path, engine_root: Path) -> None:
    path = ensure_engine(resolve_model("default"), engine_root, precision="int8",
                         quant=QuantSpec(level="1", method="minmax"), promote=False)
    m = load_engine(path).manifest
    assert (m.build["quantization"]["method"], m.build["quantization"]["level"]) == (
        "minmax", "1")
    assert m.accuracy["mean_cosine"] > 0.99  # calibrated ranges: close to FP32
