"""The files and checkpoints of a fleet re-scoring run (qscore.offline.fleet): the embedded
run's (qscore.offline.rescore), with the model learnt from the fleet instead of an engine and
the fleet's own state in the checkpoint (`Checkpoint.fleet`: run id, reply topic, output
width, `acked_line`). Each checkpoint records what is durable (the output, the rejected file,
the counters) as of the last window committed, with the fleet's state as it is now: `write`
is called again as acknowledgements come, between commits.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import IO, Any

import structlog

from qscore.offline.checkpoint import (
    Checkpoint,
    ResumeRefused,
    check_resumable,
    write_checkpoint,
)
from qscore.offline.outputs import Output, fsync
from qscore.offline.rescore import RescoreSettings, RescoreSummary, Window, _Run

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class FleetSummary(RescoreSummary):
    reply_topic: str = ""
    published_batches: int = 0  # QueryBatches sent, re-sent ones of a resumed run included
    cached_items: int = 0  # answered from the fleet's result cache
    picked_up_windows: int = 0  # this attempt: acknowledged before a resume, not re-sent

    COUNTERS = (*RescoreSummary.COUNTERS, "published_batches", "cached_items")

    def as_dict(self) -> dict[str, object]:
        out = RescoreSummary.as_dict(self)
        out.update(via="fleet", reply_topic=self.reply_topic,
                   published_batches=self.published_batches, cached_items=self.cached_items)
        out["picked_up_windows"] = self.picked_up_windows
        return out


def fleet_identity(settings: RescoreSettings, batch_items: int) -> dict[str, Any]:
    """What a fleet run's output and batch ids depend on (the engine's batch limits do not)."""
    identity = {k: v for k, v in settings.identity().items()
                if k not in ("max_batch", "token_budget")}
    return identity | {"via": "fleet", "batch_items": batch_items}


class FleetRun(_Run):
    """The embedded run's files and checkpoints, with the fleet's state in the checkpoint
    and the model learnt from the fleet instead of an engine."""

    def __init__(self, settings: RescoreSettings, identity: dict[str, Any]) -> None:
        self.settings = settings
        self.identity = identity
        self.summary: FleetSummary = FleetSummary(output=str(settings.output),
                                                  rejected_path=str(settings.rejected_path))
        self.input_size = os.stat(settings.input).st_size
        self.ckpt_path = settings.checkpoint_path
        self.fleet: dict[str, Any] = {}
        self.output_dim = 0
        self.checkpoint = self._checkpoint()
        self.lines_done = self.checkpoint.lines_done if self.checkpoint else 0
        self.elapsed = self.checkpoint.summary.get("seconds", 0.0) if self.checkpoint else 0.0
        c = self.checkpoint
        # What the last checkpoint says is durable (output, rejected file, counters).
        self.durable: dict[str, Any] | None = None if c is None else {
            "lines_done": c.lines_done, "input_sha256": c.input_sha256,
            "output_bytes": c.output_bytes, "parts": c.parts,
            "rejected_bytes": c.rejected_bytes, "summary": c.summary}

    def _checkpoint(self) -> Checkpoint | None:
        s = self.settings
        if (found := self._found()) is None:
            return None
        if found.settings.get("via") != "fleet" or not found.fleet:
            raise ResumeRefused(
                f"{self.ckpt_path} is the checkpoint of an in-process run: resume it without "
                "--fleet, or start again with --restart")
        check_resumable(found, input_path=s.input, input_size=self.input_size,
                        model_id=found.model_id, model_version=found.model_version,
                        settings=self.identity)
        self.summary.restore(found.summary)
        self.summary.resumed_at = found.lines_done
        self.summary.model_id, self.summary.model_version = found.model_id, found.model_version
        self.fleet = dict(found.fleet)
        self.output_dim = int(self.fleet.get("output_dim", 0))
        return found

    def write(self, *, finished: bool = False) -> None:
        """The checkpoint: what is durable, and the fleet's state as it is now."""
        d = self.durable
        assert d is not None
        self.checkpoint = Checkpoint(
            input=str(self.settings.input), input_size=self.input_size,
            input_sha256=d["input_sha256"], lines_done=d["lines_done"],
            model_id=self.summary.model_id, model_version=self.summary.model_version,
            settings=self.identity, output_bytes=d["output_bytes"], parts=d["parts"],
            rejected_bytes=d["rejected_bytes"], summary=d["summary"], finished=finished,
            fleet=dict(self.fleet))
        write_checkpoint(self.ckpt_path, self.checkpoint)

    def start(self) -> None:
        """A fresh run's first checkpoint, before anything is published: from here on a
        crash leaves a run to resume, whose published batches it will find."""
        if self.durable is None:
            self.durable = {"lines_done": 0, "input_sha256": hashlib.sha256().hexdigest(),
                            "output_bytes": 0, "parts": 0, "rejected_bytes": 0,
                            "summary": self.summary.state()}
            self.write()

    def commit(self, window: Window, output: Output, rej: IO[bytes], started: float) -> None:
        state = output.commit()
        if state is None:
            return  # not a point to checkpoint at (a Parquet part is still open)
        rejected_bytes = fsync(rej)
        self.summary.seconds = self.elapsed + time.perf_counter() - started
        self.durable = {"lines_done": window.last_line, "input_sha256": window.input_sha256,
                        "output_bytes": state.get("output_bytes", 0),
                        "parts": state.get("parts", 0), "rejected_bytes": rejected_bytes,
                        "summary": self.summary.state()}
        self.write()
        self.lines_done = window.last_line

    def finish(self, last: Window | None, output: Output, rej: IO[bytes]) -> None:
        state = output.seal()
        rejected_bytes = fsync(rej)
        rej.close()
        if last is not None:
            self.lines_done = last.last_line
        previous = self.durable or {}
        self.durable = {"lines_done": self.lines_done,
                        "input_sha256": last.input_sha256 if last else previous.get(
                            "input_sha256", ""),
                        "output_bytes": state.get("output_bytes", 0),
                        "parts": state.get("parts", 0), "rejected_bytes": rejected_bytes,
                        "summary": self.summary.state()}
        self.write(finished=True)
        self.complete(output)
