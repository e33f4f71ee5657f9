"""Shared by the benchmarks: real queries, machine description, writing tables into docs/."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED_QUERIES = ROOT.parent / "shared" / "data" / "msmarco_dev_small_queries.tsv"
SAMPLE_LOG = ROOT / "qscore" / "data" / "sample_queries.jsonl"
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"


def load_queries(path: Path | None) -> tuple[list[str], str]:
    """Real queries (qid<TAB>query) if available, else the project's own sample log."""
    from engines.quantize import load_texts  # the one reader of TSV/JSONL query files

    path = path or (SHARED_QUERIES if SHARED_QUERIES.is_file() else SAMPLE_LOG)
    queries = load_texts(path)
    kind = "real" if path.suffix == ".tsv" else "sample"
    return queries, f"{path.name} ({len(queries)} {kind} queries)"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        text = Path("/proc/cpuinfo").read_text()
        if m := re.search(r"model name\s*:\s*(.+)", text):
            cpu = m.group(1).strip()
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores available, Python {platform.python_version()}"


def percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section between markers for `name`, keeping the rest."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
