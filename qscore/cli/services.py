"""`qscore worker` (a scoring worker) and `qscore tokenizer` (a tokenizer service): the two
services of a fleet. Both take the same engine, cache and metrics flags (options.service_command)
and run through one `serve()`: signals drain, metrics are served, the service runs until stopped
or idle."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Protocol

import typer

from engines.errors import EngineError
from plumbing.kafka import KafkaSettings, Topics
from plumbing.logs import configure_logging
from qscore.cli.options import (
    RELOAD_PANEL,
    Backend,
    Devices,
    Graphs,
    Precision,
    ReloadDeadlineS,
    ReloadMaxConcurrent,
    ReloadPollS,
    ReloadQuietLoad,
    ReloadQuietS,
    ServiceOptions,
    Spin,
    Streams,
    device_list,
    engine_settings,
)
from qscore.cli.output import err, fail
from qscore.cli.status import status_publisher, tokenizer_sample, worker_sample
from schemas import EMBEDDING_FORMATS
from workers.microbatcher import BatcherSettings
from workers.reload import ReloadSettings, parse_window

if TYPE_CHECKING:
    from engines.protocol import Engine
    from plumbing.cache import CacheSettings
    from plumbing.health import Health, MetricsPort
    from plumbing.status import StatusPublisher
    from workers.reload import Reloader
    from workers.service import ScoringWorker


class Service(Protocol):
    """What `serve` needs of a service: the lifecycle of workers/service.py."""

    async def start(self) -> None: ...
    def request_stop(self) -> None: ...
    async def run(self, *, idle_exit_s: float | None = None) -> None: ...
    async def stop(self) -> None: ...
    def metrics(self) -> dict[str, Callable[[], object]]: ...
    def health(self) -> Health: ...


def open_metrics_port(options: ServiceOptions) -> MetricsPort | None:
    """The --metrics-port, opened before the engine loads: through a long load /healthz says
    live and /readyz "starting"; `serve` then answers them from the service."""
    if options.metrics_port is None:
        return None
    from plumbing.health import MetricsPort

    try:
        return MetricsPort(options.metrics_port, options.metrics_host)
    except OSError as exc:
        fail(f"--metrics-port {options.metrics_host}:{options.metrics_port}: "
             f"{exc.strerror or exc}")


def serve(make: Callable[[], Service], options: ServiceOptions, *, metrics_prefix: str,
          summary: Callable[[Service], str],
          status: Callable[[Service], StatusPublisher | None] | None = None,
          port: MetricsPort | None = None) -> None:
    """Run one service to the end on a fresh event loop: the first SIGTERM/SIGINT drains and
    commits, a second exits at once; `summary` is printed after it stopped. `status` makes
    its heartbeats, which go from its start until it has stopped (then a tombstone). `port`
    (open_metrics_port; else opened here) serves the service's metrics and health from its
    creation until it has stopped."""
    import asyncio

    from plumbing.aio import run, stop_on_signals
    from plumbing.metrics import serve_metrics

    port = port or open_metrics_port(options)

    async def main() -> None:
        service = make()  # inside the loop: aiokafka clients bind to it
        beating = None
        if port is not None:
            serve_metrics(port, metrics_prefix, service.metrics())
            beating = asyncio.create_task(port.health.run(service.health), name="health")

        def drain() -> None:
            service.request_stop()
            if port is not None:
                port.health.beat()  # /readyz says "draining" now, not at the next beat

        stop_on_signals(drain)
        await service.start()
        heartbeats = status(service) if status is not None else None
        try:
            if heartbeats is not None:
                await heartbeats.start()  # never raises for a broker problem
            await service.run(idle_exit_s=options.idle_exit)
        finally:
            try:
                await service.stop()
            finally:
                if heartbeats is not None:
                    await heartbeats.stop()
            err.print(summary(service), soft_wrap=True, highlight=False)
            if beating is not None:
                beating.cancel()

    try:
        run(main())
    finally:
        if port is not None:
            port.close()  # connections refused from here


_B = BatcherSettings()
_R = ReloadSettings()


def worker(
    kafka: KafkaSettings,
    topics: Topics,
    service: ServiceOptions,
    engines: Annotated[int, typer.Option(envvar="QSCORE_ENGINES", min=1, help=(
        "CPU engine instances: with 2+ the next batch is formed while one runs. onnxruntime: "
        "sessions; openvino: infer requests (lanes) of one compiled model sharing its weights, "
        "each on its own CPU stream. torch: ignored, one engine per --devices entry with "
        "--streams lanes."))]
    = 1,
    backend: Backend = None,
    precision: Precision = None,
    devices: Devices = None,
    streams: Streams = 2,
    graphs: Graphs = True,
    threads: Annotated[int | None, typer.Option(envvar="QSCORE_THREADS", min=1, help=(
        "Threads per engine instance (default: all cores / instances)."))] = None,
    spin: Spin = False,
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
    follow: Annotated[bool, typer.Option(
        "--follow/--no-follow", envvar="QSCORE_RELOAD_FOLLOW", rich_help_panel=RELOAD_PANEL, help=(
            "Without --engine: follow the model's promoted version in the registry and swap "
            "it in while serving (--engine pins a version: never reloaded)."))] = True,
    reload_quiet_load: ReloadQuietLoad = _R.quiet_load,
    reload_quiet_s: ReloadQuietS = _R.quiet_s,
    reload_deadline_s: ReloadDeadlineS = _R.deadline_s,
    reload_window: Annotated[str | None, typer.Option(
        envvar="QSCORE_RELOAD_WINDOW", rich_help_panel=RELOAD_PANEL, help=(
            "Only reload (before the deadline) inside this UTC window, HH:MM-HH:MM."))] = None,
    reload_max_concurrent: ReloadMaxConcurrent = _R.max_concurrent,
    reload_jitter_s: Annotated[float, typer.Option(
        envvar="QSCORE_RELOAD_JITTER_S", min=0, rich_help_panel=RELOAD_PANEL, help=(
            "Random delay before loading when no lease store is reachable."))] = _R.jitter_s,
    reload_poll_s: ReloadPollS = _R.poll_s,
    reload_verify_mb_per_s: Annotated[float, typer.Option(
        envvar="QSCORE_RELOAD_VERIFY_MB_PER_S", min=1, rich_help_panel=RELOAD_PANEL, help=(
            "Checksums of a promoted version are verified as soon as it is seen, at most this "
            "fast (a burst beside the serving engines is a latency spike)."))]
    = _R.verify_mb_per_s,
    reload_copy_mb_per_s: Annotated[float, typer.Option(
        envvar="QSCORE_RELOAD_COPY_MB_PER_S", min=1, rich_help_panel=RELOAD_PANEL, help=(
            "GPU: a promoted version's weights are copied to the device at most this fast, "
            "in chunks on a low-priority stream, beside the serving engine's copies."))]
    = _R.copy_mb_per_s or 1000.0,
    engine_timeout: Annotated[float, typer.Option(envvar="QSCORE_ENGINE_TIMEOUT", min=0.1, help=(
        "Seconds one engine call may take; a call still running then is stuck (a hung GPU): "
        "its engine is taken out of service, and with none left the worker stops so a "
        "restart or another host takes over."))] = 300.0,
) -> None:
    """Run a scoring worker: token batches in, scores out (SIGTERM drains and commits)."""
    from engines.manifest import read_manifest
    from engines.select import find_artifact, load_for, serving_devices
    from workers.service import ScoringWorker, WorkerSettings

    configure_logging(service.log_level)
    port = open_metrics_port(service)  # probes answer through the engine load
    settings_ = engine_settings(service.model, service.engine_dir, service.artifact, None, None,
                                threads, precision=precision, backend=backend,
                                devices=device_list(devices), lanes=streams, graphs=graphs,
                                spin=spin)
    try:
        path = find_artifact(settings_)
        manifest = read_manifest(path)
        per_engine = threads or max(1, (os.cpu_count() or 1) // engines)
        if manifest.backend == "onnxruntime":
            loaded = [load_for(settings_, path, threads=per_engine) for _ in range(engines)]
        elif manifest.backend == "openvino":  # one compiled model, a lane per instance
            settings_ = replace(settings_, lanes=engines)
            per_engine = threads * engines if threads else (os.cpu_count() or 1)
            loaded = [load_for(settings_, path, threads=per_engine)]
        else:
            loaded = [load_for(settings_, path, device)
                      for device in serving_devices(settings_, manifest.backend)]
    except EngineError as exc:
        fail(exc)
    err.print(f"engine {path.name}: {manifest.backend} {manifest.precision}, "
              + ", ".join(f"{e.device} x{e.lanes} lanes" for e in loaded), soft_wrap=True)
    settings = WorkerSettings(
        kafka=kafka, topics=topics, group_id=group_id, cache=service.cache,
        reply_topics=service.reply_topics, engine_timeout_s=engine_timeout,
        batcher=BatcherSettings(max_batch=max_batch, token_budget=token_budget,
                                max_wait_ms=max_wait_ms, capacity=queue_capacity))

    def summary(service: ScoringWorker) -> str:
        s = service.stats
        dead = service.online.stats.dead_letters + service.offline.stats.dead_letters
        return (f"worker done: {s.messages} messages, {s.items} items, {s.batches} engine "
                f"calls (mean batch {s.mean_batch_size:.1f}), {s.cache_writes} cache writes, "
                f"{dead} dead letters")

    reload = None
    if follow and service.artifact is None:
        try:
            reload = ReloadSettings(
                poll_s=reload_poll_s, quiet_load=reload_quiet_load, quiet_s=reload_quiet_s,
                deadline_s=reload_deadline_s, max_concurrent=reload_max_concurrent,
                jitter_s=reload_jitter_s, verify_mb_per_s=reload_verify_mb_per_s,
                copy_mb_per_s=reload_copy_mb_per_s,
                window=parse_window(reload_window) if reload_window else None)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--reload-window") from None

    def reload_engine_on(path: Path, threads: int | None, device: str) -> Engine:
        """A promoted version's engine on `device`, as the serving ones are (threads, lanes;
        verified already: not hashed again), its weights copied at the capped rate."""
        assert reload is not None
        cap = None if reload.copy_mb_per_s is None else reload.copy_mb_per_s * 1e6
        return load_for(settings_, path, device, threads=threads or per_engine, verify=False,
                        load_max_bytes_per_s=cap)

    def reload_engines(path: Path, threads: int | None) -> list[Engine]:
        """One per serving engine, on its device; none left open if one fails."""
        out: list[Engine] = []
        try:
            for e in loaded:
                out.append(reload_engine_on(path, threads, e.device))
        except BaseException:
            for engine in out:
                engine.close()
            raise
        return out

    def make() -> ScoringWorker:
        worker = ScoringWorker(settings, loaded)
        if reload is not None:
            worker.reloader = follower(worker, reload, service.engine_dir, manifest.model_id,
                                       service.cache, reload_engines, reload_engine_on)
        return worker

    def heartbeats(worker: ScoringWorker) -> StatusPublisher | None:
        return status_publisher("worker", worker.name, worker_sample(worker), kafka, topics,
                                service)

    serve(make, service, metrics_prefix="qscore_worker", summary=summary,
          status=heartbeats, port=port)  # type: ignore[arg-type]


def registry_pointer(engine_dir: Path, model_id: str) -> Callable[[], Path | None]:
    """Reads the artifact `model_id`'s registry `current` names (None: none promoted)."""
    from engines.errors import RegistryError
    from engines.registry import EngineRegistry

    registry = EngineRegistry(engine_dir)

    def current() -> Path | None:
        try:
            return registry.get(model_id)
        except RegistryError:
            return None

    return current


