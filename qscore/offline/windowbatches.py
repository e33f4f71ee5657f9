"""A window of the log as the fleet sees it: QueryBatches out, item scores back.

The fleet path (qscore.offline.fleet) publishes each window's items as QueryBatches and waits
for every item's answer. This module owns the pure part of that:

- Batch ids are `rescore-<run id>-<window's last line>-<part>`: deterministic, so a resumed
  run that publishes a window again publishes the same ids (the fleet's answers to both are
  duplicates, dropped), and the window an answer belongs to can be read off its id.
- Parts follow input order, and a part closes at `batch_items` items, before an id repeats
  (ids are unique in a QueryBatch), or before its encoded size would pass the limit on a
  message (`fits`). An item too large for a message on its own never reaches a window: it is
  rejected as it is read (`sendable`), as the embedded path rejects any bad line.
- Answers: the first answer per item counts; a later one is a redelivery. The scores are
  brought back to float32 (the engines' own precision, what the embedded path writes), so the
  JSON floats of the wire change nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import orjson

from qscore.offline.outputs import Rows
from qscore.offline.querylog import LogRecord
from qscore.offline.rescore import Window
from schemas import ItemScore, Limits, QueryBatch

EMBEDDING_FORMAT = "base64"  # float32 bits on the wire: a third of JSON's bytes, exact
# A float's repr is at most 24 characters; submitted_at is written as one.
_FLOAT_ROOM = 32


def batch_prefix(run_id: str) -> str:
    return f"rescore-{run_id}-"


def window_of(batch_id: str, prefix: str) -> int | None:
    """The last line of the window `batch_id` belongs to, None if it is not this run's."""
    if not batch_id.startswith(prefix):
        return None
    line, _, part = batch_id[len(prefix):].partition("-")
    return int(line) if line.isdigit() and part.isdigit() else None


def envelope_bytes(prefix: str, reply_topic: str | None) -> int:
    """A QueryBatch's encoded bytes besides its items, at most (ids up to 20 digits more)."""
    empty = QueryBatch(batch_id=prefix + "9" * 20, items=(), submitted_at=0.0,
                       reply_topic=reply_topic, priority="offline",
                       embedding_format=EMBEDDING_FORMAT)  # type: ignore[arg-type]
    return len(orjson.dumps(empty.to_obj())) + _FLOAT_ROOM


def item_bytes(record: LogRecord) -> int:
    assert record.item is not None
    return len(orjson.dumps(record.item.to_obj()))


def sendable(records: Iterator[LogRecord], limits: Limits,
             envelope: int) -> Iterator[LogRecord]:
    """`records`, with a good line too large for a QueryBatch of its own turned into a
    rejected one."""
    budget = limits.max_encoded_bytes - envelope
    for record in records:
        if record.item is not None and (size := item_bytes(record)) > budget:
            record = LogRecord(record.line, None, (
                f"too large to send to the fleet: {size:,} bytes encoded, a message holds "
                f"{budget:,} besides the batch (max_message_bytes="
                f"{limits.max_message_bytes:,})"), record.raw)
        yield record


def plan_parts(window: Window, *, batch_items: int, limits: Limits,
               envelope: int) -> list[list[int]]:
    """The window's items (indices) in parts, each a QueryBatch that fits."""
    budget = limits.max_encoded_bytes - envelope
    most = min(batch_items, limits.max_items)
    parts: list[list[int]] = []
    part: list[int] = []
    ids: set[str] = set()
    size = 0
    for i, item in enumerate(window.items):
        n = len(orjson.dumps(item.to_obj())) + 1  # and a comma
        if part and (len(part) >= most or item.id in ids or size + n > budget):
            parts.append(part)
            part, ids, size = [], set(), 0
        part.append(i)
        ids.add(item.id)
        size += n
    if part:
        parts.append(part)
    return parts


@dataclass(slots=True)
class Part:
    """One QueryBatch of a window: its items by id (position in the window), still missing."""

    batch_id: str
    window: WindowAnswers
    index: dict[str, int]
    missing: int


