"""Errors raised while building, verifying and loading engines."""

from __future__ import annotations


class EngineError(Exception):
    """Base class: something is wrong with an engine or its artifact."""


class EngineDead(EngineError):
    """The device or engine is gone (a CUDA error, a lost device): no later call can succeed.

    Unlike a plain EngineError, which fails one batch and leaves the engine in service, this
    takes the engine out of its pool; the batch may still run on another engine.
    """


class ArtifactError(EngineError):
    """An artifact directory is missing, corrupt or inconsistent with its manifest."""

    def __init__(self, artifact: object, problem: str) -> None:
        self.artifact = str(artifact)
        self.problem = problem
        super().__init__(f"engine artifact {self.artifact}: {problem}")


class BackendUnavailable(EngineError):
    """The runtime an artifact needs is not installed or has no device here."""


class BuildError(EngineError):
    """Exporting or optimising a model failed, or the result failed its accuracy check."""


class RegistryError(EngineError):
    """A registry request names a model or version that is not there, or may not be done."""
