"""Command-line options shared by every fleet command, and the builders that turn them into
settings objects (KafkaSettings, Topics, CacheSettings, EngineSettings). This module is the
only reader of flags and QSCORE_* environment variables; everything below the command line
gets settings objects.

A command either lists the annotations it needs as parameters and calls a builder once, at
the edge:

    def worker(bootstrap_servers: BootstrapServers = DEFAULT_BOOTSTRAP, ...,
               topic_prefix: TopicPrefix = "qscore") -> None:
        kafka = kafka_settings_from(bootstrap_servers, ...)
        topics = topics_from(topic_prefix)

or, for all the Kafka flags at once, takes the built objects and lets `kafka_command` put the
flags in their place:

    @app.command()
    @kafka_command
    def worker(kafka: KafkaSettings, topics: Topics, batch_size: ... = 64) -> None: ...

Every option is a flag and a QSCORE_* environment variable. Secrets (the SASL password, a
password inside the Redis URL) are best given through the environment, and are never printed.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from engines.build import BACKENDS
from engines.quantize import QuantSpec
from engines.select import EngineSettings, default_backend
from plumbing.cache import DEFAULT_TTL_S, CacheSettings, CacheSettingsError
from plumbing.kafka import (
    FAST_GROUP_TIMINGS,
    SASL_MECHANISMS,
    SECURITY_PROTOCOLS,
    KafkaSettings,
    Topics,
)
from plumbing.status import DEFAULT_INTERVAL_S as DEFAULT_STATUS_INTERVAL_S


def default_home() -> Path:
    """Where built engines are cached: $QSCORE_HOME, else $XDG_CACHE_HOME/qscore, else
    ~/.cache/qscore."""
    if home := os.environ.get("QSCORE_HOME"):
        return Path(home)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qscore"


DEFAULT_BOOTSTRAP = KafkaSettings().bootstrap_servers
DEFAULT_TOPIC_PREFIX = "qscore"
DEFAULT_CACHE_TTL_S = DEFAULT_TTL_S

_KAFKA = "Kafka"
_REDIS = "Redis cache"

BootstrapServers = Annotated[str, typer.Option(
    "--bootstrap-servers", envvar="QSCORE_KAFKA_BOOTSTRAP", rich_help_panel=_KAFKA,
    help="Kafka brokers, comma-separated host:port.")]
SecurityProtocol = Annotated[str, typer.Option(
    "--security-protocol", envvar="QSCORE_KAFKA_SECURITY_PROTOCOL", rich_help_panel=_KAFKA,
    help=f"One of {', '.join(SECURITY_PROTOCOLS)}. SSL/SASL_SSL encrypt the connection; "
    "SASL_* authenticate with --sasl-*.")]
SaslMechanism = Annotated[str | None, typer.Option(
    "--sasl-mechanism", envvar="QSCORE_KAFKA_SASL_MECHANISM", rich_help_panel=_KAFKA,
    help=f"SASL mechanism for SASL_* protocols: {', '.join(SASL_MECHANISMS)}.")]
SaslUsername = Annotated[str | None, typer.Option(
    "--sasl-username", envvar="QSCORE_KAFKA_SASL_USERNAME", rich_help_panel=_KAFKA,
    help="SASL user name (SASL_* protocols only).")]
SaslPassword = Annotated[str | None, typer.Option(
    "--sasl-password", envvar="QSCORE_KAFKA_SASL_PASSWORD", rich_help_panel=_KAFKA,
    show_default=False, help="SASL password (SASL_* protocols only). Prefer the environment "
    "variable: a flag shows up in `ps`. Never printed.")]
SslCafile = Annotated[Path | None, typer.Option(
    "--ssl-cafile", envvar="QSCORE_KAFKA_SSL_CAFILE", rich_help_panel=_KAFKA,
    exists=True, dir_okay=False, help="PEM file of the CA that signed the brokers' "
    "certificates (SSL/SASL_SSL; default: the system's trusted CAs).")]
SslCertfile = Annotated[Path | None, typer.Option(
    "--ssl-certfile", envvar="QSCORE_KAFKA_SSL_CERTFILE", rich_help_panel=_KAFKA,
    exists=True, dir_okay=False, help="Client certificate (PEM) for mutual TLS; needs "
    "--ssl-keyfile unless the key is in the same file.")]
SslKeyfile = Annotated[Path | None, typer.Option(
    "--ssl-keyfile", envvar="QSCORE_KAFKA_SSL_KEYFILE", rich_help_panel=_KAFKA,
    exists=True, dir_okay=False, help="Private key (PEM) of --ssl-certfile.")]
SslNoCheckHostname = Annotated[bool, typer.Option(
    "--ssl-no-check-hostname", envvar="QSCORE_KAFKA_SSL_NO_CHECK_HOSTNAME",
    rich_help_panel=_KAFKA, help="Accept broker certificates whose name does not match the "
    "host (the chain is still verified). For test clusters only.")]
FastGroups = Annotated[bool, typer.Option(
    "--fast-groups", envvar="QSCORE_KAFKA_FAST_GROUPS", rich_help_panel=_KAFKA,
    help="Timings for the embedded broker (qscore up, tests): 1 s consumer-group sessions "
    "(joins take ~1 s instead of 5-20 s) and 2 ms fetch waits (it holds fetches for about "
    "half the wait). Apache Kafka rejects sessions under 6 s.")]
TopicPrefix = Annotated[str, typer.Option(
    "--topic-prefix", envvar="QSCORE_TOPIC_PREFIX", rich_help_panel=_KAFKA,
    help="Topic names are PREFIX.queries, PREFIX.queries.offline, PREFIX.tokens, "
    "PREFIX.tokens.offline, PREFIX.scores, PREFIX.dead-letter, PREFIX.status (one fleet per "
    "prefix).")]

RedisUrl = Annotated[str | None, typer.Option(
    "--redis-url", envvar="QSCORE_REDIS_URL", rich_help_panel=_REDIS, show_default=False,
    help="Result cache, e.g. redis://:PASSWORD@host:6379/0, or rediss://... for TLS. Unset: "
    "no cache. A URL with a password is best given through the environment variable: a flag "
    "shows up in `ps`. Never printed with its password.")]
RedisCaCerts = Annotated[Path | None, typer.Option(
    "--redis-ca-certs", envvar="QSCORE_REDIS_CA_CERTS", rich_help_panel=_REDIS,
    exists=True, dir_okay=False, help="PEM file of the CA that signed the Redis server's "
    "certificate (rediss:// only; default: the system's trusted CAs).")]
CacheTtl = Annotated[int, typer.Option(
    "--cache-ttl", envvar="QSCORE_CACHE_TTL", rich_help_panel=_REDIS, min=1,
    help="Seconds a cached score lives. Keys carry the model version, so a new engine never "
    "reads an old engine's scores; the TTL only bounds memory.")]


# -- options every command that loads an engine or runs a service shares ---------------------

DEFAULT_ENGINE_DIR = default_home() / "engines"

EngineModel = Annotated[str, typer.Option(
    "--model", envvar="QSCORE_MODEL", help="'default' (all-MiniLM-L6-v2, shipped offline) or "
    "a Hugging Face model directory; used when no --engine is given.")]
EngineArtifact = Annotated[Path | None, typer.Option(
    "--engine", envvar="QSCORE_ENGINE", help="Use this engine artifact directory instead of "
    "building (or finding) the one for --model.")]
EngineDir = Annotated[Path, typer.Option(
    "--engine-dir", envvar="QSCORE_ENGINE_DIR", help="Where built engines are cached.")]
Precision = Annotated[str | None, typer.Option(
    "--precision", envvar="QSCORE_PRECISION", help="openvino, onnxruntime: fp32 or int8 "
    "(default: int8, checked against FP32 on real queries, for similarity models; fp32 for "
    "classifiers). torch: fp32, fp16 (default), int8 or fp8 (Ada/Hopper GPUs).")]
Backend = Annotated[str | None, typer.Option(
    "--backend", envvar="QSCORE_BACKEND", help="Runtime: openvino (CPU: calibrated static "
    "INT8 on VNNI/AMX), onnxruntime (CPU: dynamic INT8), torch (CUDA GPUs: FP16/INT8/FP8, "
    "CUDA graphs, one stream per lane) or tensorrt (INT8/FP16 plans; needs tensorrt + "
    "pycuda). Default: the promoted engine's, else openvino (the faster CPU engine measured, "
    "docs/benchmarks.md), or onnxruntime where OpenVINO is not installed.")]
Device = Annotated[str | None, typer.Option(
    "--device", envvar="QSCORE_DEVICE", help="Where a torch engine runs: cuda:N or cpu "
    "(default: cuda:0 when a GPU is visible).")]
Devices = Annotated[str | None, typer.Option(
    "--devices", envvar="QSCORE_DEVICES", help="torch backend: GPUs to serve on, comma-"
    "separated (cuda:0,cuda:1; default: every visible GPU), one engine each.")]
Streams = Annotated[int, typer.Option(
    "--streams", envvar="QSCORE_STREAMS", min=1, max=8, help="torch backend: CUDA streams "
    "(lanes) per engine; two overlap one batch's copies with another's compute.")]
Graphs = Annotated[bool, typer.Option(
    "--graphs/--no-graphs", envvar="QSCORE_CUDA_GRAPHS", help="torch backend: capture a CUDA "
    "graph per shape bucket at load (off: eager launches, for debugging).")]
QuantLevel = Annotated[str, typer.Option(
    "--level", envvar="QSCORE_INT8_LEVEL", help="INT8 quantization level: 1 (projection and "
    "feed-forward MatMuls), 2 (+ attention), 3 (everything), or auto (the fastest candidate, "
    "with sensitive nodes left in FP32, that meets --max-drop on a validation split).")]
MaxDrop = Annotated[float, typer.Option(
    "--max-drop", envvar="QSCORE_INT8_MAX_DROP", min=1e-6, max=0.5, help="INT8 budget: mean "
    "cosine to FP32 >= 1 - X, 1st percentile >= 1 - 4X, Spearman of pair scores >= 1 - 2X.")]
Calibration = Annotated[Path | None, typer.Option(
    "--calibration", envvar="QSCORE_INT8_CALIBRATION", exists=True, dir_okay=False, help=(
        "Queries for INT8 calibration/validation: TSV qid<TAB>query or a JSONL query log "
        "(default: the shipped sample log). One third calibrates, another validates."))]
CalibrationMethodOpt = Annotated[str, typer.Option(
    "--calibration-method", envvar="QSCORE_INT8_METHOD", help="dynamic (activation ranges "
    "at run time; the fast one on CPU), or static Q/DQ calibrated by minmax, entropy or "
    "percentile.")]
LogLevel = Annotated[str, typer.Option(envvar="QSCORE_LOG_LEVEL", help="Log level.")]
StatusInterval = Annotated[float, typer.Option(
    "--status-interval-s", envvar="QSCORE_STATUS_INTERVAL_S", min=0, help=(
        "Publish a heartbeat (model, versions, reload state, load) to PREFIX.status this "
        "often, for `qscore status`; 0: none."))]
MetricsPort = Annotated[int | None, typer.Option(envvar="QSCORE_METRICS_PORT", help=(
    "Serve Prometheus metrics on HOST:PORT/metrics, with /healthz (live) and /readyz (engine "
    "loaded, partitions assigned, not draining) beside them."))]
MetricsHost = Annotated[str, typer.Option(envvar="QSCORE_METRICS_HOST", help=(
    "The address --metrics-port listens on: 127.0.0.1 (this host only), 0.0.0.0 or :: in a "
    "container, where probes and Prometheus connect to the pod's address."))]
IdleExit = Annotated[float | None, typer.Option(envvar="QSCORE_IDLE_EXIT", help=(
    "Burst mode: exit after this many idle seconds with nothing in flight."))]


def kafka_settings_from(
    bootstrap_servers: str = DEFAULT_BOOTSTRAP,
    security_protocol: str = "PLAINTEXT",
    sasl_mechanism: str | None = None,
    sasl_username: str | None = None,
    sasl_password: str | None = None,
    ssl_cafile: Path | None = None,
    ssl_certfile: Path | None = None,
    ssl_keyfile: Path | None = None,
    ssl_no_check_hostname: bool = False,
    fast_groups: bool = False,
    **extra: Any,
) -> KafkaSettings:
    """KafkaSettings from CLI options; raises typer.BadParameter naming the flags to fix.

    Options that the chosen protocol would ignore are refused rather than dropped, so that a
    typo in the protocol never silently sends credentials, or data, in the clear.
    `extra` goes to KafkaSettings as is (client_id, linger_ms, ...).
    """
    protocol = security_protocol.strip().upper()
    mechanism = sasl_mechanism.strip().upper() if sasl_mechanism else None
    if protocol not in SECURITY_PROTOCOLS:
        raise typer.BadParameter(
            f"must be one of {', '.join(SECURITY_PROTOCOLS)}, not {security_protocol!r}",
            param_hint="--security-protocol")
    sasl_given = [flag for flag, value in (("--sasl-mechanism", mechanism),
                                           ("--sasl-username", sasl_username),
                                           ("--sasl-password", sasl_password)) if value]
    if sasl_given and not protocol.startswith("SASL"):
        raise typer.BadParameter(
            f"{', '.join(sasl_given)} given but --security-protocol is {protocol}: use "
            "SASL_SSL (or SASL_PLAINTEXT) to authenticate", param_hint="--security-protocol")
    ssl_given = [flag for flag, value in (("--ssl-cafile", ssl_cafile),
                                          ("--ssl-certfile", ssl_certfile),
                                          ("--ssl-keyfile", ssl_keyfile),
                                          ("--ssl-no-check-hostname", ssl_no_check_hostname))
                 if value]
    if ssl_given and protocol not in ("SSL", "SASL_SSL"):
        raise typer.BadParameter(
            f"{', '.join(ssl_given)} given but --security-protocol is {protocol}: use SSL or "
            "SASL_SSL", param_hint="--security-protocol")
    if ssl_keyfile and not ssl_certfile:
        raise typer.BadParameter("needs --ssl-certfile (the certificate of this key)",
                                 param_hint="--ssl-keyfile")
    servers = ",".join(s.strip() for s in bootstrap_servers.split(",") if s.strip())
    if not servers:
        raise typer.BadParameter("is empty: give host:port[,host:port...]",
                                 param_hint="--bootstrap-servers")
    if protocol.startswith("SASL") and mechanism not in SASL_MECHANISMS:
        raise typer.BadParameter(
            f"{protocol} needs --sasl-mechanism {' | '.join(SASL_MECHANISMS)}, not {mechanism!r}",
            param_hint="--sasl-mechanism")
    if protocol.startswith("SASL") and not (sasl_username and sasl_password):
        raise typer.BadParameter(
            f"{protocol} needs --sasl-username and --sasl-password (or "
            "QSCORE_KAFKA_SASL_PASSWORD)", param_hint="--security-protocol")
    if fast_groups:
        extra = FAST_GROUP_TIMINGS | extra
    try:
        return KafkaSettings(
            bootstrap_servers=servers, security_protocol=protocol, sasl_mechanism=mechanism,
            # An empty flag or variable is no value here, as in the checks above.
            sasl_username=sasl_username or None, sasl_password=sasl_password or None,
            ssl_cafile=str(ssl_cafile) if ssl_cafile else None,
            ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
            ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
            ssl_check_hostname=not ssl_no_check_hostname, **extra)
    except ValueError as exc:  # the remaining rules live in KafkaSettings.__post_init__
        raise typer.BadParameter(str(exc)) from None


_TOPIC_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,200}")


def topics_from(topic_prefix: str = DEFAULT_TOPIC_PREFIX) -> Topics:
    """Topics under `topic_prefix`; BadParameter if that cannot start a Kafka topic name."""
    if not _TOPIC_PREFIX.fullmatch(topic_prefix) or topic_prefix in (".", ".."):
        raise typer.BadParameter(
            f"{topic_prefix!r} is not a legal topic name prefix: use letters, digits, "
            "'.', '_' and '-' (at most 200)", param_hint="--topic-prefix")
    return Topics.with_prefix(topic_prefix)


_KAFKA_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    ("bootstrap_servers", BootstrapServers, DEFAULT_BOOTSTRAP),
    ("security_protocol", SecurityProtocol, "PLAINTEXT"),
    ("sasl_mechanism", SaslMechanism, None),
    ("sasl_username", SaslUsername, None),
    ("sasl_password", SaslPassword, None),
    ("ssl_cafile", SslCafile, None),
    ("ssl_certfile", SslCertfile, None),
    ("ssl_keyfile", SslKeyfile, None),
    ("ssl_no_check_hostname", SslNoCheckHostname, False),
    ("fast_groups", FastGroups, False),
    ("topic_prefix", TopicPrefix, DEFAULT_TOPIC_PREFIX),
)
R = TypeVar("R")


def kafka_command(func: Callable[..., R]) -> Callable[..., R]:
    """Decorate a typer command whose parameters include `kafka: KafkaSettings` and/or
    `topics: Topics`: typer sees every Kafka flag above instead (after the command's own
    options, in a "Kafka" help panel), and the command gets the objects built from them.
    Put it under `@app.command()`. Bad combinations end the command with BadParameter."""
    def build(values: dict[str, Any]) -> dict[str, Any]:
        topics = topics_from(values.pop("topic_prefix"))
        return {"kafka": kafka_settings_from(**values), "topics": topics}

    return _with_flags(func, ("kafka", "topics"), (), _KAFKA_OPTIONS, build)


def _with_flags(func: Callable[..., R], replaced: tuple[str, ...],
                leading: tuple[tuple[str, Any, Any], ...],
                trailing: tuple[tuple[str, Any, Any], ...],
                build: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[..., R]:
    """`func` with its `replaced` parameters turned into the flags of `leading` (before its
    own options) and `trailing` (after them); `build` makes the replaced values from the
    flags' values when the command runs."""
    signature = inspect.signature(func)
    hints = typing.get_type_hints(func, include_extras=True)  # typer needs real annotations
    own = [p.replace(annotation=hints.get(p.name, p.annotation),
                     kind=inspect.Parameter.KEYWORD_ONLY)
           for p in signature.parameters.values() if p.name not in replaced]
    names = [name for name, _, _ in (*leading, *trailing)]

    def flags(table: tuple[tuple[str, Any, Any], ...]) -> list[inspect.Parameter]:
        return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                  annotation=annotation) for name, annotation, default in table]

    @functools.wraps(func)
    def command(**kwargs: Any) -> R:
        built = build({name: kwargs.pop(name) for name in names})
        kwargs.update({k: v for k, v in built.items() if k in signature.parameters})
        return func(**kwargs)

    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*flags(leading), *own, *flags(trailing)],
        return_annotation=hints.get("return", None))
    return command


