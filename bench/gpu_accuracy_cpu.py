"""Accuracy of the GPU engines' precisions, measured without a GPU.

Builds the default model for the torch backend at FP16, INT8 and FP8 and compares each, on
held-out real queries, with the FP32 ONNX Runtime engine. The arithmetic is PyTorch's CPU
kernels in the GPU engine's dtype: FP16 activations and weights, INT8 products summed exactly,
FP8 e4m3 with row-wise scales. Speed is not measured here (bench/engine_gpu.py, on a GPU).

    .venv/bin/python bench/gpu_accuracy_cpu.py [--queries TSV] [--n 3000]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import load_queries, machine, markdown_table, write_section
from engines.accuracy import cosines

PRECISIONS = ("fp16", "int8", "fp8")


def embed(engine, tokenizer, queries: list[str]) -> np.ndarray:  # type: ignore[no-untyped-def]
    from engines.batch import pad_sequences, plan_batches
    from schemas import QueryItem

    tb = tokenizer.token_batch("acc", [QueryItem(id=str(i), query=q)
                                       for i, q in enumerate(queries)], submitted_at=0.0)
    out = np.empty((len(queries), engine.manifest.output_dim or 384), dtype=np.float32)
    for rows in plan_batches(tb.lengths, max_batch=64, token_budget=64 * 256):
        out[rows] = engine.run(pad_sequences([tb.sequence(int(j)) for j in rows]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=Path, default=None)
    parser.add_argument("--n", type=int, default=3000, help="held-out queries compared")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from engines.build import ensure_engine
    from engines.loader import load_engine
    from engines.quantize import QuantSpec
    from engines.source import resolve_model
    from engines.tokenizer import QueryTokenizer
    from engines.torch_runtime import TorchEngine, TorchOptions

    queries, where = load_queries(args.queries)
    split = len(queries) * 4 // 7  # the same split as bench/engine_cpu.py
    held_out = queries[split:][: args.n]
    source = resolve_model("default")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "calibration.tsv"
        calibration.write_text("".join(f"{i}\t{q}\n" for i, q in enumerate(queries[:split])))
        fp32 = load_engine(ensure_engine(source, Path(tmp), precision="fp32", promote=False))
        tokenizer = QueryTokenizer(fp32.path / "tokenizer" / "tokenizer.json",
                                   fp32.manifest.max_length, pairs=False)
        reference = embed(fp32, tokenizer, held_out)
        for precision in PRECISIONS:
            started = time.perf_counter()
            path = ensure_engine(source, Path(tmp), precision=precision, backend="torch",
                                 promote=False, quant=QuantSpec(calibration=calibration),
                                 progress=lambda m: print(f"  build: {m}"))
            engine = TorchEngine(path, options=TorchOptions(device="cpu", dtype="fp16"))
            got = embed(engine, tokenizer, held_out)
            cos = cosines(reference, got)
            excluded = engine.manifest.build.get("quantization", {}).get("excluded", [])
            rows.append([precision.upper(), f"{cos.mean():.4f}",
                         f"{np.percentile(cos, 1):.4f}", f"{cos.min():.4f}",
                         ", ".join(excluded) or "none"])
            print(f"{precision}: mean {cos.mean():.5f} p1 {np.percentile(cos, 1):.5f} "
                  f"min {cos.min():.5f} ({time.perf_counter() - started:.0f} s)")
    table = markdown_table(["torch engine", "mean cosine", "p1 cosine", "min cosine",
                            "linears left in FP16"], rows)
    body = (f"### GPU precisions, accuracy measured on CPU\n\n"
            f"`{shlex.join(['.venv/bin/python', 'bench/gpu_accuracy_cpu.py', *sys.argv[1:]])}`"
            f" on {machine()}. Cosine of each held-out query's embedding to the FP32 ONNX "
            f"Runtime engine's, {len(held_out)} queries of {where.split(' ')[0]} never used "
            f"to build (the builds calibrate and check on the first {split}). FP16 rounding "
            f"and INT8/FP8 arithmetic by PyTorch's CPU kernels; the same comparison on the "
            f"GPU is part b of bench/engine_gpu.py. Targets: FP16 min >= 0.999; INT8/FP8 mean "
            f">= 0.995 and p1 >= 0.98.\n\n{table}\n")
    print(table)
    if not args.no_write:
        write_section("gpu_accuracy_cpu", body)


if __name__ == "__main__":
    main()
