"""CPU engine benchmark: what a newcomer writes vs batched PyTorch vs qscore's engine.

Run: .venv/bin/python bench/engine_cpu.py [--queries PATH] [--n 2000]
Prints a table and writes it into docs/benchmarks.md. Every row includes tokenization, so
rows are end-to-end items/s on the same real queries, measured in one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import load_queries, machine, markdown_table, percentiles, write_section
from engines.accuracy import cosines


def hf_one_at_a_time(model, tokenizer, queries, max_length):  # type: ignore[no-untyped-def]
    """The newcomer: one query per call, padded to the model's max length."""
    import torch

    outs, times = [], []
    with torch.inference_mode():
        for q in queries:
            t0 = time.perf_counter()
            enc = tokenizer([q], padding="max_length", truncation=True, max_length=max_length,
                            return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            times.append((time.perf_counter() - t0) * 1000)
            outs.append(emb.numpy())
    return np.concatenate(outs), times


def hf_batched(model, tokenizer, queries, batch, max_length):  # type: ignore[no-untyped-def]
    """Batched, padded to the longest query of each batch (input order, not sorted)."""
    import torch

    outs, times = [], []
    with torch.inference_mode():
        for i in range(0, len(queries), batch):
            t0 = time.perf_counter()
            enc = tokenizer(queries[i:i + batch], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            times.append((time.perf_counter() - t0) * 1000)
            outs.append(emb.numpy())
    return np.concatenate(outs), times


def qscore_engine(engine, tokenizer, queries, batch):  # type: ignore[no-untyped-def]
    """qscore: fast tokenizer -> TokenBatch -> length-sorted micro-batches -> ORT engine."""
    from qscore.offline.rescore import DEFAULT_CHUNK_ITEMS
    from schemas import QueryItem
    from workers.scoring import BatchLimits, run_token_batch

    limits = BatchLimits(max_batch=batch, token_budget=BatchLimits().token_budget)
    outs, times = [], []
    chunk = DEFAULT_CHUNK_ITEMS  # the window `qscore rescore` sorts by length
    for i in range(0, len(queries), chunk):
        items = [QueryItem(id=str(j), query=q) for j, q in enumerate(queries[i:i + chunk])]
        tb = tokenizer.token_batch("bench", items, submitted_at=0.0)
        result = run_token_batch(engine, tb, limits)
        times.extend(result.batch_ms)
        outs.append(np.array([s.embedding for s in result.items], dtype=np.float32))
    return np.concatenate(outs), times


class _SessionEngine:
    """An ONNX model file behind the Engine protocol (for the un-packaged baseline row)."""

    def __init__(self, model: str, manifest, threads: int) -> None:  # type: ignore[no-untyped-def]
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.names = {i.name for i in self.session.get_inputs()}
        self.manifest = manifest

    def run(self, batch):  # type: ignore[no-untyped-def]
        from engines.onnx_runtime import ort_feed

        return self.session.run(None, ort_feed(batch, self.names))[0]


def precision_rows(fp32_path: Path, root: Path, report: list[str], calibration: Path,
                   threads: int, batch: int) -> tuple[list[list[str]], str]:
    """FP32, naive dynamic INT8, levels 1-3 and auto: speed and accuracy on `report`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from engines.build import ensure_engine
    from engines.loader import load_engine
    from engines.quantize import QuantSpec, load_pairs, spearman
    from engines.source import default_sample_log, resolve_model
    from engines.tokenizer import QueryTokenizer
    from qscore.offline.rescore import DEFAULT_CHUNK_ITEMS
    from schemas import QueryItem
    from workers.scoring import BatchLimits, run_token_batch

    source = resolve_model("default")
    fp32 = load_engine(fp32_path, threads=threads)
    tok = QueryTokenizer(fp32_path / "tokenizer" / "tokenizer.json", source.max_length,
                         pairs=False)
    pair_q, pair_d = load_pairs(default_sample_log(), limit=1000)
    limits = BatchLimits(max_batch=batch)

    def embed(engine, texts):  # type: ignore[no-untyped-def]
        out, times = [], []
        for i in range(0, len(texts), DEFAULT_CHUNK_ITEMS):
            items = [QueryItem(id=str(j), query=t)
                     for j, t in enumerate(texts[i:i + DEFAULT_CHUNK_ITEMS])]
            result = run_token_batch(engine, tok.token_batch("b", items, submitted_at=0),
                                     limits)
            times.extend(result.batch_ms)
            out.append(np.array([s.embedding for s in result.items], dtype=np.float32))
        return np.concatenate(out), times

    def measure(engine):  # type: ignore[no-untyped-def]
        embed(engine, report[:64])
        started = time.perf_counter()
        emb, times = embed(engine, report)
        rate = len(report) / (time.perf_counter() - started)
        q, _ = embed(engine, pair_q)
        d, _ = embed(engine, pair_d)
        return emb, rate, times, np.sum(q * d, axis=1)

    ref, ref_rate, ref_times, ref_pairs = measure(fp32)
    engines = []
    naive = str(root / "naive-int8.onnx")
    quantize_dynamic(str(fp32_path / "model.onnx"), naive, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    engines.append(("dynamic INT8, per-tensor, everything (naive quantize_dynamic)",
                    _SessionEngine(naive, fp32.manifest, threads)))
    auto_path = None
    for level in ("1", "2", "3", "auto"):
        path = ensure_engine(source, root, precision="int8", promote=False,
                             quant=QuantSpec(level=level, calibration=calibration))
        m = load_engine(path, threads=threads)
        q = m.manifest.build["quantization"]
        label = (f"qscore INT8 level {level}" if level != "auto" else
                 f"qscore INT8 auto (chose {q['name']})")
        engines.append((label, m))
        auto_path = path if level == "auto" else auto_path
    p50, p99 = percentiles(ref_times)
    rows = [["qscore FP32", f"{ref_rate:,.0f}", "1.00x", f"{p50:.1f}", f"{p99:.1f}", "1.0000",
             "1.0000", "1.0000"]]
    for label, engine in engines:
        emb, rate, times, pairs = measure(engine)
        cos = cosines(ref, emb)
        p50, p99 = percentiles(times)
        rows.append([label, f"{rate:,.0f}", f"{rate / ref_rate:.2f}x", f"{p50:.1f}",
                     f"{p99:.1f}", f"{cos.mean():.4f}", f"{np.percentile(cos, 1):.4f}",
                     f"{spearman(pairs, ref_pairs):.4f}"])
        print(rows[-1])
    excluded = load_engine(auto_path).manifest.build["quantization"]["excluded_nodes"]
    return rows, ", ".join("/".join(n.split("/")[3:-1]) for n in excluded) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=Path, default=None,
                        help="qid<TAB>query file (default: ../shared/data MS MARCO dev queries)")
    parser.add_argument("--n", type=int, default=2000, help="queries for the batched rows")
    parser.add_argument("--n-slow", type=int, default=300,
                        help="queries for the one-at-a-time row (it is slow)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    parser.add_argument("--skip-int8", action="store_true", help="only the first table")
    args = parser.parse_args()

    import onnxruntime
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    from engines.build import ensure_engine
    from engines.loader import load_engine
    from engines.source import resolve_model
    from engines.tokenizer import QueryTokenizer

    queries, source_name = load_queries(args.queries)
    queries = queries[: args.n]
    threads = args.threads or len(__import__("os").sched_getaffinity(0))
    torch.set_num_threads(threads)
    source = resolve_model("default")
    with tempfile.TemporaryDirectory() as tmp:
        path = ensure_engine(source, Path(tmp))
        engine = load_engine(path, threads=threads)
        qtok = QueryTokenizer(path / "tokenizer" / "tokenizer.json", source.max_length,
                              pairs=False)
        model = AutoModel.from_pretrained(str(source.path)).eval()
        hf_tok = AutoTokenizer.from_pretrained(str(source.path))
        # Warm-up so no row pays first-call costs.
        hf_batched(model, hf_tok, queries[:64], args.batch, source.max_length)
        qscore_engine(engine, qtok, queries[:64], args.batch)

        rows = []
        results = {}
        for name, fn, n in [
            ("HF PyTorch, 1 query/call, padded to max length "
             f"({source.max_length})",
             lambda qs: hf_one_at_a_time(model, hf_tok, qs, source.max_length), args.n_slow),
            (f"HF PyTorch, batch {args.batch}, dynamic padding",
             lambda qs: hf_batched(model, hf_tok, qs, args.batch, source.max_length), args.n),
            (f"qscore ONNX Runtime FP32, batch {args.batch}, length-sorted",
             lambda qs: qscore_engine(engine, qtok, qs, args.batch), args.n),
        ]:
            t0 = time.perf_counter()
            emb, times = fn(queries[:n])
            elapsed = time.perf_counter() - t0
            results[name] = emb
            p50, p99 = percentiles(times)
            rows.append([name, str(n), f"{n / elapsed:,.0f}", f"{p50:.1f}", f"{p99:.1f}"])
        names = list(results)
        ref = results[names[1]]
        ours = results[names[2]]
        cos = cosines(ref, ours)
        for row, name in zip(rows, names, strict=True):
            emb = results[name]
            c = cosines(ref[: len(emb)], emb)
            row.append(f"{c.min():.6f}")
        int8_rows, excluded = None, ""
        if not args.skip_int8:
            # Calibrate and validate on one part of the real queries, report on the rest.
            all_queries, _ = load_queries(args.queries)
            split = len(all_queries) * 4 // 7
            calibration = Path(tmp) / "calibration.tsv"
            calibration.write_text("".join(f"{i}\t{q}\n"
                                           for i, q in enumerate(all_queries[:split])))
            int8_rows, excluded = precision_rows(path, Path(tmp), all_queries[split:],
                                                 calibration, threads, args.batch)
        base = float(rows[0][2].replace(",", ""))
        for row in rows:
            row.insert(3, f"{float(row[2].replace(',', '')) / base:.1f}x")

    header = ["engine", "queries", "items/s", "vs newcomer", "p50 call ms", "p99 call ms",
              "min cosine vs HF batched"]
    table = markdown_table(header, rows)
    body = (
        "## CPU engine (`bench/engine_cpu.py`)\n\n"
        f"Machine: {machine()}; {threads} threads; torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, transformers {transformers.__version__}.\n"
        f"Queries: {source_name}, first {args.n} (one-at-a-time row: first {args.n_slow}). "
        "Model: all-MiniLM-L6-v2 (similarity head), embeddings of the query alone. items/s "
        "includes tokenization; a call is one model invocation.\n\n"
        f"{table}\n\n"
        f"ONNX FP32 vs PyTorch on all {len(cos)} queries: min cosine {cos.min():.6f}, mean "
        f"{cos.mean():.6f}.\n\n"
        f"Command: `.venv/bin/python bench/engine_cpu.py --n {args.n} --n-slow {args.n_slow}`\n"
    )
    print(body)
    if not args.no_write:
        write_section("engine_cpu", body)
    if int8_rows:
        n_all = len(load_queries(args.queries)[0])
        split = n_all * 4 // 7
        table = markdown_table(["engine", "items/s", "vs FP32", "p50 call ms", "p99 call ms",
                                "mean cosine", "p1 cosine", "Spearman (pairs)"], int8_rows)
        body = (
            "## Precision and quantization level (`bench/engine_cpu.py`)\n\n"
            f"Same machine and run. INT8 engines were built with `--calibration` = the first "
            f"{split} real queries (the build calibrates on one third of them and chooses on "
            "another), and are reported here on the other "
            f"{n_all - split} ({source_name.split(' ')[0]}), query embeddings, batches of "
            f"{args.batch} in length-sorted windows; cosine to the FP32 engine per query; "
            "Spearman of 1,000 (query, doc) cosine scores from the sample log against FP32. "
            "Budget (`--max-drop 0.005`): mean >= 0.995, p1 >= 0.98, Spearman >= 0.99. "
            f"Nodes the auto build left in FP32: {excluded}.\n\n"
            f"{table}\n\n"
            "Command: `.venv/bin/python bench/engine_cpu.py`\n")
        print(body)
        if not args.no_write:
            write_section("engine_int8", body)


if __name__ == "__main__":
    main()
