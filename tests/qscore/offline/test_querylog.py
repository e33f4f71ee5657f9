"""Reading query logs: formats, compression, detection, and one report per bad line."""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import orjson
import pytest

from qscore.offline.querylog import LogRecord, count_lines, detect_format, iter_query_log
from schemas import Limits, QueryItem

ITEMS = [
    {"id": "q1", "query": "how to boil an egg", "docs": ["Boil for nine minutes.", "Tax day."]},
    {"id": "q2", "query": "best time to visit lisbon"},
    {"id": "q3", "query": "café près de la gare", "docs": ["Un café à deux pas."]},
]


def jsonl(items: list[dict[str, object]]) -> bytes:
    return b"".join(orjson.dumps(item) + b"\n" for item in items)


def tsv(items: list[dict[str, object]]) -> bytes:
    rows = ["\t".join([item["id"], item["query"], *item.get("docs", [])]) for item in items]
    return "".join(row + "\n" for row in rows).encode()


def write(path: Path, data: bytes, *, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def items_of(records: list[LogRecord]) -> list[QueryItem]:
    assert [r.error for r in records] == [None] * len(records)
    return [r.item for r in records if r.item is not None]


def expected() -> list[tuple[str, str, tuple[str, ...] | None]]:
    return [(d["id"], d["query"], tuple(d["docs"]) if "docs" in d else None) for d in ITEMS]


def as_tuples(items: list[QueryItem]) -> list[tuple[str, str, tuple[str, ...] | None]]:
    return [(i.id, i.query, tuple(i.docs) if i.docs is not None else None) for i in items]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    ("name", "encode"), [("log.jsonl", jsonl), ("log.tsv", tsv), ("log.ndjson", jsonl)]
)
def test_reads_jsonl_and_tsv_plain_and_gzip(tmp_path, name, encode, compress):
    path = write(tmp_path / (name + (".gz" if compress else "")), encode(ITEMS), compress=compress)
    records = list(iter_query_log(path))
    assert as_tuples(items_of(records)) == expected()
    assert [r.line for r in records] == [1, 2, 3]
    assert records[1].raw == encode(ITEMS).splitlines()[1]
    assert count_lines(path) == 3


@pytest.mark.parametrize("encode", [jsonl, tsv])
def test_gzip_detected_by_magic_bytes_not_extension(tmp_path, encode):
    path = write(tmp_path / "log", encode(ITEMS), compress=True)
    assert as_tuples(items_of(list(iter_query_log(path)))) == expected()
    # A ".gz" name on an uncompressed file is read as plain text.
    plain = write(tmp_path / "plain.jsonl.gz", jsonl(ITEMS))
    assert as_tuples(items_of(list(iter_query_log(plain)))) == expected()


@pytest.mark.parametrize(
    ("name", "data", "fmt"),
    [
        ("a.jsonl", b"", "jsonl"),
        ("a.JSON", b"", "jsonl"),
        ("a.ndjson.gz", b"", "jsonl"),
        ("a.tsv", b"", "tsv"),
        ("a.txt.gz", b"", "tsv"),
        ("queries.log", b"\n  \n" + jsonl(ITEMS), "jsonl"),
        ("queries.log", b"\xef\xbb\xbf" + jsonl(ITEMS), "jsonl"),
        ("queries", tsv(ITEMS), "tsv"),
        ("queries.dat", b"", "jsonl"),
    ],
)
def test_format_detection(tmp_path, name, data, fmt):
    assert detect_format(write(tmp_path / name, data)) == fmt


def test_sniffing_reads_through_gzip_and_explicit_format_wins(tmp_path):
    path = write(tmp_path / "dump.gz", tsv(ITEMS), compress=True)
    assert detect_format(path) == "tsv"
    assert as_tuples(items_of(list(iter_query_log(path)))) == expected()
    # An explicit format overrides the extension: a JSONL file named .txt.
    path = write(tmp_path / "log.txt", jsonl(ITEMS))
    assert as_tuples(items_of(list(iter_query_log(path, fmt="jsonl")))) == expected()
    with pytest.raises(ValueError, match="unknown query log format"):
        detect_format(path, "csv")  # type: ignore[arg-type]


def test_blank_lines_crlf_and_bom(tmp_path):
    lines = jsonl(ITEMS).splitlines()
    data = b"\xef\xbb\xbf" + b"\r\n".join([lines[0], b"", b"   ", lines[1], b"\t", lines[2]])
    path = write(tmp_path / "log.jsonl", data + b"\r\n\r\n")
    records = list(iter_query_log(path))
    assert as_tuples(items_of(records)) == expected()
    assert [r.line for r in records] == [1, 4, 6]
    assert records[0].raw == lines[0]  # no BOM, no CR
    assert count_lines(path) == 7


def test_tsv_crlf_does_not_leak_into_last_field(tmp_path):
    path = write(tmp_path / "log.tsv", b"\xef\xbb\xbf" + tsv(ITEMS).replace(b"\n", b"\r\n"))
    assert as_tuples(items_of(list(iter_query_log(path)))) == expected()


def test_last_line_without_newline(tmp_path):
    path = write(tmp_path / "log.jsonl", jsonl(ITEMS).rstrip(b"\n"))
    assert len(items_of(list(iter_query_log(path)))) == 3
    assert count_lines(path) == 3


