"""`qscore merge`: the outputs of `qscore rescore --shard I/N` runs joined into the output one
unsharded run writes, checked for lines missing or doubled.

Each finished shard leaves `OUTPUT.shard.json` beside its output: the input (size and SHA-256 of
all its bytes), its line count, the shard, the block size, the format and engine, and its item,
rejected and blank counts. The merge refuses shards of different inputs, engines, block sizes or
formats, a shard missing or given twice, or one unfinished; then it walks the blocks in order,
taking block b's lines from shard b % N (shards write their blocks in order, so each output is
read once, front to back), and checks that every line number rises and stays inside its block,
and that items + rejected + blank lines add up to the input's lines.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from qscore.offline.checkpoint import sync_dir
from qscore.offline.outputs import partial_of

SAME = ("input_size", "input_sha256", "lines", "chunk_items", "format", "model_id",
        "model_version")


class MergeError(ValueError):
    """The shards cannot be joined: which, and why."""


@dataclass(frozen=True, slots=True)
class MergeSummary:
    shards: int
    lines: int
    items: int
    rejected: int
    blank: int

    def as_dict(self) -> dict[str, int]:
        return {"shards": self.shards, "lines": self.lines, "items": self.items,
                "rejected": self.rejected, "blank": self.blank}


def _record(output: Path) -> dict[str, Any]:
    path = output.with_name(output.name + ".shard.json")
    pending = output.with_name(output.name + ".checkpoint.json")
    if pending.exists():  # a run over an older finished output: its record is stale
        raise MergeError(f"{output}: a run writing it is unfinished ({pending.name}); resume "
                         "it with --resume")
    try:
        return orjson.loads(path.read_bytes())  # type: ignore[no-any-return]
    except FileNotFoundError:
        pending = output.with_name(output.name + ".checkpoint.json")
        why = ("it is unfinished (resume it with --resume)" if pending.exists()
               else "it is not the output of a finished `qscore rescore --shard` run")
        raise MergeError(f"{output}: no {path.name}: {why}") from None
    except orjson.JSONDecodeError as exc:
        raise MergeError(f"{path}: unreadable ({exc})") from None


def _check(outputs: list[Path]) -> tuple[list[dict[str, Any]], int]:
    records = [_record(p) for p in outputs]
    first = records[0]
    for path, record in zip(outputs, records, strict=True):
        for key in SAME:
            if record.get(key) != first.get(key):
                raise MergeError(f"{path} differs from {outputs[0]} in {key}: "
                                 f"{record.get(key)!r} != {first.get(key)!r} (shards of one "
                                 "run share the input, engine, block size and format)")
    counts = {int(r["shard"].split("/")[1]) for r in records}
    if len(counts) != 1:
        raise MergeError(f"shards of different splits: {sorted(r['shard'] for r in records)}")
    n = counts.pop()
    by_index: dict[int, list[Path]] = {}
    for path, record in zip(outputs, records, strict=True):
        by_index.setdefault(int(record["shard"].split("/")[0]), []).append(path)
    if doubled := {i: p for i, p in by_index.items() if len(p) > 1}:
        raise MergeError("shards given twice: " + "; ".join(
            f"{i}/{n}: {', '.join(map(str, p))}" for i, p in sorted(doubled.items())))
    if missing := sorted(set(range(1, n + 1)) - set(by_index)):
        raise MergeError(f"shards missing: {', '.join(f'{i}/{n}' for i in missing)}")
    ordered = sorted(zip(outputs, records, strict=True),
                     key=lambda pr: int(pr[1]["shard"].split("/")[0]))
    return [{"path": p, **r} for p, r in ordered], n


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                yield orjson.loads(raw)["line"], raw


def _blocks(shards: list[dict[str, Any]], n: int, lines: int, chunk: int,
            read: Any) -> Iterator[tuple[int, Any]]:
    """(line, row) of every shard in input order, checking each row's line is in its block
    and rises."""
    streams = [read(s) for s in shards]
    heads: list[tuple[int, Any] | None] = [next(s, None) for s in streams]
    last = 0
    for block in range((lines + chunk - 1) // chunk):
        i = block % n
        end = (block + 1) * chunk
        while heads[i] is not None and heads[i][0] <= end:  # type: ignore[index]
            line, row = heads[i]  # type: ignore[misc]
            if line <= last or line <= block * chunk:
                raise MergeError(f"{shards[i]['path']}: line {line} out of order or outside "
                                 f"its block (after line {last}); a shard output was changed")
            last = line
            yield line, row
            heads[i] = next(streams[i], None)
    for i, head in enumerate(heads):
        if head is not None:
            raise MergeError(f"{shards[i]['path']}: line {head[0]} is past the input's "
                             f"{lines} lines or not in shard {shards[i]['shard']}'s blocks")


def merge(outputs: list[Path], target: Path) -> MergeSummary:
    """Join shard outputs (and their rejected lines) into `target`; MergeError if they do not
    make one whole run. The target appears whole, in one rename."""
    if not outputs:
        raise MergeError("no shard outputs given")
    shards, n = _check(outputs)
    first = shards[0]
    lines, chunk, fmt = int(first["lines"]), int(first["chunk_items"]), first["format"]
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        items = _merge_parquet(shards, n, lines, chunk, target)
    else:
        items = _merge_jsonl([s["path"] for s in shards], shards, n, lines, chunk, target)
    rejected_target = target.with_name(target.name + ".rejected.jsonl")
    rejected = _merge_jsonl(
        [Path(str(s["path"]) + ".rejected.jsonl") for s in shards],
        shards, n, lines, chunk, rejected_target)
    blank = sum(int(s["blank"]) for s in shards)
    want = {"items": sum(int(s["items"]) for s in shards),
            "rejected": sum(int(s["rejected"]) for s in shards)}
    if (items, rejected) != (want["items"], want["rejected"]):
        raise MergeError(f"the shard outputs hold {items} items and {rejected} rejected lines, "
                         f"their records say {want['items']} and {want['rejected']}: a shard "
                         "output was changed or truncated")
    if items + rejected + blank != lines:
        raise MergeError(f"{items} items + {rejected} rejected + {blank} blank lines != the "
                         f"input's {lines} lines: lines are missing")
    return MergeSummary(n, lines, items, rejected, blank)


def _merge_jsonl(paths: list[Path], shards: list[dict[str, Any]], n: int, lines: int,
                 chunk: int, target: Path) -> int:
    located = [{**s, "path": p} for s, p in zip(shards, paths, strict=True)]
    for s in located:
        if not Path(s["path"]).is_file():
            raise MergeError(f"{s['path']} is missing")
    tmp = partial_of(target)
    count = 0
    with tmp.open("wb") as out:
        for _, raw in _blocks(located, n, lines, chunk, lambda s: _jsonl_lines(Path(s["path"]))):
            out.write(raw if raw.endswith(b"\n") else raw + b"\n")
            count += 1
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)
    sync_dir(target.parent)
    return count


def _merge_parquet(shards: list[dict[str, Any]], n: int, lines: int, chunk: int,
                   target: Path) -> int:
    """Row groups never cross a block (one a window), so whole row groups are moved."""
    import pyarrow.parquet as pq

    files = [pq.ParquetFile(s["path"]) for s in shards]
    schema = files[0].schema_arrow
    for s, f in zip(shards, files, strict=True):
        if not f.schema_arrow.equals(schema):
            raise MergeError(f"{s['path']}: another Parquet schema than {shards[0]['path']}")

    def groups(s: dict[str, Any]) -> Iterator[tuple[int, Any]]:
        f = files[shards.index(s)]
        for g in range(f.num_row_groups):
            table = f.read_row_group(g)
            line = table.column("line")
            first, last = line[0].as_py(), line[-1].as_py()
            if (first - 1) // chunk != (last - 1) // chunk:
                raise MergeError(f"{s['path']}: a row group spans blocks (lines {first}-{last})")
            yield last, table

    tmp = partial_of(target)
    count = 0
    previous = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for _, table in _blocks(shards, n, lines, chunk, groups):
            line = table.column("line").to_pylist()
            if line[0] <= previous or any(b <= a for a, b in itertools.pairwise(line)):
                raise MergeError(f"lines out of order near line {line[0]}")
            previous = line[-1]
            writer.write_table(table, row_group_size=max(1, table.num_rows))
            count += table.num_rows
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    sync_dir(target.parent)
    return count
