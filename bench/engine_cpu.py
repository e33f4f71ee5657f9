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
    from qscore.config import DEFAULT_CHUNK_ITEMS
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
    args = parser.parse_args()

    import onnxruntime
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    from engines.build import ensure_engine
    from engines.loader import load_engine
    from engines.source import resolve_model
    from tokenizer_svc.tokenization import QueryTokenizer

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
        cos = np.sum(ref * ours, axis=1)
        for row, name in zip(rows, names, strict=True):
            emb = results[name]
            c = np.sum(emb * ref[: len(emb)], axis=1)
            row.append(f"{c.min():.6f}")
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


if __name__ == "__main__":
    main()
