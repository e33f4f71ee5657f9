"""A tokenizer pool held in start-up until a test opens its gate (a file): so a test can stop
or cancel a service exactly while a followed promotion's pool is starting."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

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


def hold_new_pools(monkeypatch: Any, gate: Path) -> list[TokenizerPool]:
    """Every pool TokenizerService makes from now on is `gated` on `gate`; the list fills
    with them as they are made."""
    from tokenizer_svc.service import TokenizerService

    starting: list[TokenizerPool] = []
    new_pool = TokenizerService._new_pool

    def held(self: TokenizerService, *args: object) -> TokenizerPool:
        starting.append(gated(new_pool(self, *args), gate))  # type: ignore[arg-type]
        return starting[-1]

    monkeypatch.setattr(TokenizerService, "_new_pool", held)
    return starting
