"""Build an engine artifact from a model directory, once: later calls find it by content hash."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson

from engines.errors import ArtifactError, BuildError
from engines.manifest import (
    Manifest,
    estimate_memory_bytes,
    hash_files,
    list_files,
    read_manifest,
    verify_artifact,
    write_manifest,
)
from engines.quantize import QuantSpec
from engines.registry import EngineRegistry, model_dir
from engines.source import MODEL_FILES, TOKENIZER_FILES, ModelSource

BUILD_FORMAT = 1  # bump when export/optimise changes what an artifact contains
PRECISIONS = ("fp32", "int8")  # onnxruntime; the torch backend's are in engines.torch_runtime
BACKENDS = ("onnxruntime", "torch", "tensorrt")
# FP32 ONNX Runtime vs PyTorch on the same weights: anything below this is a broken export.
MIN_COSINE = 0.9999
MAX_PROB_DIFF = 1e-4

Progress = Callable[[str], None]


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


def ensure_engine(
    source: ModelSource,
    root: Path,
    *,
    precision: str = "fp32",
    quant: QuantSpec | None = None,
    rebuild: bool = False,
    progress: Progress | None = None,
    promote: bool = True,
    backend: str = "onnxruntime",
    device: str | None = None,
) -> Path:
    """Return the artifact for `source`, building it if no intact one exists.

    INT8 engines are made from the FP32 one (built first if needed) by `engines.quantize`.
    The first version of a model in `root` is promoted to its registry `current`; later ones
    wait for an explicit `EngineRegistry.promote` (qscore engine promote).
    Backend "torch" artifacts (GPU runtime) are built by `engines.build_torch`."""
    if backend not in BACKENDS:
        raise BuildError(f"backend {backend!r} not supported; choose {BACKENDS}")
    if backend in ("torch", "tensorrt"):
        return _ensure_gpu(source, root, backend, precision, quant or QuantSpec(), rebuild,
                           progress, promote, device)
    if precision not in PRECISIONS:
        raise BuildError(f"precision {precision!r} not supported; choose {PRECISIONS}")
    say = progress or _quiet
    fp32: Path | None = None
    extra: dict[str, object] | None = None
    if precision == "int8":
        if source.head != "similarity":
            raise BuildError("INT8 selection measures embedding cosine to FP32; only the "
                             "similarity head can be built INT8 for now (use --precision fp32)")
        quant = quant or QuantSpec()
        fp32 = ensure_engine(source, root, precision="fp32", progress=progress, promote=False)
        extra = quant_options(quant)
    full = content_hash(source, precision, "onnxruntime", extra)
    target = artifact_dir(root, source.model_id, full[:12])
    if (cached := _cached(target, root, source.model_id, rebuild, progress, promote)):
        return cached
    if fp32 is not None:
        target = _build_int8(fp32, target, full, quant or QuantSpec(), say)
    else:
        target = _build(source, root, target, full, precision, say)
    if promote:
        EngineRegistry(root).promote_first(source.model_id, target.name)
    return target


def _ensure_gpu(source: ModelSource, root: Path, backend: str, precision: str,
                quant: QuantSpec, rebuild: bool, progress: Progress | None, promote: bool,
                device: str | None) -> Path:
    """GPU backends: torch (engines.build_torch) and TensorRT (engines.build_tensorrt)."""
    if backend == "tensorrt":
        from engines.tensorrt.availability import require_tensorrt

        require_tensorrt()  # before hashing gigabytes or exporting anything
    extra: dict[str, object] = {}
    if precision in ("int8", "fp8"):
        extra = {"max_drop": quant.max_drop, "max_exclude": quant.max_exclude}
    if precision != "fp32":
        from engines.quantize import file_digest
        from engines.source import default_sample_log

        extra["calibration"] = file_digest(quant.calibration or default_sample_log())
    full = content_hash(source, precision, backend, extra)
    target = artifact_dir(root, source.model_id, full[:12])
    if (cached := _cached(target, root, source.model_id, rebuild, progress, promote)):
        return cached
    if backend == "torch":
        from engines.build_torch import build_torch

        target = build_torch(source, target, full, precision, quant, progress or _quiet,
                             device=device)
    else:
        from engines.build_tensorrt import build_tensorrt

        target = build_tensorrt(source, target, full, precision, quant, progress or _quiet)
    if promote:
        EngineRegistry(root).promote_first(source.model_id, target.name)
    return target


def _cached(target: Path, root: Path, model_id: str, rebuild: bool,
            progress: Progress | None, promote: bool) -> Path | None:
    """The intact artifact already at `target` (promoted if it is the model's first), or None
    when there is none, a rebuild is asked for, or it fails verification."""
    if not target.exists() or rebuild:
        return None
    try:
        verify_artifact(target)
    except ArtifactError as exc:
        (progress or _quiet)(f"cached engine is unusable ({exc.problem}); rebuilding")
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
        _move_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def quant_options(quant: QuantSpec) -> dict[str, object]:
    """What of a QuantSpec decides the chosen engine (and so its version)."""
    from engines.quantize import file_digest
    from engines.source import default_sample_log

    return {"level": quant.level, "max_drop": quant.max_drop, "method": quant.method,
            "max_exclude": quant.max_exclude,
            "calibration": file_digest(quant.calibration or default_sample_log()),
            "pairs": file_digest(quant.sample_pairs or default_sample_log())}


def _build_int8(fp32: Path, target: Path, full_hash: str, quant: QuantSpec,
                say: Progress) -> Path:
    from engines.quantize import choose, install
    from engines.tokenizer import QueryTokenizer

    started = time.perf_counter()
    base = read_manifest(fp32)
    work = Path(tempfile.mkdtemp(prefix=f".build-{target.name}-", dir=target.parent))
    scratch = Path(tempfile.mkdtemp(prefix=f".candidates-{target.name}-", dir=target.parent))
    try:
        shutil.copytree(fp32 / "tokenizer", work / "tokenizer")
        tokenizer = QueryTokenizer(work / "tokenizer" / "tokenizer.json", base.max_length,
                                   pairs=False)
        chosen, candidates, facts = choose(fp32 / base.model_file, scratch, quant, tokenizer,
                                           say)
        install(chosen, work / base.model_file)
        say(f"chose {chosen.name}: {chosen.metrics['speedup']:.2f}x FP32, mean cosine "
            f"{chosen.metrics['mean_cosine']:.4f}")
        manifest = Manifest(**{
            **_fields(base), "version": full_hash[:12], "content_hash": full_hash,
            "precision": "int8", "files": hash_files(work, list_files(work)),
            "created_at": time.time(),
            # Same workspace as the FP32 engine; only the weights shrink.
            "memory_bytes": max(0, base.memory_bytes - (fp32 / base.model_file).stat().st_size
                                + (work / base.model_file).stat().st_size),
            "build": {**base.build, "seconds": round(time.perf_counter() - started, 2),
                      "from_fp32": base.version,
                      "quantization": {**chosen.summary(), "max_drop": quant.max_drop,
                                       "budget": quant.budget, **facts,
                                       "candidates": [c.summary() for c in candidates]}},
            "accuracy": {"reference": f"fp32 engine {base.version}",
                         **{k: round(v, 6) for k, v in chosen.metrics.items()}},
        })
        write_manifest(work, manifest)
        _move_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _quiet(_: str) -> None:
    pass


def _build(source: ModelSource, root: Path, target: Path, full_hash: str, precision: str,
           say: Progress) -> Path:
    import onnx
    import onnxruntime

    from engines.export import export_onnx, optimize_onnx
    from engines.tokenizer import QueryTokenizer, tokenizer_id_of

    started = time.perf_counter()
    with build_dir(source, target) as work:
        say(f"exporting {source.model_id} ({source.head} head) to ONNX")
        raw = work.parent / f"{work.name}.raw.onnx"
        try:
            module = export_onnx(source, raw)
            say("optimising the graph (fused attention, LayerNorm, GELU)")
            fused = optimize_onnx(source, raw, work / "model.onnx")
        finally:
            raw.unlink(missing_ok=True)
        tokenizer = QueryTokenizer(work / "tokenizer" / "tokenizer.json", source.max_length,
                                   pairs=source.head == "classifier")
        manifest = Manifest(
            model_id=source.model_id, version=full_hash[:12], content_hash=full_hash,
            precision=precision, backend="onnxruntime", head=source.head,
            max_length=source.max_length, output_dim=0,
            tokenizer_id=tokenizer_id_of(work / "tokenizer" / "tokenizer.json"),
            files=hash_files(work, list_files(work)), created_at=time.time(),
            num_labels=source.num_labels, positive_label=source.positive_label,
            memory_bytes=estimate_memory_bytes(
                (work / "model.onnx").stat().st_size, max_length=source.max_length,
                hidden_size=source.hidden_size, num_layers=source.num_layers),
            build={"fused_ops": fused, "onnx": onnx.__version__,
                   "onnxruntime": onnxruntime.__version__, "opset": 17},
        )
        write_manifest(work, manifest)
        say("checking the engine against PyTorch")
        accuracy, output_dim = _check_accuracy(source, module, tokenizer, work)
        manifest = Manifest(**{**_fields(manifest), "accuracy": accuracy,
                               "output_dim": output_dim})
        manifest.build["seconds"] = round(time.perf_counter() - started, 2)
        write_manifest(work, manifest)
    return target


def _move_into_place(work: Path, target: Path) -> None:
    """A finished build dir becomes the artifact in one rename (a stale one is replaced)."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(work, target)


def _fields(manifest: Manifest) -> dict[str, object]:
    return {name: getattr(manifest, name) for name in manifest.__dataclass_fields__}


def _check_accuracy(source: ModelSource, module: object, tokenizer: object,
                    artifact: Path) -> tuple[dict[str, float], int]:
    from engines.batch import pad_sequences
    from engines.export import CHECK_TEXTS, pytorch_outputs
    from engines.onnx_runtime import OnnxRuntimeEngine
    from schemas import QueryItem

    items = [QueryItem(id=str(i), query=CHECK_TEXTS[i], docs=(CHECK_TEXTS[-1 - i],))
             for i in range(len(CHECK_TEXTS) // 2)]
    enc = tokenizer.encode(items)  # type: ignore[attr-defined]
    seqs = [enc.input_ids[enc.offsets[i]:enc.offsets[i + 1]] for i in range(len(enc.seq_item))]
    types = None
    if enc.token_type_ids is not None:
        types = [enc.token_type_ids[enc.offsets[i]:enc.offsets[i + 1]] for i in range(len(seqs))]
    batch = pad_sequences(seqs, types)
    feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
            "token_type_ids": batch.token_type_ids}
    ref = pytorch_outputs(module, feed)
    got = OnnxRuntimeEngine(artifact, verify=False).run(batch)
    if source.head == "similarity":
        cos = np.sum(ref * got, axis=1) / (
            np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
        report = {"reference": "pytorch-fp32", "sequences": len(seqs),
                  "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        if report["min_cosine"] < MIN_COSINE:
            raise BuildError(f"exported engine disagrees with PyTorch: min cosine "
                             f"{report['min_cosine']:.6f} < {MIN_COSINE}")
        return report, int(got.shape[1])
    diff = float(np.abs(ref - got).max())
    report = {"reference": "pytorch-fp32", "sequences": len(seqs), "max_abs_prob_diff": diff}
    if diff > MAX_PROB_DIFF:
        raise BuildError(f"exported engine disagrees with PyTorch: max probability "
                         f"difference {diff:.2e} > {MAX_PROB_DIFF}")
    return report, 1
