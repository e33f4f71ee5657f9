"""Where re-scored lines go: JSONL (the default) or Parquet, written window by window.

Both writers grow a `.partial` beside the final output and say, at a window's end, whether what
they wrote is durable (`commit`): the JSONL file after a flush and fsync, at its byte length;
Parquet in part files (`OUTPUT.parts/NNNNNN.parquet`, one row group a window) once a part is
complete. A checkpoint records that state, and a resumed run reopens the writer at it (`at`),
dropping anything written after it. `finish` makes the final file appear whole in one rename:
for Parquet, the parts' row groups copied in order into one file, one row group at a time.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from qscore.offline.checkpoint import sync_dir

FORMATS = ("jsonl", "parquet")
PART_WINDOWS = 16  # windows (row groups) in a Parquet part: what a crash can cost at most


@dataclass(slots=True)
class Rows:
    """A window's output rows, columns in input order."""

    ids: list[str]
    lines: list[int]
    scores: list[list[float]]
    embeddings: list[list[float] | None]
    truncated: list[bool]
    versions: list[str]
    model_id: str

    def __len__(self) -> int:
        return len(self.ids)


class Output(Protocol):
    path: Path

    def write(self, rows: Rows) -> None: ...

    def commit(self) -> dict[str, int] | None:
        """Make what was written durable if this is a point to checkpoint at: the state to
        record (`output_bytes` or `parts`), else None."""
        ...

    def seal(self) -> dict[str, int]:
        """Make everything written durable (the last Parquet part closed): the state to
        record in the finished checkpoint."""
        ...

    def finish(self) -> None:
        """Everything sealed becomes the final output, in one rename."""
        ...

    def close(self) -> None:
        """Stop, keeping what is durable for a resume."""
        ...


def format_for(output: Path, fmt: str | None) -> str:
    """`fmt` if given, else from the output's suffix (.parquet), else JSONL."""
    if fmt is None:
        return "parquet" if output.suffix.lower() in (".parquet", ".pq") else "jsonl"
    if fmt not in FORMATS:
        raise ValueError(f"output format must be one of {', '.join(FORMATS)}, not {fmt!r} "
                         "(the input's format is --input-format)")
    return fmt


def open_output(path: Path, fmt: str, *, output_dim: int, state: dict[str, int] | None,
                part_windows: int = PART_WINDOWS) -> Output:
    """The writer for `path`: new (state None) or reopened at a checkpoint's `state`."""
    if fmt == "parquet":
        return ParquetOutput(path, output_dim, (state or {}).get("parts"), part_windows)
    return JsonlOutput(path, (state or {}).get("output_bytes"))