@dataclass(slots=True)
class WindowAnswers:
    """A window published (or waiting for answers published before a resume)."""

    window: Window
    first_line: int
    spool_start: int  # where its rejected lines start in the spool
    answers: list[ItemScore | None]
    parts: list[Part] = field(default_factory=list)
    missing: int = 0
    since: float = 0.0  # loop time it was published (or found published)
    acks: list[object] = field(default_factory=list)  # futures of the broker's acks
    picked_up: bool = False  # acknowledged before a resume: not published again

    @classmethod
    def of(cls, window: Window, first_line: int, spool_start: int) -> WindowAnswers:
        return cls(window, first_line, spool_start, [None] * len(window.items),
                   missing=len(window.items))

    def add_part(self, batch_id: str, indices: list[int]) -> Part:
        part = Part(batch_id, self, {self.window.items[i].id: i for i in indices},
                    len(indices))
        self.parts.append(part)
        return part

    def offer(self, part: Part, items: tuple[ItemScore, ...]) -> None:
        """Take the first answer for each of the part's items."""
        for item in items:
            i = part.index.get(item.id)
            if i is None or self.answers[i] is not None:
                continue
            self.answers[i] = item
            part.missing -= 1
            self.missing -= 1

    @property
    def cached(self) -> int:
        """Items scored from the fleet's result cache."""
        return sum(1 for a in self.answers if a is not None and a.cached and a.error is None)

    @property
    def complete(self) -> bool:
        return self.missing == 0

    @property
    def acked(self) -> bool:
        return self.picked_up or all(
            f.done() and not f.cancelled() and f.exception() is None  # type: ignore[attr-defined]
            for f in self.acks)

    def missing_batches(self) -> dict[str, int]:
        return {p.batch_id: p.missing for p in self.parts if p.missing}

    def errors(self) -> list[tuple[int, bytes]]:
        """Rejected-file lines for the items the fleet answered with an error."""
        out = []
        for i, answer in enumerate(self.answers):
            if answer is not None and answer.error is not None:
                out.append((self.window.lines[i], orjson.dumps({
                    "line": self.window.lines[i],
                    "reason": f"the fleet could not score it: {answer.error}",
                    "raw": orjson.dumps(self.window.items[i].to_obj()).decode()}) + b"\n"))
        return out

    def rows(self, model_id: str) -> Rows:
        """The output rows of the items scored (not those answered with an error)."""
        w = self.window
        good = [(i, a) for i, a in enumerate(self.answers) if a is not None and a.error is None]
        return Rows(
            ids=[a.id for _, a in good], lines=[w.lines[i] for i, _ in good],
            scores=[_f32(a.scores) for _, a in good],
            embeddings=[_f32(a.embedding) if a.embedding is not None else None
                        for _, a in good],
            # Not known: a ScoreBatch does not say whether the fleet truncated an item.
            truncated=[False] * len(good),
            versions=[a.model_version for _, a in good], model_id=model_id)


def _f32(values: tuple[float, ...]) -> list[float]:
    return np.asarray(values, dtype=np.float32).tolist()  # type: ignore[no-any-return]


def copy_rejects(spool: IO[bytes], start: int, end: int, errors: list[tuple[int, bytes]],
                 rej: IO[bytes]) -> None:
    """The window's rejected lines, spool[start:end] (read ones, in line order), merged by
    line with `errors` (the fleet's), onto the rejected file."""
    spool.seek(start)
    if not errors:
        left = end - start
        while left > 0:
            chunk = spool.read(min(left, 1 << 20))
            if not chunk:
                raise OSError(f"the rejected-lines spool ends before byte {end}")
            rej.write(chunk)
            left -= len(chunk)
        return
    pending = iter(errors)
    nxt = next(pending, None)
    while spool.tell() < end:
        record = spool.readline()
        line = orjson.loads(record)["line"]
        while nxt is not None and nxt[0] < line:
            rej.write(nxt[1])
            nxt = next(pending, None)
        rej.write(record)
    while nxt is not None:
        rej.write(nxt[1])
        nxt = next(pending, None)