def follower(worker: ScoringWorker, reload: ReloadSettings, engine_dir: Path, model_id: str,
             cache: CacheSettings,
             load: Callable[[Path, int | None], list[Engine]],
             load_on: Callable[[Path, int | None, str], Engine] | None = None) -> Reloader:
    """The worker's Reloader: the registry's pointer, a Redis lease when Redis is set."""
    from engines.golden import check_golden
    from workers.reload import RedisLease, Reloader

    current = registry_pointer(engine_dir, model_id)

    lease = None
    if cache.redis_url is not None:
        from redis.asyncio import Redis

        from plumbing.cache import tls_kwargs

        client = Redis.from_url(cache.redis_url, socket_timeout=cache.op_timeout_s,
                                socket_connect_timeout=cache.op_timeout_s, **tls_kwargs(cache))
        lease = RedisLease(client, f"{cache.key_prefix}:reload:{model_id}",
                           reload.max_concurrent, reload.lease_s)
    # One call of the 32 golden queries, as at build time: a dynamic-INT8 engine's outputs
    # depend on the batch (its activation scales are the batch's), so chunks would not
    # reproduce them (8-query chunks: min cosine 0.990 against the 0.995 budget).
    return Reloader(worker, current, load, reload, load_sample=worker.load_sample, lease=lease,
                    check=check_golden, load_on=load_on)


