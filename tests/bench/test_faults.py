"""bench/faults.py --short end to end: the local fleet under load and faults loses nothing and
dead-letters only poison (a subprocess, as CI runs it; writes nothing to docs/)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _row(table: str, name: str) -> str:
    found = re.search(rf"^\| {re.escape(name)} \| ([^|]+) \|$", table, re.M)
    assert found, f"no row {name!r} in:\n{table}"
    return found.group(1).strip()


@pytest.mark.timeout(420)
def test_short_fault_run_loses_nothing_and_dead_letters_only_poison(
        default_engine_path: Path) -> None:
    if not shutil.which("redis-server"):
        pytest.skip("bench/faults.py needs redis-server on PATH")
    run = subprocess.run([sys.executable, "bench/faults.py", "--short", "--no-write",
                          "--engine", str(default_engine_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=400)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert _row(out, "lost") == "0", out[-6000:]
    assert _row(out, "wrongly dead-lettered") == "0", out[-6000:]
    assert _row(out, "poison not dead-lettered").startswith("0 of "), out[-6000:]
