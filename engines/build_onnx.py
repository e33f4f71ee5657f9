"""Build ONNX Runtime artifacts (backend "onnxruntime"): FP32 by export, INT8 from the FP32 one.

FP32: the model is exported with its head folded in (engines.export), fused by ONNX Runtime's
transformer optimiser, and checked against PyTorch FP32 before the manifest is final. INT8: the
FP32 engine (built first if needed, never promoted for it) is quantized by the measured search
in engines.quantize, and the candidate chosen is installed with the FP32 tokenizer.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from engines.accuracy import rounded
from engines.build_common import (
    Progress,
    build_dir,
    check_against_torch,
    ensure_artifact,
    move_into_place,
)
from engines.errors import BuildError
from engines.manifest import (
    Manifest,
    estimate_memory_bytes,
    hash_files,
    list_files,
    read_manifest,
    write_manifest,
)
from engines.quantize import QuantSpec, file_digest
from engines.source import ModelSource, default_sample_log

PRECISIONS = ("fp32", "int8")  # the torch backend's are in engines.torch_runtime


def ensure_onnx(source: ModelSource, root: Path, *, precision: str, quant: QuantSpec,
                rebuild: bool, progress: Progress, promote: bool,
                device: str | None = None) -> Path:
    """The ONNX Runtime artifact for `source` at `precision`, built if no intact one exists.
    (`device` is for the table's common signature: ONNX Runtime engines build on the CPU.)"""
    if precision not in PRECISIONS:
        raise BuildError(f"precision {precision!r} not supported; choose {PRECISIONS}")
    if precision == "fp32":
        return ensure_artifact(
            source, root, "onnxruntime", precision, None, rebuild=rebuild, progress=progress,
            promote=promote,
            build=lambda target, full: _build(source, target, full, precision, progress))
    if source.head != "similarity":
        raise BuildError("INT8 selection measures embedding cosine to FP32; only the "
                         "similarity head can be built INT8 for now (use --precision fp32)")
    # The FP32 engine is only the INT8 search's input: reused as cached even on a rebuild.
    fp32 = ensure_onnx(source, root, precision="fp32", quant=QuantSpec(), rebuild=False,
                       progress=progress, promote=False)
    return ensure_artifact(
        source, root, "onnxruntime", precision, quant_options(quant), rebuild=rebuild,
        progress=progress, promote=promote,
        build=lambda target, full: _build_int8(fp32, target, full, quant, progress))


def quant_options(quant: QuantSpec) -> dict[str, object]:
    """What of a QuantSpec decides the chosen engine (and so its version)."""
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
    # Not build_dir: the tokenizer comes from the FP32 artifact, not the model directory.
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
            "accuracy": {"reference": f"fp32 engine {base.version}", **rounded(chosen.metrics)},
        })
        write_manifest(work, manifest)
        move_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _build(source: ModelSource, target: Path, full_hash: str, precision: str,
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
        from engines.onnx_runtime import OnnxRuntimeEngine

        accuracy, output_dim = check_against_torch(source, module, tokenizer,
                                                   OnnxRuntimeEngine(work, verify=False))
        manifest = Manifest(**{**_fields(manifest), "accuracy": accuracy,
                               "output_dim": output_dim})
        manifest.build["seconds"] = round(time.perf_counter() - started, 2)
        write_manifest(work, manifest)
    return target


def _fields(manifest: Manifest) -> dict[str, object]:
    return {name: getattr(manifest, name) for name in manifest.__dataclass_fields__}
