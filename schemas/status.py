"""Heartbeats on the status topic: one service's state, JSON ("v": 1), strictly validated."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from . import _check as c
from .errors import SchemaError
from .limits import Limits

Kind = Literal["worker", "tokenizer"]
KINDS: tuple[str, ...] = get_args(Kind)

_LIMITS = Limits(max_message_bytes=32_768)
_SHORT, _REASON = 256, 4096  # chars: ids and versions; a refusal reason (clipped when sent)
_INT64 = 2**63 - 1
_FIELDS = ("v", "kind", "name", "host", "pid", "started_at", "sent_at", "interval_s",
           "model_id", "serving", "pending", "reload_state", "last_refusal", "arrival_per_s",
           "queue_depth", "busy", "in_flight", "items", "dead_letters")


def instance_id(kind: str, host: str, pid: int, name: str) -> str:
    """The key of a service's heartbeats: stable for the life of its process."""
    return f"{kind}/{host}/{pid}/{name}"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One service's state at `sent_at` (JSON, "v": 1, on the status topic).

    `arrival_per_s` is what arrived per second since the previous heartbeat: sequences queued
    for a worker (what its reload waits on), query items for a tokenizer. `busy` is the
    fraction of the serving engine slots' time spent in engine calls over the same span (None:
    no engine); `queue_depth` None: no queue. `items` and `dead_letters` are totals."""

    kind: Kind
    name: str
    host: str
    pid: int
    started_at: float  # unix seconds
    sent_at: float
    interval_s: float  # the sender's heartbeat interval
    model_id: str
    serving: str  # the version that scores (or whose cache keys are looked up)
    pending: str | None  # a promoted version waiting to be swapped in
    reload_state: str  # serving, pending, loading, checking, swapping; pinned: not following
    last_refusal: str | None  # why the last promoted version was refused
    arrival_per_s: float
    queue_depth: int | None
    busy: float | None
    in_flight: int  # input records being worked on
    items: int
    dead_letters: int

    @property
    def instance(self) -> str:
        return instance_id(self.kind, self.host, self.pid, self.name)

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.sent_at)

    def to_obj(self) -> dict[str, Any]:
        return {"v": 1, **asdict(self)}

    def encode(self) -> bytes:
        return c.dump_message(self.to_obj(), _LIMITS)


@c.decoder
def decode_heartbeat(data: object) -> Heartbeat:
    """A Heartbeat from its JSON bytes; raises SchemaError (and nothing else) for any input."""
    m = c.keys(c.load_message(data, _LIMITS), "", _FIELDS)

    def text(name: str, max_chars: int = _SHORT) -> str:
        return c.text(m[name], name, max_chars)

    def optional(name: str, max_chars: int = _SHORT) -> str | None:
        return None if m[name] is None else text(name, max_chars)

    def count(name: str) -> int:
        return c.integer(m[name], name, 0, _INT64)

    def seconds(name: str) -> float:
        return c.number(m[name], name, 0.0)

    busy = None if m["busy"] is None else seconds("busy")
    if busy is not None and busy > 1.0:
        raise SchemaError("busy", "range", f"expected 0..1, got {busy}")
    return Heartbeat(
        kind=c.enum(m["kind"], "kind", KINDS),  # type: ignore[arg-type]
        name=text("name"), host=text("host"), pid=c.integer(m["pid"], "pid", 0, 2**31 - 1),
        started_at=seconds("started_at"), sent_at=seconds("sent_at"),
        interval_s=seconds("interval_s"), model_id=text("model_id"), serving=text("serving"),
        pending=optional("pending"), reload_state=text("reload_state", 32),
        last_refusal=optional("last_refusal", _REASON), arrival_per_s=seconds("arrival_per_s"),
        queue_depth=None if m["queue_depth"] is None else count("queue_depth"), busy=busy,
        in_flight=count("in_flight"), items=count("items"), dead_letters=count("dead_letters"))