def partial_of(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def durable_append(path: Path, at: int | None) -> Any:
    """A binary file to append to: new, or cut back to `at` bytes (a checkpoint's length)."""
    if at is None:
        return path.open("wb")
    f = path.open("r+b")
    size = f.seek(0, os.SEEK_END)
    if size < at:
        f.close()
        raise ValueError(f"{path} is {size:,} bytes, shorter than the {at:,} the checkpoint "
                         "recorded: it was changed or truncated since; start again with "
                         "--restart")
    f.truncate(at)
    f.seek(at)
    return f


def fsync(f: Any) -> int:
    f.flush()
    os.fsync(f.fileno())
    return f.tell()


class JsonlOutput:
    """One JSON object a line, the shape `qscore rescore` has always written."""

    def __init__(self, path: Path, at: int | None) -> None:
        self.path = path
        self._file = durable_append(partial_of(path), at)

    def write(self, rows: Rows) -> None:
        out = []
        for i, item_id in enumerate(rows.ids):
            line: dict[str, Any] = {"id": item_id, "line": rows.lines[i], "scores": rows.scores[i],
                                    "model_id": rows.model_id, "model_version": rows.versions[i]}
            if rows.truncated[i]:
                line["truncated"] = True
            if rows.embeddings[i] is not None:
                line["embedding"] = rows.embeddings[i]
            out.append(orjson.dumps(line))
        if out:
            self._file.write(b"\n".join(out) + b"\n")

    def commit(self) -> dict[str, int] | None:
        return {"output_bytes": fsync(self._file)}

    def seal(self) -> dict[str, int]:
        return {"output_bytes": fsync(self._file)}

    def finish(self) -> None:
        self._file.close()
        os.replace(partial_of(self.path), self.path)
        sync_dir(self.path.parent)

    def close(self) -> None:
        self._file.close()


def merged_parts(path: Path) -> Path:
    """Where a finished Parquet output's parts go to be deleted."""
    return path.with_name(path.name + ".parts.merged")


def discard_merged_parts(path: Path) -> None:
    """Delete the parts of a finished Parquet output, if any are left (a kill while deleting
    them)."""
    shutil.rmtree(merged_parts(path), ignore_errors=True)


def parquet_schema(output_dim: int) -> Any:
    import pyarrow as pa

    fields = [pa.field("id", pa.string(), nullable=False),
              pa.field("line", pa.int64(), nullable=False),
              pa.field("scores", pa.list_(pa.float32()), nullable=False),
              pa.field("truncated", pa.bool_(), nullable=False),
              pa.field("model_id", pa.dictionary(pa.int32(), pa.string()), nullable=False),
              pa.field("model_version", pa.dictionary(pa.int32(), pa.string()),
                       nullable=False)]
    if output_dim > 1:  # similarity: a query without docs has its embedding
        fields.insert(3, pa.field("embedding", pa.list_(pa.float32(), output_dim)))
    return pa.schema(fields)


def _require_pyarrow() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise ValueError("Parquet output needs pyarrow: pip install pyarrow") from exc


class ParquetOutput:
    """Row groups of one window each, in part files of `part_windows` row groups; the final
    file is the parts' row groups in order."""

    def __init__(self, path: Path, output_dim: int, parts: int | None,
                 part_windows: int) -> None:
        _require_pyarrow()
        self.path = path
        self.schema = parquet_schema(output_dim)
        self.dim = output_dim
        self.part_windows = part_windows
        self.dir = path.with_name(path.name + ".parts")
        if parts is None:
            shutil.rmtree(self.dir, ignore_errors=True)
            discard_merged_parts(path)
            self.dir.mkdir(parents=True)
            parts = 0
        else:
            if not self.dir.is_dir():
                raise ValueError(f"{self.dir} is missing: the checkpoint's parts are gone; "
                                 "start again with --restart")
            for stale in self.dir.iterdir():  # a part begun after the checkpoint
                if not stale.name.endswith(".parquet") or int(stale.stem) >= parts:
                    stale.unlink()
            have = len(list(self.dir.glob("*.parquet")))
            if have != parts:
                raise ValueError(f"{self.dir} has {have} parts, the checkpoint recorded "
                                 f"{parts}; start again with --restart")
        self.parts = parts
        self._writer: Any = None
        self._windows = 0

    def _part(self, n: int) -> Path:
        return self.dir / f"{n:06d}.parquet"

    def table(self, rows: Rows) -> Any:
        import numpy as np
        import pyarrow as pa

        columns: dict[str, Any] = {
            "id": pa.array(rows.ids, pa.string()),
            "line": pa.array(rows.lines, pa.int64()),
            "scores": pa.array(rows.scores, pa.list_(pa.float32())),
            "truncated": pa.array(rows.truncated, pa.bool_()),
            "model_id": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(len(rows), np.int32)), pa.array([rows.model_id])),
            "model_version": pa.array(rows.versions).dictionary_encode(),
        }
        if self.dim > 1:
            present = np.array([e is not None for e in rows.embeddings], dtype=bool)
            flat = np.zeros((len(rows), self.dim), dtype=np.float32)
            if present.any():
                flat[present] = np.asarray([e for e in rows.embeddings if e is not None],
                                           dtype=np.float32)
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(
                pa.array(flat.reshape(-1)), self.dim, mask=pa.array(~present))
        return pa.table({f.name: columns[f.name] for f in self.schema}, schema=self.schema)

    def write(self, rows: Rows) -> None:
        import pyarrow.parquet as pq

        if self._writer is None:
            self._writer = pq.ParquetWriter(self._part(self.parts), self.schema)
        self._writer.write_table(self.table(rows), row_group_size=max(1, len(rows)))
        self._windows += 1

    def _close_part(self) -> None:
        self._writer.close()
        with self._part(self.parts).open("rb") as f:
            os.fsync(f.fileno())
        sync_dir(self.dir)
        self._writer = None
        self._windows = 0
        self.parts += 1

    def commit(self) -> dict[str, int] | None:
        if self._writer is None or self._windows < self.part_windows:
            return None
        self._close_part()
        return {"parts": self.parts}

    def seal(self) -> dict[str, int]:
        if self._writer is not None:
            self._close_part()
        return {"parts": self.parts}

    def finish(self) -> None:
        import pyarrow.parquet as pq

        target = partial_of(self.path)
        with pq.ParquetWriter(target, self.schema) as writer:
            for n in range(self.parts):
                part = pq.ParquetFile(self._part(n))
                for group in range(part.num_row_groups):
                    table = part.read_row_group(group)
                    writer.write_table(table, row_group_size=max(1, table.num_rows))
        with target.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(target, self.path)
        sync_dir(self.path.parent)
        # Out of the way in one rename, then deleted: stopped half way through deleting them
        # in place, a resume would find fewer parts than the finished checkpoint names.
        discard_merged_parts(self.path)
        os.replace(self.dir, merged_parts(self.path))
        discard_merged_parts(self.path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()  # an incomplete part: dropped on resume
            self._writer = None