_CACHE_FLAGS = {"redis_url": "--redis-url", "ssl_ca_certs": "--redis-ca-certs",
                "ttl_s": "--cache-ttl"}


def cache_settings_from(redis_url: str | None, redis_ca_certs: Path | None = None,
                        cache_ttl: int = DEFAULT_CACHE_TTL_S) -> CacheSettings:
    """CacheSettings from CLI options: no --redis-url means the in-process LRU only."""
    if not redis_url and redis_ca_certs:
        raise typer.BadParameter("given without --redis-url", param_hint="--redis-ca-certs")
    try:
        return CacheSettings(redis_url=redis_url or None, ttl_s=cache_ttl,
                             ssl_ca_certs=str(redis_ca_certs) if redis_ca_certs else None)
    except CacheSettingsError as exc:
        raise typer.BadParameter(str(exc).removeprefix(exc.field).strip(),
                                 param_hint=_CACHE_FLAGS.get(exc.field, exc.field)) from None


# -- engine options of `rescore`, `engine build`, `worker`, `tokenizer` ----------------------

Head = Annotated[str | None, typer.Option(
    envvar="QSCORE_HEAD", help="similarity | classifier (default: from the model's config).")]
MaxLength = Annotated[int | None, typer.Option(
    envvar="QSCORE_MAX_LENGTH", min=2, help="Max tokens per sequence; longer ones are "
    "truncated and counted (default: the model's).")]
