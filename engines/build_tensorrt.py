"""Build a TensorRT artifact: raw ONNX export -> plan (INT8 entropy-calibrated, or FP16) ->
accuracy check against PyTorch FP32 on real queries -> manifest.

The raw export (not ONNX Runtime's fused graph, whose com.microsoft operators TensorRT cannot
parse) is kept in the artifact: a plan only loads on the GPU architecture and TensorRT version
that built it, and is rebuilt from that file elsewhere. TensorRT is required before any work
starts, so a machine without it fails in a second with the install hint, not after an export.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from engines.accuracy import (
    FP16_MIN_COSINE,
    cosine_budget,
    cosine_report,
    meets,
    rounded,
    torch_outputs,
)
from engines.buckets import BucketPlan
from engines.build_common import Progress, build_dir, ensure_artifact, gpu_options
from engines.errors import BuildError
from engines.manifest import Manifest, hash_files, list_files, write_manifest
from engines.quantize import QuantSpec, encode_texts, split_texts
from engines.source import ModelSource, default_sample_log
from engines.tensorrt.availability import require_tensorrt
from engines.tensorrt.build import CALIBRATION_CACHE, ONNX_FILE, PLAN_FILE, build_plan

CONTEXTS = 2  # one optimisation profile per execution context: two lanes
CALIBRATION_BATCH = 16
CALIBRATION_BATCHES = 32


def ensure_tensorrt(source: ModelSource, root: Path, *, precision: str, quant: QuantSpec,
                    rebuild: bool, progress: Progress, promote: bool,
                    device: str | None = None) -> Path:
    """The TensorRT artifact for `source` at `precision`, built if no intact one exists.
    (`device` is for the table's common signature: a plan builds on the current GPU.)"""
    require_tensorrt()  # before hashing gigabytes or exporting anything
    return ensure_artifact(
        source, root, "tensorrt", precision, gpu_options(precision, quant), rebuild=rebuild,
        progress=progress, promote=promote,
        build=lambda target, full: build_tensorrt(source, target, full, precision, quant,
                                                  progress))


def build_tensorrt(source: ModelSource, target: Path, full_hash: str, precision: str,
                   quant: QuantSpec, say: Progress) -> Path:
    """Build the TensorRT artifact for `source` at `target` (version `full_hash[:12]`)."""
    require_tensorrt()
    from engines.export import export_onnx
    from engines.tensorrt.calibration import CalibrationBatches
    from engines.tensorrt.runtime import TensorRTEngine
    from engines.tokenizer import QueryTokenizer, tokenizer_id_of

    if source.head != "similarity" and precision == "int8":
        raise BuildError("INT8 accuracy is measured as embedding cosine; classifier heads "
                         "build as --precision fp16 on TensorRT")
    started = time.perf_counter()
    with build_dir(source, target) as work:
        tokenizer = QueryTokenizer(work / "tokenizer" / "tokenizer.json", source.max_length,
                                   pairs=source.head == "classifier")
        say(f"exporting {source.model_id} to ONNX for TensorRT")
        reference = export_onnx(source, work / ONNX_FILE)
        calibrate, validate = split_texts(quant.calibration or default_sample_log())
        batches = None
        if precision == "int8":
            batches = CalibrationBatches(calibrate, tokenizer, batch_size=CALIBRATION_BATCH,
                                         max_batches=CALIBRATION_BATCHES)
        plan = BucketPlan.for_model(source.max_length)
        facts = build_plan(work / ONNX_FILE, work / PLAN_FILE, plan=plan, precision=precision,
                           calibration="entropy", batches=batches,
                           cache_path=work / CALIBRATION_CACHE, contexts=CONTEXTS,
                           progress=say)
        device_bytes = int(facts.get("device_memory_bytes") or 0)
        io_bytes = plan.max_tokens * 8 * 3 + plan.max_batch * source.hidden_size * 4
        manifest = Manifest(
            model_id=source.model_id, version=full_hash[:12], content_hash=full_hash,
            precision=precision, backend="tensorrt", head=source.head,
            max_length=source.max_length,
            output_dim=source.hidden_size if source.head == "similarity" else 1,
            tokenizer_id=tokenizer_id_of(work / "tokenizer" / "tokenizer.json"),
            files=hash_files(work, list_files(work)), created_at=time.time(),
            num_labels=source.num_labels, positive_label=source.positive_label,
            memory_bytes=(work / PLAN_FILE).stat().st_size + CONTEXTS * (device_bytes
                                                                          + io_bytes),
            build=facts,
        )
        write_manifest(work, manifest)
        say(f"checking the plan against PyTorch FP32 on {min(len(validate), 600)} queries")
        checked = encode_texts(tokenizer, validate[:600])
        ref = torch_outputs(reference, checked, "cpu")
        engine = TensorRTEngine(work, lanes=1, verify=False)
        try:
            got = np.empty_like(ref)
            for rows, batch in checked:
                got[rows] = engine.run(batch)
        finally:
            engine.close()
        report = _judge(source, precision, quant, ref, got)
        manifest = dataclasses.replace(manifest, accuracy={
            "reference": "pytorch-fp32", "queries": len(ref), **report})
        manifest.build["seconds"] = round(time.perf_counter() - started, 2)
        write_manifest(work, manifest)
    return target


def _judge(source: ModelSource, precision: str, quant: QuantSpec, ref: np.ndarray,
           got: np.ndarray) -> dict[str, float]:
    if source.head != "similarity":
        diff = float(np.abs(ref - got).max())
        if diff > 1e-2:
            raise BuildError(f"TensorRT FP16 plan differs from FP32 by {diff:.2e} probability")
        return {"max_abs_prob_diff": diff}
    report = cosine_report(ref, got)
    if precision == "fp16" and report["min_cosine"] < FP16_MIN_COSINE:
        raise BuildError(f"TensorRT FP16 plan is not within {FP16_MIN_COSINE} cosine of FP32 "
                         f"on every query: {report}")
    if precision == "int8" and not meets(report, cosine_budget(quant.max_drop)):
        raise BuildError(f"TensorRT INT8 plan misses max_drop {quant.max_drop}: {report}; "
                         "use --precision fp16, or explicit Q/DQ (docs/tensorrt.md)")
    return rounded(report)
