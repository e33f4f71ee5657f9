"""Dead letters: where every message that cannot be scored ends (JSON, ``"v": 1``).

Wire form::

    {"v": 1, "stage": "tokenize", "reason": "items[3].query: empty", "failed_at": 1700000000.1,
     "error_field": "items[3].query", "error_rule": "empty",
     "source": {"topic": "queries", "partition": 2, "offset": 118, "line": null},
     "original_truncated": false, "original": "eyJ2IjogMSwgLi4u"}

The original bytes travel base64-encoded, clipped so that the whole dead letter still fits in
`max_message_bytes`: a dead letter must never be the next poison message.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

from . import _check as c
from .errors import SchemaError
from .limits import DEFAULT_LIMITS, Limits

Stage = Literal["ingest", "tokenize", "score", "publish", "rescore"]
STAGES: tuple[str, ...] = get_args(Stage)

_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


def max_original_bytes(limits: Limits = DEFAULT_LIMITS) -> int:
    """How many original bytes a dead letter can carry and still fit in one message.

    Headroom covers the other fields at their limits (6 bytes a char when JSON escapes control
    characters); base64 turns 3 bytes into 4.
    """
    headroom = 6 * (limits.max_reason_chars + 3 * limits.max_id_chars) + 1024
    return max(0, (limits.max_encoded_bytes - headroom) * 3 // 4)


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where the original came from: a Kafka record, or a line of an input file."""

    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    line: int | None = None  # for file inputs (offline re-scoring)

    @classmethod
    def from_obj(
        cls, obj: object, limits: Limits = DEFAULT_LIMITS, where: str = "source"
    ) -> SourceRef:
        m = c.keys(obj, where, (), ("topic", "partition", "offset", "line"))
        return cls(
            topic=c.opt_text(m.get("topic"), c.join(where, "topic"), limits.max_id_chars),
            partition=c.opt_integer(m.get("partition"), c.join(where, "partition"), 0, _INT32_MAX),
            offset=c.opt_integer(m.get("offset"), c.join(where, "offset"), 0, _INT64_MAX),
            line=c.opt_integer(m.get("line"), c.join(where, "line"), 0, _INT64_MAX),
        )

    def to_obj(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "line": self.line,
        }


@dataclass(frozen=True, slots=True)
class DeadLetter:
    stage: Stage
    reason: str
    original: bytes  # possibly clipped; see original_truncated
    source: SourceRef
    failed_at: float  # unix seconds
    error_field: str | None = None  # from a SchemaError, so dead letters can be grouped by rule
    error_rule: str | None = None
    original_truncated: bool = False

    @classmethod
    def from_error(
        cls,
        stage: Stage,
        err: Exception,
        original: bytes,
        source: SourceRef,
        now: float | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
    ) -> DeadLetter:
        """Build a dead letter that is sure to encode: runs on error paths, so it never raises
        on odd errors (lone surrogates, huge messages, a failing ``__str__``); text is clipped
        to the limits and `original` to `max_original_bytes`."""
        field = rule = None
        if isinstance(err, SchemaError):
            field = _clean(err.field, limits.max_id_chars) or None
            rule = _clean(err.rule, limits.max_id_chars) or None
        reason = _clean(_describe(err), limits.max_reason_chars)
        if not reason.strip():
            reason = type(err).__name__[: limits.max_reason_chars]
        if isinstance(source.topic, str):
            source = replace(source, topic=_clean(source.topic, limits.max_id_chars) or None)
        cap = max_original_bytes(limits)
        raw = bytes(original)
        return cls(
            stage=stage,
            reason=reason,
            original=raw[:cap],
            source=source,
            failed_at=time.time() if now is None else now,
            error_field=field,
            error_rule=rule,
            original_truncated=len(raw) > cap,
        )

    @classmethod
    def from_obj(cls, obj: object, limits: Limits = DEFAULT_LIMITS) -> DeadLetter:
        required = ("v", "stage", "reason", "original", "source", "failed_at")
        optional = ("error_field", "error_rule", "original_truncated")
        m = c.keys(obj, "", required, optional)
        c.check_version(m)
        return cls(
            stage=c.enum(m["stage"], "stage", STAGES),  # type: ignore[arg-type]
            reason=c.text(m["reason"], "reason", limits.max_reason_chars),
            original=_original(m["original"], limits),
            source=SourceRef.from_obj(m["source"], limits),
            failed_at=c.number(m["failed_at"], "failed_at", lo=0.0),
            error_field=c.opt_text(m.get("error_field"), "error_field", limits.max_id_chars),
            error_rule=c.opt_text(m.get("error_rule"), "error_rule", limits.max_id_chars),
            original_truncated=c.boolean(m.get("original_truncated", False), "original_truncated"),
        )

    def to_obj(self) -> dict[str, Any]:
        original: object = self.original
        if isinstance(original, bytes | bytearray | memoryview):
            original = base64.b64encode(original).decode("ascii")
        source = self.source.to_obj() if isinstance(self.source, SourceRef) else self.source
        return {
            "v": c.VERSION,
            "stage": self.stage,
            "reason": self.reason,
            "failed_at": self.failed_at,
            "error_field": self.error_field,
            "error_rule": self.error_rule,
            "source": source,
            "original_truncated": self.original_truncated,
            "original": original,
        }


def _describe(err: BaseException) -> str:
    try:
        text = str(err)
    except Exception:  # a broken __str__ must not lose the dead letter
        text = ""
    if isinstance(err, SchemaError):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _clean(text: str, max_chars: int) -> str:
    """Make text JSON-encodable (lone surrogates escaped) and clip it."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")[:max_chars]


def _original(value: object, limits: Limits) -> bytes:
    if not isinstance(value, str):
        raise SchemaError("original", "type", f"expected base64 str, got {c.kind(value)}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SchemaError("original", "base64", str(exc)) from None
    cap = max_original_bytes(limits)
    if len(raw) > cap:
        raise SchemaError("original", "max_bytes", f"got {len(raw)}", limit=cap)
    return raw


def encode_dead_letter(dl: DeadLetter, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Validate with the decoder's rules, then serialise."""
    if not isinstance(dl, DeadLetter):
        raise SchemaError("$", "type", f"expected DeadLetter, got {type(dl).__name__}")
    if not isinstance(dl.original, bytes | bytearray | memoryview):
        raise SchemaError("original", "type", f"expected bytes, got {type(dl.original).__name__}")
    return c.dump_message(DeadLetter.from_obj(dl.to_obj(), limits).to_obj(), limits)


@c.decoder
def decode_dead_letter(data: bytes, limits: Limits = DEFAULT_LIMITS) -> DeadLetter:
    """Size, then JSON/UTF-8, then version, then fields; raises only SchemaError."""
    return DeadLetter.from_obj(c.load_message(data, limits), limits)
