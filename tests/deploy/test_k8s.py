"""deploy/k8s/, checked offline as CI can: no cluster, no kustomize, no network.

Every deployable kustomization (the overlays, jobs/ and dashboard/) is rendered by
tests/deploy/k8s_render.py; Kubernetes' own resources are validated against the OpenAPI
schemas of Kubernetes K8S_VERSION that kubernetes-validate ships (strict: unknown fields are
errors); custom resources (KEDA, Prometheus operator, Strimzi) against the JSON schemas in
deploy/k8s/schemas/; every YAML file passes yamllint with deploy/k8s/.yamllint.yaml; and the
fleet's own rules hold (resources, probes, non-root, secrets, scaling, drain, topics).
Each check returns the problems it found, so the last tests can show each one failing on a
broken copy of the tree.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import shutil
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import typer.main
from yamllint import linter
from yamllint.config import YamlLintConfig

from plumbing.kafka import Topics
from plumbing.pipeline import PipelineSettings
from plumbing.status import STATUS_TOPIC_CONFIG, StatusPublisher
from qscore.cli.app import app
from tests.deploy.k8s_render import (
    KustomizeError,
    dump,
    is_builtin,
    pod_specs,
    render,
    split_image,
)
from workers.pool import EnginePool

K8S_VERSION = "1.35.0"  # the Kubernetes whose schemas the built-in resources must meet
ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DASHBOARD_JSON = ROOT / "deploy" / "grafana" / "dashboards" / "qscore.json"
# What an operator applies (base/ only through the overlays).
UNITS = ("overlays/cpu", "overlays/gpu", "overlays/strimzi", "overlays/registry-s3", "jobs",
         "dashboard")
METRICS_PORT_NAME = "metrics"
SECRET_NAME = re.compile(r"(^|_)(PASSWORD|SECRET|TOKEN|CREDENTIALS?|ACCESS_KEY)(_|$)",
                         re.IGNORECASE)
KEDA_SASL = {"": "none", "PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256",
             "SCRAM-SHA-512": "scram_sha512"}  # qscore's --sasl-mechanism -> KEDA's sasl
URL_CREDENTIALS = re.compile(r"://[^/@\s]*:[^/@\s]+@")
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
TOKENIZER_POOL_CLOSE_S = 10.0  # tokenizer_svc/procpool.py reap: joined for 5 s, then killed
# Variables the manifests set for a flag the command line does not read yet, with why: the
# env-var rule lets them pass, and test_pending_variables_are_still_pending fails as soon as
# the command line reads one (then delete it here).
PENDING_ENV: dict[str, str] = {}


# -- rendering -------------------------------------------------------------------------------

def render_unit(k8s: Path, unit: str) -> list[dict[str, Any]]:
    return render(k8s / unit)  # as kustomize does by default: no file outside its directory


def rendered_units(k8s: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    for unit in UNITS:
        if unit == "dashboard" and not (k8s.parent / "grafana/dashboards/qscore.json").exists():
            continue
        yield unit, render_unit(k8s, unit)


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


# -- validators: each returns its problems -----------------------------------------------------

def builtin_problems(resources: list[dict[str, Any]]) -> list[str]:
    """Kubernetes' own kinds against K8S_VERSION's schemas, unknown fields refused."""
    problems = []
    for obj in resources:
        if not is_builtin(obj["apiVersion"]):
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            problems.append(f"{name_of(obj)}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{name_of(obj)}: {exc.message}")
    return problems


@cache
def schema_registry(schemas: Path) -> tuple[referencing.Registry, dict[str, Any]]:
    """Every schema in `schemas`, by file name, and a registry that resolves their $refs."""
    loaded = {p.name: json.loads(p.read_text()) for p in sorted(schemas.glob("*.schema.json"))}
    registry = referencing.Registry().with_resources(
        (s["$id"], referencing.Resource.from_contents(s)) for s in loaded.values())
    return registry, loaded


def custom_problems(resources: list[dict[str, Any]], schemas: Path) -> list[str]:
    """Custom resources against deploy/k8s/schemas/GROUP_VERSION_KIND.schema.json."""
    registry, loaded = schema_registry(schemas)
    problems = []
    for obj in resources:
        if is_builtin(obj["apiVersion"]):
            continue
        file = f"{obj['apiVersion'].replace('/', '_')}_{obj['kind']}.schema.json"
        if file not in loaded:
            problems.append(f"{name_of(obj)}: no schema {file} in {schemas}")
            continue
        validator = jsonschema.Draft202012Validator(loaded[file], registry=registry)
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            where = ".".join(str(p) for p in error.absolute_path)
            problems.append(f"{name_of(obj)}: {where}: {error.message}")
    return problems


def yamllint_problems(k8s: Path) -> list[str]:
    config = YamlLintConfig(file=str(k8s / ".yamllint.yaml"))
    problems = []
    for path in sorted([*k8s.rglob("*.yaml"), *k8s.rglob("*.yml"), k8s / ".yamllint.yaml"]):
        for p in linter.run(path.read_text(), config, str(path)):
            problems.append(f"{path.relative_to(k8s)}:{p.line}:{p.column}: {p.level}: "
                            f"{p.desc} ({p.rule})")
    return problems


# -- what the qscore command line reads --------------------------------------------------------

@cache
def cli_commands() -> dict[tuple[str, ...], Any]:
    """('worker',) -> the click command of `qscore worker`, and so on for every command."""
    out: dict[tuple[str, ...], Any] = {}

    def walk(cmd: Any, path: tuple[str, ...]) -> None:
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, (*path, name))
        else:
            out[path] = cmd

    walk(typer.main.get_command(app), ())
    return out


def cli_envvars(command: tuple[str, ...]) -> dict[str, Any]:
    """The QSCORE_* variables `qscore COMMAND` reads, each with its option's default."""
    out = {}
    for param in cli_commands()[command].params:
        envvars = [param.envvar] if isinstance(param.envvar, str) else param.envvar or []
        for var in envvars:
            out[var] = param.default
    return out


