"""The checkpoint of a re-scoring run: what lets `--resume` continue where a killed run stopped.

It sits beside the output (`OUTPUT.checkpoint.json`) and names the input (path, size, and the
SHA-256 of the decompressed bytes read up to `lines_done`), the engine (model id, version), the
settings that decide the output (format, windows, limits, shard), how far the output and
rejected files are durable (bytes, or Parquet parts), and the summary so far. It is written
only after what it counts is on disk (fsync), by a rename, so a crash at any point leaves the
previous checkpoint or the new one, each describing files at least that long.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

FORMAT = 1


class ResumeRefused(ValueError):
    """The checkpoint does not fit this run: another input, engine or settings."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    input: str
    input_size: int
    input_sha256: str  # of the (decompressed) bytes of lines 1..lines_done
    lines_done: int  # every line up to here is in the output, the rejected file, or blank
    model_id: str
    model_version: str
    settings: dict[str, Any]  # what decides the output's bytes (RescoreSettings.identity)
    output_bytes: int = 0  # JSONL: the output file's durable length
    parts: int = 0  # Parquet: complete part files
    rejected_bytes: int = 0
    summary: dict[str, Any] = field(default_factory=dict)  # counters so far
    finished: bool = False
    format: int = FORMAT
    # The fleet path's own state (qscore.offline.fleet): run id, reply topic, output width,
    # the last line through which every window was acknowledged. Empty for in-process runs.
    fleet: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


def checkpoint_path(output: Path) -> Path:
    return output.with_name(output.name + ".checkpoint.json")


def read_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint at `path`, None if there is none; ResumeRefused if it is unreadable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        raw = orjson.loads(data)
        if raw.get("format") != FORMAT:
            raise ResumeRefused(f"{path}: checkpoint format {raw.get('format')!r} is not "
                                f"{FORMAT}; start again with --restart")
        return Checkpoint(**raw)
    except (orjson.JSONDecodeError, TypeError, AttributeError) as exc:
        raise ResumeRefused(f"{path}: unreadable checkpoint ({exc}); start again with "
                            "--restart") from None


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Replace the checkpoint in one rename, durable before this returns."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(checkpoint.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)


def sync_dir(directory: Path) -> None:
    """fsync a directory, so a rename or a new file in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_resumable(checkpoint: Checkpoint, *, input_path: Path, input_size: int,
                    model_id: str, model_version: str, settings: dict[str, Any]) -> None:
    """ResumeRefused, saying what differs, unless the checkpoint is of this input (by size
    here; by content once its first lines_done lines are read again), engine and settings."""
    if checkpoint.input_size != input_size:
        raise ResumeRefused(
            f"the input changed: {input_path} is {input_size:,} bytes, the checkpoint was made "
            f"on {checkpoint.input_size:,} bytes of {checkpoint.input}; resume with the same "
            "input, or start again with --restart")
    if (checkpoint.model_id, checkpoint.model_version) != (model_id, model_version):
        raise ResumeRefused(
            f"the engine changed: this run scores with {model_id} {model_version}, the "
            f"checkpoint's lines were scored with {checkpoint.model_id} "
            f"{checkpoint.model_version}; resume with --engine set to that version, or start "
            "again with --restart")
    if checkpoint.settings != settings:
        changed = sorted(k for k in {*checkpoint.settings, *settings}
                         if checkpoint.settings.get(k) != settings.get(k))
        raise ResumeRefused(
            "settings that decide the output changed since the checkpoint: "
            + ", ".join(f"{k} {checkpoint.settings.get(k)!r} -> {settings.get(k)!r}"
                        for k in changed)
            + "; resume with the same ones, or start again with --restart")
