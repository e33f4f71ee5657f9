"""One child process with its output in a log file: the piece every local server and service
shares. `spawn()` starts a command in its own session with stdout and stderr appended to
`log_path`; `stop()` asks it to end with SIGTERM and SIGKILLs it after a grace period; `kill()`
is the crash; `log_tail()` reads the last lines of the log for error messages. A ChildProcess
can be spawned again after it has ended (a server restarted on the same port).
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from plumbing.procs import die_with_parent


class ChildProcess:
    """A command run as a child process, its output appended to `log_path`."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def spawn(self, command: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> None:
        """Start `command`; `env` is added to this process's environment."""
        self._close_log()  # a previous run that ended by itself left its log open
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        try:
            self._proc = subprocess.Popen(
                list(command), cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=self._log, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                # Own session: a terminal's Ctrl-C reaches only the parent, which then stops
                # its children in order (services before the broker and cache they drain into).
                start_new_session=True,
                # ...but a parent that dies without stopping them (SIGKILL, OOM) takes them
                # along, instead of leaving a broker and services running unowned.
                preexec_fn=functools.partial(die_with_parent, os.getpid()),
            )
        except BaseException:
            self._close_log()
            raise

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has ended (and been polled or waited for)."""
        return self._proc.returncode if self._proc is not None else None

    def poll(self) -> int | None:
        """The exit code if the process has ended, else None (also None before `spawn()`)."""
        return self._proc.poll() if self._proc is not None else None

    def wait(self, timeout: float | None = None) -> int:
        assert self._proc is not None, "not started"
        return self._proc.wait(timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not ended after `timeout` s; returns the exit code
        (None if it was never spawned)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_log()
        return self.returncode

    def kill(self) -> None:
        """SIGKILL, as in a crash: no shutdown work."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close_log()

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` lines of the log ("" if there is none yet)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
