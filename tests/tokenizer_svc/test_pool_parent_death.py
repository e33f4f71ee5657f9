"""A SIGKILLed tokenizer service must not leave its pool processes running (they would hold
its environment, Redis URL included, forever)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys

SCRIPT = """
import asyncio
from engines.source import default_model_path
from schemas import Limits
from tokenizer_svc.pool import TokenizerPool, TokenizerSpec

async def main():
    spec = TokenizerSpec(tokenizer_json=default_model_path() / "tokenizer.json",
                         max_length=64, pairs=False, model_version="v", limits=Limits())
    pool = TokenizerPool(spec, processes=2)
    await pool.start()
    print("PIDS", *pool.pids, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_pool_processes_end_when_the_service_is_sigkilled() -> None:
    service = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE)
    assert service.stdout is not None
    line = b""
    while not line.startswith(b"PIDS"):  # past the service's log lines; EOF fails below
        line = service.stdout.readline()
        assert line, "the service ended before its pool was up"
    pids = [int(p) for p in line.split()[1:]]
    assert len(pids) == 2
    watches = [os.pidfd_open(pid) for pid in pids]  # each readable once its process exits
    try:
        service.kill()
        service.wait(10)
        pending = list(watches)
        while pending:  # bounded by the select timeout
            readable, _, _ = select.select(pending, [], [], 10)
            assert readable, "pool processes outlived their SIGKILLed service"
            pending = [fd for fd in pending if fd not in readable]
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for fd in watches:
            os.close(fd)
