"""Build OpenVINO artifacts (backend "openvino"): FP32 converted from the model, INT8 by NNCF.

FP32: the PyTorch model with its head folded in (engines.export.head_module) is converted by
`openvino.convert_model`, saved without FP16 weight compression, and checked against PyTorch
before the manifest is final. INT8: the FP32 artifact (built first if needed, never promoted
for it) is quantized by NNCF post-training quantization (static: activation ranges calibrated
on the calibration third of real queries, so OpenVINO runs the MatMuls on the integer
dot-product units), then measured on the validation third against the same budget as ONNX
Runtime's INT8 search (mean and p1 cosine to FP32, Spearman of query-doc scores). When the
budget is missed, NNCF's accuracy-aware quantization returns layers to FP32, most sensitive
first, in at most `max_exclude` steps (a step returns a group of layers that share a quantizer,
e.g. the Q, K and V projections, or an embedding table); the layers left in FP32 are read back
from the graph and recorded in the manifest.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from engines.accuracy import cosine_report, cosines, meets, rounded
from engines.build_common import (
    Progress,
    build_dir,
    check_against_torch,
    ensure_artifact,
    move_into_place,
)
from engines.errors import BuildError
from engines.export import INPUT_NAMES
from engines.manifest import (
    Manifest,
    estimate_memory_bytes,
    hash_files,
    list_files,
    read_manifest,
    write_manifest,
)
from engines.openvino_runtime import import_openvino, telemetry_off
from engines.quantize import (
    QuantSpec,
    encode_texts,
    file_digest,
    load_pairs,
    spearman,
    split_texts,
)
from engines.source import ModelSource, default_sample_log

PRECISIONS = ("fp32", "int8")
CALIBRATION_QUERIES = 300  # NNCF's default subset size; one query per sample, no padding
VALIDATION_QUERIES = 1000
METHOD = "nncf-ptq"


def ensure_openvino(source: ModelSource, root: Path, *, precision: str, quant: QuantSpec,
                    rebuild: bool, progress: Progress, promote: bool,
                    device: str | None = None) -> Path:
    """The OpenVINO artifact for `source` at `precision`, built if no intact one exists.
    (`device` is for the table's common signature: these engines build on the CPU.)"""
    if precision not in PRECISIONS:
        raise BuildError(f"precision {precision!r} not supported by the openvino backend; "
                         f"choose {PRECISIONS}")
    _require_openvino()
    if precision == "fp32":
        return ensure_artifact(
            source, root, "openvino", precision, None, rebuild=rebuild, progress=progress,
            promote=promote, build=lambda target, full: _build_fp32(source, target, full,
                                                                    progress))
    if source.head != "similarity":
        raise BuildError("INT8 selection measures embedding cosine to FP32; only the "
                         "similarity head can be built INT8 for now (use --precision fp32)")
    if quant.level != "auto" or quant.method != "dynamic":
        raise BuildError("--level and --method choose ONNX Runtime's INT8 candidates; the "
                         "openvino backend calibrates every MatMul statically (NNCF) and "
                         "returns layers to FP32 only as the budget needs")
    fp32 = ensure_openvino(source, root, precision="fp32", quant=QuantSpec(), rebuild=False,
                           progress=progress, promote=False)
    return ensure_artifact(
        source, root, "openvino", precision, quant_options(quant), rebuild=rebuild,
        progress=progress, promote=promote,
        build=lambda target, full: _build_int8(fp32, target, full, quant, progress))


def quant_options(quant: QuantSpec) -> dict[str, object]:
    """What of a QuantSpec decides the INT8 engine (and so its version)."""
    return {"method": METHOD, "max_drop": quant.max_drop, "max_exclude": quant.max_exclude,
            "calibration": file_digest(quant.calibration or default_sample_log()),
            "pairs": file_digest(quant.sample_pairs or default_sample_log()),
            "calibration_queries": CALIBRATION_QUERIES}


def _require_openvino() -> None:
    try:
        import_openvino()
    except ImportError as exc:
        raise BuildError("the openvino backend needs OpenVINO: pip install openvino") from exc


def _build_fp32(source: ModelSource, target: Path, full_hash: str, say: Progress) -> Path:
    import torch

    from engines.export import _load_torch_model, head_module
    from engines.openvino_runtime import INFERENCE_PRECISION, OpenVinoEngine
    from engines.tokenizer import QueryTokenizer, tokenizer_id_of

    ov = import_openvino()
    started = time.perf_counter()
    with build_dir(source, target) as work:
        say(f"converting {source.model_id} ({source.head} head) to OpenVINO")
        module = head_module(source, _load_torch_model(source))
        dummy = torch.ones((2, 8), dtype=torch.long)
        try:
            with telemetry_off():
                model = ov.convert_model(
                    module, example_input=(dummy, dummy, torch.zeros_like(dummy)),
                    input=[(name, [-1, -1], ov.Type.i64) for name in INPUT_NAMES])
        except Exception as exc:
            raise BuildError(f"OpenVINO cannot convert {source.model_id}: {exc}") from exc
        # FP16-compressed weights would be decompressed at load: not the FP32 engine.
        ov.save_model(model, work / "model.xml", compress_to_fp16=False)
        tokenizer = QueryTokenizer(work / "tokenizer" / "tokenizer.json", source.max_length,
                                   pairs=source.head == "classifier")
        manifest = Manifest(
            model_id=source.model_id, version=full_hash[:12], content_hash=full_hash,
            precision="fp32", backend="openvino", head=source.head,
            max_length=source.max_length, output_dim=0,
            tokenizer_id=tokenizer_id_of(work / "tokenizer" / "tokenizer.json"),
            files=hash_files(work, list_files(work)), created_at=time.time(),
            num_labels=source.num_labels, positive_label=source.positive_label,
            memory_bytes=_memory(work, source),
            build={"openvino": ov.get_version(), "converted_from": "pytorch",
                   "inference_precision": INFERENCE_PRECISION},
        )
        write_manifest(work, manifest)
        say("checking the engine against PyTorch")
        accuracy, output_dim = check_against_torch(
            source, module, tokenizer, OpenVinoEngine(work, verify=False))
        manifest = Manifest(**{**_fields(manifest), "accuracy": accuracy,
                               "output_dim": output_dim})
        manifest.build["seconds"] = round(time.perf_counter() - started, 2)
        write_manifest(work, manifest)
    return target


def _memory(work: Path, source: ModelSource) -> int:
    return estimate_memory_bytes(
        (work / "model.bin").stat().st_size, max_length=source.max_length,
        hidden_size=source.hidden_size, num_layers=source.num_layers)


def _fields(manifest: Manifest) -> dict[str, object]:
    return {name: getattr(manifest, name) for name in manifest.__dataclass_fields__}


# -- INT8 -----------------------------------------------------------------------------------

def _feeds(batch: Any) -> dict[str, np.ndarray]:
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
            "token_type_ids": batch.token_type_ids}


