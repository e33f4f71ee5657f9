"""`qscore rescore --shard I/N` runs joined by `qscore merge` equal the unsharded run; the merge
refuses shards that do not make one whole run. In process, with the stand-in tokenizer and the
batch-sensitive stand-in engine (rescore_helpers): no model."""

from __future__ import annotations

import itertools
import random
import re
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from qscore.offline.merge import MergeError, merge
from qscore.offline.rescore import Interrupted, Shard
from tests.qscore.offline.rescore_helpers import (
    BatchEngine,
    assert_same_output,
    fresh_dir,
    make_log,
    row_groups,
    run,
)

FORMATS = {"jsonl": ("out.jsonl", {}), "parquet": ("out.parquet", {"part_windows": 2})}
N = 3


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_log(tmp_path_factory.mktemp("log") / "log.jsonl")


@pytest.fixture(scope="module", params=list(FORMATS))
def sharded(request: pytest.FixtureRequest, log: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The unsharded run, and shards 1/3..3/3 of the same log (shard 2 interrupted and
    resumed on the way)."""
    name, extra = FORMATS[request.param]
    root = tmp_path_factory.mktemp(f"shards-{request.param}")
    base = fresh_dir(root, "base") / name
    whole = run(log, base, **extra)
    shards, summaries = [], []
    for i in range(1, N + 1):
        out = fresh_dir(root, f"shard{i}") / name
        if i == 2:
            with pytest.raises(Interrupted):
                run(log, out, BatchEngine(interrupt_at=20), shard=Shard(i, N), **extra)
            summaries.append(run(log, out, shard=Shard(i, N), resume=True, **extra))
        else:
            summaries.append(run(log, out, shard=Shard(i, N), **extra))
        shards.append(out)
    return {"fmt": request.param, "name": name, "extra": extra, "base": base, "whole": whole,
            "shards": shards, "summaries": summaries, "root": root}


def _merge_cli(shards: list[Path], target: Path) -> Any:
    from qscore.cli.app import app

    return CliRunner().invoke(app, ["merge", *map(str, shards), "-o", str(target)])


def test_each_shard_scores_only_its_blocks(sharded: dict[str, Any]) -> None:
    chunk = 7
    for i, (out, summary) in enumerate(zip(sharded["shards"], sharded["summaries"],
                                           strict=True), start=1):
        record = orjson.loads(out.with_name(out.name + ".shard.json").read_bytes())
        assert record["shard"] == f"{i}/{N}" and record["chunk_items"] == chunk
        assert (record["items"], record["rejected"], record["blank"]) == (
            summary.items, summary.rejected, summary.blank)
        assert not out.with_name(out.name + ".checkpoint.json").exists()
        rejected = [orjson.loads(r)["line"] for r in out.with_name(
            out.name + ".rejected.jsonl").read_bytes().splitlines()]
        assert rejected and all(((line - 1) // chunk) % N == i - 1 for line in rejected)
    whole, parts = sharded["whole"], sharded["summaries"]
    for key in ("items", "rejected", "blank", "sequences", "truncated_items", "batches",
                "padded_tokens", "real_tokens"):
        assert sum(getattr(s, key) for s in parts) == getattr(whole, key), key


def test_merged_shards_equal_the_unsharded_run(sharded: dict[str, Any], tmp_path: Path) -> None:
    orders = list(itertools.permutations(sharded["shards"]))
    for n, order in enumerate(random.Random(5).sample(orders, 3)):
        target = tmp_path / f"merged{n}" / sharded["name"]
        summary = merge(list(order), target)
        assert_same_output(target, sharded["base"])
        whole = sharded["whole"]
        assert summary.as_dict() == {"shards": N, "lines": 300, "items": whole.items,
                                     "rejected": whole.rejected, "blank": whole.blank}


def test_qscore_merge_on_the_command_line(sharded: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / sharded["name"]
    result = _merge_cli(sharded["shards"][::-1], target)
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.stdout.strip().splitlines()[-1])["items"] == sharded["whole"].items
    assert_same_output(target, sharded["base"])


def test_more_shards_than_blocks(tmp_path: Path) -> None:
    """Shard 3/3 of a log of 2 blocks owns nothing: an empty output, and the merge is whole."""
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(b'{"id": "q%d", "query": "words %d"}\n' % (i, i)
                             for i in range(10)))
    for name, extra in FORMATS.values():
        base = fresh_dir(tmp_path, "base") / name
        run(log, base, **extra)
        outs = []
        for i in range(1, N + 1):
            outs.append(fresh_dir(tmp_path, f"s{i}") / name)
            summary = run(log, outs[-1], shard=Shard(i, N), **extra)
            assert summary.items == (7, 3, 0)[i - 1]
        merge(outs, tmp_path / "merged" / name)
        assert_same_output(tmp_path / "merged" / name, base)


# -- refusals ----------------------------------------------------------------------------------

def _copy(out: Path, to: Path) -> Path:
    """A shard's files under another directory."""
    to.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".rejected.jsonl", ".shard.json"):
        shutil.copy2(out.with_name(out.name + suffix), to / (out.name + suffix))
    return to / out.name


