"""The one interface every runtime implements; the worker never branches on the backend."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from engines.manifest import Manifest
from workers.batching import PaddedBatch


@runtime_checkable
class Engine(Protocol):
    """A loaded artifact that turns padded batches into head outputs.

    `run` returns float32: L2-normalised embeddings [n, dim] for the similarity head, positive
    class probabilities [n] for the classifier head. It blocks; callers keep it off the event
    loop. It may be called from one thread at a time per engine instance.
    """

    manifest: Manifest
    path: Path

    def run(self, batch: PaddedBatch) -> np.ndarray: ...

    def health(self) -> None:
        """Raise EngineError if the engine cannot serve (runs a one-token batch)."""
        ...

    def close(self) -> None: ...
