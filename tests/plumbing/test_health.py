"""The metrics port's routes and what the probes answer (pure logic, and a loopback socket)."""

from __future__ import annotations

import asyncio
import http.client
import io
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, make_wsgi_app

from plumbing.health import STARTING, Health, HealthMonitor, MetricsPort, probe_app
from plumbing.metrics import StatsCollector, serve_metrics


def call(app: Any, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    """One request through a WSGI app: (status code, body, headers)."""
    answered: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answered["status"], answered["headers"] = status, dict(headers)

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": method, "QUERY_STRING": "",
                         "wsgi.input": io.BytesIO()}, start_response))
    return int(answered["status"].split()[0]), body.decode(), answered["headers"]


def registry_with(stats: dict[str, int]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(StatsCollector("qscore_test", {"group": lambda: stats}))
    return registry


@pytest.mark.parametrize(("health", "healthz", "readyz"), [
    (Health(True, True, "ok"), (200, "ok\n"), (200, "ok\n")),
    (Health(True, False, "draining"), (200, "ok\n"), (503, "draining\n")),
    (STARTING, (200, "ok\n"), (503, "starting\n")),
    (Health(False, False, "failed: no engine"), (503, "failed: no engine\n"),
     (503, "failed: no engine\n")),
    # Not live is never ready, whatever the service says.
    (Health(False, True, "event loop unresponsive"), (503, "event loop unresponsive\n"),
     (503, "event loop unresponsive\n")),
])
def test_probes_answer_from_health(health: Health, healthz: tuple[int, str],
                                   readyz: tuple[int, str]) -> None:
    app = probe_app(make_wsgi_app(CollectorRegistry()), lambda: health)
    for path, expected in (("/healthz", healthz), ("/readyz", readyz)):
        status, body, headers = call(app, path)
        assert (status, body) == expected, path
        assert headers["Content-Type"].startswith("text/plain")
        assert headers["Content-Length"] == str(len(body.encode()))
        assert headers["Cache-Control"] == "no-store"


def test_metrics_is_prometheus_and_other_paths_are_404() -> None:
    app = probe_app(make_wsgi_app(registry_with({"batches": 3})), lambda: STARTING)
    status, body, headers = call(app, "/metrics")
    assert status == 200 and "qscore_test_group_batches_total 3.0" in body
    assert headers["Content-Type"].startswith("text/plain; version=")
    for path in ("/", "/health", "/healthz/", "/readyz/x", "/favicon.ico", "/metricsx"):
        status, body, _ = call(app, path)
        assert status == 404 and path in body, path


def test_a_probe_takes_only_get() -> None:
    app = probe_app(make_wsgi_app(CollectorRegistry()), lambda: Health(True, True, "ok"))
    status, _, headers = call(app, "/readyz", "POST")
    assert status == 405 and headers["Allow"] == "GET"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_monitor_is_live_not_ready_until_its_heartbeat_runs_then_answers_the_service() -> None:
    clock = Clock()
    monitor = HealthMonitor(beat_s=1.0, stale_after_s=5.0, clock=clock)
    assert monitor.current() == STARTING
    monitor.beat()  # nothing to ask yet
    assert monitor.current() == STARTING
    answer = Health(True, False, "waiting for a partition assignment: worker-online")
    monitor.check = lambda: answer
    monitor.beat()
    assert monitor.current() == answer
    answer = Health(True, True, "ok")
    clock.now += 5.0  # not stale yet: the last answer stands until the next beat
    assert monitor.current() == Health(True, False,
                                       "waiting for a partition assignment: worker-online")
    monitor.beat()
    assert monitor.current() == answer


def test_a_stale_heartbeat_is_not_live() -> None:
    clock = Clock()
    monitor = HealthMonitor(stale_after_s=5.0, clock=clock)
    monitor.check = lambda: Health(True, True, "ok")
    monitor.beat()
    clock.now += 5.5  # the loop has not turned since
    live, ready, reason = monitor.current()
    assert not live and not ready
    assert reason == "event loop unresponsive: no heartbeat for 6 s"


def test_a_failing_health_check_is_live_but_not_ready() -> None:
    monitor = HealthMonitor()

    def broken() -> Health:
        raise KeyError("pool")

    monitor.check = broken
    monitor.beat()
    assert monitor.current() == Health(True, False, "health check failed: KeyError: 'pool'")


async def test_run_beats_on_the_loop_until_cancelled() -> None:
    monitor = HealthMonitor(beat_s=0.01)
    asked = asyncio.Event()
    answers = iter([Health(True, False, "starting"), Health(True, True, "ok")])

    def check() -> Health:
        answer = next(answers, Health(True, True, "ok"))
        if answer.ready:
            asked.set()
        return answer

    task = asyncio.create_task(monitor.run(check))
    await asyncio.wait_for(asked.wait(), 5)
    assert monitor.current() == Health(True, True, "ok")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_the_port_serves_metrics_and_probes_and_refuses_once_closed() -> None:
    stats = {"batches": 1}
    with serve_metrics(0, "qscore_test", {"group": lambda: stats}) as port:
        assert get(port.port, "/healthz") == (200, "ok\n")
        assert get(port.port, "/readyz") == (503, "starting\n")
        stats["batches"] = 7
        status, body = get(port.port, "/metrics")
        assert status == 200 and "qscore_test_group_batches_total 7.0" in body
        assert get(port.port, "/nope")[0] == 404
        port.health.check = lambda: Health(True, True, "ok")
        port.health.beat()
        assert get(port.port, "/readyz") == (200, "ok\n")
    with pytest.raises(ConnectionRefusedError):
        get(port.port, "/healthz")
    port.close()  # twice is fine


def test_a_port_opened_early_gets_its_metrics_later() -> None:
    with MetricsPort(0) as port:
        assert get(port.port, "/metrics") == (200, "")  # nothing exposed yet
        assert serve_metrics(port, "qscore_test", {"group": lambda: {"batches": 2}}) is port
        assert "qscore_test_group_batches_total 2.0" in get(port.port, "/metrics")[1]


def test_a_busy_port_fails_to_open() -> None:
    with MetricsPort(0) as port, pytest.raises(OSError):
        MetricsPort(port.port)