class _Runner:
    """Compiled models run on fixed, length-sorted batches (what every candidate is measured on),
    each output row written back at its text's index."""

    def __init__(self, threads: int | None) -> None:
        from engines.openvino_runtime import inference_config

        self.core = import_openvino().Core()
        self.config = inference_config(threads or 0, 1)

    def compile(self, model: Any) -> Any:
        return self.core.compile_model(model, "CPU", self.config)

    @staticmethod
    def outputs(compiled: Any, batches: Iterable[tuple[np.ndarray, Any]]) -> np.ndarray:
        request = compiled.create_infer_request()
        batches = list(batches)
        n = max((int(rows.max()) + 1 for rows, _ in batches), default=0)
        out = np.zeros((n, *compiled.outputs[0].get_partial_shape()[1:].to_shape()),
                       dtype=np.float32)
        for rows, b in batches:
            request.infer({k: v for k, v in _feeds(b).items()
                           if k in {p.get_any_name() for p in compiled.inputs}})
            out[rows] = request.get_output_tensor(0).data
        return out


def _measure(runner: _Runner, model: Any, data: dict[str, Any]) -> dict[str, Any]:
    compiled = runner.compile(model)
    runner.outputs(compiled, data["validate"][:1])  # first-call costs outside the timing
    started = time.perf_counter()
    emb = runner.outputs(compiled, data["validate"])
    rate = len(emb) / (time.perf_counter() - started)
    q = runner.outputs(compiled, data["pair_q"])
    d = runner.outputs(compiled, data["pair_d"])
    return {"emb": emb, "pairs": np.sum(q * d, axis=1), "items_per_s": rate}


