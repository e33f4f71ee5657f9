"""`qscore rescore` end to end on the real default engine: bad lines never stop a run."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from qscore.cli.app import app

pytestmark = pytest.mark.slow

BAD_LINES = [
    (b"{not json", "invalid JSON"),
    (b'{"id": "x", "query": ""}', "query"),
    (b'{"id": "x"}', "query"),
    (b'{"id": "x", "query": "q", "docs": ' + orjson.dumps(["d"] * 300) + b"}", "docs"),
    (b'{"id": "x", "query": "\xff\xfe bad utf8"}', "UTF-8"),
    (b'{"id": "x", "query": 42}', "query"),
    (b'["a", "list"]', "object"),
    (b'{"id": "x", "query": "q", "extra": 1}', "extra"),
    (b'{"id": "x", "query": "' + b"a" * 3000 + b'"}', "max_chars"),
]


def _log(tmp_path: Path, n_good: int = 180, seed: int = 7) -> tuple[Path, dict[int, str],
                                                                       list[dict]]:
    """A JSONL log with ~10% malformed lines at random places."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    bad: dict[int, str] = {}
    good: list[dict] = []
    for i in range(n_good):
        if rng.random() < 0.11:
            raw, why = BAD_LINES[len(bad) % len(BAD_LINES)]
            raw = raw.replace(b'"x"', f'"bad{len(bad)}"'.encode())
            lines.append(raw)
            bad[len(lines)] = why
        row = {"id": f"g{i}", "query": f"how to cook rice number {i}"}
        if i % 3:
            row["docs"] = ["Rinse the rice and simmer it for 15 minutes.",
                           "The stock market fell today."][: 1 + i % 2]
        good.append(row)
        lines.append(orjson.dumps(row))
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, bad, good


def test_malformed_lines_are_rejected_and_the_rest_scored(default_engine_path: Path,
                                                          tmp_path: Path) -> None:
    log, bad, good = _log(tmp_path)
    out = tmp_path / "scores.jsonl"
    result = CliRunner().invoke(app, ["rescore", str(log), "-o", str(out), "--engine",
                                      str(default_engine_path), "--no-progress",
                                      "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    scored = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [s["id"] for s in scored] == [g["id"] for g in good]  # every good line, in order
    for row, s in zip(good, scored, strict=True):
        if row.get("docs"):
            assert len(s["scores"]) == len(row["docs"])
        else:
            assert s["scores"] == [] and len(s["embedding"]) == 384
    rejected = [orjson.loads(line) for line in
                (tmp_path / "scores.jsonl.rejected.jsonl").read_bytes().splitlines()]
    assert [r["line"] for r in rejected] == sorted(bad)  # each bad line once, in order
    for r in rejected:
        assert bad[r["line"]].lower() in r["reason"].lower(), r
    summary = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["items"], summary["rejected"]) == (len(good), len(bad))
    # Every input line is accounted for once, and the reported reject rate is the ~10% planted.
    lines = len(log.read_bytes().splitlines())
    assert summary["items"] + summary["rejected"] == lines
    assert 0.08 <= summary["rejected"] / lines <= 0.14
    assert summary["items_per_s"] > 0 and summary["p99_batch_ms"] >= summary["p50_batch_ms"]


def test_scores_rank_relevant_doc_first(default_engine_path: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.tsv.gz"
    with gzip.open(log, "wt", encoding="utf-8") as fh:
        fh.write("q1\thow to cook rice\tRinse the rice and simmer it for 15 minutes.\t"
                 "The stock market fell today.\n")
        fh.write("q2\t" + "long query " * 150 + "\tshort doc\n")
    out = tmp_path / "scores.jsonl"
    result = CliRunner().invoke(app, ["rescore", str(log), "-o", str(out), "--engine",
                                      str(default_engine_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    q1, q2 = (orjson.loads(line) for line in out.read_bytes().splitlines())
    assert q1["scores"][0] > 0.5 > q1["scores"][1]
    assert q2["truncated"] is True and "truncated" not in q1
    summary = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["truncated_items"], summary["truncated_sequences"]) == (1, 1)


def test_unusable_engine_is_a_clear_error(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text('{"id": "a", "query": "q"}\n')
    result = CliRunner().invoke(app, ["rescore", str(log), "-o", str(tmp_path / "o.jsonl"),
                                      "--engine", str(tmp_path / "nowhere"), "--no-progress"])
    assert result.exit_code == 2
    assert "no such artifact directory" in result.output


def test_engine_verify_catches_a_flipped_byte(default_engine_path: Path,
                                              tmp_path: Path) -> None:
    import shutil

    art = tmp_path / "art"
    shutil.copytree(default_engine_path, art)
    ok = CliRunner().invoke(app, ["engine", "verify", str(art)])
    assert ok.exit_code == 0, ok.output
    vocab = art / "tokenizer" / "vocab.txt"
    data = bytearray(vocab.read_bytes())
    data[100] ^= 0x20
    vocab.write_bytes(bytes(data))
    bad = CliRunner().invoke(app, ["engine", "verify", str(art)])
    assert bad.exit_code == 2
    assert "vocab.txt: checksum mismatch" in bad.output


def test_progress_moves_per_engine_call_and_ends_at_the_last_line(
        default_engine_path: Path, tmp_path: Path) -> None:
    from engines.select import EngineSettings, open_engine
    from qscore.offline.rescore import RescoreSettings, rescore
    from workers.scoring import BatchLimits

    log, bad, good = _log(tmp_path, n_good=120)
    settings = RescoreSettings(input=log, output=tmp_path / "o.jsonl",
                               engine=EngineSettings(artifact=default_engine_path),
                               batch=BatchLimits(max_batch=8), chunk_items=50)
    engine, tokenizer = open_engine(settings.engine)
    steps: list[int] = []
    summary = rescore(settings, engine, tokenizer, on_progress=steps.append)
    assert sum(steps) == len(good) + len(bad)  # every line, once
    assert len(steps) > 3 and all(s > 0 for s in steps)  # several steps per window
    assert summary.items == len(good) and summary.batches == len(summary.latency)
