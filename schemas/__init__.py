"""Wire types for every Kafka topic: versioned, strictly validated, size-limited.

JSON (orjson) for the human-facing topics (queries, scores, dead letters), a compact binary
layout for token ids. Every decoder raises only `SchemaError`, whatever the input bytes.
"""

from .deadletter import (
    STAGES,
    DeadLetter,
    SourceRef,
    Stage,
    decode_dead_letter,
    encode_dead_letter,
    max_original_bytes,
)
from .errors import SchemaError
from .limits import DEFAULT_LIMITS, Limits
from .query import (
    PRIORITIES,
    Priority,
    QueryBatch,
    QueryItem,
    decode_query_batch,
    encode_query_batch,
)
from .scores import (
    EMBEDDING_FORMATS,
    EmbeddingFormat,
    ItemScore,
    ScoreArrays,
    ScoreBatch,
    Timings,
    decode_score_batch,
    encode_score_arrays,
    encode_score_batch,
    encode_scores_to_fit,
)
from .tokens import (
    HEADS,
    KEY_BYTES,
    Head,
    TokenBatch,
    decode_token_batch,
    encode_token_batch,
    encoded_size,
    pack_sequences,
)

__all__ = [
    "DEFAULT_LIMITS",
    "EMBEDDING_FORMATS",
    "HEADS",
    "KEY_BYTES",
    "PRIORITIES",
    "STAGES",
    "DeadLetter",
    "EmbeddingFormat",
    "Head",
    "ItemScore",
    "Limits",
    "Priority",
    "QueryBatch",
    "QueryItem",
    "SchemaError",
    "ScoreArrays",
    "ScoreBatch",
    "SourceRef",
    "Stage",
    "Timings",
    "TokenBatch",
    "decode_dead_letter",
    "decode_query_batch",
    "decode_score_batch",
    "decode_token_batch",
    "encode_dead_letter",
    "encode_query_batch",
    "encode_score_arrays",
    "encode_score_batch",
    "encode_scores_to_fit",
    "encode_token_batch",
    "encoded_size",
    "max_original_bytes",
    "pack_sequences",
]
