"""`qscore engine build|verify` and `qscore rescore` with --backend openvino: the same commands,
the same output, the OpenVINO engines (copied from the session's builds, never rebuilt here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from engines.manifest import read_manifest
from engines.registry import EngineRegistry
from engines.source import DEFAULT_MODEL_ID
from qscore.cli.app import app
from tests.engine_fixtures import copy_version
from tests.engines.test_onnx_engine import SAMPLE

WIDE = {"COLUMNS": "200"}  # error boxes unwrapped, so messages match whole


@pytest.fixture
def ov_root(openvino_artifacts: dict[str, Path], tmp_path: Path) -> Path:
    """An engine directory holding the session's OpenVINO FP32 and INT8 versions, none
    promoted: what `engine build` would have left there, without building."""
    root = tmp_path / "engines"
    for path in openvino_artifacts.values():
        copy_version(path, root, path.name)
    return root


@pytest.fixture
def small_log(tmp_path: Path) -> Path:
    log = tmp_path / "in.jsonl"
    log.write_bytes(b"\n".join(SAMPLE.read_bytes().splitlines()[:40]) + b"\n")
    return log


def _rescore(log: Path, out: Path, *options: str) -> tuple[list[dict], dict]:
    result = CliRunner().invoke(app, ["rescore", str(log), "-o", str(out), "--no-progress",
                                      *options])
    assert result.exit_code == 0, result.output
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    return rows, orjson.loads(result.stdout.strip().splitlines()[-1])


def _model_xml_mtimes(model_dir: Path) -> dict[str, int]:
    """Each version directory's model.xml mtime (the registry's `current` pointer is no
    version)."""
    return {p.name: (p / "model.xml").stat().st_mtime_ns for p in model_dir.iterdir()
            if p.is_dir()}


@pytest.mark.slow
def test_engine_build_prints_the_openvino_int8_artifact(ov_root: Path,
                                                        openvino_artifacts: dict[str, Path]
                                                        ) -> None:
    version = openvino_artifacts["int8"].name
    model_dir = ov_root / openvino_artifacts["fp32"].parent.name
    before = _model_xml_mtimes(model_dir)
    assert set(before) == {p.name for p in openvino_artifacts.values()}
    result = CliRunner().invoke(app, ["engine", "build", "--backend", "openvino",
                                      "--precision", "int8", "--engine-dir", str(ov_root)],
                                env=WIDE)
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.name == version and path.is_relative_to(ov_root)
    m = read_manifest(path)
    assert (m.backend, m.precision, m.head) == ("openvino", "int8", "similarity")
    assert "(openvino int8, similarity head" in result.output
    # Found by content hash: nothing converted or quantized again.
    assert path.parent == model_dir and _model_xml_mtimes(model_dir) == before
    # The model's first version in this directory: promoted.
    assert EngineRegistry(ov_root).current(DEFAULT_MODEL_ID) == version

    ok = CliRunner().invoke(app, ["engine", "verify", str(path)])
    assert ok.exit_code == 0, ok.output
    assert "inference ok" in ok.output
    weights = path / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 3] ^= 0x10
    weights.write_bytes(bytes(data))
    bad = CliRunner().invoke(app, ["engine", "verify", str(path)], env=WIDE)
    assert bad.exit_code == 2
    assert "model.bin: checksum mismatch" in bad.output


@pytest.mark.slow
def test_rescore_on_openvino_matches_onnx_runtime(ov_root: Path, small_log: Path,
                                                  openvino_artifacts: dict[str, Path],
                                                  default_engine_path: Path,
                                                  tmp_path: Path) -> None:
    ort_rows, ort_summary = _rescore(small_log, tmp_path / "ort.jsonl", "--engine",
                                     str(default_engine_path))
    ov_rows, ov_summary = _rescore(small_log, tmp_path / "ov.jsonl", "--backend", "openvino",
                                   "--engine-dir", str(ov_root))
    fp32_rows, _ = _rescore(small_log, tmp_path / "ov32.jsonl", "--backend", "openvino",
                            "--precision", "fp32", "--engine-dir", str(ov_root))
    wanted = [orjson.loads(line)["id"] for line in small_log.read_bytes().splitlines()]
    assert len(wanted) == 40
    for rows, artifact in ((ov_rows, openvino_artifacts["int8"]),
                           (fp32_rows, openvino_artifacts["fp32"])):
        assert [r["id"] for r in rows] == wanted  # input order
        assert [r["line"] for r in rows] == [r["line"] for r in ort_rows]
        assert [set(r) for r in rows] == [set(r) for r in ort_rows]  # the same keys per line
        assert {r["model_version"] for r in rows} == {artifact.name}
        assert {r["model_id"] for r in rows} == {DEFAULT_MODEL_ID}
    assert set(ov_summary) == set(ort_summary)
    assert ov_summary["model_version"] == openvino_artifacts["int8"].name
    assert (ov_summary["items"], ov_summary["rejected"], ov_summary["sequences"]) == (
        ort_summary["items"], ort_summary["rejected"], ort_summary["sequences"])

    def scores(rows: list[dict]) -> np.ndarray:
        return np.array([s for r in rows for s in r["scores"]])

    assert scores(ort_rows).size > 40
    # Cosine scores: INT8 close to ONNX Runtime FP32, OpenVINO FP32 the same to rounding.
    assert np.abs(scores(ov_rows) - scores(ort_rows)).max() < 0.02
    assert np.abs(scores(fp32_rows) - scores(ort_rows)).max() < 1e-4
    # Nothing was built: the copied versions served (the model dir holds just those two).
    assert set(_model_xml_mtimes(ov_root / openvino_artifacts["int8"].parent.name)) == {
        p.name for p in openvino_artifacts.values()}


@pytest.mark.parametrize("command", ["rescore", "build"])
def test_unknown_backend_and_precision_are_refused(tmp_path: Path, command: str) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text('{"id": "a", "query": "q"}\n')
    base = (["rescore", str(log), "-o", str(tmp_path / "o.jsonl"), "--no-progress"]
            if command == "rescore" else ["engine", "build"])
    base += ["--engine-dir", str(tmp_path / "engines")]
    run = CliRunner().invoke
    bogus = run(app, [*base, "--backend", "bogus"], env=WIDE)
    assert bogus.exit_code == 2
    assert "--backend must be one of onnxruntime, openvino, torch, tensorrt, not 'bogus'" in (
        bogus.output)
    fp16 = run(app, [*base, "--backend", "openvino", "--precision", "fp16"], env=WIDE)
    assert fp16.exit_code == 2
    assert "--precision must be one of fp32, int8 for the openvino backend, not 'fp16'" in (
        fp16.output)
    assert not (tmp_path / "engines").exists()  # refused before building anything
