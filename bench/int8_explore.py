"""Groundwork for INT8 engines: ONNX Runtime dynamic quantization variants of the default
engine against its FP32 self, on real queries, and a greedy per-node sensitivity search.

Run: .venv/bin/python bench/int8_explore.py [--n 1500]
Quantizes the fused FP32 artifact (Attention, MatMul), then for per-channel dynamic INT8 finds
the nodes whose exclusion helps accuracy most, measured on a split the report does not use.
Prints a table and writes it into docs/benchmarks.md. Not yet an engine build path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import load_queries, machine, markdown_table, write_section
from engines.accuracy import cosines


def batches_of(tokenizer, queries: list[str]):  # type: ignore[no-untyped-def]
    from engines.batch import pad_sequences, plan_batches
    from schemas import QueryItem

    tb = tokenizer.token_batch("q", [QueryItem(id=str(i), query=q)
                                     for i, q in enumerate(queries)], submitted_at=0)
    plans = plan_batches(tb.lengths, max_batch=64, token_budget=1 << 20)
    return [pad_sequences([tb.sequence(int(j)) for j in rows]) for rows in plans]


def run(model: str, batches) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    from engines.onnx_runtime import ort_feed

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}

    session.run(None, ort_feed(batches[0], names))
    started = time.perf_counter()
    outs = [session.run(None, ort_feed(b, names))[0] for b in batches]
    elapsed = time.perf_counter() - started
    return np.concatenate(outs), sum(b.size for b in batches) / elapsed


def short(node: str) -> str:
    """'/encoder/encoder/layer.0/output/dense/MatMul' -> 'layer.0/output/dense'."""
    return "/".join(node.split("/")[3:-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=Path, default=None)
    parser.add_argument("--n", type=int, default=1500, help="report queries")
    parser.add_argument("--search", type=int, default=800, help="sensitivity-search queries")
    parser.add_argument("--calibrate", type=int, default=300, help="calibration queries")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from engines.select import EngineSettings, find_artifact
    from engines.tokenizer import QueryTokenizer
    from qscore.cli.options import DEFAULT_ENGINE_DIR

    queries, source_name = load_queries(args.queries)
    path = find_artifact(EngineSettings(engine_dir=DEFAULT_ENGINE_DIR))
    fp32 = str(path / "model.onnx")
    tok = QueryTokenizer(path / "tokenizer" / "tokenizer.json", 256, pairs=False)
    report = batches_of(tok, queries[: args.n])
    search = batches_of(tok, queries[args.n: args.n + args.search])
    ref, fp32_rate = run(fp32, report)
    search_ref, _ = run(fp32, search)
    nodes = [n.name for n in onnx.load(fp32).graph.node if n.op_type in ("MatMul", "Attention")]
    tmp = Path(tempfile.mkdtemp(prefix="qscore-int8-"))

    def quantize(name: str, **kw) -> str:  # type: ignore[no-untyped-def]
        out = str(tmp / f"{name}.onnx")
        quantize_dynamic(fp32, out, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}, **kw)
        return out

    rows = [["FP32 (fused, ONNX Runtime)", f"{fp32_rate:,.0f}", "1.00x", "1.0000", "1.0000",
             "1.0000"]]

    def row(label: str, model: str) -> None:
        out, rate = run(model, report)
        c = cosines(out, ref)
        rows.append([label, f"{rate:,.0f}", f"{rate / fp32_rate:.2f}x", f"{c.mean():.4f}",
                     f"{np.percentile(c, 1):.4f}", f"{c.min():.4f}"])
        print(rows[-1])

    row("dynamic INT8, per-tensor, all (Attention + MatMul)", quantize("all"))
    row("dynamic INT8, per-channel, all", quantize("pc", per_channel=True))
    row("dynamic INT8, per-channel, MatMul only",
        quantize("pc_mm", per_channel=True, op_types_to_quantize=["MatMul"]))
    # Greedy sensitivity on the search split: which single exclusion helps most.
    base = cosines(run(quantize("s", per_channel=True), search)[0], search_ref).mean()
    gains = []
    for node in nodes:
        model = quantize("s", per_channel=True, nodes_to_exclude=[node])
        gains.append((cosines(run(model, search)[0], search_ref).mean() - base, node))
    ranked = [n for _, n in sorted(gains, reverse=True)]
    for k in (1, 2, 3):
        row(f"dynamic INT8, per-channel, all but the {k} most sensitive",
            quantize(f"ex{k}", per_channel=True, nodes_to_exclude=ranked[:k]))

    # Static Q/DQ, calibrated on queries neither the search nor the report uses.
    start = args.n + args.search
    calibration = batches_of(tok, queries[start: start + args.calibrate])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            b = next(self.batches, None)
            return None if b is None else {"input_ids": b.input_ids,
                                           "attention_mask": b.attention_mask,
                                           "token_type_ids": b.token_type_ids}

    for ops, label in ((["MatMul"], "MatMul"), (["MatMul", "Attention"], "MatMul + Attention")):
        out = str(tmp / f"static-{len(ops)}.onnx")
        quantize_static(fp32, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=ops, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        row(f"static Q/DQ INT8 (MinMax, per-channel), {label}", out)
    table = markdown_table(["variant", "queries/s", "vs FP32", "mean cosine", "p1 cosine",
                            "min cosine"], rows)
    body = (
        "## INT8 groundwork (`bench/int8_explore.py`)\n\n"
        f"Machine: {machine()}. The default engine's fused FP32 graph quantized with ONNX "
        "Runtime's `quantize_dynamic` (INT8 weights, activations quantized at run time), "
        f"measured on the first {args.n} of {source_name}, query embeddings, batches of 64 "
        "length-sorted; cosine to the FP32 engine per query. The sensitivity search (one node "
        f"excluded at a time) used the next {args.search} queries, static calibration the "
        f"{args.calibrate} after those; neither overlaps the reported ones. Most "
        f"sensitive first: {', '.join(short(n) for n in ranked[:3])}. Static (calibrated "
        "Q/DQ) runs at about FP32 speed here: ONNX Runtime 1.32's CPU provider does not turn "
        "these Q/DQ MatMuls into integer kernels (and its QOperator static path fails on this "
        "graph), so speed has to come from dynamic quantization, accuracy from choosing what to "
        "exclude. Levels and the `--level auto` build are issue 4's work.\n\n"
        f"{table}\n\n"
        f"Command: `.venv/bin/python bench/int8_explore.py --n {args.n}`\n")
    print(body)
    if not args.no_write:
        write_section("int8_explore", body)


if __name__ == "__main__":
    main()