# -- the rendered fleet --------------------------------------------------------------------

def containers(obj: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any], str]]:
    """(pod spec, container, role): role is main, init or sidecar (restartPolicy Always)."""
    for spec in pod_specs(obj):
        for c in spec.get("initContainers", ()):
            yield spec, c, "sidecar" if c.get("restartPolicy") == "Always" else "init"
        for c in spec.get("containers", ()):
            yield spec, c, "main"


def qscore_command(container: dict[str, Any]) -> tuple[str, ...] | None:
    command = [*container.get("command", ()), *container.get("args", ())]
    if command[:1] != ["qscore"]:
        return None
    words = []
    for word in command[1:]:
        if word.startswith("-"):
            break
        words.append(word)
    return tuple(words)


def environment(container: dict[str, Any], resources: list[dict[str, Any]]) -> dict[str, Any]:
    """Name -> value (a string, or the valueFrom mapping) as the container gets it: envFrom
    ConfigMaps first, then env."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in resources if o["kind"] == "ConfigMap"}
    env: dict[str, Any] = {}
    for source in container.get("envFrom", ()):
        env.update(maps.get((source.get("configMapRef") or {}).get("name"), {}))
    for var in container.get("env", ()):
        env[var["name"]] = var.get("value", var.get("valueFrom"))
    return env


def services(resources: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any],
                                                                tuple[str, ...]]]:
    """(Deployment, container, qscore command) of each qscore service container."""
    for obj in resources:
        if obj["kind"] == "Deployment":
            for _, c, role in containers(obj):
                if role == "main" and (command := qscore_command(c)) is not None:
                    yield obj, c, command


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    return ((obj.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels", {})


def startup_window_s(container: dict[str, Any]) -> int:
    """The longest start the startupProbe allows: its initial delay + period x failures."""
    probe = container.get("startupProbe") or {}
    return (probe.get("initialDelaySeconds", 0)
            + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3))


def drain_bound_s(command: tuple[str, ...], engine_timeout_s: float) -> float:
    """The longest a SIGTERM'd service takes to stop, from the bounded waits of its code:
    its pipelines' run (drain, abandon, commit) and stop (commit, close consumer and
    producer), its heartbeat tombstone and producer, and the worker's engine pool close
    plus a call stuck in an engine (which the engine timeout ends)."""
    p = PipelineSettings(group_id="bound")
    pipeline = (p.drain_timeout_s + p.close_timeout_s + p.commit_timeout_s
                + p.commit_timeout_s + 2 * p.close_timeout_s)
    send = inspect.signature(StatusPublisher).parameters["send_timeout_s"].default
    bound = pipeline + 2 * send
    if command == ("worker",):
        close = inspect.signature(EnginePool.close).parameters["timeout_s"].default
        return bound + close + engine_timeout_s
    return bound + TOKENIZER_POOL_CLOSE_S


def topic_groups(command: tuple[str, ...], env: dict[str, Any],
                 topics: Topics) -> dict[str, str]:
    """Topic -> consumer group, for every topic a tokenizer or worker consumes."""
    defaults = cli_envvars(command)
    if command == ("tokenizer",):
        group = env.get("QSCORE_TOKENIZER_GROUP", defaults["QSCORE_TOKENIZER_GROUP"])
        return {topics.queries: group, topics.queries_offline: group}
    group = env.get("QSCORE_WORKER_GROUP", defaults["QSCORE_WORKER_GROUP"])
    return {topics.tokens: group, topics.tokens_offline: f"{group}.offline"}


# -- the fleet's rules ---------------------------------------------------------------------

def rule_problems(resources: list[dict[str, Any]]) -> list[str]:
    return [*_container_problems(resources), *_secret_problems(resources),
            *_scaling_problems(resources), *_drain_problems(resources),
            *_wiring_problems(resources), *_strimzi_problems(resources)]


def _container_problems(resources: list[dict[str, Any]]) -> Iterator[str]:
    """Resources, probes, non-root, pinned images, env the command line really reads."""
    for obj in resources:
        for spec in pod_specs(obj):
            sc = spec.get("securityContext") or {}
            if sc.get("runAsNonRoot") is not True or sc.get("runAsUser") == 0:
                yield f"{name_of(obj)}: pod securityContext must set runAsNonRoot: true"
            if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                yield f"{name_of(obj)}: pod seccompProfile must be RuntimeDefault"
        for _, c, role in containers(obj):
            who = f"{name_of(obj)} container {c['name']}"
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(res.get(part) or {})
                if missing:
                    yield f"{who}: resources.{part} lacks {', '.join(sorted(missing))}"
            csc = c.get("securityContext") or {}
            if (csc.get("allowPrivilegeEscalation") is not False or csc.get("privileged")
                    or csc.get("runAsUser") == 0 or csc.get("runAsNonRoot") is False
                    or "ALL" not in (csc.get("capabilities") or {}).get("drop", ())
                    or csc.get("readOnlyRootFilesystem") is not True):
                yield (f"{who}: securityContext must forbid privilege escalation, drop ALL "
                       "capabilities, keep the root filesystem read-only and not run as root")
            _, tag, digest = split_image(c.get("image", ""))
            if not digest and tag in (None, "latest"):
                yield f"{who}: image {c.get('image')!r} must be pinned to a tag or digest"
            if obj["kind"] == "Deployment":
                yield from _probe_problems(who, c, role, environment(c, resources))
            if (command := qscore_command(c)) is not None:
                yield from _env_problems(who, c, command, resources)


def _probe_problems(who: str, c: dict[str, Any], role: str, env: dict[str, Any]) -> Iterator[str]:
    if role == "sidecar" and not c.get("livenessProbe"):
        yield f"{who}: a sidecar needs a livenessProbe"
    if role != "main":
        return
    wanted = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/readyz"}
    for probe, path in wanted.items():
        get = (c.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != path or get.get("port") != METRICS_PORT_NAME:
            yield f"{who}: {probe} must be GET {path} on port {METRICS_PORT_NAME!r}"
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", ())}
    if str(ports.get(METRICS_PORT_NAME)) != str(env.get("QSCORE_METRICS_PORT")):
        yield (f"{who}: port {METRICS_PORT_NAME!r} ({ports.get(METRICS_PORT_NAME)}) is not "
               f"QSCORE_METRICS_PORT ({env.get('QSCORE_METRICS_PORT')})")


def _env_problems(who: str, c: dict[str, Any], command: tuple[str, ...],
                  resources: list[dict[str, Any]]) -> Iterator[str]:
    if command not in cli_commands():
        yield f"{who}: `qscore {' '.join(command)}` is not a qscore command"
        return
    read, env = cli_envvars(command), environment(c, resources)
    for var in env:
        if var.startswith("QSCORE_") and var not in read and var not in PENDING_ENV:
            yield f"{who}: {var} is not read by `qscore {' '.join(command)}`"
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", ())}
    registry = mounts.get(env.get("QSCORE_ENGINE_DIR", ""), {})
    if command in (("worker",), ("tokenizer",)) and registry.get("readOnly") is not True:
        yield (f"{who}: QSCORE_ENGINE_DIR must be the registry volume, mounted read-only "
               "(services follow it; only `qscore engine` writes it)")


def _secret_problems(resources: list[dict[str, Any]]) -> Iterator[str]:
    """Secrets are created by the operator, reach containers only through secretKeyRef env
    vars (or volumes), and never sit in a ConfigMap, a plain env value or an argument."""
    for obj in resources:
        if obj["kind"] == "Secret":
            yield f"{name_of(obj)}: Secrets are never committed; create them (README)"
        if obj["kind"] == "ConfigMap":
            for key, value in (obj.get("data") or {}).items():
                if SECRET_NAME.search(key) or URL_CREDENTIALS.search(str(value)):
                    yield f"{name_of(obj)}: {key} looks like a secret; use a Secret"
        for _, c, _ in containers(obj):
            who = f"{name_of(obj)} container {c['name']}"
            from_secrets, defined = set(), set(environment({"envFrom": c.get("envFrom", [])},
                                                           resources))
            for var in c.get("env", ()):
                source = var.get("valueFrom") or {}
                if "secretKeyRef" in source:
                    from_secrets.add(var["name"])
                elif SECRET_NAME.search(var["name"]):
                    yield f"{who}: {var['name']} must come from a secretKeyRef"
                value = str(var.get("value", ""))
                refs = set(VAR_REF.findall(value))
                if refs - defined:
                    yield (f"{who}: {var['name']} refers to {', '.join(sorted(refs - defined))}, "
                           "not defined before it")
                # A URL's password may only be a secret's $(VAR): drop those, and any
                # password left over is in plain text (or in a variable that is no secret).
                if URL_CREDENTIALS.search(without_refs(value, from_secrets)):
                    yield f"{who}: {var['name']} holds credentials in plain text"
                defined.add(var["name"])
            for arg in [*c.get("command", ()), *c.get("args", ())]:
                if (re.search(r"--[\w-]*(password|secret|token)|--redis-url", arg)
                        or URL_CREDENTIALS.search(arg)
                        or set(VAR_REF.findall(arg)) & from_secrets):
                    yield f"{who}: argument {arg!r} would put a secret in the process list"


def without_refs(value: str, names: set[str]) -> str:
    """`value` without its $(NAME) references to `names`."""
    return VAR_REF.sub(lambda m: "" if m[1] in names else m[0], value)


def _scaling_problems(resources: list[dict[str, Any]]) -> Iterator[str]:
    deployments = {o["metadata"]["name"]: o for o in resources if o["kind"] == "Deployment"}
    for so in (o for o in resources if o["kind"] == "ScaledObject"):
        who, spec = name_of(so), so["spec"]
        partitions = int((so["metadata"].get("annotations") or {}).get("qscore/partitions", 0))
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if not partitions or low < 1 or partitions % low or partitions % high:
            yield (f"{who}: minReplicaCount {low} and maxReplicaCount {high} must divide the "
                   f"partitions (annotation qscore/partitions: {partitions or 'missing'})")
        behavior = (spec.get("advanced", {}).get("horizontalPodAutoscalerConfig") or {}).get(
            "behavior") or {}
        for way, frm, to in (("scaleUp", low, high), ("scaleDown", high, low)):
            if not _one_step(behavior.get(way) or {}, frm, to):
                yield (f"{who}: behavior.{way} must allow {frm} -> {to} replicas in one step "
                       "(a rate limit stops on counts that do not divide the partitions)")
        target = deployments.get(spec["scaleTargetRef"]["name"])
        if target is None:
            yield f"{who}: scaleTargetRef names no Deployment here"
            continue
        gpu = any("nvidia.com/gpu" in (c.get("resources") or {}).get("limits", {})
                  for _, c, _ in containers(target))
        if gpu:
            warmup = max(startup_window_s(c) for _, c, _ in containers(target))
            down = (behavior.get("scaleDown") or {}).get("stabilizationWindowSeconds", 300)
            if spec.get("cooldownPeriod", 300) <= warmup or down <= warmup:
                yield (f"{who}: cooldownPeriod {spec.get('cooldownPeriod', 300)} and scaleDown "
                       f"stabilizationWindowSeconds {down} must exceed a GPU pod's warm-up "
                       f"({warmup} s, its startupProbe's window)")
        yield from _trigger_problems(who, so, target, resources)


def _one_step(rules: dict[str, Any], frm: int, to: int) -> bool:
    if rules.get("selectPolicy") == "Disabled":
        return False
    policies = rules.get("policies")
    if policies is None:  # the HPA's defaults: +100% or +4 pods up, -100% down
        return to <= max(2 * frm, frm + 4) if to > frm else True
    change = abs(to - frm)
    return any((p["type"] == "Pods" and p["value"] >= change)
               or (p["type"] == "Percent" and p["value"] * frm >= change * 100)
               for p in policies)


def _trigger_problems(who: str, so: dict[str, Any], target: dict[str, Any],
                      resources: list[dict[str, Any]]) -> Iterator[str]:
    auths = {o["metadata"]["name"] for o in resources if o["kind"] == "TriggerAuthentication"}
    watched = {}
    for _, c, command in services([target]):
        env = environment(c, resources)
        topics = Topics.with_prefix(env.get("QSCORE_TOPIC_PREFIX", "qscore"))
        watched = topic_groups(command, env, topics)
        sasl = KEDA_SASL.get(env.get("QSCORE_KAFKA_SASL_MECHANISM", ""))
        tls = "enable" if env.get("QSCORE_KAFKA_SECURITY_PROTOCOL") in ("SSL", "SASL_SSL") \
            else "disable"
        for t in so["spec"]["triggers"]:
            meta, where = t["metadata"], f"{who} trigger {t.get('name', t['type'])}"
            if t["type"] != "kafka":
                continue
            wanted = {"bootstrapServers": env.get("QSCORE_KAFKA_BOOTSTRAP"),
                      "consumerGroup": watched.get(meta.get("topic")),
                      "ensureEvenDistributionOfPartitions": "true",
                      "offsetResetPolicy": "earliest", "sasl": sasl, "tls": tls}
            for key, value in wanted.items():
                if meta.get(key) != value:
                    yield f"{where}: {key} is {meta.get(key)!r}, the service's is {value!r}"
            if (t.get("authenticationRef") or {}).get("name") not in auths:
                yield f"{where}: authenticationRef names no TriggerAuthentication here"
    missing = set(watched) - {t["metadata"].get("topic") for t in so["spec"]["triggers"]}
    if missing:
        yield f"{who}: no trigger watches {', '.join(sorted(missing))}"


def _drain_problems(resources: list[dict[str, Any]]) -> Iterator[str]:
    for obj, c, command in services(resources):
        env = environment(c, resources)
        timeout = float(env.get("QSCORE_ENGINE_TIMEOUT",
                                cli_envvars(command).get("QSCORE_ENGINE_TIMEOUT") or 0))
        bound = drain_bound_s(command, timeout)
        grace = obj["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        if grace <= bound:
            yield (f"{name_of(obj)}: terminationGracePeriodSeconds {grace} must exceed the "
                   f"drain's bound, {bound:g} s")
        gpus = (c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu")
        on_gpu = env.get("QSCORE_BACKEND") in ("torch", "tensorrt")
        if on_gpu != bool(gpus):
            yield f"{name_of(obj)}: QSCORE_BACKEND {env.get('QSCORE_BACKEND')} with GPUs {gpus}"
        if gpus is not None:
            spec = obj["spec"]["template"]["spec"]
            if str(gpus) != "1" or len(str(env.get("QSCORE_DEVICES", "")).split(",")) != 1:
                yield f"{name_of(obj)}: one worker per GPU: nvidia.com/gpu 1, one QSCORE_DEVICES"
            if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", ())):
                yield f"{name_of(obj)}: needs the toleration nvidia.com/gpu"
            if not spec.get("nodeSelector"):
                yield f"{name_of(obj)}: needs a GPU nodeSelector"


def _wiring_problems(resources: list[dict[str, Any]]) -> Iterator[str]:
    """PDBs, the metrics Service and ServiceMonitor, and KEDA's credentials each point at
    what exists and is used."""
    pods = [(o, pod_labels(o)) for o in resources if o["kind"] == "Deployment"]
    for pdb in (o for o in resources if o["kind"] == "PodDisruptionBudget"):
        chosen = [d for d, labels in pods
                  if selects(pdb["spec"]["selector"].get("matchLabels", {}), labels)]
        if len(chosen) != 1:
            yield f"{name_of(pdb)}: selects {len(chosen)} Deployments, not 1"
    svcs = [o for o in resources if o["kind"] == "Service"]
    for sm in (o for o in resources if o["kind"] == "ServiceMonitor"):
        svc = [s for s in svcs if selects(sm["spec"]["selector"].get("matchLabels", {}),
                                          s["metadata"].get("labels", {}))]
        ports = {p.get("name") for s in svc for p in s["spec"].get("ports", ())}
        if not svc or any(e.get("port") not in ports for e in sm["spec"]["endpoints"]):
            yield f"{name_of(sm)}: selects no Service with the endpoints' ports"
        for s in svc:
            scraped = {c.get("name") for d, labels in pods if selects(s["spec"]["selector"], labels)
                       for _, c, _ in services([d])}
            served = {c["name"] for _, c, _ in services(resources)}
            if scraped != served:
                yield f"{name_of(s)}: selects {sorted(scraped)}, not every service {sorted(served)}"
    refs = {(v["name"], v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"][
        "key"]) for _, c, _ in services(resources) for v in c.get("env", ())
        if "secretKeyRef" in (v.get("valueFrom") or {})}
    cas = {v["secret"]["secretName"] for d, _ in pods for s in pod_specs(d)
           for v in s.get("volumes", ()) if v["name"] == "kafka-ca" and "secret" in v}
    for ta in (o for o in resources if o["kind"] == "TriggerAuthentication"):
        params = {r["parameter"]: (r["name"], r["key"]) for r in ta["spec"].get(
            "secretTargetRef", ())}
        for param, var in (("username", "QSCORE_KAFKA_SASL_USERNAME"),
                           ("password", "QSCORE_KAFKA_SASL_PASSWORD")):
            if not {(var, *params.get(param, ("", "")))} <= refs:
                yield f"{name_of(ta)}: {param} is not the Secret key the services' {var} reads"
        if "ca" in params and {params["ca"][0]} != cas:
            yield f"{name_of(ta)}: ca {params['ca'][0]} is not the services' CA {sorted(cas)}"


def _strimzi_problems(resources: list[dict[str, Any]]) -> Iterator[str]:
    kafkas = {o["metadata"]["name"]: o for o in resources if o["kind"] == "Kafka"}
    if not kafkas:
        return
    for obj in resources:
        cluster = obj["metadata"].get("labels", {}).get("strimzi.io/cluster")
        if obj["apiVersion"].startswith("kafka.strimzi.io/") and obj["kind"] != "Kafka" \
                and cluster not in kafkas:
            yield f"{name_of(obj)}: strimzi.io/cluster {cluster!r} names no Kafka here"
    partitions = {int(o["metadata"]["annotations"]["qscore/partitions"])
                  for o in resources if o["kind"] == "ScaledObject"}
    for _, c, _ in list(services(resources))[:1]:  # the services share their Kafka settings
        env = environment(c, resources)
        topics = Topics.with_prefix(env.get("QSCORE_TOPIC_PREFIX", "qscore"))
        made = {o["spec"].get("topicName", o["metadata"]["name"]): o["spec"]
                for o in resources if o["kind"] == "KafkaTopic"}
        if set(made) != set(topics.all()):
            yield f"KafkaTopics {sorted(made)} are not the fleet's topics {sorted(topics.all())}"
        for name, spec in made.items():
            if name == topics.status:
                config = {k: str(v) for k, v in spec.get("config", {}).items()}
                if {k: config.get(k) for k in STATUS_TOPIC_CONFIG} != STATUS_TOPIC_CONFIG \
                        or "compact" not in config.get("cleanup.policy", "").split(","):
                    yield f"KafkaTopic {name}: config must be compacted as {STATUS_TOPIC_CONFIG}"
            elif {spec.get("partitions")} != partitions:
                yield f"KafkaTopic {name}: {spec.get('partitions')} partitions, scalers say " \
                      f"{sorted(partitions)}"
        listeners = {f"{k}-kafka-bootstrap:{lst['port']}" for k, o in kafkas.items()
                     for lst in o["spec"]["kafka"]["listeners"]}
        if env.get("QSCORE_KAFKA_BOOTSTRAP") not in listeners:
            yield f"{c['name']}: QSCORE_KAFKA_BOOTSTRAP is not one of {sorted(listeners)}"


# -- the tests ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def units() -> dict[str, list[dict[str, Any]]]:
    return dict(rendered_units(K8S))


@pytest.mark.parametrize("unit", [u for u in UNITS if u != "dashboard"])
def test_every_overlay_renders(unit: str, units: dict[str, list[dict[str, Any]]]) -> None:
    assert units[unit], f"{unit} rendered nothing"
    for obj in units[unit]:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "qscore", name_of(obj)


def test_dashboard_configmap_is_built_from_the_grafana_json() -> None:
    if not DASHBOARD_JSON.exists():
        pytest.skip(f"{DASHBOARD_JSON.relative_to(ROOT)} does not exist yet (written with the "
                    "compose set-up); its ConfigMap cannot be rendered")
    [cm] = render_unit(K8S, "dashboard")
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["qscore.json"]) == json.loads(DASHBOARD_JSON.read_text())
    assert len(json.dumps(cm).encode()) < 1_000_000  # a ConfigMap holds at most 1 MiB


def test_pending_variables_are_still_pending() -> None:
    for var in PENDING_ENV:
        readers = [" ".join(c) for c in cli_commands() if var in cli_envvars(c)]
        assert readers == [], (f"`qscore {readers[0]}` reads {var} now: remove it from "
                               "PENDING_ENV in this file")


def test_builtin_resources_meet_the_kubernetes_schemas(units: dict[str, Any]) -> None:
    assert kubernetes_validate.utils.major_minor(K8S_VERSION) in {
        kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    for unit, resources in units.items():
        assert builtin_problems(resources) == [], unit


def test_custom_resources_meet_our_schemas(units: dict[str, Any]) -> None:
    kinds = set()
    for unit, resources in units.items():
        assert custom_problems(resources, K8S / "schemas") == [], unit
        kinds |= {o["kind"] for o in resources if not is_builtin(o["apiVersion"])}
    assert kinds >= {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "Kafka",
                     "KafkaTopic"}


def test_our_schemas_are_valid_json_schemas() -> None:
    _, loaded = schema_registry(K8S / "schemas")
    assert len(loaded) >= 8
    for name, schema in loaded.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$id"].endswith("/" + name), name


def test_yamllint() -> None:
    assert yamllint_problems(K8S) == []


def test_fleet_rules(units: dict[str, Any]) -> None:
    for unit, resources in units.items():
        assert rule_problems(resources) == [], unit


def test_replica_bounds_divide_the_stated_partitions(units: dict[str, Any]) -> None:
    stated = {int(o["metadata"]["annotations"]["qscore/partitions"])
              for resources in units.values() for o in resources if o["kind"] == "ScaledObject"}
    assert stated == {12}  # as README.md says
    for resources in units.values():
        for so in (o for o in resources if o["kind"] == "ScaledObject"):
            assert 12 % so["spec"]["minReplicaCount"] == 0
            assert 12 % so["spec"]["maxReplicaCount"] == 0


def test_gpu_cooldown_outlasts_warmup_and_grace_outlasts_drain(units: dict[str, Any]) -> None:
    resources = units["overlays/gpu"]
    worker = next(o for o in resources if name_of(o) == "Deployment/qscore-worker")
    scaler = next(o for o in resources if name_of(o) == "ScaledObject/qscore-worker")
    [(_, c, _)] = list(containers(worker))
    assert scaler["spec"]["cooldownPeriod"] > startup_window_s(c) >= 300
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain_bound_s(("worker",), float(environment(c, resources)[
        "QSCORE_ENGINE_TIMEOUT"])) > PipelineSettings(group_id="g").drain_timeout_s


# -- the renderer itself ---------------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: app, labels: {a: "1"}}
spec:
  template:
    spec:
      containers:
        - name: app
          image: app:1
          env: [{name: A, value: "1"}, {name: B, value: "2"}]
          volumeMounts: [{name: v, mountPath: /v}]
        - {name: side, image: side}
      tolerations: [{key: x, operator: Exists}]
"""


