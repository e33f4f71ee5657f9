"""`qscore worker` (a scoring worker) and `qscore up` (a whole local fleet on one machine)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.panel import Panel

from qscore.config import EngineSettings
from qscore.kafka import KafkaSettings, Topics
from qscore.logs import configure_logging
from qscore.metrics import serve_metrics
from qscore.settings import (
    DEFAULT_ENGINE_DIR,
    Backend,
    CacheTtl,
    Devices,
    EngineArtifact,
    EngineDir,
    EngineModel,
    Graphs,
    IdleExit,
    LogLevel,
    MetricsPort,
    Precision,
    RedisCaCerts,
    RedisUrl,
    Streams,
    kafka_command,
    redis_settings_from,
)
from workers.microbatcher import BatcherSettings

err = Console(stderr=True)
_B = BatcherSettings()

def cache_settings(redis_url: str | None, redis_ca_certs: Path | None, cache_ttl: float,
                   *, local_only: bool = False):  # type: ignore[no-untyped-def]
    """CacheSettings from the shared Redis flags (no URL: the in-process LRU only)."""
    from qscore.cache import CacheSettings

    redis = redis_settings_from(redis_url, redis_ca_certs, cache_ttl)
    if redis is None or local_only:
        return CacheSettings()
    return CacheSettings(redis_url=redis.url, ttl_s=int(redis.ttl_s),
                         ssl_ca_certs=str(redis.ca_certs) if redis.ca_certs else None)


def worker(
    kafka: KafkaSettings,
    topics: Topics,
    artifact: EngineArtifact = None,
    model: EngineModel = "default",
    engine_dir: EngineDir = DEFAULT_ENGINE_DIR,
    engines: Annotated[int, typer.Option(envvar="QSCORE_ENGINES", min=1, help=(
        "onnxruntime: engine instances (sessions); with 2+ the next batch is formed while "
        "one runs. torch: ignored, one engine per --devices entry with --streams lanes."))]
    = 1,
    backend: Backend = None,
    precision: Precision = None,
    devices: Devices = None,
    streams: Streams = 2,
    graphs: Graphs = True,
    threads: Annotated[int | None, typer.Option(envvar="QSCORE_THREADS", min=1, help=(
        "Threads per engine instance (default: all cores / instances)."))] = None,
    max_batch: Annotated[int, typer.Option(envvar="QSCORE_MAX_BATCH", min=1, help=(
        "Max sequences per engine call (reached under load)."))] = _B.max_batch,
    token_budget: Annotated[int, typer.Option(envvar="QSCORE_TOKEN_BUDGET", min=1, help=(
        "Max padded tokens (count x longest) per engine call."))] = _B.token_budget,
    max_wait_ms: Annotated[float, typer.Option(envvar="QSCORE_MAX_WAIT_MS", min=0, help=(
        "How long a shallow queue waits for company before running."))] = _B.max_wait_ms,
    queue_capacity: Annotated[int, typer.Option(envvar="QSCORE_QUEUE_CAPACITY", min=1, help=(
        "Queued sequences per priority; fetching pauses beyond (backpressure)."))]
    = _B.capacity,
    group_id: Annotated[str, typer.Option(envvar="QSCORE_WORKER_GROUP", help=(
        "Consumer group (the offline topic uses GROUP.offline)."))] = "qscore-worker",
    idle_exit: IdleExit = None,
    redis_url: RedisUrl = None,
    redis_ca_certs: RedisCaCerts = None,
    cache_ttl: CacheTtl = 86_400.0,
    metrics_port: MetricsPort = None,
    log_level: LogLevel = "info",
) -> None:
    """Run a scoring worker: token batches in, scores out (SIGTERM drains and commits)."""
    import os

    from engines.errors import EngineError
    from engines.manifest import read_manifest
    from qscore.aio import run, stop_on_signals
    from qscore.cache import ResultCache
    from qscore.cli import _engine_settings, device_list
    from qscore.engine import find_artifact, load_for, serving_devices
    from workers.service import ScoringWorker, WorkerSettings

    configure_logging(log_level)
    engine_settings = _engine_settings(model, engine_dir, artifact, None, None, threads,
                                       precision=precision, backend=backend,
                                       devices=device_list(devices), lanes=streams,
                                       graphs=graphs)
    try:
        path = find_artifact(engine_settings)
        kind = read_manifest(path).backend
        if kind == "onnxruntime":
            per_engine = threads or max(1, (os.cpu_count() or 1) // engines)
            loaded = [load_for(engine_settings, path, threads=per_engine)
                      for _ in range(engines)]
        else:
            loaded = [load_for(engine_settings, path, device)
                      for device in serving_devices(engine_settings, kind)]
    except EngineError as exc:
        err.print(f"[bold red]error:[/] {exc}", soft_wrap=True, markup=True, highlight=False)
        raise typer.Exit(2) from None
    err.print(f"engine {path.name}: {kind} {read_manifest(path).precision}, "
              + ", ".join(f"{e.device} x{e.lanes} lanes" for e in loaded), soft_wrap=True)
    settings = WorkerSettings(
        kafka=kafka, topics=topics, group_id=group_id,
        batcher=BatcherSettings(max_batch=max_batch, token_budget=token_budget,
                                max_wait_ms=max_wait_ms, capacity=queue_capacity))
    cache = ResultCache(cache_settings(redis_url, redis_ca_certs, cache_ttl),
                        loaded[0].manifest.version)

    async def main() -> None:
        await cache.start()
        service = ScoringWorker(settings, loaded, cache)
        stop_on_signals(service.request_stop)
        if metrics_port is not None:
            serve_metrics(metrics_port, "qscore_worker", {
                "worker": lambda: service.stats,
                "online": lambda: service.online.stats,
                "offline": lambda: service.offline.stats,
                "cache": lambda: cache.stats,
                "queue": lambda: {"queue_depth": service.batcher.depth(),
                                  "busy_slots": service.pool.busy()},
                "pool": service.pool.device_counters,
            })
        await service.start()
        try:
            await service.run(idle_exit_s=idle_exit)
        finally:
            await service.stop()
            await cache.close()
            s = service.stats
            dead = service.online.stats.dead_letters + service.offline.stats.dead_letters
            err.print(f"worker done: {s.messages} messages, {s.items} items, {s.batches} "
                      f"engine calls (mean batch {s.mean_batch_size:.1f}), {s.cache_writes} "
                      f"cache writes, {dead} dead letters", soft_wrap=True)

    run(main())


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
) -> None:
    """Run a whole local fleet: broker (embedded unless --bootstrap-servers), redis-server (if
    installed), tokenizer and scoring workers. Ctrl-C stops it all, draining first."""
    from qscore.engine import find_artifact
    from qscore.fleet import FleetSpec, LocalFleet

    configure_logging("warning")
    with err.status("preparing the engine"):
        path = find_artifact(EngineSettings(model=model, engine_dir=engine_dir,
                                            artifact=artifact))
    spec = FleetSpec(artifact=path, tokenizers=tokenizers, workers=workers,
                     bootstrap_servers=bootstrap_servers, redis_url=redis_url,
                     use_redis=not no_redis, topic_prefix=topic_prefix, partitions=partitions)
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
            f"cache       {fleet.redis_url or 'in-process (no redis-server)'}\n"
            f"services    {tokenizers} tokenizer, {workers} worker  (logs: {fleet.workdir})\n"
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


def register(app: typer.Typer) -> None:
    app.command()(kafka_command(worker))
    app.command()(up)