def _metrics(got: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    return {**cosine_report(ref["emb"], got["emb"]),
            "spearman": spearman(got["pairs"], ref["pairs"]),
            "items_per_s": float(got["items_per_s"]),
            "speedup": float(got["items_per_s"] / ref["items_per_s"])}


QUANTIZABLE = ("MatMul", "ScaledDotProductAttention")
# Embedding lookups: NNCF quantizes their tables (weights only), and accuracy control may return
# one to FP32 without touching any MatMul.
EMBEDDING = "Gather"
_AROUND_WEIGHTS = ("Convert", "Reshape", "Transpose", "Multiply", "Subtract")


def fp32_layers(model: Any) -> list[str]:
    """The layers of a quantized graph left in FP32: the MatMuls (linear layers and attention
    products) none of whose inputs is quantized, and the embedding lookups whose table is
    neither INT8 nor behind a FakeQuantize."""
    out = []
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind in QUANTIZABLE:
            sources = [op.input_value(i).get_node() for i in range(min(2, op.get_input_size()))]
            if not any(_quantized(s) for s in sources):
                out.append(op.get_friendly_name())
        elif kind == EMBEDDING:
            table = _behind_wrappers(op.input_value(0).get_node())
            if table.get_type_name() == "Constant" and len(table.get_output_shape(0)) >= 2 \
                    and not table.get_output_element_type(0).is_integral():
                out.append(op.get_friendly_name())  # an FP32 table (shape Gathers are skipped)
    return sorted(out)


def _behind_wrappers(node: Any) -> Any:
    # The FakeQuantize or Constant behind the Convert/Reshape/Transpose/Multiply/Subtract NNCF
    # leaves around weights (INT8 weights are Constant(i8) -> Convert -> [Subtract] -> Multiply)
    for _ in range(4):
        if node.get_type_name() not in _AROUND_WEIGHTS:
            return node
        node = node.input_value(0).get_node()
    return node


def _quantized(node: Any) -> bool:
    return bool(_behind_wrappers(node).get_type_name() == "FakeQuantize")


def _build_int8(fp32: Path, target: Path, full_hash: str, quant: QuantSpec,
                say: Progress) -> Path:
    # NNCF's progress bars go to stdout, where `qscore engine build` prints only the artifact;
    # its INFO lines repeat what `say` reports; at DEBUG it writes ./nncf_debug/ (cwd).
    with telemetry_off():
        import nncf

        level = nncf.common.logging.nncf_logger.level
        nncf.set_log_level(logging.WARNING)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return _build_int8_quietly(fp32, target, full_hash, quant, say)
        finally:
            nncf.set_log_level(level)


def _build_int8_quietly(fp32: Path, target: Path, full_hash: str, quant: QuantSpec,
                        say: Progress) -> Path:
    import nncf

    ov = import_openvino()

    from engines.tokenizer import QueryTokenizer

    started = time.perf_counter()
    base = read_manifest(fp32)
    work = Path(tempfile.mkdtemp(prefix=f".build-{target.name}-", dir=target.parent))
    try:
        shutil.copytree(fp32 / "tokenizer", work / "tokenizer")
        tokenizer = QueryTokenizer(work / "tokenizer" / "tokenizer.json", base.max_length,
                                   pairs=False)
        source = quant.calibration or default_sample_log()
        calibrate, validate = split_texts(source)
        pair_q, pair_d = load_pairs(quant.sample_pairs or default_sample_log())
        data = {"validate": encode_texts(tokenizer, validate[:VALIDATION_QUERIES]),
                "pair_q": encode_texts(tokenizer, pair_q),
                "pair_d": encode_texts(tokenizer, pair_d)}
        runner = _Runner(None)
        fp32_model = runner.core.read_model(str(fp32 / base.model_file))
        say(f"measuring FP32 on {len(validate[:VALIDATION_QUERIES])} validation queries and "
            f"{len(pair_q)} pairs")
        ref = _measure(runner, fp32_model, data)
        # One query per sample: padding would add the pad tokens' activations to the ranges.
        calib = encode_texts(tokenizer, calibrate[:CALIBRATION_QUERIES], max_batch=1)
        calibration = nncf.Dataset(calib, lambda item: _feeds(item[1]))
        say(f"calibrating INT8 on {len(calib)} queries (NNCF post-training quantization)")
        quantized = nncf.quantize(fp32_model, calibration, model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calib))
        candidates = [_candidate("nncf-ptq", quantized, _metrics(_measure(runner, quantized,
                                                                          data), ref))]
        say(_said(candidates[-1]))
        budget = quant.budget
        if not meets(candidates[-1]["metrics"], budget) and quant.max_exclude > 0:
            say(f"below the budget; returning layers to FP32 ({quant.max_exclude} steps at most)")
            quantized = _restore(nncf, fp32_model, calibration, data, ref, quant, runner)
            candidates.append(_candidate("nncf-ptq-accuracy-control", quantized,
                                         _metrics(_measure(runner, quantized, data), ref)))
            say(_said(candidates[-1]))
        chosen = candidates[-1]
        if not meets(chosen["metrics"], budget):
            raise BuildError(
                f"no INT8 engine meets max_drop {quant.max_drop} (mean cosine "
                f"{chosen['metrics']['mean_cosine']:.4f}, p1 "
                f"{chosen['metrics']['p1_cosine']:.4f}, Spearman "
                f"{chosen['metrics']['spearman']:.4f} with {len(chosen['excluded'])} layers "
                "in FP32); raise --max-drop, allow more exclusions, or use --precision fp32")
        ov.save_model(quantized, work / base.model_file, compress_to_fp16=False)
        manifest = Manifest(**{
            **_fields(base), "version": full_hash[:12], "content_hash": full_hash,
            "precision": "int8", "files": hash_files(work, list_files(work)),
            "created_at": time.time(),
            "memory_bytes": max(0, base.memory_bytes - (fp32 / "model.bin").stat().st_size
                                + (work / "model.bin").stat().st_size),
            "build": {**base.build, "seconds": round(time.perf_counter() - started, 2),
                      "from_fp32": base.version, "nncf": nncf.__version__,
                      "quantization": {**_summary(chosen), "max_drop": quant.max_drop,
                                       "budget": budget,
                                       "calibration_file": source.name,
                                       "calibration_sha256": file_digest(source),
                                       "calibration_queries": len(calib),
                                       "validation_queries": len(validate[:VALIDATION_QUERIES]),
                                       "pairs": len(pair_q),
                                       "fp32_items_per_s": round(ref["items_per_s"], 1),
                                       "candidates": [_summary(c) for c in candidates]}},
            "accuracy": {"reference": f"fp32 engine {base.version}",
                         **rounded(chosen["metrics"])},
        })
        write_manifest(work, manifest)
        move_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def _candidate(name: str, model: Any, metrics: dict[str, float]) -> dict[str, Any]:
    return {"name": name, "excluded": fp32_layers(model), "metrics": metrics}


