"""Read query logs for offline re-scoring.

A query log is one query item a line, as JSONL (`{"id": ..., "query": ..., "docs": [...]}`)
or TSV (`id<TAB>query[<TAB>doc...]`), optionally gzip-compressed. `iter_query_log` streams it
line by line and yields one `LogRecord` a non-blank line: either a validated `QueryItem` or the
reason the line was rejected, with its line number and original bytes, so that a bad line
becomes a report (or a dead letter) instead of stopping the job.
"""

from __future__ import annotations

import gzip
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

import orjson

from schemas import DEFAULT_LIMITS, Limits, QueryItem, SchemaError

__all__ = ["DEFAULT_DEDUPE_WINDOW", "LogFormat", "LogRecord", "count_lines", "detect_format",
           "iter_query_log"]

LogFormat = Literal["auto", "jsonl", "tsv"]

GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
JSONL_SUFFIXES = frozenset({".jsonl", ".json", ".ndjson"})
TSV_SUFFIXES = frozenset({".tsv", ".txt"})
_CHUNK = 1 << 20
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


DEFAULT_DEDUPE_WINDOW = 100_000


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One line of a query log: at most one of `item` and `error` is set; neither for a blank
    line (yielded only when asked for, `blank=True`).

    `line` is 1-based and counts every line of the (decompressed) file, blank ones included.
    `raw` is the line without its terminator; for an over-long line only its first
    `limits.max_message_bytes` bytes are kept, so that memory stays bounded.
    """

    line: int
    item: QueryItem | None
    error: str | None
    raw: bytes

    @property
    def ok(self) -> bool:
        return self.item is not None

    @property
    def blank(self) -> bool:
        return self.item is None and self.error is None


def _open(path: Path) -> BinaryIO:
    # Trust the magic bytes, not the name: logs get renamed, and ".gz" files are not always gzip.
    with path.open("rb") as f:
        magic = f.read(2)
    if magic == GZIP_MAGIC:
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def detect_format(path: Path, fmt: LogFormat = "auto") -> Literal["jsonl", "tsv"]:
    """The log's format: `fmt` if given, else from the extension, else from its first line."""
    if fmt not in ("auto", "jsonl", "tsv"):
        raise ValueError(f"unknown query log format {fmt!r}: use 'auto', 'jsonl' or 'tsv'")
    if fmt != "auto":
        return fmt
    suffix = _suffix(path)
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TSV_SUFFIXES:
        return "tsv"
    # Sniff the first non-blank bytes; bounded reads, so a huge first line costs nothing extra.
    with _open(path) as f:
        first = True
        try:
            while chunk := f.readline(_CHUNK):
                if first:
                    chunk = chunk.removeprefix(UTF8_BOM)
                    first = False
                head = chunk.lstrip()
                if head:
                    return "jsonl" if head.startswith(b"{") else "tsv"
        except _GZIP_ERRORS:
            pass  # iter_query_log reports the broken stream as a record
    return "jsonl"  # empty (or unreadable) file: either format reads as nothing


class _LineError(Exception):
    """A line-level rejection; its message is the reason reported in `LogRecord.error`."""


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _LineError(f"invalid UTF-8 at byte {e.start}: {e.reason}") from None


def _parse_jsonl(raw: bytes) -> object:
    text = _decode(raw)  # first, so bad bytes are reported as such, not as bad JSON
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise _LineError(f"invalid JSON: {e}") from None


def _parse_tsv(raw: bytes) -> object:
    # TSV has no quoting: a tab always separates fields, so queries and docs cannot hold tabs.
    fields = _decode(raw).split("\t")
    obj: dict[str, object] = {"id": fields[0]}
    if len(fields) > 1:
        obj["query"] = fields[1]
    if len(fields) > 2:
        obj["docs"] = fields[2:]
    return obj


def _strip_eol(chunk: bytes) -> bytes:
    return chunk.removesuffix(b"\n").removesuffix(b"\r")


class Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


