"""HTTP on a service's metrics port: `/metrics` (Prometheus), `/healthz` and `/readyz` (probes).

- `/healthz` (live): 200 while the service's event loop turns and the service has not failed.
  A task on the loop asks the service for its `Health` every `beat_s` and stores the answer
  with the time; an answer older than `stale_after_s` means the loop is stuck: not live. A
  service that recorded a fatal failure (a worker with no engine left, a record that could not
  even be dead-lettered) says so itself: not live, whatever the loop does.
- `/readyz` (ready): 200 once the service has started (its engine loaded, its tokenizer
  processes up), each of its consumers has joined its group and received an assignment, and it
  is not draining; what "ready" needs is the service's to say (its `health()`).
- Anything else is 404; a non-GET on a probe is 405. Failures answer 503 with the reason as
  one line of plain text.

The port opens before the service exists (an engine load can take minutes, and a probe must
then see "live, not ready": `starting`). The HTTP server's threads only read the one tuple the
loop wrote, so they never see a half-updated service.

Why WSGI (wsgiref with a thread per request, as prometheus_client's own `start_http_server`):
the `/metrics` answer stays prometheus_client's `make_wsgi_app` (content negotiation,
OpenMetrics, gzip, `name[]` filters), routing is one small function that tests call without a
socket, and nothing new is installed.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, NamedTuple, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.registry import Collector

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Health(NamedTuple):
    live: bool
    ready: bool
    reason: str  # why not live or not ready; "ok" when both


STARTING = Health(True, False, "starting")


class HealthMonitor:
    """What the probes answer. The event loop writes (`run`, `beat`); any thread reads
    (`current`)."""

    def __init__(self, *, beat_s: float = 1.0, stale_after_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.beat_s = beat_s
        self.stale_after_s = stale_after_s
        self._clock = clock
        self.check: Callable[[], Health] | None = None  # the service's health (run sets it)
        self._last: tuple[float, Health] | None = None  # (when, answer): one atomic read

    def current(self) -> Health:
        """The last answer; not live once it is older than `stale_after_s` (the loop is
        stuck); `starting` until `run` has begun."""
        last = self._last
        if last is None:
            return STARTING
        when, health = last
        age = self._clock() - when
        if age > self.stale_after_s:
            return Health(False, False, f"event loop unresponsive: no heartbeat for {age:.0f} s")
        return health

    def beat(self) -> None:
        """Ask the service now (on the loop); `run` does it every `beat_s`."""
        check = self.check
        if check is None:
            return
        try:
            health = check()
        except Exception as exc:  # a bug in health() must not read as a dead loop
            health = Health(True, False, f"health check failed: {type(exc).__name__}: {exc}")
        self._last = (self._clock(), health)

    async def run(self, check: Callable[[], Health]) -> None:
        """The heartbeat: ask `check` (the service's `health`) every `beat_s`, until
        cancelled."""
        self.check = check
        while True:
            self.beat()
            await asyncio.sleep(self.beat_s)


def probe_app(metrics: WSGIApp, health: Callable[[], Health]) -> WSGIApp:
    """Routes /metrics to `metrics`, /healthz and /readyz to `health`; 404 for the rest."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            return metrics(environ, start_response)
        if path not in ("/healthz", "/readyz"):
            return _answer(start_response, "404 Not Found",
                           f"no {path} here: /metrics, /healthz or /readyz")
        if environ.get("REQUEST_METHOD") != "GET":
            return _answer(start_response, "405 Method Not Allowed", "use GET",
                           [("Allow", "GET")])
        now = health()
        ok = now.live if path == "/healthz" else now.live and now.ready
        return _answer(start_response, "200 OK" if ok else "503 Service Unavailable",
                       "ok" if ok else now.reason)

    return app


def _answer(start_response: Callable[..., Any], status: str, text: str,
            headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = f"{text}\n".encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), *(headers or [])])
    return [body]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a probe's thread never holds the process open


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """A probe every few seconds is not worth a log line."""


class MetricsPort:
    """A service's metrics port, served by a daemon thread from the moment it is made:
    `/metrics` from `registry` (empty until something is exposed), the probes from `health`
    (`starting` until the service's health is run: `health.run(service.health)` on its
    loop). `close()` (or leaving `with`) stops it: the port then refuses connections."""

    def __init__(self, port: int, host: str = "127.0.0.1", *, beat_s: float = 1.0,
                 stale_after_s: float = 10.0) -> None:
        self.registry = CollectorRegistry()
        self.health = HealthMonitor(beat_s=beat_s, stale_after_s=stale_after_s)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        server = _Server6 if family == socket.AF_INET6 else _Server  # "::" binds IPv6
        self._server = make_server(host, port, probe_app(make_wsgi_app(self.registry),
                                                         self.health.current),
                                   server_class=server, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.2,),
                                        name=f"metrics-port-{self.port}", daemon=True)
        self._closed = False
        self._thread.start()

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen by the system when made with port 0)."""
        return int(self._server.server_port)

    def expose(self, collector: Collector) -> None:
        self.registry.register(collector)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()  # returns once serve_forever has (within its 0.2 s poll)
        self._server.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
