"""The one interface every runtime implements; the worker never branches on the backend."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from engines.batch import PaddedBatch
from engines.manifest import Manifest


@runtime_checkable
class Engine(Protocol):
    """A loaded artifact that turns padded batches into head outputs.

    `run` returns float32: L2-normalised embeddings [n, dim] for the similarity head, positive
    class probabilities [n] for the classifier head. It blocks; callers keep it off the event
    loop.

    `lanes` is how many calls the engine can run at once, each from its own thread with its own
    `lane` index: 1 for a CPU session, one per CUDA stream for a GPU engine (two streams share
    the weights, so one batch's copies overlap the other's kernels). A lane is used by one
    thread at a time. `device` names where it runs ("cpu", "cuda:0"): the pool spreads work
    over devices.
    """

    manifest: Manifest
    path: Path
    lanes: int
    device: str

    def run(self, batch: PaddedBatch, lane: int = 0) -> np.ndarray: ...

    def health(self) -> None:
        """Raise EngineError if the engine cannot serve (runs a one-token batch)."""
        ...

    def close(self) -> None: ...
