"""Build artifacts for the PyTorch runtime (backend "torch"): weights, config, accuracy report.

An artifact holds the encoder's weights (FP16, or FP32 for an fp32 engine) in safetensors, its
config, and the tokenizer. Quantization (INT8/FP8, per-channel) happens at load on the device,
in milliseconds, so one artifact per precision records the choice and its measured accuracy:

1. the implementation check: our Encoder against Hugging Face PyTorch in FP32 (min cosine
   >= 0.9999), so a wrong weight mapping can never ship;
2. the precision check on real queries (the validation third of the calibration file) against
   FP32, on the GPU when the build has one, else on CPU, where INT8 accumulation is exact and
   FP16/FP8 rounding is emulated. INT8/FP8 linears that push accuracy under budget are left in
   FP16, most sensitive first, like the ONNX Runtime INT8 search.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engines.accuracy import (
    FP16_MIN_COSINE,
    cosine_budget,
    cosine_report,
    cosines,
    meets,
    rounded,
    torch_outputs,
)
from engines.build_common import Progress, build_dir, ensure_artifact, gpu_options
from engines.errors import BuildError
from engines.manifest import Manifest, hash_files, list_files, write_manifest
from engines.quantize import QuantSpec, encode_texts, split_texts
from engines.source import ModelSource, default_sample_log

FP16_MAX_PROB_DIFF = 1e-2  # classifier heads
IMPLEMENTATION_MIN_COSINE = 0.9999
CHECK_QUERIES = 600


def ensure_torch(source: ModelSource, root: Path, *, precision: str, quant: QuantSpec,
                 rebuild: bool, progress: Progress, promote: bool,
                 device: str | None = None) -> Path:
    """The torch-backend artifact for `source` at `precision`, built if no intact one exists;
    `device` is where the precision check runs (default: CUDA when present, else CPU)."""
    return ensure_artifact(
        source, root, "torch", precision, gpu_options(precision, quant), rebuild=rebuild,
        progress=progress, promote=promote,
        build=lambda target, full: build_torch(source, target, full, precision, quant,
                                               progress, device=device))


def build_torch(source: ModelSource, target: Path, full_hash: str, precision: str,
                quant: QuantSpec, say: Progress, *, device: str | None = None) -> Path:
    """Build the torch artifact for `source` at `target` (version `full_hash[:12]`)."""
    import torch

    from engines.export import _load_torch_model, head_module
    from engines.tokenizer import QueryTokenizer, tokenizer_id_of
    from engines.torch_model import EncoderConfig, save_encoder, state_from_hf
    from engines.torch_runtime import PRECISIONS, memory_estimate

    if precision not in PRECISIONS:
        raise BuildError(f"precision {precision!r} not supported by the torch backend; choose "
                         f"{PRECISIONS}")
    if precision in ("int8", "fp8") and source.head != "similarity":
        raise BuildError("INT8/FP8 selection measures embedding cosine to FP32; classifier "
                         "heads build as fp16 or fp32 on the torch backend")
    started = time.perf_counter()
    with build_dir(source, target) as work:
        say(f"loading {source.model_id} ({source.head} head) for the torch backend")
        hf = _load_torch_model(source)
        reference = head_module(source, hf)
        cfg = EncoderConfig.from_hf(json.loads((source.path / "config.json").read_text()),
                                    head=source.head, num_labels=source.num_labels,
                                    positive_label=source.positive_label)
        state = state_from_hf(hf.state_dict(), cfg)
        tokenizer = QueryTokenizer(work / "tokenizer" / "tokenizer.json", source.max_length,
                                   pairs=source.head == "classifier")
        say("checking the encoder against Hugging Face PyTorch (FP32)")
        implementation = _implementation_check(cfg, state, reference, tokenizer)
        store = torch.float32 if precision == "fp32" else torch.float16
        save_encoder(work, cfg, state, store)
        quantization: dict[str, Any] = {}
        report: dict[str, Any] = {"reference": "pytorch-fp32", **implementation}
        if precision != "fp32":
            check, quantization = _precision_check(cfg, state, precision, quant, tokenizer,
                                                   say, device)
            report.update(check)
        manifest = Manifest(
            model_id=source.model_id, version=full_hash[:12], content_hash=full_hash,
            precision=precision, backend="torch", head=source.head,
            max_length=source.max_length, output_dim=cfg.output_dim,
            tokenizer_id=tokenizer_id_of(work / "tokenizer" / "tokenizer.json"),
            files=hash_files(work, list_files(work)), created_at=time.time(),
            num_labels=source.num_labels, positive_label=source.positive_label,
            memory_bytes=memory_estimate(cfg, precision, max_tokens=64 * 256, lanes=2),
            build={"torch": torch.__version__, "stored_dtype": str(store).removeprefix("torch."),
                   "seconds": round(time.perf_counter() - started, 2),
                   **({"quantization": quantization} if quantization else {})},
            accuracy=report,
        )
        write_manifest(work, manifest)
    return target


def _implementation_check(cfg: Any, state: dict[str, Any], reference: Any,
                          tokenizer: Any) -> dict[str, float]:
    from engines.export import CHECK_TEXTS
    from engines.torch_model import Encoder

    model = Encoder(cfg)
    model.load_state_dict(state)
    model.eval()
    batches = encode_texts(tokenizer, list(CHECK_TEXTS))
    ours, ref = torch_outputs(model, batches, "cpu"), torch_outputs(reference, batches, "cpu")
    if cfg.head == "similarity":
        low = float(cosines(ref, ours).min())
        if low < IMPLEMENTATION_MIN_COSINE:
            raise BuildError(f"the torch encoder disagrees with Hugging Face PyTorch: min "
                             f"cosine {low:.6f} < {IMPLEMENTATION_MIN_COSINE}")
        return {"implementation_min_cosine": low}
    diff = float(np.abs(ref - ours).max())
    if diff > 1e-4:
        raise BuildError(f"the torch encoder disagrees with Hugging Face PyTorch: max "
                         f"probability difference {diff:.2e}")
    return {"implementation_max_prob_diff": diff}


def _precision_check(cfg: Any, state: dict[str, Any], precision: str, quant: QuantSpec,
                     tokenizer: Any, say: Progress,
                     device_name: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Accuracy of `precision` against FP32 on real queries; for INT8/FP8 the linears left in
    the float dtype to meet the budget (empty when all of them can be quantized)."""
    import torch

    from engines.torch_model import Encoder
    from engines.torch_quant import quantize_linears

    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16
    source = quant.calibration or default_sample_log()
    _, validate = split_texts(source)
    texts = validate[:CHECK_QUERIES]
    batches = encode_texts(tokenizer, texts)
    base = Encoder(cfg)
    base.load_state_dict(state)
    base.eval()
    fp32 = torch_outputs(base.to(device), batches, device)

    def measure(excluded: tuple[str, ...]) -> dict[str, float]:
        model = Encoder(cfg)
        model.load_state_dict(state)
        model = model.to(device=device, dtype=dtype).eval()
        if precision in ("int8", "fp8"):
            names = [n for n in cfg.linear_names() if n not in excluded]
            quantize_linears(model, precision, names, out_dtype=dtype)
        got = torch_outputs(model, batches, device)
        if cfg.head != "similarity":
            return {"max_abs_prob_diff": float(np.abs(fp32 - got).max())}
        return cosine_report(fp32, got)

    where = {"checked_on": str(device) if device.type == "cuda"
             else "cpu (fp16 and int8/fp8 arithmetic emulated by PyTorch's CPU kernels)",
             "queries": len(texts), "query_file": source.name}
    say(f"measuring {precision} against FP32 on {len(texts)} real queries ({device})")
    metrics = measure(())
    if precision == "fp16":
        ok = (metrics["min_cosine"] >= FP16_MIN_COSINE if "min_cosine" in metrics
              else metrics["max_abs_prob_diff"] <= FP16_MAX_PROB_DIFF)
        if not ok:
            raise BuildError(f"FP16 engine is not within {FP16_MIN_COSINE} cosine of FP32 on "
                             f"every query: {metrics}")
        return {**where, **rounded(metrics)}, {}
    budget = cosine_budget(quant.max_drop)
    excluded: tuple[str, ...] = ()
    if not meets(metrics, budget):
        say(f"{precision} misses the budget ({rounded(metrics)}); ranking layers by "
            "sensitivity")
        ranked = _sensitivity(cfg, measure)
        for name in ranked[: quant.max_exclude]:
            excluded = (*excluded, name)
            metrics = measure(excluded)
            if meets(metrics, budget):
                break
        if not meets(metrics, budget):
            raise BuildError(f"no {precision} engine meets max_drop {quant.max_drop} with up "
                             f"to {quant.max_exclude} linears left in FP16 (best: "
                             f"{rounded(metrics)}); raise --max-drop or use fp16")
    return ({**where, **rounded(metrics), "budget": budget},
            {"method": "per-channel weights, per-token dynamic activations",
             "excluded": list(excluded), "quantized": len(cfg.linear_names()) - len(excluded)})


def _sensitivity(cfg: Any, measure: Callable[[tuple[str, ...]], dict[str, float]]) -> list[str]:
    """Linears ordered by how much mean cosine each one alone costs when quantized."""
    names = cfg.linear_names()
    drops = {}
    for name in names:
        others = tuple(n for n in names if n != name)
        drops[name] = 1 - measure(others)["mean_cosine"]
    return sorted(names, key=lambda n: -drops[n])

