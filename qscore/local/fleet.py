"""A whole local fleet on one machine: broker, cache, tokenizer and scoring worker processes.

`qscore up` runs one; integration tests and benchmarks use the same pieces to start, kill and
restart real service processes. Services are separate OS processes (as in production), each
started as `python -m qscore <service> ...` with its log in a file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from qscore.local.servers import EmbeddedBroker, RedisServer


@dataclass
class ServiceProcess:
    """One `python -m qscore <args>` child with its output in `log_path`."""

    name: str
    args: Sequence[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> ServiceProcess:
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "qscore", *self.args], stdout=self._log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # Own session: a terminal's Ctrl-C reaches only `qscore up`, which then stops
            # services before the broker and cache they drain into.
            start_new_session=True,
            env={**os.environ, "QSCORE_LOG_LEVEL": "info", **self.env})
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def poll(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def wait(self, timeout: float | None = None) -> int:
        assert self._proc is not None, "not started"
        return self._proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the service drains and commits), then SIGKILL after `timeout`."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._close_log()
        return self._proc.returncode

    def kill(self) -> None:
        """SIGKILL: no drain, no commit (crash testing)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close_log()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class FleetSpec:
    artifact: Path
    tokenizers: int = 1
    workers: int = 1
    bootstrap_servers: str | None = None  # None: start the embedded broker
    redis_url: str | None = None  # None: start redis-server if installed, else local cache
    use_redis: bool = True
    topic_prefix: str = "qscore"
    partitions: int = 4
    worker_args: Sequence[str] = ()
    tokenizer_args: Sequence[str] = ()
    workdir: Path | None = None


class LocalFleet:
    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.workdir = spec.workdir or Path(tempfile.mkdtemp(prefix="qscore-fleet-"))
        self.broker: EmbeddedBroker | None = None
        self.redis: RedisServer | None = None
        self.bootstrap_servers = spec.bootstrap_servers or ""
        self.redis_url = spec.redis_url
        self.tokenizers: list[ServiceProcess] = []
        self.workers: list[ServiceProcess] = []

    def start(self) -> Self:
        import asyncio

        from plumbing.kafka import KafkaSettings, Topics, ensure_topics

        try:
            if not self.bootstrap_servers:
                self.broker = EmbeddedBroker(workdir=self.workdir).start()
                self.bootstrap_servers = self.broker.bootstrap_servers
            if self.redis_url is None and self.spec.use_redis and shutil.which("redis-server"):
                self.redis = RedisServer(workdir=self.workdir).start()
                self.redis_url = self.redis.url
            topics = Topics.with_prefix(self.spec.topic_prefix)
            asyncio.run(ensure_topics(KafkaSettings(bootstrap_servers=self.bootstrap_servers),
                                      topics.all(), partitions=self.spec.partitions))
            for i in range(self.spec.tokenizers):
                self.tokenizers.append(self.service("tokenizer", i).start())
            for i in range(self.spec.workers):
                self.workers.append(self.service("worker", i).start())
        except BaseException:
            self.stop()
            raise
        return self

    def common_args(self) -> list[str]:
        args = ["--bootstrap-servers", self.bootstrap_servers,
                "--topic-prefix", self.spec.topic_prefix, "--engine", str(self.spec.artifact)]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        if self.broker is not None:
            args += ["--fast-groups"]  # the embedded broker holds group joins for ~a session
        return args

    def service(self, kind: str, index: int) -> ServiceProcess:
        """A (not yet started) service process of this fleet; tests start extra ones."""
        extra = self.spec.worker_args if kind == "worker" else self.spec.tokenizer_args
        return ServiceProcess(name=f"{kind}-{index}",
                              args=[kind, *self.common_args(), *extra],
                              log_path=self.workdir / f"{kind}-{index}.log")

    def processes(self) -> list[ServiceProcess]:
        return [*self.tokenizers, *self.workers]

    def stop(self) -> None:
        for proc in reversed(self.processes()):
            proc.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
