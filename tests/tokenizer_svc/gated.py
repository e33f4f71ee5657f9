"""A tokenizer pool held in start-up until a test opens its gate (a file): so a test can stop
or cancel a service exactly while a followed promotion's pool is starting."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from tokenizer_svc.pool import TokenizerPool, TokenizerSpec, _init_process
from tokenizer_svc.procpool import ProcessPool


def gated_init(arg: tuple[Path, TokenizerSpec]) -> tuple[int, str]:
    """In the pool's process: wait for the gate file (or the parent's end), then set up."""
    gate, spec = arg
    parent = multiprocessing.parent_process()
    deadline = time.monotonic() + 120
    while not gate.exists():
        if parent is None or not parent.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("gate never opened")
        time.sleep(0.005)
    return _init_process(spec)


def gated(pool: TokenizerPool, gate: Path) -> TokenizerPool:
    """`pool`, its processes held in start-up until `gate` exists."""
    pool._pool = ProcessPool(gated_init, (gate, pool.spec), pool.processes, name="tokenizer")
    return pool