def _iter_lines(f: BinaryIO, max_bytes: int,
                digest: Digest | None = None) -> Iterator[tuple[bytes, int | None]]:
    """Yield (line without its terminator, None), or (first max_bytes bytes, length) if longer.

    Reads at most `max_bytes + 2` bytes at a time (room for CRLF), so an over-long line is
    skipped in bounded chunks and never held whole in memory, nor decoded. Every byte read
    goes to `digest` before its line is yielded, so between two lines it holds exactly the
    lines so far.
    """
    limit = max_bytes + 2
    feed = digest.update if digest is not None else (lambda _: None)
    while chunk := f.readline(limit):
        feed(chunk)
        if len(chunk) == limit and not chunk.endswith(b"\n"):
            prefix, length = chunk[:max_bytes], len(chunk)
            while chunk and not chunk.endswith(b"\n"):
                chunk = f.readline(_CHUNK)
                feed(chunk)
                length += len(chunk)
            yield prefix, length - len(chunk) + len(_strip_eol(chunk))
            continue
        line = _strip_eol(chunk)
        yield (line, None) if len(line) <= max_bytes else (line[:max_bytes], len(line))


class _RecentIds:
    """The line of each of the last `size` good ids: memory stays bounded however long the
    log (about 100 bytes an id), and a duplicate is caught while its first copy is this
    recent."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"dedupe window must be >= 1 id, not {size}")
        self.size = size
        self._lines: OrderedDict[str, int] = OrderedDict()

    def first(self, item_id: str, line: int) -> int:
        """The line `item_id` was first seen on among the recent ids, else remember `line`."""
        if (seen := self._lines.get(item_id)) is not None:
            return seen
        self._lines[item_id] = line
        if len(self._lines) > self.size:
            self._lines.popitem(last=False)
        return line


def iter_query_log(
    path: Path,
    limits: Limits = DEFAULT_LIMITS,
    fmt: LogFormat = "auto",
    *,
    dedupe_window: int = DEFAULT_DEDUPE_WINDOW,
    blank: bool = False,
    digest: Digest | None = None,
) -> Iterator[LogRecord]:
    """Stream `path` (JSONL or TSV, plain or gzip) as one `LogRecord` a non-blank line (and a
    blank record for each blank line, with `blank`).

    CRLF endings and a leading UTF-8 BOM are accepted. Every other problem (bad UTF-8 or
    JSON, a schema violation, a line over `limits.max_message_bytes`, an id seen on one of the
    previous `dedupe_window` good lines) becomes a record with `error` set, and reading goes
    on. A truncated or corrupt gzip stream ends the log with one final error record. The
    (decompressed) bytes are fed to `digest` as they are read (_iter_lines).
    """
    path = Path(path)
    parse = _parse_jsonl if detect_format(path, fmt) == "jsonl" else _parse_tsv
    max_bytes = limits.max_message_bytes
    recent = _RecentIds(dedupe_window)
    lineno = 0
    with _open(path) as f:
        try:
            for raw, overlong in _iter_lines(f, max_bytes, digest):
                lineno += 1
                if lineno == 1:
                    raw = raw.removeprefix(UTF8_BOM)
                if overlong is not None:
                    reason = f"line too long: {overlong} bytes > max_message_bytes={max_bytes}"
                    yield LogRecord(lineno, None, reason, raw)
                    continue
                if not raw.strip():
                    if blank:
                        yield LogRecord(lineno, None, None, raw)
                    continue
                try:
                    obj = parse(raw)
                    item = QueryItem.from_obj(obj, limits, where="item")
                except (_LineError, SchemaError) as e:
                    yield LogRecord(lineno, None, str(e), raw)
                    continue
                first = recent.first(item.id, lineno)
                if first != lineno:
                    reason = f"duplicate id {item.id!r}, first seen at line {first}"
                    yield LogRecord(lineno, None, reason, raw)
                    continue
                yield LogRecord(lineno, item, None, raw)
        except _GZIP_ERRORS as e:
            yield LogRecord(lineno + 1, None, f"corrupt or truncated gzip stream: {e}", b"")


def count_lines(path: Path) -> int:
    """Number of lines in `path` (gzip-aware), counting a last line without a newline.

    Counts blank lines too, so it matches `LogRecord.line` numbering: a progress bar can use it
    as its total and the last record's `line` as its position.
    """
    count = 0
    last = b""
    with _open(Path(path)) as f:
        try:
            while chunk := f.read(_CHUNK):
                count += chunk.count(b"\n")
                last = chunk
        except _GZIP_ERRORS:
            pass  # a progress total need not be exact; iter_query_log reports the damage
    return count + (1 if last and not last.endswith(b"\n") else 0)