def test_render_resources_namespace_labels_images_and_patches(tmp_path: Path) -> None:
    write(tmp_path / "base/app.yaml", DEPLOYMENT)
    write(tmp_path / "base/cr.yaml", "apiVersion: x.io/v1\nkind: Thing\nmetadata: {name: t}\n"
                                     "spec: {items: [1, 2], keep: 1}\n")
    write(tmp_path / "base/kustomization.yaml", "resources: [app.yaml, cr.yaml]\n"
                                                "namespace: one\n")
    write(tmp_path / "over/patch.yaml", """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  template:
    spec:
      containers:
        - name: app
          env: [{name: B, value: "3"}, {name: A, $patch: delete}, {name: C, value: "4"}]
          volumeMounts: [{mountPath: /v, readOnly: true}]
        - {name: new, image: new:2}
      tolerations: [{key: y, operator: Exists}]
""")
    write(tmp_path / "over/cr-patch.yaml", "apiVersion: x.io/v1\nkind: Thing\nmetadata: {name: t}"
                                           "\nspec: {items: [3], keep: null}\n")
    write(tmp_path / "over/kustomization.yaml", """\
resources: [../base]
namespace: two
patches: [{path: patch.yaml}, {path: cr-patch.yaml}]
labels: [{pairs: {fleet: cpu}, includeTemplates: true}]
images: [{name: side, newName: reg/side, newTag: "9"}]
""")
    app_, thing = render(tmp_path / "over")
    c = {x["name"]: x for x in app_["spec"]["template"]["spec"]["containers"]}
    assert c["app"]["env"] == [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]
    assert c["app"]["volumeMounts"] == [{"name": "v", "mountPath": "/v", "readOnly": True}]
    assert c["side"]["image"] == "reg/side:9" and c["new"]["image"] == "new:2"
    assert app_["spec"]["template"]["spec"]["tolerations"] == [{"key": "y", "operator": "Exists"}]
    assert app_["metadata"] == {"name": "app", "labels": {"a": "1", "fleet": "cpu"},
                                "namespace": "two"}
    assert app_["spec"]["template"]["metadata"]["labels"] == {"fleet": "cpu"}
    assert thing["spec"] == {"items": [3]}  # a custom resource: lists replaced, null deletes
    assert dump([thing]).startswith("apiVersion: x.io/v1\nkind: Thing\n")


def test_render_generator_and_delete(tmp_path: Path) -> None:
    write(tmp_path / "k/data.json", '{"a": 1}\n')
    write(tmp_path / "k/pvc.yaml", "apiVersion: v1\nkind: PersistentVolumeClaim\n"
                                   "metadata: {name: gone}\n")
    write(tmp_path / "k/del.yaml", "apiVersion: v1\nkind: PersistentVolumeClaim\n"
                                   "metadata: {name: gone}\n$patch: delete\n")
    write(tmp_path / "k/kustomization.yaml", """\
resources: [pvc.yaml]
patches: [{path: del.yaml}]
generatorOptions: {disableNameSuffixHash: true, labels: {l: "1"}}
configMapGenerator: [{name: cm, files: [d.json=data.json], literals: [K=V]}]
""")
    [cm] = render(tmp_path / "k")
    assert cm == {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": "cm", "labels": {"l": "1"}},
                  "data": {"d.json": '{"a": 1}\n', "K": "V"}}


@pytest.mark.parametrize(("kustomization", "files", "message"), [
    ("resources: [a.yaml]\nnamePrefix: x-\n", {}, "namePrefix not supported"),
    ("resources: [../out.yaml]\n", {"out.yaml": DEPLOYMENT}, "not in or below"),
    ("resources: [a.yaml, b.yaml]\n", {"k/b.yaml": DEPLOYMENT}, "already registered id"),
    ("resources: [a.yaml]\npatches: [{path: p.yaml}]\n",
     {"k/p.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: nope}\n"},
     "failed to find unique target"),
    ("configMapGenerator: [{name: c, literals: [A=1]}]\n", {}, "disableNameSuffixHash"),
    ("resources: [https://example.com/x.yaml]\n", {}, "remote resource"),
])
def test_render_refuses_what_it_does_not_do(tmp_path: Path, kustomization: str,
                                            files: dict[str, str], message: str) -> None:
    write(tmp_path / "k/a.yaml", DEPLOYMENT)
    for name, text in files.items():
        write(tmp_path / name, text)
    write(tmp_path / "k/kustomization.yaml", kustomization)
    with pytest.raises(KustomizeError, match=message):
        render(tmp_path / "k")


