"""`qscore up`'s fleet without starting it: secrets reach services by environment, never by
command line (readable by any user in `ps`), and the start-up panel masks them."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import engines.select
import qscore.local.fleet
from qscore.cli.app import app
from qscore.local.fleet import FleetSpec, LocalFleet, ServiceProcess

URL = "redis://:s3cret-pw@cache.example:6379/0"


def _fleet(redis_url: str | None) -> LocalFleet:
    return LocalFleet(FleetSpec(artifact=Path("engine"), bootstrap_servers="127.0.0.1:9092",
                                redis_url=redis_url, worker_args=("--threads", "1")))


@pytest.mark.parametrize("kind", ["tokenizer", "worker"])
def test_services_get_the_redis_url_in_their_environment_only(kind: str) -> None:
    service = _fleet(URL).service(kind, 0)
    assert service.args[0] == kind and "--bootstrap-servers" in service.args
    assert not any("s3cret" in arg or arg.startswith("--redis-url") for arg in service.args)
    assert service.env["QSCORE_REDIS_URL"] == URL


def test_a_fleet_without_redis_overrides_an_inherited_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QSCORE_REDIS_URL", "redis://elsewhere:6379/0")
    # "" reads as unset (no cache), as the panel's "in-process" says.
    assert _fleet(None).service("worker", 0).env["QSCORE_REDIS_URL"] == ""


@pytest.mark.parametrize("args", [
    ["worker", "--redis-url", URL],
    ["worker", f"--redis-url={URL}"],
    ["worker", "--sasl-password", "pw"],
    ["worker", "--sasl-password=pw"],
])
def test_service_arguments_with_a_secret_are_refused(args: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="environment") as caught:
        ServiceProcess("worker-0", args, tmp_path / "worker.log")
    assert "s3cret" not in str(caught.value)


def test_service_arguments_without_secrets_are_accepted() -> None:
    check = qscore.local.fleet.check_no_secrets
    check(["worker", "--redis-url", "redis://cache:6379/0", "--redis-url"])
    check(["worker", "--sasl-username", "u", "--threads", "1"])


class _ExitedService:
    name = "worker-0"

    def poll(self) -> int:
        return 1

    def log_tail(self) -> str:
        return "worker ended"


class _StartedFleet:
    """LocalFleet as `qscore up` sees it once started, with a service that has exited (so
    that `up` prints its panel, then stops)."""

    def __init__(self, spec: FleetSpec) -> None:
        self.redis_url = spec.redis_url
        self.bootstrap_servers = "127.0.0.1:9092"
        self.broker = None
        self.workdir = spec.artifact
        self.stopped = False

    def start(self) -> _StartedFleet:
        return self

    def processes(self) -> list[_ExitedService]:
        return [_ExitedService()]

    def stop(self) -> None:
        self.stopped = True


def test_up_panel_masks_the_redis_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setattr(engines.select, "find_artifact", lambda settings: tmp_path)
    monkeypatch.setattr(qscore.local.fleet, "LocalFleet", _StartedFleet)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's Ctrl-C handler
    result = CliRunner().invoke(app, ["up", "--engine", str(tmp_path)],
                                env={"QSCORE_REDIS_URL": URL, "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "qscore fleet is up" in result.output and "worker-0 exited" in result.output
    assert "redis://:***@cache.example:6379/0" in result.output
    assert "s3cret" not in result.output


def test_children_of_a_killed_parent_do_not_outlive_it(tmp_path: Path) -> None:
    # `qscore up` SIGKILLed (or OOM-killed) must not leave its broker and services running.
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from qscore.local.process import ChildProcess\n"
        "child = ChildProcess(Path(sys.argv[1]) / 'child.log')\n"
        "child.spawn([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                              stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    exited = os.pidfd_open(child_pid)  # readable once the child has exited
    try:
        parent.kill()
        parent.wait(10)
        readable, _, _ = select.select([exited], [], [], 10)
        if not readable:
            os.kill(child_pid, signal.SIGKILL)
        assert readable, "the child outlived its SIGKILLed parent"
    finally:
        os.close(exited)


def test_up_passes_engine_reload_and_status_options_to_the_services(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    specs: list[FleetSpec] = []

    class Recorded(_StartedFleet):
        def __init__(self, spec: FleetSpec) -> None:
            super().__init__(spec)
            specs.append(spec)

    found: list[engines.select.EngineSettings] = []
    monkeypatch.setattr(engines.select, "find_artifact",
                        lambda settings: found.append(settings) or tmp_path)
    monkeypatch.setattr(qscore.local.fleet, "LocalFleet", Recorded)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's Ctrl-C handler
    result = CliRunner().invoke(app, [
        "up", "--backend", "torch", "--devices", "cuda:0,cuda:1", "--threads", "2",
        "--reload-quiet-load", "0.2", "--reload-quiet-s", "3", "--reload-deadline-s", "60",
        "--reload-max-concurrent", "2", "--reload-poll-s", "0.5", "--status-interval-s", "0",
    ], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert found[0].backend == "torch" and found[0].devices == ("cuda:0", "cuda:1")
    assert "qscore status --bootstrap-servers" in result.output
    fleet = LocalFleet(specs[0])
    fleet.bootstrap_servers = "127.0.0.1:9092"
    worker, tokenizer = fleet.service("worker", 0).args, fleet.service("tokenizer", 0).args

    def value(args: list[str], flag: str) -> str | None:
        return args[args.index(flag) + 1] if flag in args else None

    for flag, expected in [("--backend", "torch"), ("--devices", "cuda:0,cuda:1"),
                           ("--threads", "2"), ("--reload-quiet-load", "0.2"),
                           ("--reload-quiet-s", "3.0"), ("--reload-deadline-s", "60.0"),
                           ("--reload-max-concurrent", "2"), ("--reload-poll-s", "0.5"),
                           ("--status-interval-s", "0.0")]:
        assert value(worker, flag) == expected, (flag, worker)
    # The tokenizer takes the options it has, and no engine runtime options.
    assert value(tokenizer, "--reload-poll-s") == "0.5"
    assert value(tokenizer, "--status-interval-s") == "0.0"
    assert not {"--backend", "--devices", "--threads", "--reload-quiet-s"} & set(tokenizer)


def test_up_leaves_options_not_given_to_the_services_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    specs: list[FleetSpec] = []
    monkeypatch.setattr(engines.select, "find_artifact", lambda settings: tmp_path)
    monkeypatch.setattr(qscore.local.fleet, "LocalFleet",
                        lambda spec: specs.append(spec) or _StartedFleet(spec))
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    for name in [name for name in os.environ if name.startswith("QSCORE_")]:
        monkeypatch.delenv(name)
    result = CliRunner().invoke(app, ["up", "--engine", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert list(specs[0].worker_args) == [] and list(specs[0].tokenizer_args) == []


def test_up_refuses_an_unknown_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    result = CliRunner().invoke(app, ["up", "--backend", "tpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "--backend must be" in result.output