Threads = Annotated[int | None, typer.Option(
    envvar="QSCORE_THREADS", min=1, help="Engine threads (default: all cores).")]
Spin = Annotated[bool, typer.Option(
    "--spin/--no-spin", envvar="QSCORE_ORT_SPIN", help="onnxruntime: idle engine threads spin "
    "waiting for the next batch instead of yielding their cores. Off by default in a worker: "
    "between batches the spinning burnt more CPU than a small engine's inference (bench/"
    "host_cost.py), CPU the tokenizer and the broker on the same host need. On for a host "
    "whose cores serve only this worker's back-to-back batches.")]


def engine_settings(model: str, engine_dir: Path, artifact: Path | None, head: str | None,
                    max_length: int | None, threads: int | None,
                    rebuild: bool = False, precision: str | None = None,
                    quant: QuantSpec | None = None, backend: str | None = None,
                    devices: tuple[str, ...] = (), lanes: int | None = None,
                    graphs: bool = True, spin: bool = True) -> EngineSettings:
    """EngineSettings from CLI options; BadParameter names the flag to fix."""
    if head not in (None, "similarity", "classifier"):
        raise typer.BadParameter(f"--head must be similarity or classifier, not {head!r}")
    if backend not in (None, *BACKENDS):
        raise typer.BadParameter(f"--backend must be one of {', '.join(BACKENDS)}, not "
                                 f"{backend!r}")
    allowed = {"torch": ("fp32", "fp16", "int8", "fp8"), "tensorrt": ("fp16", "int8")}.get(
        backend or "", ("fp32", "int8"))
    if precision not in (None, *allowed):
        raise typer.BadParameter(f"--precision must be one of {', '.join(allowed)} for the "
                                 f"{backend or default_backend()} backend, not {precision!r}")
    for device in devices:
        if device != "cpu" and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise typer.BadParameter(f"device {device!r}: use cuda:N or cpu")
    return EngineSettings(model=model, engine_dir=engine_dir, artifact=artifact,
                          head=head, max_length=max_length,  # type: ignore[arg-type]
                          threads=threads, rebuild=rebuild, precision=precision,
                          quant=quant or QuantSpec(), backend=backend, devices=devices,
                          lanes=lanes, graphs=graphs, spin=spin)


def device_list(text: str | None) -> tuple[str, ...]:
    """'cuda:0, cuda:1' -> ('cuda:0', 'cuda:1'); a bare index N means cuda:N."""
    if not text:
        return ()
    return tuple(f"cuda:{d}" if d.isdigit() else d
                 for d in (part.strip() for part in text.split(",")) if d)


# -- hot reload: `worker` and `tokenizer` take these, and `qscore up` passes them on ----------

RELOAD_PANEL = "Hot reload"
ReloadPollS = Annotated[float, typer.Option(
    envvar="QSCORE_RELOAD_POLL_S", min=0.1, rich_help_panel=RELOAD_PANEL, help=(
        "How often the registry's pointer is read."))]
ReloadQuietLoad = Annotated[float, typer.Option(
    envvar="QSCORE_RELOAD_QUIET_LOAD", min=0.01, max=1.0, rich_help_panel=RELOAD_PANEL, help=(
        "Traffic counts as low below this fraction of the worker's measured capacity."))]
ReloadQuietS = Annotated[float, typer.Option(
    envvar="QSCORE_RELOAD_QUIET_S", min=0.1, rich_help_panel=RELOAD_PANEL, help=(
        "Seconds of low traffic before a reload starts."))]
ReloadDeadlineS = Annotated[float, typer.Option(
    envvar="QSCORE_RELOAD_DEADLINE_S", min=1, rich_help_panel=RELOAD_PANEL, help=(
        "After this long pending, reload at the quietest moment seen so far."))]
ReloadMaxConcurrent = Annotated[int, typer.Option(
    envvar="QSCORE_RELOAD_MAX_CONCURRENT", min=1, rich_help_panel=RELOAD_PANEL, help=(
        "Workers of the fleet reloading at once (a lease in Redis; without Redis, a random "
        "delay of up to --reload-jitter-s instead)."))]


# -- what both fleet services (worker, tokenizer) take besides Kafka --------------------------

@dataclass(frozen=True, slots=True)
class ServiceOptions:
    """The flags both services share: where their engine is, the result cache, burst mode,
    metrics and logging."""

    model: str
    engine_dir: Path
    artifact: Path | None
    cache: CacheSettings
    reply_topics: tuple[str, ...]  # (): the fleet's default allow-list
    idle_exit: float | None
    metrics_port: int | None
    metrics_host: str
    log_level: str
    status_interval_s: float  # 0: no heartbeats


_SERVICE_ENGINE = (
    ("artifact", EngineArtifact, None),
    ("model", EngineModel, "default"),
    ("engine_dir", EngineDir, DEFAULT_ENGINE_DIR),
)
ReplyTopics = Annotated[str | None, typer.Option(
    "--reply-topics", envvar="QSCORE_REPLY_TOPICS", rich_help_panel=_KAFKA, help="Topics a "
    "producer may name as a batch's reply_topic: comma-separated shell-style patterns "
    "(default: PREFIX.scores and PREFIX.scores.*). A batch asking for any other topic is "
    "dead-lettered with the reason.")]
_SERVICE_REST = (
    ("reply_topics", ReplyTopics, None),
    ("idle_exit", IdleExit, None),
    ("redis_url", RedisUrl, None),
    ("redis_ca_certs", RedisCaCerts, None),
    ("cache_ttl", CacheTtl, DEFAULT_CACHE_TTL_S),
    ("metrics_port", MetricsPort, None),
    ("metrics_host", MetricsHost, "127.0.0.1"),
    ("status_interval_s", StatusInterval, DEFAULT_STATUS_INTERVAL_S),
    ("log_level", LogLevel, "info"),
)


def service_command(func: Callable[..., R]) -> Callable[..., R]:
    """Like kafka_command, for a parameter `service: ServiceOptions`: typer sees the engine
    flags (first) and the cache, burst-mode, metrics and log flags (last) instead."""
    def build(values: dict[str, Any]) -> dict[str, Any]:
        cache = cache_settings_from(values.pop("redis_url"), values.pop("redis_ca_certs"),
                                    values.pop("cache_ttl"))
        patterns = tuple(p.strip() for p in (values.pop("reply_topics") or "").split(",")
                         if p.strip())
        return {"service": ServiceOptions(cache=cache, reply_topics=patterns, **values)}

    return _with_flags(func, ("service",), _SERVICE_ENGINE, _SERVICE_REST, build)
