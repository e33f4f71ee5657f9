"""`qscore up`: a whole local fleet on one machine (broker, redis-server, both services)."""

from __future__ import annotations

import signal
import time
from typing import Annotated

import typer
from rich.panel import Panel

from plumbing.cache import redact_url
from plumbing.logs import configure_logging
from qscore.cli.options import (
    DEFAULT_ENGINE_DIR,
    Backend,
    Devices,
    EngineArtifact,
    EngineDir,
    EngineModel,
    RedisUrl,
    ReloadDeadlineS,
    ReloadMaxConcurrent,
    ReloadPollS,
    ReloadQuietLoad,
    ReloadQuietS,
    StatusInterval,
    Threads,
    device_list,
    engine_settings,
)
from qscore.cli.output import err


def up(
    artifact: EngineArtifact = None,
    model: EngineModel = "default",
    engine_dir: EngineDir = DEFAULT_ENGINE_DIR,
    tokenizers: Annotated[int, typer.Option(min=1, help="Tokenizer service processes.")] = 1,
    workers: Annotated[int, typer.Option(min=1, help="Scoring worker processes.")] = 1,
    bootstrap_servers: Annotated[str | None, typer.Option(
        envvar="QSCORE_KAFKA_BOOTSTRAP", help="Use this Kafka instead of the embedded "
        "broker.")] = None,
    redis_url: RedisUrl = None,
    no_redis: Annotated[bool, typer.Option(help="Do not start redis-server; use each "
                                           "service's in-process cache.")] = False,
    topic_prefix: Annotated[str, typer.Option(envvar="QSCORE_TOPIC_PREFIX")] = "qscore",
    partitions: Annotated[int, typer.Option(min=1, help="Partitions per topic.")] = 4,
    backend: Backend = None,
    devices: Devices = None,
    threads: Threads = None,
    reload_quiet_load: ReloadQuietLoad = None,  # type: ignore[assignment]
    reload_quiet_s: ReloadQuietS = None,  # type: ignore[assignment]
    reload_deadline_s: ReloadDeadlineS = None,  # type: ignore[assignment]
    reload_max_concurrent: ReloadMaxConcurrent = None,  # type: ignore[assignment]
    reload_poll_s: ReloadPollS = None,  # type: ignore[assignment]
    status_interval_s: StatusInterval = None,  # type: ignore[assignment]
) -> None:
    """Run a whole local fleet: broker (embedded unless --bootstrap-servers), redis-server (if
    installed), tokenizer and scoring workers. Ctrl-C stops it all, draining first.

    --backend, --devices, --threads and the other --reload-* options go to the workers,
    --reload-poll-s and --status-interval-s to every service; those not given leave each
    service its own default (or QSCORE_* variable)."""
    from engines.select import find_artifact
    from qscore.local.fleet import FleetSpec, LocalFleet

    configure_logging("warning")
    settings = engine_settings(model, engine_dir, artifact, None, None, None,
                               backend=backend, devices=device_list(devices))
    with err.status("preparing the engine"):
        path = find_artifact(settings)
    both = service_flags(reload_poll_s=reload_poll_s, status_interval_s=status_interval_s)
    # Found by model (no --engine): the services follow its promotions while serving (hot
    # reload).
    spec = FleetSpec(artifact=path, tokenizers=tokenizers, workers=workers,
                     bootstrap_servers=bootstrap_servers, redis_url=redis_url,
                     use_redis=not no_redis, topic_prefix=topic_prefix, partitions=partitions,
                     follow=None if artifact is not None else (engine_dir, model),
                     worker_args=service_flags(
                         backend=backend, devices=devices, threads=threads,
                         reload_quiet_load=reload_quiet_load, reload_quiet_s=reload_quiet_s,
                         reload_deadline_s=reload_deadline_s,
                         reload_max_concurrent=reload_max_concurrent) + both,
                     tokenizer_args=both)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with err.status("starting the fleet"):
        fleet = LocalFleet(spec).start()
    try:
        flags = f"--bootstrap-servers {fleet.bootstrap_servers} --topic-prefix {topic_prefix}"
        err.print(Panel.fit(
            f"broker      {fleet.bootstrap_servers}"
            f"{' (embedded)' if fleet.broker else ''}\n"
            f"cache       {redact_url(fleet.redis_url or '') or 'in-process (no redis-server)'}\n"
            f"services    {tokenizers} tokenizer, {workers} worker  (logs: {fleet.workdir})\n"
            f"status      qscore status {flags}\n"
            f"publish     qscore publish QUERIES.jsonl {flags}\n"
            f"read        qscore consume {flags}",
            title="qscore fleet is up", border_style="green"))
        while not stopping:
            for proc in fleet.processes():
                if proc.poll() is not None:
                    err.print(f"[red]{proc.name} exited ({proc.poll()}):[/]\n{proc.log_tail()}")
                    stopping = True
            time.sleep(0.5)
    finally:
        with err.status("stopping (draining in-flight work)"):
            fleet.stop()


def service_flags(**options: object) -> list[str]:
    """`--name value` for each option given (None: not given)."""
    flags: list[str] = []
    for name, value in options.items():
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags
