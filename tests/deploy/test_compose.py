"""deploy/compose/: the one-host fleet's compose file, checked offline.

No Docker engine is reachable from CI, so `docker compose config` cannot run. The file is
validated against the Compose Specification's JSON schema (the copy check-jsonschema ships as
`vendor.compose-spec`: unknown keys and wrong types are errors), then against rules of our own
that a schema cannot express: every service has a health check (the qscore ones their
/healthz), no secret is written in the file or passed as an argument, every image is pinned by
a tag, Kafka is a consistent one-node KRaft quorum, the services start after the topics exist,
Grafana's provisioning and dashboards exist where they are mounted from, Prometheus scrapes
each service on its metrics port, and .env.example names every variable the file requires.
Each check returns the problems it found, so the last tests show each one failing on a
broken copy.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
PROMETHEUS = COMPOSE_DIR / "prometheus.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
# qscore-cpu, qscore-gpu, qscore-engine-builder: the image names deploy/k8s uses too.
QSCORE_IMAGE = "qscore-"
SECRET_NAME = re.compile(r"(^|_)(PASSWORD|SECRET|TOKEN|CREDENTIALS?|AUTH|API_KEY)(_|$)",
                         re.IGNORECASE)
SECRET_FLAGS = ("--sasl-password", "--redis-url", "--requirepass", "--password", "-a")
URL_PASSWORD = re.compile(r"://[^/@\s:]*:([^/@\s]+)@")
ONLY_VARIABLE = re.compile(r"\$\{\w+(:?[-?][^}]*)?\}")
VARIABLE = re.compile(r"(?<!\$)\$\{(\w+)(:?[-?])?([^}]*)\}")


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


# -- reading the compose file ----------------------------------------------------------------
def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def words(value: Any) -> list[str]:
    return value.split() if isinstance(value, str) else [str(v) for v in value or ()]


def is_qscore(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith(QSCORE_IMAGE)


def is_one_shot(service: dict[str, Any]) -> bool:
    return service.get("restart", "no") == "no"


def bind_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(host source, container target) of each relative bind mount."""
    for volume in service.get("volumes") or ():
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
        else:
            source, target = volume.get("source", ""), volume.get("target", "")
        if source.startswith("."):
            yield source, target


def strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, value) of every string in a YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from strings(value, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


# -- our rules -------------------------------------------------------------------------------
def health_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    for name, service in doc["services"].items():
        check = service.get("healthcheck")
        if not check:
            problems.append(f"{name}: no healthcheck")
        elif check.get("disable"):
            if not is_one_shot(service):
                problems.append(f"{name}: healthcheck disabled on a long-running service")
        elif is_qscore(service) and "qscore-healthcheck" not in words(check.get("test")):
            problems.append(f"{name}: the healthcheck does not ask the service's /healthz "
                            "(qscore-healthcheck)")
    return problems


def image_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    for name, service in doc["services"].items():
        image = str(service.get("image", ""))
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        if not image or "$" in image or not tag or tag == "latest":
            problems.append(f"{name}: image {image!r} is not pinned by a tag")
    return problems


def secret_problems(doc: dict[str, Any]) -> list[str]:
    """No secret value in the file: secret-named variables and passwords inside URLs are
    `${VAR}` references (filled from .env), no secret travels in a command's arguments, and
    no top-level secret or config carries inline content."""
    problems = []
    for name, service in doc["services"].items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key) and value and not ONLY_VARIABLE.fullmatch(value):
                problems.append(f"{name}: {key} has an inline value")
        for key in ("command", "entrypoint"):
            for word in words(service.get(key)):
                flag = word.split("=")[0]
                if flag in SECRET_FLAGS:
                    problems.append(f"{name}: {key} passes {flag} as an argument (use the "
                                    "environment)")
    for path, value in strings(doc):
        for password in URL_PASSWORD.findall(value):
            if not ONLY_VARIABLE.fullmatch(password):
                problems.append(f"{path}: a URL carries an inline password")
    for kind in ("secrets", "configs"):
        for name, item in (doc.get(kind) or {}).items():
            if "content" in (item or {}):
                problems.append(f"{kind}.{name}: inline content")
    return problems


def kafka_problems(doc: dict[str, Any]) -> list[str]:
    """A one-node KRaft quorum whose listeners agree, internal topics at replication 1."""
    env = environment(doc["services"].get("kafka", {}))
    problems = []
    if set(env.get("KAFKA_PROCESS_ROLES", "").split(",")) != {"broker", "controller"}:
        problems.append("kafka: KAFKA_PROCESS_ROLES is not broker,controller")
    voters = env.get("KAFKA_CONTROLLER_QUORUM_VOTERS", "")
    if voters.split("@")[0] != env.get("KAFKA_NODE_ID"):
        problems.append(f"kafka: quorum voters {voters!r} do not name KAFKA_NODE_ID")
    listeners = {ln.split("://")[0] for ln in env.get("KAFKA_LISTENERS", "").split(",") if ln}
    mapped = {m.split(":")[0] for m in env.get("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
                                               "").split(",") if m}
    advertised = {ln.split("://")[0] for ln in env.get("KAFKA_ADVERTISED_LISTENERS",
                                                       "").split(",") if ln}
    controller = env.get("KAFKA_CONTROLLER_LISTENER_NAMES", "")
    if not {"PLAINTEXT", "CONTROLLER"} <= listeners or not listeners <= mapped:
        problems.append(f"kafka: listeners {sorted(listeners)} need PLAINTEXT and CONTROLLER, "
                        "each in the security protocol map")
    if controller not in listeners or controller in advertised or not advertised <= listeners:
        problems.append("kafka: advertised listeners must be listeners other than the "
                        "controller's")
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
        if env.get(key) != "1":
            problems.append(f"kafka: {key} is not 1 (one broker)")
    return problems


def start_order_problems(doc: dict[str, Any]) -> list[str]:
    """Every depends_on names a service; long-running qscore services wait for the topics."""
    services = doc["services"]
    problems = []
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for other in depends:
            if other not in services:
                problems.append(f"{name}: depends on {other}, which is not a service")
        if is_qscore(service) and not is_one_shot(service):
            condition = (depends.get("topics") or {}).get("condition") if isinstance(
                depends, dict) else None
            if condition != "service_completed_successfully":
                problems.append(f"{name}: does not wait for the topics service to complete")
    return problems


def grafana_problems(doc: dict[str, Any], base: Path) -> list[str]:
    """Grafana's mounts come from files that exist, its data source is the Prometheus service,
    and its dashboard provider and home dashboard point into the mounted dashboards."""
    grafana = doc["services"].get("grafana")
    if grafana is None:
        return ["no grafana service"]
    problems, mounts = [], dict((target, source) for source, target in bind_mounts(grafana))
    for target, source in mounts.items():
        if not (base / source).exists():
            problems.append(f"grafana: mounts {source} at {target}, which does not exist")

    def host(container_dir: str) -> Path | None:
        for target, source in mounts.items():
            if container_dir == target or container_dir.startswith(target + "/"):
                return base / source / container_dir[len(target):].lstrip("/")
        return None

    for kind in ("datasources", "dashboards"):
        folder = host(f"/etc/grafana/provisioning/{kind}")
        if folder is None or not folder.is_dir() or not any(folder.glob("*.y*ml")):
            problems.append(f"grafana: nothing mounted at /etc/grafana/provisioning/{kind}")
            continue
        for item in folder.glob("*.y*ml"):
            provisioning = yaml.safe_load(item.read_text())
            for source in provisioning.get("datasources") or ():
                url = re.match(r"https?://([\w.-]+):(\d+)", source.get("url", ""))
                if not url or url.group(1) not in doc["services"]:
                    problems.append(f"grafana: data source {source.get('url')!r} is not a "
                                    "service of this file")
            for provider in provisioning.get("providers") or ():
                path = (provider.get("options") or {}).get("path", "")
                dashboards = host(path)
                if dashboards is None or not any(dashboards.glob("*.json")):
                    problems.append(f"grafana: provider path {path} holds no mounted "
                                    "dashboard")
    home = environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home and ((file := host(home)) is None or not file.is_file()):
        problems.append(f"grafana: home dashboard {home} is not a mounted file")
    return problems