def test_a_missing_shard_is_refused(sharded: dict[str, Any], tmp_path: Path) -> None:
    s1, _, s3 = sharded["shards"]
    with pytest.raises(MergeError, match=f"shards missing: 2/{N}"):
        merge([s3, s1], tmp_path / sharded["name"])
    result = _merge_cli([s1], tmp_path / sharded["name"])
    assert result.exit_code == 2 and f"shards missing: 2/{N}, 3/{N}" in result.output
    assert not (tmp_path / sharded["name"]).exists()


def test_a_shard_given_twice_is_refused(sharded: dict[str, Any], tmp_path: Path) -> None:
    s1, s2, s3 = sharded["shards"]
    again = _copy(s2, tmp_path / "again")
    with pytest.raises(MergeError, match=f"shards given twice: 2/{N}: .*{s2.parent.name}.*again"):
        merge([s1, s2, s3, again], tmp_path / sharded["name"])
    with pytest.raises(MergeError, match="given twice"):
        merge([s1, s2, s3, s3], tmp_path / sharded["name"])


@pytest.mark.parametrize(("change", "field"), [
    ("input", "input_size"), ("input_same_size", "input_sha256"),
    ("engine", "model_version"), ("chunk_items", "chunk_items"),
])
def test_shards_of_other_runs_are_refused(sharded: dict[str, Any], log: Path, tmp_path: Path,
                                          change: str, field: str) -> None:
    """A shard 2/3 made of another input, engine or block size than shards 1 and 3."""
    s1, _, s3 = sharded["shards"]
    other_log, engine, extra = log, None, dict(sharded["extra"])
    if change.startswith("input"):
        other_log = tmp_path / "log.jsonl"
        data = log.read_bytes()
        other_log.write_bytes(data.replace(b"rice", b"RICE", 1) if change == "input_same_size"
                              else data + b'{"id": "late", "query": "more"}\n')
    elif change == "engine":
        engine = BatchEngine(version="v1")
    else:
        extra["chunk_items"] = 8
    other = tmp_path / "other" / sharded["name"]
    run(other_log, other, engine, shard=Shard(2, N), **extra)
    with pytest.raises(MergeError, match=rf"{re.escape(str(other))} differs from "
                       rf"{re.escape(str(s1))} in {field}"):
        merge([s1, other, s3], tmp_path / sharded["name"])


def test_shards_of_other_splits_or_formats_are_refused(sharded: dict[str, Any], log: Path,
                                                       tmp_path: Path) -> None:
    s1, _, s3 = sharded["shards"]
    half = tmp_path / "half" / sharded["name"]
    run(log, half, shard=Shard(2, 2), **sharded["extra"])
    with pytest.raises(MergeError, match=r"shards of different splits: \['1/3', '2/2', '3/3'\]"):
        merge([s1, half, s3], tmp_path / "m" / sharded["name"])
    other_name = "out.parquet" if sharded["fmt"] == "jsonl" else "out.jsonl"
    other = tmp_path / "fmt" / other_name
    run(log, other, shard=Shard(2, N), part_windows=2)
    with pytest.raises(MergeError, match="in format"):
        merge([s1, other, s3], tmp_path / "m" / sharded["name"])


