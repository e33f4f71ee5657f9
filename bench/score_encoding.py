"""Score-topic encoding: bytes and CPU per item of each way a worker can write its scores.

Run: .venv/bin/python bench/score_encoding.py [--dim 384] [--per-batch 20] [--no-write]
Query-only items (a similarity head's embedding each, `--dim` floats like the default model's)
and items with 4 docs (4 scores each), in ScoreBatches of `--per-batch` items. Rows: the
ItemScore path (one Python object per item and per float, validated by decoding what is
encoded: the worker's path before issue 11, still the tokenizer's for cached items) and the
ScoreArrays path with each embedding format. Encode and decode are timed in this process
(process CPU time, best of 3 passes over 500 batches); decode is `decode_score_batch`, what
ScoreConsumer and `qscore consume` run, and returns floats whatever the format.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, markdown_table, write_section

T = TypeVar("T")


def best_us(fn: Callable[[T], object], inputs: Sequence[T], per: int) -> float:
    """Best of 3 passes: CPU us per item of fn over every input (`per` items each)."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for x in inputs:
            fn(x)
        best = min(best, time.process_time() - started)
    return best / (len(inputs) * per) * 1e6


def main() -> None:
    from schemas import (
        DEFAULT_LIMITS,
        ScoreArrays,
        Timings,
        decode_score_batch,
        encode_score_arrays,
        encode_scores_to_fit,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--per-batch", type=int, default=20)
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    per, n = args.per_batch, args.batches
    ids = tuple(f"q{i}" for i in range(per))

    def arrays(docs: int, fmt: str) -> list[ScoreArrays]:
        out = []
        for b in range(n):
            emb = rng.normal(size=(per, args.dim)).astype(np.float32)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            scores = rng.random(per * docs).astype(np.float32)
            out.append(ScoreArrays(
                batch_id=f"batch-{b:06d}", item_ids=ids, model_id="all-minilm-l6-v2",
                model_version="3f2a9c41d0e7", produced_at=time.time(),
                timings=Timings(queue_ms=1.25, total_ms=9.5), scores=scores,
                score_offsets=np.arange(per + 1, dtype=np.int64) * docs,
                embeddings=None if docs else emb,
                has_embedding=None if docs else np.ones(per, dtype=bool),
                embedding_format=fmt))  # type: ignore[arg-type]
        return out

    rows = []
    for docs, kind in ((0, f"query only ({args.dim}-float embedding)"), (4, "4 docs (4 scores)")):
        formats = ("float",) if docs else ("float", "base64", "base64-f16")
        for path in ("ItemScore", "ScoreArrays"):
            for fmt in formats if path == "ScoreArrays" else ("float",):
                data = arrays(docs, fmt)
                objects = [a.to_score_batch() for a in data]
                if path == "ItemScore":
                    encoded = [encode_scores_to_fit(o, DEFAULT_LIMITS)[0] for o in objects]
                    enc = best_us(lambda o: encode_scores_to_fit(o, DEFAULT_LIMITS), objects,
                                  per)
                else:
                    encoded = [encode_score_arrays(a)[0] for a in data]
                    enc = best_us(encode_score_arrays, data, per)
                dec = best_us(decode_score_batch, encoded, per)
                size = sum(map(len, encoded)) / (n * per)
                rows.append([kind, path, fmt, f"{size:,.0f}", f"{enc:.1f}", f"{dec:.1f}"])
                print(rows[-1], flush=True)
    table = markdown_table(["items", "encoder", "embedding_format", "bytes/item",
                            "encode CPU us/item", "decode CPU us/item"], rows)
    body = (
        "## Score-topic encoding (`bench/score_encoding.py`)\n\n"
        f"Machine: {machine()}. ScoreBatches of {per} items; the ItemScore path validates by "
        "decoding what it encodes (the worker's path before issue 11; the tokenizer's for "
        "cached items), the ScoreArrays path checks the decoder's rules on the arrays and "
        "encodes in one orjson call. Decode is `decode_score_batch` (ScoreConsumer, `qscore "
        "consume`), floats out for every format. CPU time in one process, best of 3 passes "
        f"over {n} batches.\n\n{table}\n\n"
        f"Command: `.venv/bin/python bench/score_encoding.py --dim {args.dim} "
        f"--per-batch {per}`\n")
    print(body)
    if not args.no_write:
        write_section("score_encoding", body)


if __name__ == "__main__":
    main()