def scrape_problems(doc: dict[str, Any], prometheus: dict[str, Any]) -> list[str]:
    """Each long-running qscore service is scraped on its QSCORE_METRICS_PORT (by its name or a
    network alias), and every scrape target names a service."""
    names: dict[str, set[int]] = {}
    for job in prometheus.get("scrape_configs") or ():
        for sd in job.get("dns_sd_configs") or ():
            for name in sd.get("names") or ():
                names.setdefault(name, set()).add(int(sd.get("port", 0)))
    known = set()
    problems = []
    for name, service in doc["services"].items():
        aliases = {name} | {a for net in (service.get("networks") or {}).values()
                            if isinstance(net, dict) for a in net.get("aliases") or ()}
        known |= aliases
        if not is_qscore(service) or is_one_shot(service):
            continue
        port = environment(service).get("QSCORE_METRICS_PORT")
        if not port:
            problems.append(f"{name}: no QSCORE_METRICS_PORT (no metrics, no health check)")
        elif not any(int(port) in names.get(alias, ()) for alias in aliases):
            problems.append(f"{name}: Prometheus does not scrape it on port {port}")
    problems += [f"prometheus: scrapes {name}, which is not a service or alias"
                 for name in names if name not in known]
    return problems


def env_example_problems(text: str, example: str) -> list[str]:
    """Variables the file requires (`${VAR:?...}`) are in .env.example; secrets are blank
    there."""
    given = dict(line.partition("=")[::2] for line in example.splitlines()
                 if "=" in line and not line.startswith("#"))
    problems = []
    for name, operator, _ in VARIABLE.findall(text):
        if operator.endswith("?") and name not in given:
            problems.append(f"${{{name}}} is required but not in .env.example")
    problems += [f".env.example: {k} has a value (leave secrets blank)"
                 for k, v in given.items() if SECRET_NAME.search(k) and v.strip()]
    return problems


def all_problems(doc: dict[str, Any], prometheus: dict[str, Any], base: Path) -> list[str]:
    return [*health_problems(doc), *image_problems(doc), *secret_problems(doc),
            *kafka_problems(doc), *start_order_problems(doc), *grafana_problems(doc, base),
            *scrape_problems(doc, prometheus)]


# -- the checks --------------------------------------------------------------------------------
def test_compose_file_meets_the_compose_specification() -> None:
    result = compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_follows_our_rules() -> None:
    assert all_problems(load(COMPOSE), load(PROMETHEUS), COMPOSE_DIR) == []


def test_env_example_names_every_required_variable() -> None:
    assert env_example_problems(COMPOSE.read_text(), ENV_EXAMPLE.read_text()) == []


def test_profiles_split_cpu_and_gpu_workers() -> None:
    services = load(COMPOSE)["services"]
    assert services["worker"]["profiles"] == ["cpu"]
    gpu = services["worker-gpu-0"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["device_ids"] == ["0"]
    assert "profiles" not in services["tokenizer"]  # tokenizers serve either profile


# -- each check fails on a broken copy -----------------------------------------------------------
def test_schema_fails_on_a_typo(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    stop_grace_period: 60s\n",
                                                  "    stop_grace_periode: 60s\n", 1))
    result = compose_schema(broken)
    assert result.returncode == 1
    assert "stop_grace_periode" in result.stdout, result.stdout