def test_an_unfinished_shard_is_refused(sharded: dict[str, Any], log: Path,
                                        tmp_path: Path) -> None:
    s1, _, s3 = sharded["shards"]
    stopped = tmp_path / "stopped" / sharded["name"]
    with pytest.raises(Interrupted):
        run(log, stopped, BatchEngine(interrupt_at=30), shard=Shard(2, N), **sharded["extra"])
    with pytest.raises(MergeError, match=rf"{re.escape(str(stopped))}: a run writing it is "
                       r"unfinished \(.*checkpoint.json\); resume it with --resume"):
        merge([s1, stopped, s3], tmp_path / sharded["name"])
    plain = tmp_path / "plain" / sharded["name"]  # a finished run, but not a shard's
    run(log, plain, **sharded["extra"])
    with pytest.raises(MergeError, match="not the output of a finished `qscore rescore --shard`"):
        merge([s1, plain, s3], tmp_path / sharded["name"])


def _rewrite_parquet(path: Path, keep: list[int]) -> None:
    """The file with row groups `keep` (in that order) only."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    tables = [f.read_row_group(g) for g in keep]
    with pq.ParquetWriter(path.with_name("tmp.parquet"), f.schema_arrow) as writer:
        for table in tables:
            writer.write_table(table)
    path.with_name("tmp.parquet").replace(path)


def test_a_shard_output_with_a_line_deleted_is_refused(sharded: dict[str, Any],
                                                       tmp_path: Path) -> None:
    s1, s2, s3 = sharded["shards"]
    changed = _copy(s2, tmp_path / "changed")
    if sharded["fmt"] == "jsonl":
        lines = changed.read_bytes().splitlines(keepends=True)
        changed.write_bytes(b"".join(lines[:10] + lines[11:]))
    else:
        groups = row_groups(changed)
        _rewrite_parquet(changed, [g for g in range(len(groups)) if g != 4])
    with pytest.raises(MergeError, match=r"the shard outputs hold \d+ items .* their records say "
                       r"\d+ .*: a shard output was changed or truncated"):
        merge([s1, changed, s3], tmp_path / sharded["name"])
    rejected = changed.with_name(changed.name + ".rejected.jsonl")
    _copy(s2, tmp_path / "changed")
    rejected.write_bytes(b"".join(rejected.read_bytes().splitlines(keepends=True)[1:]))
    with pytest.raises(MergeError, match="changed or truncated"):
        merge([s1, changed, s3], tmp_path / sharded["name"])


def test_a_shard_output_with_a_line_doubled_is_refused(sharded: dict[str, Any],
                                                       tmp_path: Path) -> None:
    s1, s2, s3 = sharded["shards"]
    changed = _copy(s2, tmp_path / "changed")
    if sharded["fmt"] == "jsonl":
        lines = changed.read_bytes().splitlines(keepends=True)
        changed.write_bytes(b"".join(lines[:10] + lines[9:]))
    else:
        n = len(row_groups(changed))
        _rewrite_parquet(changed, [*range(5), 4, *range(5, n)])
    with pytest.raises(MergeError, match="out of order"):
        merge([s1, changed, s3], tmp_path / sharded["name"])
    # Rows moved into another shard's blocks are refused too.
    moved = _copy(s1, tmp_path / "moved")
    if sharded["fmt"] == "jsonl":
        first = orjson.loads(moved.read_bytes().splitlines()[0])
        first["line"] += 7
        moved.write_bytes(orjson.dumps(first) + b"\n" + b"".join(
            moved.read_bytes().splitlines(keepends=True)[1:]))
        with pytest.raises(MergeError, match=r"out of order or outside its block|past the"):
            merge([moved, s2, s3], tmp_path / sharded["name"])
