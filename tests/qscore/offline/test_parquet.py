"""`qscore rescore` Parquet output: its schema, one row group a window, and the same values as
the JSONL output (to float32). The stand-in tokenizer and engine (rescore_helpers): no model;
the real engine's 384-wide embeddings are checked in test_resume_real.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qscore.offline.rescore import rescore
from tests.qscore.offline.rescore_helpers import BatchEngine, make_log, row_groups, run, settings
from tests.qscore.offline.test_rescore_windows import _ByteTokenizer


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("parquet")
    log = make_log(root / "log.jsonl")
    run(log, root / "out.jsonl")
    tokenizer = _ByteTokenizer()
    rescore(settings(log, root / "out.parquet", part_windows=4), BatchEngine(),  # type: ignore[arg-type]
            tokenizer)  # type: ignore[arg-type]
    return {"jsonl": root / "out.jsonl", "parquet": root / "out.parquet",
            "windows": tokenizer.windows}


def test_schema(outputs: dict[str, Any]) -> None:
    schema = pq.read_schema(outputs["parquet"])
    assert schema.names == ["id", "line", "scores", "embedding", "truncated", "model_id",
                            "model_version"]
    assert schema.field("id").type == pa.string() and not schema.field("id").nullable
    assert schema.field("line").type == pa.int64()
    assert schema.field("scores").type == pa.list_(pa.float32())
    assert schema.field("embedding").type == pa.list_(pa.float32(), 3)  # fixed size: output_dim
    assert schema.field("embedding").nullable  # null for items with docs
    assert schema.field("truncated").type == pa.bool_()
    for name in ("model_id", "model_version"):
        assert schema.field(name).type == pa.dictionary(pa.int32(), pa.string())


def test_one_row_group_a_window(outputs: dict[str, Any]) -> None:
    # Windows of several items each, many of them: each is its own row group.
    assert len(outputs["windows"]) > 50
    assert row_groups(outputs["parquet"]) == outputs["windows"]


def test_values_equal_the_jsonl_output(outputs: dict[str, Any]) -> None:
    rows = pq.read_table(outputs["parquet"]).to_pylist()
    want = [orjson.loads(line) for line in outputs["jsonl"].read_bytes().splitlines()]
    assert len(rows) == len(want) > 150
    with_docs = 0
    for got, exp in zip(rows, want, strict=True):
        assert (got["id"], got["line"], got["model_id"], got["model_version"]) == (
            exp["id"], exp["line"], exp["model_id"], exp["model_version"])
        assert got["truncated"] is exp.get("truncated", False)
        assert np.array_equal(np.float32(got["scores"]), np.float32(exp["scores"]))
        if exp["scores"]:
            with_docs += 1
            assert got["embedding"] is None and "embedding" not in exp
        else:
            assert np.array_equal(np.float32(got["embedding"]), np.float32(exp["embedding"]))
    assert 50 < with_docs < len(rows) - 50  # both kinds, many of each
    assert any(r["truncated"] for r in rows) and not all(r["truncated"] for r in rows)


def test_readable_by_pandas(outputs: dict[str, Any]) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(outputs["parquet"])
    assert list(frame.columns)[:3] == ["id", "line", "scores"] and len(frame) > 150
    assert frame["embedding"].isna().sum() > 50


def test_an_output_with_no_rows_is_still_a_parquet_file(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"{bad\n\n" * 20)
    summary = run(log, tmp_path / "out.parquet", part_windows=2)
    assert (summary.items, summary.rejected, summary.blank) == (0, 20, 20)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.num_rows == 0 and table.schema.names[:3] == ["id", "line", "scores"]
    assert len((tmp_path / "out.parquet.rejected.jsonl").read_bytes().splitlines()) == 20