def test_a_patch_finds_a_resource_a_base_moved_into_a_namespace(tmp_path: Path) -> None:
    write(tmp_path / "base/a.yaml", DEPLOYMENT)
    write(tmp_path / "base/kustomization.yaml", "resources: [a.yaml]\nnamespace: ns\n")
    write(tmp_path / "o/p.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\n"
                                 "spec: {replicas: 3}\n")
    write(tmp_path / "o/kustomization.yaml", "resources: [../base]\npatches: [{path: p.yaml}]\n")
    [app_] = render(tmp_path / "o")
    assert app_["spec"]["replicas"] == 3 and app_["metadata"]["namespace"] == "ns"


# -- and each validator fails on a broken copy --------------------------------------------------

@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """A copy of deploy/ (k8s, and the dashboard's JSON when there is one) to break."""
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    return tmp_path / "deploy" / "k8s"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_a_typo_in_a_deployment_fails_kubernetes_validation(broken: Path) -> None:
    edit(broken / "overlays/gpu/worker.yaml", "terminationGracePeriodSeconds:",
         "terminationGracePeriodSecond:")
    problems = builtin_problems(render_unit(broken, "overlays/gpu"))
    assert problems == ["Deployment/qscore-worker: spec.template.spec: Additional properties are "
                        "not allowed ('terminationGracePeriodSecond' was unexpected)"]