def test_schema_fails_on_a_wrong_type(tmp_path: Path) -> None:
    doc = load(COMPOSE)
    doc["services"]["kafka"]["ports"] = {"9094": 9094}
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(doc))
    result = compose_schema(broken)
    assert result.returncode == 1 and "ports" in result.stdout, result.stdout


def _broken(edit: Any) -> list[str]:
    doc, prometheus = copy.deepcopy(load(COMPOSE)), load(PROMETHEUS)
    edit(doc, prometheus)
    return all_problems(doc, prometheus, COMPOSE_DIR)


BREAKAGES = {
    "tokenizer: no healthcheck":
        lambda d, p: d["services"]["tokenizer"].pop("healthcheck"),
    "worker: the healthcheck does not ask":
        lambda d, p: d["services"]["worker"].update(
            healthcheck={"test": ["CMD", "true"]}),
    "redis: image 'redis:latest' is not pinned":
        lambda d, p: d["services"]["redis"].update(image="redis:latest"),
    "grafana: image 'grafana/grafana' is not pinned":
        lambda d, p: d["services"]["grafana"].update(image="grafana/grafana"),
    "a URL carries an inline password":
        lambda d, p: d["services"]["tokenizer"]["environment"].update(
            QSCORE_REDIS_URL="redis://:hunter2@redis:6379/0"),
    "redis: REDISCLI_AUTH has an inline value":
        lambda d, p: d["services"]["redis"]["environment"].update(REDISCLI_AUTH="hunter2"),
    "worker: command passes --sasl-password":
        lambda d, p: d["services"]["worker"].update(
            command=["worker", "--sasl-password", "hunter2"]),
    "kafka: quorum voters":
        lambda d, p: d["services"]["kafka"]["environment"].update(
            KAFKA_CONTROLLER_QUORUM_VOTERS="2@kafka:9093"),
    "kafka: KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR is not 1":
        lambda d, p: d["services"]["kafka"]["environment"].update(
            KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR=3),
    "kafka: advertised listeners":
        lambda d, p: d["services"]["kafka"]["environment"].update(
            KAFKA_ADVERTISED_LISTENERS="PLAINTEXT://kafka:9092,CONTROLLER://kafka:9093"),
    "worker: does not wait for the topics":
        lambda d, p: d["services"]["worker"]["depends_on"].pop("topics"),
    "grafana: mounts ../grafana/dashboard":
        lambda d, p: d["services"]["grafana"].update(volumes=[
            v.replace("grafana/dashboards:", "grafana/dashboard:")
            for v in d["services"]["grafana"]["volumes"]]),
    "tokenizer: Prometheus does not scrape it on port 9101":
        lambda d, p: p["scrape_configs"][0]["dns_sd_configs"][0].update(port=9100),
    "prometheus: scrapes tokenizers":
        lambda d, p: p["scrape_configs"][0]["dns_sd_configs"][0].update(names=["tokenizers"]),
}


@pytest.mark.parametrize("expected", sorted(BREAKAGES))
def test_our_rules_fail_on_a_broken_copy(expected: str) -> None:
    problems = _broken(BREAKAGES[expected])
    assert any(p.startswith(expected) or expected in p for p in problems), problems


def test_env_example_check_fails_on_a_missing_or_filled_secret() -> None:
    example = ENV_EXAMPLE.read_text()
    missing = env_example_problems(COMPOSE.read_text(),
                                   example.replace("GRAFANA_ADMIN_PASSWORD=\n", ""))
    assert missing == ["${GRAFANA_ADMIN_PASSWORD} is required but not in .env.example"]
    filled = env_example_problems(COMPOSE.read_text(),
                                  example.replace("REDIS_PASSWORD=\n", "REDIS_PASSWORD=x\n"))
    assert filled == [".env.example: REDIS_PASSWORD has a value (leave secrets blank)"]
