"""`qscore rescore` on large logs: throughput, peak memory against log length, and the time one
SIGKILL + `--resume` costs.

Run: .venv/bin/python bench/rescore_scale.py [--lines 200000,2000000] [--kill-lines 200000]
Makes query-only logs of the given lengths from the shipped sample log's queries (new ids, one
blank line in 1,000), runs `qscore rescore` on each in a fresh process (peak RSS from the
kernel's accounting of that child), then kills one run of `--kill-lines` with SIGKILL once its
checkpoint passes the middle, resumes it, and checks the output is byte-identical to the
uninterrupted run's. Writes the table into docs/benchmarks.md (section rescore_scale).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, markdown_table, write_section

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "qscore" / "data" / "sample_queries.jsonl"


def make_log(path: Path, lines: int) -> None:
    queries = [orjson.loads(line)["query"] for line in SAMPLE.read_bytes().splitlines()]
    with path.open("wb") as f:
        for n in range(lines):
            if n % 1000 == 999:
                f.write(b"\n")
                continue
            f.write(orjson.dumps({"id": f"q{n}", "query": queries[n % len(queries)]}) + b"\n")


def qscore(*args: str) -> list[str]:
    return [sys.executable, "-m", "qscore", "rescore", *args, "--no-progress"]


# Each run under its own wrapper process: RUSAGE_CHILDREN of the wrapper is that run's peak
# alone (in this process it would be the largest of all runs so far).
_WRAPPER = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
            "sys.stderr.write('PEAK %d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN)"
            ".ru_maxrss); sys.exit(p.returncode)")


def run(args: list[str]) -> tuple[float, int, dict[str, object]]:
    """Wall seconds, peak RSS (bytes) of the run, and its summary line."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *args], capture_output=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(proc.stderr.decode()[-3000:])
    peak = int(proc.stderr.decode().rsplit("PEAK ", 1)[1].split()[0])
    summary = orjson.loads(proc.stdout.splitlines()[-1])
    return seconds, peak * 1024, summary


def wait_for_checkpoint(path: Path, line: int, proc: subprocess.Popen[bytes]) -> int:
    while proc.poll() is None:
        try:
            done = int(orjson.loads(path.read_bytes())["lines_done"])
        except (FileNotFoundError, orjson.JSONDecodeError, KeyError):
            done = 0
        if done >= line:
            return done
        time.sleep(0.05)
    raise RuntimeError("the run finished before the checkpoint passed the kill line")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", default="200000,2000000", help="log lengths")
    parser.add_argument("--kill-lines", type=int, default=200_000)
    parser.add_argument("--engine", type=Path, default=None,
                        help="artifact (default: the model's promoted version, built if none)")
    parser.add_argument("--format", default="jsonl", choices=("jsonl", "parquet"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from engines.manifest import read_manifest
    from engines.select import EngineSettings, find_artifact
    from qscore.cli.options import DEFAULT_ENGINE_DIR

    engine = args.engine or find_artifact(EngineSettings(engine_dir=DEFAULT_ENGINE_DIR))
    manifest = read_manifest(engine)
    sizes = sorted(int(n) for n in args.lines.split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="qscore-scale-") as tmp:
        work = Path(tmp)
        for lines in sizes:
            log = work / f"log{lines}.jsonl"
            make_log(log, lines)
            out = work / f"out{lines}.{args.format}"
            seconds, peak, summary = run(qscore(str(log), "-o", str(out), "--engine",
                                                str(engine), "--format", args.format))
            rows.append([f"{lines:,}", f"{log.stat().st_size / 2**20:,.0f}",
                         f"{summary['items']:,}", f"{seconds:,.1f}",
                         f"{summary['items_per_s']:,.0f}", f"{peak / 2**20:,.0f}"])
            print(rows[-1], flush=True)
        # One SIGKILL past the middle, then --resume.
        lines = args.kill_lines
        log = work / f"log{lines}.jsonl"
        if not log.exists():
            make_log(log, lines)
        whole = work / f"whole{lines}.{args.format}"
        t_whole, _, _ = run(qscore(str(log), "-o", str(whole), "--engine", str(engine),
                                   "--format", args.format))
        killed = work / f"killed{lines}.{args.format}"
        started = time.perf_counter()
        proc = subprocess.Popen(qscore(str(log), "-o", str(killed), "--engine", str(engine),
                                       "--format", args.format),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        at = wait_for_checkpoint(killed.with_name(killed.name + ".checkpoint.json"),
                                 lines // 2, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t_first = time.perf_counter() - started
        t_resume, _, resumed = run(qscore(str(log), "-o", str(killed), "--engine", str(engine),
                                          "--format", args.format, "--resume"))
        same = (killed.read_bytes() == whole.read_bytes() if args.format == "jsonl"
                else _tables_equal(killed, whole))
        lost = t_first + t_resume - t_whole
        print(f"kill at checkpoint line {at:,}: {t_first:.1f} s + resume {t_resume:.1f} s vs "
              f"{t_whole:.1f} s uninterrupted; identical output: {same}", flush=True)

    table = markdown_table(["lines", "log MiB", "items", "seconds", "items/s",
                            "peak RSS MiB"], rows)
    body = (
        "## Re-scoring large logs (`bench/rescore_scale.py`)\n\n"
        f"Machine: {machine()}. `qscore rescore` in a fresh process per log, engine "
        f"{manifest.backend} {manifest.precision} ({manifest.model_id}), default settings "
        f"(windows of 2,048 lines, batches of 64, all cores), {args.format} output with a "
        "checkpoint after every window. Logs: query-only lines made from the shipped sample "
        "log's queries (new ids; one blank line in 1,000); seconds include the engine's load "
        "and counting the lines for the progress total. Peak RSS: the child's maximum "
        "resident set from the kernel.\n\n"
        f"{table}\n\n"
        f"One SIGKILL: a run of {lines:,} lines killed once its checkpoint passed line "
        f"{at:,}, then resumed (`--resume`, which re-reads and hashes the first {at:,} lines "
        f"to check the input is unchanged): {t_first:.1f} s before the kill + {t_resume:.1f} s "
        f"resumed = {t_first + t_resume:.1f} s against {t_whole:.1f} s uninterrupted, so the "
        f"kill cost **{lost:.1f} s** (the window in flight when it died, a second engine load "
        f"and the re-read). Output identical to the uninterrupted run's: **{same}**; "
        f"the resumed summary counts {resumed['items']:,} items.\n\n"
        f"Command: `.venv/bin/python bench/rescore_scale.py --lines {args.lines} "
        f"--kill-lines {args.kill_lines}`\n")
    print(body)
    if not args.no_write:
        write_section("rescore_scale", body)


def _tables_equal(a: Path, b: Path) -> bool:
    import pyarrow.parquet as pq

    return bool(pq.read_table(a).equals(pq.read_table(b)))


if __name__ == "__main__":
    main()