def test_a_missing_required_field_fails_the_custom_resource_schema(broken: Path) -> None:
    edit(broken / "overlays/cpu/worker-scaling.yaml",
         "  scaleTargetRef:\n    name: qscore-worker\n", "")
    edit(broken / "base/tokenizer-scaling.yaml", 'lagThreshold: "5000"', 'lagTreshold: "5000"')
    problems = custom_problems(render_unit(broken, "overlays/cpu"), broken / "schemas")
    assert "ScaledObject/qscore-worker: spec: 'scaleTargetRef' is a required property" in problems
    assert any(p.startswith("ScaledObject/qscore-tokenizer: spec.triggers.0.metadata: "
                            "Additional properties are not allowed ('lagTreshold' was")
               for p in problems), problems


def test_a_removed_probe_and_a_broken_rule_fail_the_fleet_rules(broken: Path) -> None:
    edit(broken / "base/tokenizer.yaml", """          readinessProbe:
            httpGet:
              path: /readyz
              port: metrics
            periodSeconds: 5
            timeoutSeconds: 2
            failureThreshold: 2
""", "")
    edit(broken / "overlays/gpu/worker-scaling.yaml", "cooldownPeriod: 900", "cooldownPeriod: 120")
    edit(broken / "overlays/gpu/worker-scaling.yaml", "maxReplicaCount: 6", "maxReplicaCount: 5")
    edit(broken / "overlays/gpu/worker.yaml", "terminationGracePeriodSeconds: 180",
         "terminationGracePeriodSeconds: 60")
    problems = rule_problems(render_unit(broken, "overlays/gpu"))
    assert problems == [
        "Deployment/qscore-tokenizer container tokenizer: readinessProbe must be GET /readyz on "
        "port 'metrics'",
        "ScaledObject/qscore-worker: minReplicaCount 2 and maxReplicaCount 5 must divide the "
        "partitions (annotation qscore/partitions: 12)",
        "ScaledObject/qscore-worker: cooldownPeriod 120 and scaleDown stabilizationWindowSeconds "
        "900 must exceed a GPU pod's warm-up (600 s, its startupProbe's window)",
        "Deployment/qscore-worker: terminationGracePeriodSeconds 60 must exceed the drain's "
        "bound, 140 s",
    ]


