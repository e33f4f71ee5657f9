"""The one error type of the wire codecs.

Decoders raise `SchemaError` and nothing else for any input bytes, so a consumer needs a single
`except` to turn a poison message into a DeadLetter instead of a stalled partition.

Rule names are stable strings that dashboards and tests match on:

    max_bytes    message (or a dead letter's original) larger than the limit
    utf-8        bytes that are not UTF-8, or a str holding lone surrogates
    json         not JSON
    version      missing or unknown "v" (or binary layout version)
    magic        binary message does not start with the expected magic
    length       binary message shorter/longer than its header says, or arrays of unequal length
    padding      non-zero alignment padding in a binary message
    type         wrong type (JSON kind, Python type or numpy dtype)
    required     missing key
    unknown_key  key that the schema does not know (the key is in `detail`)
    empty        empty or blank string, or empty list where one item is needed
    max_chars    string longer than the limit
    max_items    list (or count of sequences/tokens) longer than the limit
    duplicate    item id (or token sequence) seen twice
    finite       NaN or infinity
    range        number outside its allowed range (negative time, index out of bounds, ...)
    enum         value outside a fixed set (priority, stage, token batch head)
    topic        not a legal Kafka topic name
    forbidden_topic  a reply_topic outside the fleet's allow-list (checked by the services)
    monotone     token offsets that go backwards or do not span the ids
    max_length   token sequence longer than the batch's max_length
    seq_layout   token sequences not laid out as the tokenizer writes them for the batch's head
                 (not grouped by item in order, an item without sequences, a missing query
                 sequence, a gap or reordering in doc indices; see schemas.tokens)
    base64       dead letter's original is not base64
    internal     a bug in this package; decoders never leak another exception type
"""

from __future__ import annotations


class SchemaError(ValueError):
    """A message breaks one rule at one field, e.g. ``items[3].query: max_chars=2048 (got 5000)``.

    `field` is a path into the message (``$`` for the whole message), `rule` a name from the
    module docstring, `limit` the configured bound that was crossed (if any), `detail` free text.
    """

    def __init__(self, field: str, rule: str, detail: str = "", *, limit: int | None = None):
        super().__init__(field, rule, detail)
        self.field = field
        self.rule = rule
        self.detail = detail
        self.limit = limit

    def __str__(self) -> str:
        rule = self.rule if self.limit is None else f"{self.rule}={self.limit}"
        return f"{self.field}: {rule}" + (f" ({self.detail})" if self.detail else "")

    def __repr__(self) -> str:
        return f"SchemaError({self.field!r}, {self.rule!r}, {self.detail!r}, limit={self.limit!r})"

    # Errors cross process pools (tokenizer workers); keep `limit` through pickling.
    def __reduce__(self):  # type: ignore[override]
        return _rebuild, (self.field, self.rule, self.detail, self.limit)


def _rebuild(field: str, rule: str, detail: str, limit: int | None) -> SchemaError:
    return SchemaError(field, rule, detail, limit=limit)
