"""Size limits for every wire message, configurable at run time (one object, passed down)."""

from __future__ import annotations

from dataclasses import dataclass, fields

# Kafka's message.max.bytes (1,048,588 by default) bounds the whole record batch: ~70 bytes of
# batch and record overhead plus the key (a batch id: up to 1 KiB of UTF-8). Encoders stop this
# far below max_message_bytes, so a message they produce is never refused by the broker; the
# decoders still accept up to max_message_bytes from other producers.
RECORD_HEADROOM_BYTES = 2048


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds that codecs enforce on encode and decode.

    The defaults fit Kafka's default 1 MiB `message.max.bytes`; raise both together.
    """

    max_message_bytes: int = 1_048_576
    max_items: int = 1024  # query items per batch (and item ids per token/score batch)
    max_id_chars: int = 256  # batch/item ids, topic names, model ids
    max_query_chars: int = 2048
    max_doc_chars: int = 8192
    max_docs_per_item: int = 256
    max_sequences: int = 65_536  # token sequences per TokenBatch
    max_token_ids: int = 4_194_304  # token ids per TokenBatch
    max_reason_chars: int = 4096  # dead-letter reasons and per-item score errors
    max_embedding_dim: int = 8192  # floats per ItemScore.embedding

    @property
    def max_encoded_bytes(self) -> int:
        """The most bytes an encoder produces (see RECORD_HEADROOM_BYTES)."""
        return self.max_message_bytes - min(RECORD_HEADROOM_BYTES, self.max_message_bytes // 16)

    def __post_init__(self) -> None:
        # Limits come from flags/env at the edge; fail there, not on the first message.
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not int:
                raise ValueError(f"Limits.{f.name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"Limits.{f.name} must be >= 1, got {value}")


DEFAULT_LIMITS = Limits()
