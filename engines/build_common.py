"""What every backend's builder shares: versions, the artifact cache, and build directories.

An artifact's version is the start of a hash of everything that decides its outputs
(`content_hash`), so `ensure_artifact` finds an intact earlier build by path and builds only
when there is none; `build_dir` gives a builder a directory that becomes the artifact in one
rename, so a crash never leaves half an artifact. The builders (engines.build_onnx,
engines.build_torch, engines.build_tensorrt) import this module; it imports none of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from engines.errors import ArtifactError, BuildError
from engines.manifest import hash_files, read_manifest, verify_artifact, write_manifest
from engines.quantize import QuantSpec, file_digest
from engines.registry import EngineRegistry, model_dir
from engines.source import MODEL_FILES, TOKENIZER_FILES, ModelSource, default_sample_log

BUILD_FORMAT = 1  # bump when export/optimise changes what an artifact contains
# An FP32 engine vs PyTorch on the same weights: anything below this is a broken conversion.
EXPORT_MIN_COSINE = 0.9999
EXPORT_MAX_PROB_DIFF = 1e-4

Progress = Callable[[str], None]


def quiet(_: str) -> None:
    """A Progress that says nothing."""


def content_hash(source: ModelSource, precision: str, backend: str,
                 extra: dict[str, object] | None = None) -> str:
    """Hash of everything that decides an engine's outputs: weights, tokenizer, options."""
    digest = hashlib.sha256()
    options = {
        "build_format": BUILD_FORMAT, "precision": precision, "backend": backend,
        "head": source.head, "max_length": source.max_length,
        "positive_label": source.positive_label, **(extra or {}),
    }
    digest.update(orjson.dumps(options, option=orjson.OPT_SORT_KEYS))
    for name in (*MODEL_FILES, *TOKENIZER_FILES):
        path = source.path / name
        if path.is_file():
            digest.update(name.encode() + b"\0")
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def artifact_dir(root: Path, model_id: str, version: str) -> Path:
    return model_dir(root, model_id) / version


def gpu_options(precision: str, quant: QuantSpec) -> dict[str, object]:
    """What of a QuantSpec decides a torch or TensorRT engine (and so its version): the
    budget for quantized precisions, the query file every reduced precision is checked on."""
    extra: dict[str, object] = {}
    if precision in ("int8", "fp8"):
        extra = {"max_drop": quant.max_drop, "max_exclude": quant.max_exclude}
    if precision != "fp32":
        extra["calibration"] = file_digest(quant.calibration or default_sample_log())
    return extra


def ensure_artifact(source: ModelSource, root: Path, backend: str, precision: str,
                    extra: dict[str, object] | None, *, rebuild: bool, progress: Progress,
                    promote: bool, build: Callable[[Path, str], Path]) -> Path:
    """The artifact for these options: the intact cached one, else `build(target, full_hash)`.

    Either way the first version of a model in `root` is promoted to its registry `current`
    (when `promote`); later ones wait for an explicit `EngineRegistry.promote`."""
    full = content_hash(source, precision, backend, extra)
    target = artifact_dir(root, source.model_id, full[:12])
    if (cached := cached_artifact(target, root, source.model_id, rebuild, progress, promote)):
        return cached
    target = build(target, full)
    if promote:
        EngineRegistry(root).promote_first(source.model_id, target.name)
    return target


def cached_artifact(target: Path, root: Path, model_id: str, rebuild: bool,
                    progress: Progress, promote: bool) -> Path | None:
    """The intact artifact already at `target` (promoted if it is the model's first), or None
    when there is none, a rebuild is asked for, or it fails verification."""
    if not target.exists() or rebuild:
        return None
    try:
        verify_artifact(target)
    except ArtifactError as exc:
        progress(f"cached engine is unusable ({exc.problem}); rebuilding")
        return None
    if promote:
        EngineRegistry(root).promote_first(model_id, target.name)
    return target


@contextlib.contextmanager
def build_dir(source: ModelSource, target: Path) -> Iterator[Path]:
    """A build directory beside `target` holding the model's tokenizer files; when the block
    ends cleanly it becomes the artifact in one rename, else it is removed: a crash leaves a
    temp dir at worst, never a half artifact."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{target.name}-", dir=target.parent))
    try:
        (work / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (source.path / name).is_file():
                shutil.copy2(source.path / name, work / "tokenizer" / name)
        yield work
        move_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def move_into_place(work: Path, target: Path) -> None:
    """A finished build dir gets its golden set, then becomes the artifact in one rename (a
    stale one is replaced)."""
    add_golden(work)
    if target.exists():
        shutil.rmtree(target)
    os.replace(work, target)


def add_golden(work: Path) -> None:
    """Load the engine just built and store its outputs on the golden set (engines.golden),
    listed and checksummed in the manifest like every other file."""
    from engines.golden import GOLDEN_FILE, write_golden
    from engines.loader import load_engine

    engine = load_engine(work, threads=1, check_memory=False, lanes=1, graphs=False)
    try:
        write_golden(engine, work)
    finally:
        engine.close()
    manifest = read_manifest(work)
    files = dict(manifest.files)
    files[GOLDEN_FILE] = hash_files(work, [GOLDEN_FILE])[GOLDEN_FILE]
    write_manifest(work, replace(manifest, files=files))


def check_against_torch(source: ModelSource, module: object, tokenizer: object,
                        engine: Any) -> tuple[dict[str, float], int]:
    """An FP32 engine's outputs against the PyTorch module it was made from, on the export
    check texts (one of them truncated); BuildError if they disagree. Returns the accuracy
    record and the output width. Closes `engine`."""
    import numpy as np

    from engines.accuracy import cosines, torch_outputs
    from engines.batch import pad_sequences
    from engines.export import CHECK_TEXTS
    from schemas import QueryItem

    items = [QueryItem(id=str(i), query=CHECK_TEXTS[i], docs=(CHECK_TEXTS[-1 - i],))
             for i in range(len(CHECK_TEXTS) // 2)]
    enc = tokenizer.encode(items)  # type: ignore[attr-defined]
    seqs = [enc.input_ids[enc.offsets[i]:enc.offsets[i + 1]] for i in range(len(enc.seq_item))]
    types = None
    if enc.token_type_ids is not None:
        types = [enc.token_type_ids[enc.offsets[i]:enc.offsets[i + 1]] for i in range(len(seqs))]
    batch = pad_sequences(seqs, types)
    ref = torch_outputs(module, [(np.arange(batch.size), batch)], "cpu")
    try:
        got = engine.run(batch)
    finally:
        engine.close()
    if source.head == "similarity":
        cos = cosines(ref, got)
        report = {"reference": "pytorch-fp32", "sequences": len(seqs),
                  "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        if report["min_cosine"] < EXPORT_MIN_COSINE:
            raise BuildError(f"exported engine disagrees with PyTorch: min cosine "
                             f"{report['min_cosine']:.6f} < {EXPORT_MIN_COSINE}")
        return report, int(got.shape[1])
    diff = float(np.abs(ref - got).max())
    report = {"reference": "pytorch-fp32", "sequences": len(seqs), "max_abs_prob_diff": diff}
    if diff > EXPORT_MAX_PROB_DIFF:
        raise BuildError(f"exported engine disagrees with PyTorch: max probability "
                         f"difference {diff:.2e} > {EXPORT_MAX_PROB_DIFF}")
    return report, 1
