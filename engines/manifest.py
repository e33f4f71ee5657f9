"""The artifact manifest: what an engine is, and the checksums that prove it is intact.

An artifact is a directory::

    manifest.json        this file's contents (written last, so its presence means complete)
    model.onnx           the runtime's model file
    tokenizer/           the tokenizer files the engine was built with

Every file except the manifest is listed with its SHA-256 and size; loading re-hashes them and
refuses any mismatch, so a flipped byte can never produce quietly wrong scores.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from engines.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 20
WORKSPACE_BATCH = 64  # the largest micro-batch a worker forms (workers.scoring.BatchLimits)
WORKSPACE_FACTOR = 2

# The file a backend's runtime loads (the rest of an artifact is tokenizer, config, caches).
MODEL_FILES = {"onnxruntime": "model.onnx", "torch": "weights.safetensors",
               "tensorrt": "model.plan", "openvino": "model.xml"}  # (+ model.bin)

Head = Literal["similarity", "classifier"]
HEADS: tuple[str, ...] = ("similarity", "classifier")


@dataclass(frozen=True, slots=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True, slots=True)
class Manifest:
    model_id: str
    version: str  # short content hash: what scores and cache keys carry
    content_hash: str  # full hash of model files + build options
    precision: str
    backend: str
    head: Head
    max_length: int
    output_dim: int  # embedding size (similarity) or 1 (classifier)
    tokenizer_id: str
    files: dict[str, FileEntry]
    created_at: float
    num_labels: int | None = None
    positive_label: int | None = None
    build: dict[str, Any] = field(default_factory=dict)  # tool versions, optimiser stats
    accuracy: dict[str, Any] = field(default_factory=dict)  # build-time check vs PyTorch
    # Weights + activation workspace (estimate_memory_bytes) so a loader can check free memory
    # before it loads; 0 = unknown (manifests written before the field existed).
    memory_bytes: int = 0
    format_version: int = FORMAT_VERSION

    @property
    def model_file(self) -> str:
        return MODEL_FILES.get(self.backend, "model.onnx")

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes, where: object) -> Manifest:
        try:
            raw = orjson.loads(data)
            if not isinstance(raw, dict):
                raise TypeError("manifest is not a JSON object")
            if raw.get("format_version") != FORMAT_VERSION:
                raise ArtifactError(
                    where,
                    f"manifest format_version {raw.get('format_version')!r} is not supported "
                    f"(this qscore reads {FORMAT_VERSION}); rebuild the engine",
                )
            raw["files"] = {k: FileEntry(**v) for k, v in raw["files"].items()}
            manifest = cls(**raw)
        except ArtifactError:
            raise
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            raise ArtifactError(where, f"unreadable manifest: {exc}") from exc
        if manifest.head not in HEADS:
            raise ArtifactError(where, f"unknown head {manifest.head!r} in manifest")
        return manifest


def estimate_memory_bytes(weights_bytes: int, *, max_length: int, hidden_size: int,
                          num_layers: int) -> int:
    """Memory an engine needs loaded and running its largest batch, as an upper estimate::

        weights_bytes + WORKSPACE_BATCH x max_length x hidden_size x num_layers x 4 B x 2

    The second term is fp32 hidden states for a full batch in every layer; x2 covers what is
    live on top of them (the 4 x hidden FFN intermediate, attention scores). Runtimes free a
    layer's activations before the next, so summing over layers already over-counts: better to
    refuse a load that would fit than to start one that OOMs while another version is resident.
    """
    workspace = WORKSPACE_BATCH * max_length * hidden_size * num_layers * 4 * WORKSPACE_FACTOR
    return int(weights_bytes) + workspace


def sha256_file(path: Path, max_bytes_per_s: float | None = None) -> str:
    """The file's sha256; `max_bytes_per_s` paces the reading (a hot reload verifies a new
    version beside a serving one and must not take its cores and disk in one burst)."""
    digest = hashlib.sha256()
    started, done = time.monotonic(), 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if max_bytes_per_s:
                ahead = done / max_bytes_per_s - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    return digest.hexdigest()


def hash_files(root: Path, relpaths: Iterable[str]) -> dict[str, FileEntry]:
    return {
        rel: FileEntry(sha256=sha256_file(root / rel), bytes=(root / rel).stat().st_size)
        for rel in sorted(relpaths)
    }


def list_files(root: Path) -> list[str]:
    """Every regular file under root except the manifest, as POSIX relative paths."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    )


def swap_blockers(serving: Manifest, new: Manifest) -> list[str]:
    """The fields in which `new` differs from `serving` so that services cannot switch to it
    while running (their TokenBatches would differ): empty when a hot swap is possible."""
    return [name for name in ("tokenizer_id", "head", "max_length")
            if getattr(new, name) != getattr(serving, name)]


def write_manifest(root: Path, manifest: Manifest) -> None:
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_bytes(manifest.to_json())
    os.replace(tmp, root / MANIFEST_NAME)


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(root, "no such artifact directory")
    if not path.is_file():
        raise ArtifactError(root, f"{MANIFEST_NAME} is missing (incomplete build?)")
    return Manifest.from_json(path.read_bytes(), root)


def verify_artifact(root: Path, manifest: Manifest | None = None, *,
                    max_bytes_per_s: float | None = None) -> Manifest:
    """Re-hash every file and compare with the manifest; raise ArtifactError on any difference.
    `max_bytes_per_s` paces the hashing (sha256_file)."""
    manifest = manifest or read_manifest(root)
    present = set(list_files(root))
    listed = set(manifest.files)
    if missing := sorted(listed - present):
        raise ArtifactError(root, f"files listed in the manifest are missing: {missing}")
    if extra := sorted(present - listed):
        raise ArtifactError(root, f"files not in the manifest: {extra}")
    for rel, entry in manifest.files.items():
        path = root / rel
        size = path.stat().st_size
        if size != entry.bytes:
            raise ArtifactError(root, f"{rel}: size {size} != {entry.bytes} in the manifest")
        actual = sha256_file(path, max_bytes_per_s)
        if actual != entry.sha256:
            raise ArtifactError(
                root, f"{rel}: checksum mismatch (sha256 {actual[:12]}… != {entry.sha256[:12]}…)"
            )
    return manifest
