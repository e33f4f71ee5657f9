"""What comes back from the fleet to a fleet re-scoring run (qscore.offline.fleet): scores on
the reply topic, dead letters of its batches, and the errors that end the run.

`Replies` routes each ScoreBatch read from the reply topic to the window part it answers,
by batch id (qscore.offline.windowbatches); an answer for a window not read yet (a resumed
run reading the topic from its beginning finds the previous attempt's) is kept until that
window is registered, and anything else (windows written already, other producers' scores)
is dropped. Every score must come from the run's model and version. A background reader
that fails, a dead letter of one of the run's batches, or a score of another version fails
the run: `until` raises it to whoever waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog

from qscore.client import ScoreConsumer
from qscore.offline.windowbatches import Part, WindowAnswers, window_of
from schemas import Limits, SchemaError, ScoreBatch, decode_dead_letter

log = structlog.get_logger(__name__)


class FleetError(RuntimeError):
    """The fleet did not score the log; the checkpoint is in place for --resume."""


class FleetTimeout(FleetError):
    """A window's answers did not all arrive in time; `missing`: {batch id: items}."""

    def __init__(self, message: str, missing: dict[str, int]) -> None:
        self.missing = missing
        super().__init__(message)


class FleetDeadLetter(FleetError):
    """The fleet dead-lettered a batch of this run."""


class FleetVersionChanged(FleetError):
    """Scores of another model or version than the run's arrived (a hot reload)."""


class Replies:
    """The answers of one attempt, by batch id; `changed` is set at each one."""

    def __init__(self, prefix: str, reply_topic: str, *, registered_through: int,
                 allow_version_change: bool) -> None:
        self.prefix = prefix
        self.reply_topic = reply_topic
        self.allow_version_change = allow_version_change
        self.parts: dict[str, Part] = {}  # registered and not fully answered
        self.early: dict[str, list[ScoreBatch]] = {}  # answers for windows not read yet
        self.registered_through = registered_through  # last line of the last window registered
        self.model: tuple[str, str] = ("", "")  # (model id, version) every score must carry
        self.probe_id = ""
        self.probe: ScoreBatch | None = None
        self.failure: BaseException | None = None
        self.changed = asyncio.Event()

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self.changed.set()

    def register(self, pending: WindowAnswers) -> None:
        """A window's parts, now expected; answers that came before are applied."""
        for part in pending.parts:
            self.parts[part.batch_id] = part
        last = pending.window.last_line
        self.registered_through = max(self.registered_through, last)
        for part in pending.parts:
            for batch in self.early.pop(part.batch_id, ()):
                self.apply(part, batch)
        for batch_id in [b for b in self.early if (window_of(b, self.prefix) or 0) <= last]:
            del self.early[batch_id]  # no part has that id: it never will

    def offer(self, batch: ScoreBatch) -> None:
        if batch.batch_id == self.probe_id:
            self.probe = self.probe or batch
        elif (part := self.parts.get(batch.batch_id)) is not None:
            self.apply(part, batch)
        elif (line := window_of(batch.batch_id, self.prefix)) is not None \
                and line > self.registered_through:
            self.early.setdefault(batch.batch_id, []).append(batch)
        else:
            return
        self.changed.set()

    def apply(self, part: Part, batch: ScoreBatch) -> None:
        versions = {(batch.model_id, it.model_version) for it in batch.items
                    if it.error is None}
        other = [v for v in versions if v != self.model]
        if other and (other[0][0] != self.model[0] or not self.allow_version_change):
            self.fail(FleetVersionChanged(
                f"batch {batch.batch_id!r} was scored by {other[0][0]} {other[0][1]}, this run "
                f"by {self.model[0]} {self.model[1]}: the fleet changed its model mid-run (a "
                "hot reload). The lines checkpointed are all of the first; start again with "
                "--restart, or resume with --allow-version-change to go on with the new one "
                "(every row carries its version)"))
            return
        part.window.offer(part, batch.items)
        if not part.missing:
            self.parts.pop(part.batch_id, None)

    async def collect(self, consumer: ScoreConsumer) -> None:
        """Background: every ScoreBatch of the reply topic, offered."""
        try:
            async for batch in consumer:
                self.offer(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fail(FleetError(f"reading scores from {self.reply_topic} failed: {exc!r}"))

    async def watch_dead_letters(self, consumer: Any, limits: Limits) -> None:
        """Background: a dead letter keyed by a batch id still expected fails the run."""
        try:
            while True:
                records = await consumer.getmany(timeout_ms=500)
                for messages in records.values():
                    for m in messages:
                        key = (m.key or b"").decode("utf-8", "replace")
                        if key != self.probe_id and key not in self.parts:
                            continue
                        try:
                            letter = decode_dead_letter(m.value or b"", limits)
                            why = f"at {letter.stage}: {letter.reason}"
                        except SchemaError as exc:
                            why = f"(its dead letter is unreadable: {exc})"
                        self.fail(FleetDeadLetter(
                            f"the fleet dead-lettered batch {key!r} {why}. Fix the cause "
                            "(e.g. a reply topic outside the fleet's --reply-topics), then "
                            "continue with --resume"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the timeout still ends a run that waits for nothing
            log.warning("rescore.dead_letter_watch_failed", error=repr(exc))

    async def until(self, done: Callable[[], bool], deadline: float,
                    expired: Callable[[], BaseException]) -> None:
        """Wait for `done()`; raise the run's failure, or `expired()` at loop time
        `deadline`."""
        loop = asyncio.get_running_loop()
        while not done():
            if self.failure is not None:
                raise self.failure
            if (left := deadline - loop.time()) <= 0:
                raise expired()
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self.changed.wait()
        if self.failure is not None:
            raise self.failure