LIMITS = Limits(max_message_bytes=400, max_query_chars=60, max_docs_per_item=3)
# Each bad line and a word its reason must mention.
BAD_JSONL: list[tuple[bytes, str]] = [
    (b'{"id": "b1", "query": "unterminated', "json"),
    (b'{"id": "b2", "query": "caf\xe9"}', "utf-8"),
    (b'{"id": "b3", "docs": ["a"]}', "query: required"),
    (b'{"id": "b4", "query": ""}', "query: empty"),
    (b'{"id": "b5", "query": "   "}', "query: empty"),
    (b'{"id": "b6", "query": "q", "docs": ["a", "b", "c", "d"]}', "docs: max_items=3"),
    (orjson.dumps({"id": "b7", "query": "x" * 61}), "query: max_chars=60"),
    (b'{"id": "b8", "query": 42}', "query: type"),
    (b'{"id": ["b8"], "query": "q"}', "id: type"),
    (b'{"id": "b8b", "query": "q", "docs": []}', "docs: empty"),
    (b'{"id": "b9", "query": "q", "docs": "not a list"}', "docs: type"),
    (b'["b10", "q"]', "item: type (expected object, got array)"),
    (b'"just a string"', "object"),
    (orjson.dumps({"id": "b11", "query": "q", "docs": ["z" * 500]}), "line too long"),
    (b'{"id": "good-1", "query": "again"}', "duplicate id 'good-1', first seen at line 1"),
    (b'{"id": "b12", "query": "q", "extra": 1}', "unknown_key"),
]


def test_malformed_lines_are_reported_and_good_lines_kept_in_order(tmp_path):
    good = [orjson.dumps({"id": f"good-{i}", "query": f"query number {i}"}) for i in range(1, 151)]
    lines: list[bytes] = []
    bad_at: dict[int, str] = {}
    for i, line in enumerate(good):
        lines.append(line)
        if i % 9 == 8 and len(bad_at) < len(BAD_JSONL):  # ~10% bad, spread through the file
            bad, why = BAD_JSONL[len(bad_at)]
            lines.append(bad)
            bad_at[len(lines)] = why
    assert len(bad_at) == len(BAD_JSONL)
    path = write(tmp_path / "mixed.jsonl", b"\n".join(lines) + b"\n")

    records = list(iter_query_log(path, LIMITS))
    assert len(records) == len(lines)
    errors = {r.line: r for r in records if r.error is not None}
    assert errors.keys() == bad_at.keys()
    for line, record in errors.items():
        assert record.item is None
        assert bad_at[line].lower() in record.error.lower(), (line, record.error)
        assert record.raw == lines[line - 1][: LIMITS.max_message_bytes]
    oks = [r for r in records if r.error is None]
    assert all(r.item is not None for r in oks)
    assert [r.item.id for r in oks] == [f"good-{i}" for i in range(1, 151)]


def test_malformed_tsv_lines(tmp_path):
    data = b"t1\tok query\tdoc\nt2\n\tno id\nt3\t\nt4\tq\ta\tb\tc\td\nt5\tbad \xff byte\nt1\tdup\n"
    records = list(iter_query_log(write(tmp_path / "log.tsv", data), LIMITS))
    assert [r.line for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert records[0].item == QueryItem("t1", "ok query", ("doc",))
    reasons = [r.error for r in records[1:]]
    for reason, word in zip(
        reasons, ["query: required", "id: empty", "query: empty", "max_items", "utf-8", "dup"],
        strict=True,
    ):
        assert reason is not None and word in reason.lower(), reason


def test_overlong_line_is_skipped_in_bounded_chunks(tmp_path):
    limits = Limits(max_message_bytes=1000)
    huge = orjson.dumps({"id": "big", "query": "q", "docs": ["w " * 1_000_000]})
    data = jsonl(ITEMS[:1]) + huge + b"\r\n" + jsonl(ITEMS[1:])
    path = write(tmp_path / "log.jsonl.gz", data, compress=True)
    records = list(iter_query_log(path, limits))
    assert [r.line for r in records] == [1, 2, 3, 4]
    assert records[1].error == f"line too long: {len(huge)} bytes > max_message_bytes=1000"
    assert len(records[1].raw) == 1000
    assert as_tuples([r.item for r in records if r.item]) == expected()


def test_line_exactly_at_the_limit_is_accepted(tmp_path):
    line = orjson.dumps({"id": "edge", "query": "q" * 40})
    limits = Limits(max_message_bytes=len(line))
    path = write(tmp_path / "log.jsonl", line + b"\r\n" + line.replace(b"edge", b"edge2") + b"x")
    records = list(iter_query_log(path, limits))
    assert records[0].item is not None
    assert records[1].error is not None and "line too long" in records[1].error


@pytest.mark.parametrize("name", ["log.jsonl.gz", "log.gz"])
@pytest.mark.parametrize("repeat", [1, 5000])
def test_truncated_gzip_ends_with_an_error_record(tmp_path, name, repeat):
    items = [{"id": f"q{i}", "query": f"query {i}"} for i in range(repeat)]
    blob = gzip.compress(jsonl(items))
    path = write(tmp_path / name, blob[: len(blob) // 2])
    records = list(iter_query_log(path))
    assert records[-1].error is not None and "gzip" in records[-1].error
    assert records[-1].line == len(records)
    assert all(r.item is not None for r in records[:-1])
    assert len(records) > (repeat // 3)
    # A progress total never raises on a damaged file. It drops the read that hit the damage,
    # and the whole stream (< 90 KB decompressed) lies within the first 1 MiB read: nothing is
    # counted, although iter_query_log got len(records) - 1 good lines out of it.
    assert count_lines(path) == 0


def test_shipped_sample_log_parses_cleanly():
    sample = resources.files("qscore") / "data" / "sample_queries.jsonl"
    with resources.as_file(sample) as path:
        records = list(iter_query_log(path))
        assert count_lines(path) == 1500
    assert [r.error for r in records if r.error] == []
    assert len(records) == 1500
    assert records[0].item is not None and records[0].item.id == "s000001"
    assert sum(r.item.docs is None for r in records if r.item) > 150  # query-only lines