def test_secrets_in_the_open_fail_the_fleet_rules(broken: Path) -> None:
    edit(broken / "base/config.yaml", "QSCORE_LOG_LEVEL: info",
         "QSCORE_LOG_LEVEL: info\n  QSCORE_REDIS_URL: redis://:hunter2@redis:6379/0")
    edit(broken / "base/tokenizer.yaml", 'command: ["qscore", "tokenizer"]',
         'command: ["qscore", "tokenizer", "--sasl-password", "$(QSCORE_KAFKA_SASL_PASSWORD)"]')
    edit(broken / "overlays/cpu/worker.yaml", "value: redis://:$(REDIS_PASSWORD)@",
         "value: redis://:$(REDIS_PASWORD)@")
    problems = rule_problems(render_unit(broken, "overlays/cpu"))
    assert "ConfigMap/qscore-config: QSCORE_REDIS_URL looks like a secret; use a Secret" in problems
    assert ("Deployment/qscore-tokenizer container tokenizer: argument '--sasl-password' would "
            "put a secret in the process list") in problems
    assert ("Deployment/qscore-worker container worker: QSCORE_REDIS_URL refers to REDIS_PASWORD, "
            "not defined before it") in problems


def test_an_env_var_the_command_line_does_not_read_fails(broken: Path) -> None:
    edit(broken / "overlays/cpu/worker.yaml", "name: QSCORE_ENGINES\n",
         "name: QSCORE_ENGINE_COUNT\n")
    problems = rule_problems(render_unit(broken, "overlays/cpu"))
    assert problems == ["Deployment/qscore-worker container worker: QSCORE_ENGINE_COUNT is not "
                        "read by `qscore worker`"]


def test_yamllint_fails_on_bad_yaml(broken: Path) -> None:
    edit(broken / "base/disruption.yaml", "  maxUnavailable: 1\n", "  maxUnavailable: 1   \n")
    problems = yamllint_problems(broken)
    assert problems == ["base/disruption.yaml:13:20: error: trailing spaces (trailing-spaces)"]


def test_strimzi_topics_follow_the_code(broken: Path) -> None:
    resources = render_unit(broken, "overlays/strimzi")
    assert rule_problems(resources) == []
    bad = copy.deepcopy(resources)
    status = next(o for o in bad if o["kind"] == "KafkaTopic" and o["metadata"]["name"].endswith(
        ".status"))
    status["spec"]["config"]["cleanup.policy"] = "delete"
    del bad[bad.index(next(o for o in bad if o["metadata"]["name"] == "qscore.dead-letter"))]
    assert sorted(rule_problems(bad)) == sorted([
        f"KafkaTopics {sorted(set(Topics().all()) - {'qscore.dead-letter'})} are not the "
        f"fleet's topics {sorted(Topics().all())}",
        f"KafkaTopic qscore.status: config must be compacted as {STATUS_TOPIC_CONFIG}",
    ])
