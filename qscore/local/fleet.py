"""A whole local fleet on one machine: broker, cache, tokenizer and scoring worker processes.

`qscore up` runs one; integration tests and benchmarks use the same pieces to start, kill and
restart real service processes. Services are separate OS processes (as in production), each
started as `python -m qscore <service> ...` with its log in a file.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from qscore.local.process import ChildProcess
from qscore.local.servers import EmbeddedBroker, RedisServer

# Flags whose values are (or may carry) secrets: any user can read a process's arguments (`ps`,
# /proc/PID/cmdline), only its owner its environment, so these go to children as QSCORE_* vars.
_SECRET_FLAGS = ("--redis-url", "--sasl-password")


def check_no_secrets(args: Sequence[str]) -> None:
    """Raise ValueError if `args` pass a password on the command line."""
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag not in _SECRET_FLAGS:
            continue
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        if flag == "--sasl-password" or urlsplit(value).password is not None:
            raise ValueError(f"{flag} would show its secret in `ps`: pass it in the environment "
                             "(QSCORE_REDIS_URL, QSCORE_KAFKA_SASL_PASSWORD)")


class ServiceProcess(ChildProcess):
    """One `python -m qscore <args>` child with its output in `log_path`. Secrets go in `env`:
    arguments carrying one are refused."""

    def __init__(self, name: str, args: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None) -> None:
        super().__init__(log_path)
        check_no_secrets(args)
        self.name = name
        self.args = list(args)
        self.env = dict(env or {})

    def start(self) -> Self:
        self.spawn([sys.executable, "-m", "qscore", *self.args],
                   env={"QSCORE_LOG_LEVEL": "info", **self.env})
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the service drains and commits), then SIGKILL after `timeout`."""
        return super().stop(timeout)

    def __repr__(self) -> str:
        return f"ServiceProcess(name={self.name!r}, pid={self.pid}, log_path={self.log_path})"


@dataclass
class FleetSpec:
    """What `LocalFleet` starts: how many services, and which broker and cache they use."""

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
    # Where `artifact` was found by model: services started with --engine-dir and --model
    # (not --engine) follow the model's promoted version while serving. None: pinned.
    follow: tuple[Path, str] | None = None
    workdir: Path | None = None


class LocalFleet:
    """Broker (embedded unless given), redis-server (if wanted and installed), tokenizer and
    worker processes; `stop()` ends the services first, so they drain into a live broker."""

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
        from plumbing.status import ensure_status_topic

        try:
            if not self.bootstrap_servers:
                self.broker = EmbeddedBroker(workdir=self.workdir).start()
                self.bootstrap_servers = self.broker.bootstrap_servers
            if self.redis_url is None and self.spec.use_redis and shutil.which("redis-server"):
                self.redis = RedisServer(workdir=self.workdir).start()
                self.redis_url = self.redis.url
            topics = Topics.with_prefix(self.spec.topic_prefix)
            kafka = KafkaSettings(bootstrap_servers=self.bootstrap_servers)

            async def create_topics() -> None:
                await ensure_status_topic(kafka, topics.status)  # compacted: first
                await ensure_topics(kafka, topics.all(), partitions=self.spec.partitions)

            asyncio.run(create_topics())
            for i in range(self.spec.tokenizers):
                self.tokenizers.append(self.service("tokenizer", i).start())
            for i in range(self.spec.workers):
                self.workers.append(self.service("worker", i).start())
        except BaseException:
            self.stop()
            raise
        return self

    def common_args(self) -> list[str]:
        """Every service's flags; the Redis URL, which may hold a password, is in common_env."""
        args = ["--bootstrap-servers", self.bootstrap_servers,
                "--topic-prefix", self.spec.topic_prefix]
        if self.spec.follow is not None:
            engine_dir, model = self.spec.follow
            args += ["--engine-dir", str(engine_dir), "--model", model]
        else:
            args += ["--engine", str(self.spec.artifact)]
        if self.broker is not None:
            args += ["--fast-groups"]  # the embedded broker holds group joins for ~a session
        return args

    def common_env(self) -> dict[str, str]:
        """Every service's environment: the cache this fleet chose, "" (none) included, so
        that a QSCORE_REDIS_URL this process inherited cannot point services elsewhere."""
        return {"QSCORE_REDIS_URL": self.redis_url or ""}

    def service(self, kind: str, index: int) -> ServiceProcess:
        """A (not yet started) service process of this fleet; tests start extra ones."""
        extra = self.spec.worker_args if kind == "worker" else self.spec.tokenizer_args
        return ServiceProcess(name=f"{kind}-{index}",
                              args=[kind, *self.common_args(), *extra],
                              log_path=self.workdir / f"{kind}-{index}.log",
                              env=self.common_env())

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
