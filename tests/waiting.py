"""Waiting in tests for a state that has no event to wait on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], object], what: str = "the condition",
                timeout_s: float = 30.0, interval_s: float = 0.02) -> None:
    """Poll `condition` until it holds; TimeoutError naming `what` after `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():  # noqa: ASYNC110 (state without an event: polled)
                await asyncio.sleep(interval_s)
    except TimeoutError:
        raise TimeoutError(f"{what}: not within {timeout_s:g} s") from None
