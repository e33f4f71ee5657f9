"""Run one TokenBatch through an engine in length-sorted, token-budgeted micro-batches."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engines.batch import pad_sequences, plan_batches
from engines.protocol import Engine
from schemas import ItemScore, TokenBatch
from workers.assemble import item_scores


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch: int = 64  # sequences per engine call
    token_budget: int = 16_384  # padded tokens (count x longest) per engine call

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.token_budget < 1:
            raise ValueError("max_batch and token_budget must be >= 1")


@dataclass(slots=True)
class ScoredBatch:
    items: list[ItemScore]
    batch_ms: list[float] = field(default_factory=list)  # one per engine call
    padded_tokens: int = 0
    real_tokens: int = 0


def run_token_batch(engine: Engine, tb: TokenBatch, limits: BatchLimits,
                    on_batch: Callable[[int], None] | None = None) -> ScoredBatch:
    """Blocking: call from a worker thread, never from the event loop.

    `on_batch` gets the number of sequences each engine call finished (for progress).
    """
    manifest = engine.manifest
    lengths = np.diff(tb.offsets.astype(np.int64))
    outputs: np.ndarray | None = None
    result = ScoredBatch(items=[])
    for rows in plan_batches(lengths, max_batch=limits.max_batch,
                             token_budget=limits.token_budget):
        seqs = [tb.sequence(int(i)) for i in rows]
        types = None
        if tb.token_type_ids is not None:
            types = [tb.token_type_ids[tb.offsets[i]:tb.offsets[i + 1]] for i in rows]
        batch = pad_sequences(seqs, types)
        started = time.perf_counter()
        out = engine.run(batch)
        result.batch_ms.append((time.perf_counter() - started) * 1000.0)
        result.padded_tokens += batch.size * batch.length
        result.real_tokens += batch.real_tokens
        if outputs is None:
            outputs = np.empty((tb.n_sequences, *out.shape[1:]), dtype=np.float32)
        outputs[rows] = out
        if on_batch is not None:
            on_batch(len(rows))
    if outputs is None:
        outputs = np.empty((0, max(manifest.output_dim, 1)), dtype=np.float32)
    result.items = item_scores(tb, outputs, head=manifest.head, model_version=manifest.version)
    return result
