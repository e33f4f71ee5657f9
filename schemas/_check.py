"""Hand-written validators shared by the JSON codecs.

Limits are runtime configuration, so a static schema library would not fit; these helpers keep
each codec a flat list of field checks. Every helper raises `SchemaError` naming the field.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Collection, Iterable
from typing import Any, ParamSpec, TypeVar

import orjson

from .errors import SchemaError
from .limits import Limits

VERSION = 1
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_KEY_PREVIEW = 64  # unknown keys are attacker-chosen; bound what we echo back

P = ParamSpec("P")
T = TypeVar("T")


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def decoder(fn: Callable[P, T]) -> Callable[P, T]:
    """Make `fn` keep the codec contract: for any bytes, return a value or raise SchemaError.

    A bug that leaks another exception becomes rule "internal" so a consumer still dead-letters
    the message instead of crashing; the fuzz tests assert that rule never appears.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except SchemaError:
            raise
        except Exception as exc:
            raise SchemaError("$", "internal", f"{type(exc).__name__}: {exc}") from exc

    return wrapper


def as_bytes(data: object, limits: Limits) -> bytes:
    """Accept any bytes-like input and check its size before any parsing work."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SchemaError("$", "type", f"expected bytes, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > limits.max_message_bytes:
        raise SchemaError("$", "max_bytes", f"got {size}", limit=limits.max_message_bytes)
    return data if isinstance(data, bytes) else bytes(data)


def loads(data: bytes, field: str = "$") -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise SchemaError(field, "utf-8", f"byte {uexc.start}") from None
        raise SchemaError(field, "json", str(exc)) from None


def load_message(data: object, limits: Limits) -> dict[str, Any]:
    """Size, then JSON, then version: the order every JSON decoder promises."""
    raw = as_bytes(data, limits)
    obj = loads(raw)
    if not isinstance(obj, dict):
        raise SchemaError("$", "type", f"expected object, got {kind(obj)}")
    check_version(obj)
    return obj


def check_version(obj: dict[str, Any]) -> None:
    v = obj.get("v")
    if type(v) is not int or v != VERSION:
        raise SchemaError("v", "version", "missing" if "v" not in obj else f"got {v!r:.32}")


def dump_message(obj: dict[str, Any], limits: Limits) -> bytes:
    data = orjson.dumps(obj)
    if len(data) > limits.max_encoded_bytes:
        raise SchemaError("$", "max_bytes", f"got {len(data)}", limit=limits.max_encoded_bytes)
    return data


def kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def keys(
    obj: object, where: str, required: Collection[str], optional: Collection[str] = ()
) -> dict[str, Any]:
    """Check that `obj` is a JSON object with all `required` keys and nothing unknown."""
    if not isinstance(obj, dict):
        raise SchemaError(where or "$", "type", f"expected object, got {kind(obj)}")
    for key in obj:
        if key not in required and key not in optional:
            raise SchemaError(where or "$", "unknown_key", f"{key!r:.{_KEY_PREVIEW}}")
    for key in required:
        if key not in obj:
            raise SchemaError(join(where, key), "required")
    return obj


def text(value: object, field: str, max_chars: int, *, blank_ok: bool = False) -> str:
    """A str of 1..max_chars chars (non-blank unless `blank_ok`), encodable as UTF-8."""
    if not isinstance(value, str):
        raise SchemaError(field, "type", f"expected str, got {kind(value)}")
    if type(value) is not str:
        value = str.__str__(value)  # StrEnum and friends: store the plain value
    if not value or (not blank_ok and not value.strip()):
        raise SchemaError(field, "empty")
    if len(value) > max_chars:
        raise SchemaError(field, "max_chars", f"got {len(value)}", limit=max_chars)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SchemaError(field, "utf-8", f"lone surrogate at char {exc.start}") from None
    return value


def opt_text(value: object, field: str, max_chars: int) -> str | None:
    return None if value is None else text(value, field, max_chars, blank_ok=True)


def topic(value: object, field: str, limits: Limits) -> str | None:
    """An optional Kafka topic name: producing to an illegal one would fail much later."""
    if value is None:
        return None
    name = text(value, field, min(limits.max_id_chars, 249), blank_ok=True)
    if not _TOPIC.fullmatch(name) or name in (".", ".."):
        raise SchemaError(field, "topic", f"{name!r:.{_KEY_PREVIEW}}")
    return name


def enum(value: object, field: str, allowed: Collection[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise SchemaError(field, "enum", f"expected one of {sorted(allowed)}, got {value!r:.32}")
    return str.__str__(value)


def boolean(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise SchemaError(field, "type", f"expected bool, got {kind(value)}")
    return value


def integer(value: object, field: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SchemaError(field, "type", f"expected int, got {kind(value)}")
    if not lo <= value <= hi:
        raise SchemaError(field, "range", f"expected {lo}..{hi}, got {value}")
    return int(value)


def opt_integer(value: object, field: str, lo: int, hi: int) -> int | None:
    return None if value is None else integer(value, field, lo, hi)


def number(value: object, field: str, lo: float = -math.inf) -> float:
    """A finite float >= lo; JSON ints are accepted and stored as float."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise SchemaError(field, "type", f"expected number, got {kind(value)}")
    try:
        result = float(value)
    except OverflowError:  # only a Python int can get here; JSON ints are 64-bit
        result = math.inf
    if not math.isfinite(result):
        raise SchemaError(field, "finite", f"got {result}")
    if result < lo:
        raise SchemaError(field, "range", f"expected >= {lo}, got {result}")
    return result


def array(value: object, field: str, max_items: int, *, min_items: int = 0) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise SchemaError(field, "type", f"expected array, got {kind(value)}")
    if len(value) < min_items:
        raise SchemaError(field, "empty", f"expected at least {min_items} item(s)")
    if len(value) > max_items:
        raise SchemaError(field, "max_items", f"got {len(value)}", limit=max_items)
    return tuple(value)


def floats(value: object, field: str, max_items: int, *, min_items: int = 0) -> tuple[float, ...]:
    """An array of finite floats; the common all-float case avoids a per-item Python loop."""
    items = array(value, field, max_items, min_items=min_items)
    if all(type(x) is float for x in items) and all(map(math.isfinite, items)):
        return items
    return tuple(number(x, f"{field}[{i}]") for i, x in enumerate(items))


def unique(ids: Iterable[str], field: str) -> None:
    """Ids must be unique: consumers correlate results by (batch_id, item id).

    `field` is a template such as ``"items[{}].id"`` filled with the index of the repeat.
    """
    seen: set[str] = set()
    for i, item_id in enumerate(ids):
        if item_id in seen:
            raise SchemaError(field.format(i), "duplicate", f"{item_id!r:.{_KEY_PREVIEW}}")
        seen.add(item_id)
