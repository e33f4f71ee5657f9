"""Event loop entry point: uvloop where it is installed, the stdlib loop elsewhere."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def stop_on_signals(stop: Callable[[], None]) -> None:
    """First SIGTERM/SIGINT: `stop()` (drain and commit). A second: the default action (exit
    now). Call from inside the running loop."""
    loop = asyncio.get_running_loop()

    def first(sig: signal.Signals) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(s)
        print(f"{sig.name}: draining in-flight work (again to exit at once)", file=sys.stderr)
        stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, first, sig)
