"""The memory pre-check: refuse before loading what cannot fit (pure logic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.memory import InsufficientMemory, check_fits, host_available_bytes


def test_reads_mem_available(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:    512 kB\n")
    assert host_available_bytes(meminfo) == 512 * 1024
    assert host_available_bytes(tmp_path / "missing") is None


def test_refuses_with_the_numbers_and_what_to_do() -> None:
    with pytest.raises(InsufficientMemory, match=r"needs about 110 MiB .* has 100 MiB free"):
        check_fits(Path("art"), 100 * 2**20, 100 * 2**20)
    check_fits(Path("art"), 100 * 2**20, 200 * 2**20)  # fits
    check_fits(Path("art"), 0, 1)  # no estimate (old manifest): nothing to check
    check_fits(Path("art"), 10, None)  # unknown free memory: nothing to check


@pytest.mark.slow
def test_load_engine_refuses_an_engine_bigger_than_free_memory(default_engine_path: Path,
                                                               tmp_path: Path) -> None:
    import shutil

    import orjson

    from engines.loader import load_engine

    art = tmp_path / "huge"
    shutil.copytree(default_engine_path, art)
    raw = orjson.loads((art / "manifest.json").read_bytes())
    raw["memory_bytes"] = 1 << 50  # a petabyte
    (art / "manifest.json").write_bytes(orjson.dumps(raw))
    with pytest.raises(InsufficientMemory, match="free"):
        load_engine(art)
