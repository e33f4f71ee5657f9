"""What every qscore service stands on, run for real: plumbing.aio's event loop and signal
handling, and a ResultCache whose Redis is down when the service starts.

(The broker and Redis themselves are exercised through qscore in test_clients, test_pipeline,
test_cache_redis and test_fleet.)"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading

import pytest

from plumbing import aio
from plumbing.cache import CacheSettings, ResultCache, encode_floats, key_digest
from qscore.local.servers import RedisServer


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_run_uses_uvloop_where_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert issubclass(aio.run(_loop_type()), uvloop.Loop)


def test_run_falls_back_to_the_stdlib_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    loop_type = aio.run(_loop_type())
    assert issubclass(loop_type, asyncio.BaseEventLoop)
    assert loop_type.__module__.startswith("asyncio")


async def test_first_sigterm_stops_once_and_a_second_would_exit(
        capsys: pytest.CaptureFixture[str]) -> None:
    if "openvino" in sys.modules:
        # Open problem (issue 14's note): with OpenVINO loaded in this process by earlier
        # tests, this SIGTERM killed the whole test run with SIGSEGV, also when sent to the
        # main thread only; not reproduced in a script. It runs when this module runs alone.
        pytest.skip("SIGTERM crashes a process that has loaded OpenVINO: under investigation")
    # Should stop_on_signals not take SIGTERM over, this guard gets it instead of the default
    # action (which would end pytest).
    guarded: list[int] = []
    previous_int = signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: guarded.append(sig))
    loop = asyncio.get_running_loop()
    try:
        stopped = asyncio.Event()
        calls: list[None] = []
        aio.stop_on_signals(lambda: (calls.append(None), stopped.set()))
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        await asyncio.wait_for(stopped.wait(), 10)
        assert calls == [None] and guarded == []
        assert "SIGTERM: draining in-flight work" in capsys.readouterr().err
        # Both handlers are gone: the next SIGTERM or SIGINT gets its default action.
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert not loop.remove_signal_handler(signal.SIGTERM)
        assert not loop.remove_signal_handler(signal.SIGINT)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.integration
async def test_cache_started_while_redis_is_down_uses_it_once_it_is_back(
        redis_server: RedisServer) -> None:
    redis_server.kill()
    entry = (key_digest("v1", "red shoes", None), encode_floats([0.5]))
    clock = _Clock()
    settings = CacheSettings(redis_url=redis_server.url, retry_after_s=5.0)
    async with ResultCache(settings, "v1", clock=clock) as cache:  # does not raise
        assert not cache.redis_available and cache.stats.errors == 1  # its PING failed
        await cache.put_many([entry])  # kept in process; Redis skipped, not tried
        assert cache.stats.bypasses == 1
        await asyncio.to_thread(redis_server.start)
        clock.now += settings.retry_after_s
        await cache.put_many([entry])
        assert cache.redis_available and cache.stats.errors == 1
    async with ResultCache(settings, "v1") as fresh:  # the second write reached Redis
        assert await fresh.get_many([entry[0]]) == [entry[1]]
        assert fresh.stats.hits_redis == 1
