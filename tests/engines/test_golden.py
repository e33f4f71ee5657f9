"""Golden sets: every artifact carries reference outputs, and a loaded engine is checked
against them before it may serve (what a hot reload runs before its swap)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.errors import ArtifactError
from engines.golden import GOLDEN_FILE, GOLDEN_QUERIES, check_golden, golden_queries
from engines.loader import load_engine
from engines.manifest import read_manifest, verify_artifact
from engines.protocol import Engine
from engines.quantize import split_texts
from engines.source import default_sample_log


def test_golden_queries_are_real_and_outside_calibration_and_validation() -> None:
    queries = golden_queries()
    assert len(queries) == GOLDEN_QUERIES == len(set(queries))
    calibrate, validate = split_texts(default_sample_log())
    assert not set(queries) & (set(calibrate) | set(validate))


def test_every_built_artifact_carries_a_checksummed_golden_set(
        default_engine_path: Path, classifier_engine: Engine) -> None:
    for path in (default_engine_path, classifier_engine.path):
        manifest = verify_artifact(path)
        assert GOLDEN_FILE in manifest.files
        with np.load(path / GOLDEN_FILE) as data:
            assert data["input_ids"].shape[0] == GOLDEN_QUERIES
            assert len(data["outputs"]) == GOLDEN_QUERIES


def test_the_engine_that_was_built_passes_its_golden_check(
        default_engine: Engine, classifier_engine: Engine) -> None:
    for engine in (default_engine, classifier_engine):
        report = check_golden(engine)
        assert report.ok, report.reason
        assert report.queries == GOLDEN_QUERIES and not report.reason
    assert check_golden(default_engine).metric == "min_cosine"
    assert check_golden(classifier_engine).metric == "max_prob_diff"


class _Skewed:
    """An engine whose outputs drift (another model, a bad kernel): same shapes, wrong values."""

    def __init__(self, engine: Engine, noise: float, fail: bool = False) -> None:
        self._engine, self._noise, self._fail = engine, noise, fail
        self.manifest, self.path = engine.manifest, engine.path

    def run(self, batch: object, lane: int = 0) -> np.ndarray:
        if self._fail:
            raise RuntimeError("CUDA error: an illegal memory access")
        out = self._engine.run(batch)  # type: ignore[arg-type]
        rng = np.random.default_rng(0)
        return (out + rng.normal(scale=self._noise, size=out.shape)).astype(np.float32)


def test_an_engine_that_does_not_reproduce_its_outputs_is_refused(
        default_engine: Engine, classifier_engine: Engine) -> None:
    report = check_golden(_Skewed(default_engine, 0.05))  # type: ignore[arg-type]
    assert not report.ok and f"outside the {default_engine.manifest.precision} budget" in (
        report.reason)
    assert report.worst < report.budget
    report = check_golden(_Skewed(classifier_engine, 0.1))  # type: ignore[arg-type]
    assert not report.ok and report.worst > report.budget
    report = check_golden(_Skewed(default_engine, 0.0, fail=True))  # type: ignore[arg-type]
    assert not report.ok and "illegal memory access" in report.reason


def test_an_artifact_without_a_golden_set_cannot_be_checked(default_engine_path: Path,
                                                            tmp_path: Path) -> None:
    copy = tmp_path / "old"
    shutil.copytree(default_engine_path, copy)
    (copy / GOLDEN_FILE).unlink()
    manifest = read_manifest(copy)
    files = {k: v for k, v in manifest.files.items() if k != GOLDEN_FILE}
    from dataclasses import replace

    from engines.manifest import write_manifest
    write_manifest(copy, replace(manifest, files=files))
    engine = load_engine(copy, threads=1)
    try:
        with pytest.raises(ArtifactError, match="rebuild it"):
            check_golden(engine)
    finally:
        engine.close()