def _summary(candidate: dict[str, Any]) -> dict[str, object]:
    return {"name": candidate["name"], "method": METHOD,
            "excluded_nodes": candidate["excluded"], **rounded(candidate["metrics"])}


def _said(candidate: dict[str, Any]) -> str:
    m = candidate["metrics"]
    return (f"{candidate['name']}: {m['speedup']:.2f}x FP32, mean cosine {m['mean_cosine']:.4f}"
            f", p1 {m['p1_cosine']:.4f}, {len(candidate['excluded'])} layers in FP32")


def _restore(nncf: Any, fp32_model: Any, calibration: Any, data: dict[str, Any],
             ref: dict[str, Any], quant: QuantSpec, runner: _Runner) -> Any:
    """NNCF's accuracy-aware quantization on the validation batches: the metric is mean cosine
    to FP32 (1.0 for the FP32 model itself), per batch for its ranking of layers."""
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    items = data["validate"]

    def validate(compiled: Any, batches: Iterable[tuple[np.ndarray, Any]]) -> tuple[float,
                                                                                   list[float]]:
        per, total, count = [], 0.0, 0
        for rows, b in batches:
            got = runner.outputs(compiled, [(np.arange(len(rows)), b)])
            cos = cosines(ref["emb"][rows], got)
            per.append(float(cos.mean()))
            total += float(cos.sum())
            count += len(rows)
        return total / max(count, 1), per

    return nncf.quantize_with_accuracy_control(
        fp32_model, calibration, nncf.Dataset(items), validation_fn=validate,
        max_drop=quant.max_drop, drop_type=nncf.DropType.ABSOLUTE,
        model_type=nncf.ModelType.TRANSFORMER, subset_size=calibration.get_length() or 300,
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            max_num_iterations=quant.max_exclude))
