"""`qscore rescore` interrupted anywhere and resumed writes what one uninterrupted run writes;
a checkpoint that does not fit the run is refused, saying why. In process, with a stand-in
tokenizer and an engine whose numbers depend on the batch (rescore_helpers): no model."""

from __future__ import annotations

import gzip
import os
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from qscore.offline.checkpoint import ResumeRefused, read_checkpoint
from qscore.offline.rescore import Interrupted
from tests.qscore.offline.rescore_helpers import (
    BatchEngine,
    assert_no_leftovers,
    assert_same_output,
    counts,
    fresh_dir,
    make_log,
    run,
)

# (log name, output name, extra settings): Parquet parts of 2 windows, so a part is often
# half written when the run stops.
CASES = {
    "jsonl": ("log.jsonl", "out.jsonl", {}),
    "parquet": ("log.jsonl", "out.parquet", {"part_windows": 2}),
    "gzip-jsonl": ("log.jsonl.gz", "out.jsonl", {}),
}


@pytest.fixture(scope="module", params=list(CASES))
def made(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A log and its uninterrupted run, once per case."""
    log_name, out_name, extra = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    log = make_log(root / log_name)
    base = fresh_dir(root, "base") / out_name
    summary = run(log, base, **extra)
    return {"log": log, "out_name": out_name, "extra": extra, "base": base,
            "summary": summary, "seed": request.param}


@pytest.fixture
def case(made: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    return {**made, "root": tmp_path}


def _tear(out: Path) -> None:
    """What a kill mid-window leaves beyond the checkpoint: a torn output line, a torn rejected
    line, a Parquet part begun and not finished, a checkpoint half written."""
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        with partial.open("ab") as f:
            f.write(b'{"id": "torn", "line": 99')
    with out.with_name(out.name + ".rejected.jsonl.partial").open("ab") as f:
        f.write(b'{"line": 12345, "reason": "tor')
    parts = out.with_name(out.name + ".parts")
    if parts.is_dir():
        (parts / "000999.parquet").write_bytes(b"PAR1 half a part")
    out.with_name(out.name + ".checkpoint.json.tmp").write_bytes(b'{"input": "hal')


def _interrupt(case: dict[str, Any], out: Path, at: int,
               **extra: Any) -> tuple[Interrupted, int]:
    """Run until the engine's call `at` raises KeyboardInterrupt (Ctrl-C): Interrupted, its
    lines_done the checkpoint's."""
    with pytest.raises(Interrupted) as caught:
        run(case["log"], out, BatchEngine(interrupt_at=at), **{**case["extra"], **extra})
    ckpt = read_checkpoint(out.with_name(out.name + ".checkpoint.json"))
    done = ckpt.lines_done if ckpt else 0
    assert caught.value.lines_done == done
    assert caught.value.checkpoint == out.with_name(out.name + ".checkpoint.json")
    assert not out.exists()  # nothing half done appears under the output's name
    if not done:
        assert "before the first checkpoint" in str(caught.value), caught.value
        assert "resume starts at line 1" in str(caught.value)
    return caught.value, done


def _lines(log: Path) -> list[bytes]:
    data = log.read_bytes()
    return (gzip.decompress(data) if log.name.endswith(".gz") else data).splitlines()


def test_the_log_has_every_kind_of_line(case: dict[str, Any]) -> None:
    s = case["summary"]
    assert s.items > 150 and s.rejected > 20 and s.blank > 8
    assert s.truncated_items > 40 and s.batches > 80
    rejected = [orjson.loads(r)["reason"] for r in case["base"].with_name(
        case["base"].name + ".rejected.jsonl").read_bytes().splitlines()]
    assert sum("duplicate id" in r for r in rejected) > 5
    assert sum(r.startswith("invalid") for r in rejected) > 5
    assert_no_leftovers(case["base"])


def test_interrupted_anywhere_then_resumed_equals_an_uninterrupted_run(
        case: dict[str, Any]) -> None:
    total_calls = case["summary"].batches
    rng = random.Random(case["seed"])
    points = sorted({1, total_calls, *rng.sample(range(2, total_calls), 4)})
    resumed_from = set()
    for at in points:
        out = fresh_dir(case["root"], f"at{at}") / case["out_name"]
        _, done = _interrupt(case, out, at)
        _tear(out)
        progress: list[int] = []
        summary = run(case["log"], out, resume=True, on_progress=progress.append,
                      **case["extra"])
        assert_same_output(out, case["base"])
        assert counts(summary) == counts(case["summary"]), f"interrupted at call {at}"
        assert summary.resumed_at == done
        assert ("resumed_at_line" in summary.as_dict()) == bool(done)
        assert sum(progress) == sum(1 for _ in _lines(case["log"]))  # each line once
        resumed_from.add(done)
    assert len(resumed_from) >= 4  # really from several places, line 0 among them
    assert 0 in resumed_from


def test_interrupted_twice_then_resumed(case: dict[str, Any]) -> None:
    out = fresh_dir(case["root"], "twice") / case["out_name"]
    total_calls = case["summary"].batches
    _, first = _interrupt(case, out, total_calls // 3)
    _, second = _interrupt(case, out, total_calls // 3, resume=True)
    assert second > first  # the second run went on from the first's checkpoint
    summary = run(case["log"], out, resume=True, **case["extra"])
    assert summary.resumed_at == second
    assert_same_output(out, case["base"])
    assert counts(summary) == counts(case["summary"])


@pytest.mark.parametrize("crash_at", ["output", "rejected"])
def test_killed_while_renaming_into_place_is_completed_by_resume(
        case: dict[str, Any], crash_at: str, monkeypatch: pytest.MonkeyPatch) -> None:
    out = fresh_dir(case["root"], "rename") / case["out_name"]
    target = out if crash_at == "output" else out.with_name(out.name + ".rejected.jsonl")
    real_replace = os.replace

    def crash(src: Any, dst: Any) -> None:
        if Path(dst) == target:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) after the finished checkpoint
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Interrupted) as caught:  # as Ctrl-C in the loop: at a checkpoint
        run(case["log"], out, **case["extra"])
    monkeypatch.setattr(os, "replace", real_replace)
    ckpt = read_checkpoint(out.with_name(out.name + ".checkpoint.json"))
    assert ckpt is not None and ckpt.finished
    assert caught.value.lines_done == ckpt.lines_done == len(_lines(case["log"]))
    summary = run(case["log"], out, resume=True, **case["extra"])
    assert_same_output(out, case["base"])
    assert counts(summary) == counts(case["summary"])


# -- refusals ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("uninterrupted")
    log = make_log(root / "log.jsonl")
    base = fresh_dir(root, "base") / "out.jsonl"
    return {"log": log, "base": base, "summary": run(log, base)}


@pytest.fixture
def stopped(uninterrupted: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """A JSONL run (of its own copy of the log) stopped half way, its checkpoint well past
    line 100."""
    log = tmp_path / "log.jsonl"
    log.write_bytes(uninterrupted["log"].read_bytes())
    out = fresh_dir(tmp_path, "run") / "out.jsonl"
    with pytest.raises(Interrupted) as caught:
        run(log, out, BatchEngine(interrupt_at=uninterrupted["summary"].batches // 2))
    assert caught.value.lines_done > 100
    return {"log": log, "out": out, "base": uninterrupted["base"],
            "done": caught.value.lines_done, "ckpt": out.with_name("out.jsonl.checkpoint.json")}


def _resumes_after_the_refusal(stopped: dict[str, Any]) -> None:
    """A refusal changes nothing: with the run's own input, engine and settings it resumes."""
    summary = run(stopped["log"], stopped["out"], resume=True)
    assert summary.resumed_at == stopped["done"]
    assert_same_output(stopped["out"], stopped["base"])


def test_a_byte_changed_in_the_done_lines_is_refused(stopped: dict[str, Any]) -> None:
    log: Path = stopped["log"]
    original = log.read_bytes()
    at = original.index(b'"query":"') + len(b'"query":"')  # in the first good line
    changed = bytearray(original)
    changed[at] = ord("Z") if changed[at] != ord("Z") else ord("Y")
    log.write_bytes(bytes(changed))  # the same size: only the prefix hash can tell
    with pytest.raises(ResumeRefused, match=rf"the input changed: its first {stopped['done']:,} "
                       r"lines are not the ones.*--restart"):
        run(log, stopped["out"], resume=True)
    assert read_checkpoint(stopped["ckpt"]) is not None
    log.write_bytes(original)
    _resumes_after_the_refusal(stopped)


def test_an_appended_line_is_refused(stopped: dict[str, Any]) -> None:
    log: Path = stopped["log"]
    original = log.read_bytes()
    log.write_bytes(original + b'{"id": "late", "query": "one more"}\n')
    with pytest.raises(ResumeRefused, match=rf"the input changed: .* is {len(original) + 36:,} "
                       rf"bytes, the checkpoint was made on {len(original):,} bytes"):
        run(log, stopped["out"], resume=True)
    log.write_bytes(original)
    _resumes_after_the_refusal(stopped)


def test_another_engine_version_is_refused(stopped: dict[str, Any]) -> None:
    with pytest.raises(ResumeRefused, match=r"the engine changed: this run scores with fake v1, "
                       r"the checkpoint's lines were scored with fake v0.*--restart"):
        run(stopped["log"], stopped["out"], BatchEngine(version="v1"), resume=True)
    with pytest.raises(ResumeRefused, match="the engine changed"):
        run(stopped["log"], stopped["out"], BatchEngine(model_id="other"), resume=True)
    _resumes_after_the_refusal(stopped)


@pytest.mark.parametrize(("change", "said"), [
    ({"chunk_items": 8}, "chunk_items 7 -> 8"),
    ({"chunk_bytes": 261}, "chunk_bytes 260 -> 261"),
    ({"dedupe_window": 31}, "dedupe_window 30 -> 31"),
    ({"out_format": "parquet"}, "format 'jsonl' -> 'parquet'"),
])
def test_changed_settings_are_refused(stopped: dict[str, Any], change: dict[str, Any],
                                      said: str) -> None:
    with pytest.raises(ResumeRefused, match=r"settings that decide the output changed since "
                       rf"the checkpoint: {said}.*--restart"):
        run(stopped["log"], stopped["out"], resume=True, **change)
    _resumes_after_the_refusal(stopped)


def test_a_checkpoint_without_resume_is_refused_with_a_hint(stopped: dict[str, Any]) -> None:
    with pytest.raises(ResumeRefused, match=rf"checkpoint at line {stopped['done']:,} .*--resume"
                       r".*--restart"):
        run(stopped["log"], stopped["out"])
    _resumes_after_the_refusal(stopped)


def test_restart_starts_over(stopped: dict[str, Any]) -> None:
    summary = run(stopped["log"], stopped["out"], restart=True)
    assert summary.resumed_at == 0
    assert_same_output(stopped["out"], stopped["base"])
    # --restart discards even a checkpoint that would be refused (another chunk size).
    with pytest.raises(Interrupted):
        run(stopped["log"], stopped["out"], BatchEngine(interrupt_at=50))
    run(stopped["log"], stopped["out"], BatchEngine(), restart=True, chunk_items=9)
    assert not stopped["ckpt"].exists()


def test_resume_without_a_checkpoint_starts_at_line_1(uninterrupted: dict[str, Any],
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    summary = run(uninterrupted["log"], out, resume=True)
    assert summary.resumed_at == 0 and counts(summary) == counts(uninterrupted["summary"])
    assert_same_output(out, uninterrupted["base"])


def test_output_shorter_than_the_checkpoint_is_refused(stopped: dict[str, Any]) -> None:
    partial = stopped["out"].with_name("out.jsonl.partial")
    size = partial.stat().st_size
    with partial.open("r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(ValueError, match=rf"out.jsonl.partial is {size - 10:,} bytes, shorter "
                       rf"than the {size:,} the checkpoint recorded.*--restart"):
        run(stopped["log"], stopped["out"], resume=True)


def test_rejected_file_shorter_than_the_checkpoint_is_refused(stopped: dict[str, Any]) -> None:
    partial = stopped["out"].with_name("out.jsonl.rejected.jsonl.partial")
    durable = read_checkpoint(stopped["ckpt"]).rejected_bytes  # type: ignore[union-attr]
    assert durable > 0
    partial.write_bytes(partial.read_bytes()[:durable - 1])
    with pytest.raises(ValueError, match=rf"is {durable - 1:,} bytes, shorter than the "
                       rf"{durable:,} the checkpoint recorded"):
        run(stopped["log"], stopped["out"], resume=True)


def test_parquet_part_missing_is_refused(uninterrupted: dict[str, Any],
                                         tmp_path: Path) -> None:
    log, out = uninterrupted["log"], tmp_path / "out.parquet"
    with pytest.raises(Interrupted) as caught:
        run(log, out, BatchEngine(interrupt_at=150), part_windows=2)
    ckpt = read_checkpoint(out.with_name("out.parquet.checkpoint.json"))
    assert ckpt is not None and ckpt.parts >= 2 and caught.value.lines_done == ckpt.lines_done
    (out.with_name("out.parquet.parts") / "000001.parquet").unlink()
    with pytest.raises(ValueError, match=rf"has {ckpt.parts - 1} parts, the checkpoint "
                       rf"recorded {ckpt.parts}.*--restart"):
        run(log, out, resume=True, part_windows=2)


def test_unreadable_checkpoint_is_refused(stopped: dict[str, Any]) -> None:
    stopped["ckpt"].write_bytes(b'{"input": "half a checkp')
    with pytest.raises(ResumeRefused, match=r"unreadable checkpoint.*--restart"):
        run(stopped["log"], stopped["out"], resume=True)
    stopped["ckpt"].write_bytes(b'{"format": 99}')
    with pytest.raises(ResumeRefused, match="checkpoint format 99"):
        run(stopped["log"], stopped["out"], resume=True)


# -- the command line (the stand-in engine in place of the model) ------------------------------

@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`qscore rescore` with open_engine giving the stand-ins: the engine put in ["next"] (once),
    else a plain BatchEngine."""
    import engines.select
    from tests.qscore.offline.test_rescore_windows import _ByteTokenizer

    state: dict[str, Any] = {"next": None}

    def open_engine(settings: Any, progress: Any = None) -> tuple[Any, Any]:
        engine, state["next"] = state["next"] or BatchEngine(), None
        return engine, _ByteTokenizer()

    monkeypatch.setattr(engines.select, "open_engine", open_engine)
    monkeypatch.setenv("COLUMNS", "400")
    return state


def _cli(log: Path, out: Path, *extra: str) -> Any:
    from qscore.cli.app import app

    return CliRunner().invoke(app, ["rescore", str(log), "-o", str(out), "--no-progress",
                                    "--chunk-items", "7", "--chunk-bytes", "260",
                                    "--dedupe-window", "30", "--batch-size", "3", *extra])


def test_cli_ctrl_c_says_how_to_resume_and_refusals_say_why(
        tmp_path: Path, cli: dict[str, Any]) -> None:
    log = make_log(tmp_path / "log.jsonl")
    base = fresh_dir(tmp_path, "base") / "out.jsonl"
    ok = _cli(log, base)
    assert ok.exit_code == 0, ok.output
    summary = orjson.loads(ok.stdout.strip().splitlines()[-1])
    out = fresh_dir(tmp_path, "run") / "out.jsonl"

    cli["next"] = BatchEngine(interrupt_at=60)
    stopped = _cli(log, out)
    assert stopped.exit_code == 130, stopped.output
    done = read_checkpoint(out.with_name("out.jsonl.checkpoint.json")).lines_done  # type: ignore[union-attr]
    assert f"lines 1-{done:,} are done" in stopped.output
    assert "resume with the same command and --resume" in stopped.output
    assert "--resume" in stopped.output.strip().splitlines()[-1]

    again = _cli(log, out)  # neither --resume nor --restart
    assert again.exit_code == 2
    assert "--resume" in again.output and "--restart" in again.output
    both = _cli(log, out, "--resume", "--restart")
    assert both.exit_code == 2 and "exclude each other" in both.output

    refused = _cli(log, out, "--resume", "--chunk-items", "8")
    assert refused.exit_code == 2 and "chunk_items 7 -> 8" in refused.output

    cli["next"] = BatchEngine(version="v9")
    other = _cli(log, out, "--resume")
    assert other.exit_code == 2 and "the engine changed" in other.output

    resumed = _cli(log, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    after = orjson.loads(resumed.stdout.strip().splitlines()[-1])
    assert after["resumed_at_line"] == done
    for key in ("items", "rejected", "sequences", "batches", "truncated_items"):
        assert after[key] == summary[key], key
    assert_same_output(out, base)


def test_cli_ctrl_c_while_renaming_into_place_says_how_to_resume(
        tmp_path: Path, cli: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C or SIGTERM after the last window (sealing the output, merging Parquet parts:
    minutes for a big output) stops the run as it does before: exit 130, and --resume
    completes it."""
    log = make_log(tmp_path / "log.jsonl")
    base = fresh_dir(tmp_path, "base") / "out.parquet"
    assert _cli(log, base).exit_code == 0
    out = fresh_dir(tmp_path, "run") / "out.parquet"
    real_replace = os.replace

    def ctrl_c(src: Any, dst: Any) -> None:
        if Path(dst) == out:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", ctrl_c)
    stopped = _cli(log, out)
    monkeypatch.setattr(os, "replace", real_replace)
    assert stopped.exit_code == 130, stopped.output
    ckpt = read_checkpoint(out.with_name("out.parquet.checkpoint.json"))
    assert ckpt is not None and ckpt.finished
    assert f"lines 1-{ckpt.lines_done:,} are done" in stopped.output
    assert "--resume" in stopped.output.strip().splitlines()[-1]
    resumed = _cli(log, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_same_output(out, base)


def test_killed_while_deleting_the_merged_parquet_parts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The output is in place and the parts are half deleted: --resume finishes the job (the
    output is whole), it does not refuse for the parts that are gone."""
    import shutil

    log = make_log(tmp_path / "log.jsonl")
    base = fresh_dir(tmp_path, "base") / "out.parquet"
    run(log, base, part_windows=2)
    out = fresh_dir(tmp_path, "run") / "out.parquet"
    real_rmtree = shutil.rmtree

    def stopped_half_way(path: Any, *args: Any, **kwargs: Any) -> None:
        parts = sorted(Path(path).glob("*.parquet")) if Path(path).is_dir() else []
        if len(parts) > 2:
            for part in parts[: len(parts) // 2]:
                part.unlink()
            raise KeyboardInterrupt  # SIGTERM, or a kill, half way through
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", stopped_half_way)
    with pytest.raises(Interrupted):
        run(log, out, part_windows=2)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert read_checkpoint(out.with_name("out.parquet.checkpoint.json")).finished  # type: ignore[union-attr]
    run(log, out, resume=True, part_windows=2)
    assert_same_output(out, base)


@pytest.mark.parametrize("kind", ["empty", "no-final-newline", "truncated-gzip"])
@pytest.mark.parametrize("out_name", ["out.jsonl", "out.parquet"])
def test_edge_logs_resume_and_shard_to_the_same_output(tmp_path: Path, kind: str,
                                                       out_name: str) -> None:
    from qscore.offline.merge import merge
    from qscore.offline.rescore import Shard

    data = make_log(tmp_path / "full.jsonl", n=150).read_bytes().rstrip(b"\n")
    log = tmp_path / ("log.jsonl.gz" if kind == "truncated-gzip" else "log.jsonl")
    log.write_bytes({"empty": b"", "no-final-newline": data,
                     "truncated-gzip": gzip.compress(data)[:-30]}[kind])
    base = fresh_dir(tmp_path, "base") / out_name
    whole = run(log, base, part_windows=2)
    if kind == "truncated-gzip":  # the stream's end is lost, and reported as a rejected line
        assert "corrupt or truncated gzip" in base.with_name(
            out_name + ".rejected.jsonl").read_bytes().splitlines()[-1].decode()
    for at in (3, whole.batches // 2):
        if not whole.batches:
            break
        out = fresh_dir(tmp_path, f"at{at}") / out_name
        with pytest.raises(Interrupted):
            run(log, out, BatchEngine(interrupt_at=at), part_windows=2)
        resumed = run(log, out, resume=True, part_windows=2)
        assert_same_output(out, base)
        assert counts(resumed) == counts(whole)
    shards = [fresh_dir(tmp_path, f"shard{i}") / out_name for i in (1, 2, 3)]
    for i, out in enumerate(shards, start=1):
        run(log, out, shard=Shard(i, 3), part_windows=2)
    merged = tmp_path / "merged" / out_name
    assert merge(shards[::-1], merged).items == whole.items
    assert_same_output(merged, base)