def tokenizer(
    kafka: KafkaSettings,
    topics: Topics,
    service: ServiceOptions,
    processes: Annotated[int, typer.Option(envvar="QSCORE_TOKENIZER_PROCESSES", min=1, help=(
        "Tokenizer processes (decode, cache keys, tokenize, pack). About one per core."))] = 2,
    group_id: Annotated[str, typer.Option(envvar="QSCORE_TOKENIZER_GROUP", help=(
        "Consumer group of the online and offline query topics."))] = "qscore-tokenizer",
    max_in_flight: Annotated[int, typer.Option(envvar="QSCORE_TOKENIZER_MAX_IN_FLIGHT", min=1,
                                               help=("Query batches worked on at once; "
                                                     "fetching pauses beyond."))] = 256,
    tokenize_chunk: Annotated[int, typer.Option(envvar="QSCORE_TOKENIZE_CHUNK", min=1, help=(
        "Items per tokenizer call: a large batch is cut into chunks tokenized in "
        "parallel."))] = 256,
    embedding_format: Annotated[str, typer.Option(
        "--embedding-format", envvar="QSCORE_EMBEDDING_FORMAT", help=(
            "The fleet's default for how scores carry embeddings, for query batches that do "
            "not ask: float (JSON numbers), base64 (float32 bytes) or base64-f16."))] = "float",
    follow: Annotated[bool, typer.Option(
        "--follow/--no-follow", envvar="QSCORE_RELOAD_FOLLOW", rich_help_panel=RELOAD_PANEL, help=(
            "Without --engine: look results up under the model's promoted version from the "
            "moment it is promoted (the workers reload onto it)."))] = True,
    reload_poll_s: ReloadPollS = _R.poll_s,
) -> None:
    """Run a tokenizer service: query batches in; cached scores, or token batches for the
    scoring workers, out. SIGTERM or Ctrl-C drains in-flight work and commits; a second one
    exits at once."""
    from engines.manifest import read_manifest
    from engines.select import find_artifact
    from tokenizer_svc.service import (
        TokenizerService,
        TokenizerServiceError,
        TokenizerServiceSettings,
    )

    configure_logging(service.log_level)
    if embedding_format not in EMBEDDING_FORMATS:
        raise typer.BadParameter(f"must be one of {', '.join(EMBEDDING_FORMATS)}, not "
                                 f"{embedding_format!r}", param_hint="--embedding-format")
    port = open_metrics_port(service)

    def summary(tokenizer: TokenizerService) -> str:
        s = tokenizer.stats
        return (f"tokenizer done: {s.batches} batches, {s.items} items ({s.cached_items} from "
                f"the cache), {s.token_batches} token batches, {s.dead_letters} dead letters")

    try:
        path = find_artifact(engine_settings(service.model, service.engine_dir,
                                             service.artifact, None, None, None))
        settings = TokenizerServiceSettings(
            kafka=kafka, topics=topics, artifact=path, cache=service.cache,
            reply_topics=service.reply_topics,
            processes=processes, group_id=group_id, max_in_flight=max_in_flight,
            tokenize_chunk=tokenize_chunk,
            embedding_format=embedding_format)  # type: ignore[arg-type]
        model_id = read_manifest(path).model_id

        def make() -> TokenizerService:
            tokenizer = TokenizerService(settings)
            if follow and service.artifact is None:
                tokenizer.follow = registry_pointer(service.engine_dir, model_id)
                tokenizer.follow_poll_s = reload_poll_s
            return tokenizer

        def heartbeats(tokenizer: TokenizerService) -> StatusPublisher | None:
            return status_publisher("tokenizer", tokenizer.name, tokenizer_sample(tokenizer),
                                    kafka, topics, service)

        serve(make, service, metrics_prefix="qscore_tokenizer",
              summary=summary, status=heartbeats, port=port)  # type: ignore[arg-type]
    except (EngineError, TokenizerServiceError, OSError) as exc:
        fail(exc)
