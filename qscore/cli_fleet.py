"""`qscore tokenizer`: the tokenizer service of the fleet (query batches in; cached scores or
token batches out). Kafka flags come from `qscore.settings.kafka_command`, engine, cache and
metrics flags are the worker's, so both services of a fleet take the same command line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from qscore.cli_worker import cache_settings
from qscore.config import EngineSettings
from qscore.kafka import KafkaSettings, Topics
from qscore.logs import configure_logging
from qscore.settings import (
    DEFAULT_ENGINE_DIR,
    CacheTtl,
    EngineArtifact,
    EngineDir,
    EngineModel,
    IdleExit,
    LogLevel,
    MetricsPort,
    RedisCaCerts,
    RedisUrl,
    kafka_command,
)

if TYPE_CHECKING:  # the service (numpy, tokenizers, ...) is imported only to run, not for --help
    from tokenizer_svc.service import TokenizerServiceSettings

err = Console(stderr=True)


def tokenizer(
    kafka: KafkaSettings,
    topics: Topics,
    artifact: EngineArtifact = None,
    model: EngineModel = "default",
    engine_dir: EngineDir = DEFAULT_ENGINE_DIR,
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
    idle_exit: IdleExit = None,
    redis_url: RedisUrl = None,
    redis_ca_certs: RedisCaCerts = None,
    cache_ttl: CacheTtl = 86_400.0,
    metrics_port: MetricsPort = None,
    log_level: LogLevel = "info",
) -> None:
    """Run a tokenizer service: query batches in; cached scores, or token batches for the
    scoring workers, out. SIGTERM or Ctrl-C drains in-flight work and commits; a second one
    exits at once."""
    from engines.errors import EngineError
    from qscore.aio import run
    from qscore.engine import find_artifact
    from tokenizer_svc.service import TokenizerServiceError, TokenizerServiceSettings

    configure_logging(log_level)
    try:
        path = find_artifact(EngineSettings(model=model, engine_dir=engine_dir,
                                            artifact=artifact))
        settings = TokenizerServiceSettings(
            kafka=kafka, topics=topics, artifact=path,
            cache=cache_settings(redis_url, redis_ca_certs, cache_ttl),
            processes=processes, group_id=group_id, max_in_flight=max_in_flight,
            tokenize_chunk=tokenize_chunk)
        run(_serve(settings, idle_exit, metrics_port))
    except (EngineError, TokenizerServiceError, OSError) as exc:
        err.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


async def _serve(settings: TokenizerServiceSettings, idle_exit: float | None,
                 metrics_port: int | None) -> None:
    from qscore.aio import stop_on_signals
    from qscore.metrics import serve_metrics
    from tokenizer_svc.service import TokenizerService

    service = TokenizerService(settings)  # inside the loop: aiokafka clients bind to it
    stop_on_signals(service.request_stop)
    if metrics_port is not None:
        serve_metrics(metrics_port, "qscore_tokenizer", {
            "tokenizer": lambda: service.stats,
            "pipeline": lambda: service.pipeline.stats,
            "cache": lambda: service.cache.stats,
            "pool": lambda: {"restarts": service.pool.restarts,
                             "in_flight": service.pipeline.tracker.in_flight()},
        })
    await service.start()
    try:
        await service.run(idle_exit_s=idle_exit)
    finally:
        await service.stop()
    s = service.stats
    err.print(f"tokenizer done: {s.batches} batches, {s.items} items ({s.cached_items} from "
              f"the cache), {s.token_batches} token batches, {s.dead_letters} dead letters")


def register(app: typer.Typer) -> None:
    app.command()(kafka_command(tokenizer))
