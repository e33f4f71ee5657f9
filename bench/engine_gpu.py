"""GPU engine benchmark: HF eager FP16 vs qscore's torch engine (graphs, lanes, INT8, FP8).

Run on a GPU host: python bench/engine_gpu.py [--queries TSV] [--model DIR] [--iters 200]
Smoke run on CPU: .venv/bin/python bench/engine_gpu.py --device cpu --quick

Three parts, one run, one process:
a. a random-weight 6-layer 768-hidden BERT (Bing's shape) at sequence 256, batch 10 and 64:
   HF eager FP16 (the baseline) against our FP16/INT8/FP8 engines with and without CUDA graphs
   and with one or two lanes; sequences/s, per-call p50/p99, speed-up over the baseline;
b. the default model (real weights) on real MS MARCO queries, length-sorted batches of 64:
   items/s, p50/p99 per batch, and per-item cosine against HF FP32 on the same device;
c. device memory of each of our engines after load and graph capture (caching allocator peak)
   against the engine's own estimate (`memory_bytes`).
Targets are printed as PASS/FAIL lines. On CUDA the run writes docs/benchmarks.md (section
`engine_gpu`) and docs/engine_gpu.json; on CPU only with --write.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, load_queries, machine, write_section
from bench.gpu_report import checks, tables
from bench.gpu_runs import (
    GpuMemory,
    HfEncoder,
    Timing,
    drain_batches,
    time_calls,
    time_lanes,
)
from engines.accuracy import cosines
from engines.batch import PaddedBatch, pad_sequences, plan_batches

MODEL_ENV = "QSCORE_TEST_MODEL"  # a model directory standing in for the default model
JSON_PATH = ROOT / "docs" / "engine_gpu.json"
SEED = 20240611


@dataclass(frozen=True, slots=True)
class Variant:
    precision: str
    graphs: bool
    lanes: int


SYNTHETIC = (Variant("fp16", False, 1), Variant("fp16", True, 1), Variant("fp16", True, 2),
             Variant("int8", True, 1), Variant("int8", True, 2),
             Variant("fp8", True, 1), Variant("fp8", True, 2))
REAL = tuple(Variant(p, True, n) for p in ("fp16", "int8", "fp8") for n in (1, 2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda:N or cpu (default: cuda:0 if present)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny counts, 2-layer BERT")
    p.add_argument("--iters", type=int, default=None, help="timed calls per row (200; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (20; quick 1)")
    p.add_argument("--seq", type=int, default=256, help="sequence length of part a")
    p.add_argument("--batches", default="10,64", help="batch sizes of part a")
    p.add_argument("--queries", type=Path, default=None, help="qid<TAB>query file for part b")
    p.add_argument("--n", type=int, default=None, help="real queries (20000; quick 300)")
    p.add_argument("--model", default=os.environ.get(MODEL_ENV) or "default",
                   help=f"model directory for part b (default: ${MODEL_ENV}, else the "
                        "default model)")
    p.add_argument("--engine-root", type=Path, default=None,
                   help="where artifacts are built (default: a temporary directory)")
    p.add_argument("--precisions", default="fp16,int8,fp8",
                   help="our engines' precisions (fp8 only where the device supports it)")
    p.add_argument("--max-drop", type=float, default=0.005,
                   help="INT8/FP8 budget for part b's builds (1 - mean cosine; the issue's)")
    p.add_argument("--skip", default="", help="parts to leave out: 'synthetic', 'real'")
    p.add_argument("--write", action="store_true", help="write docs/ (default on CUDA only)")
    p.add_argument("--no-write", action="store_true", help="never write docs/")
    args = p.parse_args(argv)
    args.iters = args.iters or (3 if args.quick else 200)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 20)
    args.n = args.n or (300 if args.quick else 20_000)
    args.batch_sizes = [int(b) for b in args.batches.split(",") if b]
    args.precision_set = set(filter(None, args.precisions.split(",")))
    return args


def random_bert(out: Path, tokenizer_dir: Path, *, quick: bool) -> Path:
    """A seeded random BERT (6x768x12x3072, or 2x128x4x512 when quick) with the default
    model's tokenizer (same 30522-token vocabulary), saved as a Hugging Face directory."""
    import torch
    from transformers import BertConfig, BertModel

    from engines.source import TOKENIZER_FILES

    torch.manual_seed(SEED)
    shape = (dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=512) if quick else
             dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                  intermediate_size=3072))
    config = BertConfig(vocab_size=30522, max_position_embeddings=512, **shape)
    BertModel(config).eval().save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    return out


def random_batch(size: int, length: int) -> PaddedBatch:
    """Fixed random ids ([CLS] ... [SEP]) with a full attention mask."""
    rng = np.random.default_rng(SEED + size)
    ids = rng.integers(1000, 30000, size=(size, length), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return PaddedBatch(ids, np.ones_like(ids), np.zeros_like(ids))


class Lab:
    """Builds artifacts once per (model, precision) and loads engines with their memory."""

    def __init__(self, args: argparse.Namespace, root: Path, device: str) -> None:
        self.args, self.root, self.device = args, root, device
        self.cuda = device.startswith("cuda")
        self.built: dict[tuple[str, str], Path | str] = {}
        self.memory: list[dict[str, Any]] = []
        self.failures: list[str] = []

    def artifact(self, source: Any, precision: str, quant: Any) -> Path | None:
        from engines.build import ensure_engine
        from engines.errors import EngineError

        key = (str(source.path), precision)
        if key not in self.built:
            try:
                self.built[key] = ensure_engine(source, self.root, precision=precision,
                                                backend="torch", quant=quant, promote=False,
                                                progress=lambda m: print(f"  build: {m}"))
            except EngineError as exc:  # BuildError, BackendUnavailable
                self.built[key] = f"{type(exc).__name__}: {exc}"
                self.failures.append(f"{source.model_id} {precision} build refused: {exc}")
        found = self.built[key]
        return found if isinstance(found, Path) else None

    def load(self, part: str, path: Path, v: Variant) -> Any:
        from engines.torch_runtime import TorchEngine, TorchOptions

        memory = GpuMemory(self.device)
        started = time.perf_counter()
        engine = TorchEngine(path, options=TorchOptions(device=self.device, lanes=v.lanes,
                                                        graphs=v.graphs))
        load_s = time.perf_counter() - started
        memory.measure()
        self.memory.append({
            "part": part, "engine": label(engine), "load_s": round(load_s, 2),
            "estimate_mib": round(engine.memory_bytes / 2**20, 1),
            "peak_allocated_mib": round(memory.peak / 2**20, 1) if memory.cuda else None,
            "held_mib": round(memory.held / 2**20, 1) if memory.cuda else None,
            "reserved_mib": round(memory.reserved / 2**20, 1) if memory.cuda else None,
            "ok": None if not memory.cuda else engine.memory_bytes >= memory.peak})
        return engine


def label(engine: Any) -> str:
    d = engine.describe()
    return (f"qscore {d['precision'].upper()} ({d['dtype']}), "
            f"{'graphs' if d['graphs'] else 'no graphs'}, {d['lanes']} lane"
            f"{'s' if d['lanes'] > 1 else ''}")


def variants(all_: tuple[Variant, ...], args: argparse.Namespace, *, fp8: bool,
             cuda: bool) -> list[Variant]:
    """The rows to run: asked-for precisions, FP8 where supported, and no separate
    graphs-off row off CUDA (every CPU engine runs without graphs)."""
    return [v for v in all_ if v.precision in args.precision_set
            and (fp8 or v.precision != "fp8") and (cuda or v.graphs)]


def part_synthetic(args: argparse.Namespace, lab: Lab, tokenizer_dir: Path, work: Path,
                   hf_dtype: Any, fp8: bool) -> list[dict[str, Any]]:
    from engines.quantize import QuantSpec
    from engines.source import resolve_model

    model_dir = random_bert(work / "random-bert", tokenizer_dir, quick=args.quick)
    shape = "2x128" if args.quick else "6x768"
    source = resolve_model(model_dir, max_length=args.seq, model_id=f"random-bert-{shape}")
    quant = QuantSpec(max_drop=0.3)  # random weights: the speed, not the accuracy, is measured
    inputs = {b: random_batch(b, args.seq) for b in args.batch_sizes}
    rows: list[dict[str, Any]] = []
    hf = HfEncoder(model_dir, device=lab.device, dtype=hf_dtype)
    base: dict[int, tuple[Timing, np.ndarray]] = {}
    for b, batch in inputs.items():
        out = hf(batch)
        base[b] = (time_calls(partial(_items, hf, batch), args.iters, args.warmup), out)
        rows.append(_row(f"HF BertModel {hf.label}", b, args.seq, base[b][0], base[b][0], 1.0))
    hf.close()
    for v in variants(SYNTHETIC, args, fp8=fp8, cuda=lab.cuda):
        path = lab.artifact(source, v.precision, quant)
        if path is None:
            continue
        engine = lab.load(f"a: random BERT {shape}", path, v)
        for b, batch in inputs.items():
            cos = float(cosines(engine.run(batch), base[b][1]).min())
            timing = time_lanes(partial(_lane_items, engine, batch), v.lanes, args.iters,
                                args.warmup)
            bucket = engine.plan.bucket_for(min(b, engine.plan.max_batch_at(
                engine.plan.length_for(args.seq))), args.seq)
            rows.append(_row(label(engine), b, args.seq, timing, base[b][0], cos,
                             precision=v.precision, graphs=engine.graphs, lanes=v.lanes,
                             bucket=f"{bucket.batch}x{bucket.length}"))
        engine.close()
        print(f"  {rows[-1]['engine']}: done")
    return rows


def _items(hf: HfEncoder, batch: PaddedBatch) -> int:
    return len(hf(batch))


def _lane_items(engine: Any, batch: PaddedBatch, lane: int) -> int:
    return len(engine.run(batch, lane))


def _row(name: str, batch: int, seq: int, t: Timing, base: Timing, cos: float,
         **extra: Any) -> dict[str, Any]:
    return {"engine": name, "batch": batch, "seq": seq, "seq_per_s": round(t.rate, 1),
            "p50_ms": round(t.pct(50), 3), "p99_ms": round(t.pct(99), 3),
            "speedup": round(t.rate / base.rate, 2) if base.rate else None,
            "min_cos_vs_hf": round(cos, 6), "calls": len(t.call_ms), **extra}


def part_real(args: argparse.Namespace, lab: Lab, source: Any, hf_dtype: Any,
              fp8: bool) -> tuple[list[dict[str, Any]], str]:
    from engines.quantize import QuantSpec
    from engines.tokenizer import QueryTokenizer
    from schemas import QueryItem

    queries, where = load_queries(args.queries)
    queries = queries[: args.n]
    tok = QueryTokenizer(source.path / "tokenizer.json", source.max_length, pairs=False)
    tb = tok.token_batch("bench", [QueryItem(id=str(i), query=q) for i, q in enumerate(queries)],
                         submitted_at=0.0)
    batches = [(rows, pad_sequences([tb.sequence(int(j)) for j in rows]))
               for rows in plan_batches(tb.lengths, max_batch=64, token_budget=64 * 256)]
    n = len(queries)
    dim = source.hidden_size

    def measure(run: Any, lanes: int) -> tuple[np.ndarray, Timing]:
        drain_batches(run, batches, n, lanes, dim)  # warm-up: every shape once
        return drain_batches(run, batches, n, lanes, dim)

    reference = HfEncoder(source.path, device=lab.device, dtype=_dtype("fp32"))
    ref_out, _ = drain_batches(lambda b, _lane: reference(b), batches, n, 1, dim)
    reference.close()
    rows: list[dict[str, Any]] = []
    hf = HfEncoder(source.path, device=lab.device, dtype=hf_dtype)
    out, base = measure(lambda b, _lane: hf(b), 1)
    hf.close()
    rows.append(_real_row(f"HF AutoModel {hf.label}", base, base, cosines(out, ref_out)))
    for v in variants(REAL, args, fp8=fp8, cuda=lab.cuda):
        path = lab.artifact(source, v.precision, QuantSpec(max_drop=args.max_drop))
        if path is None:
            continue
        engine = lab.load(f"b: {source.model_id}", path, v)
        out, timing = measure(engine.run, v.lanes)
        rows.append(_real_row(label(engine), timing, base, cosines(out, ref_out),
                              precision=v.precision, lanes=v.lanes))
        engine.close()
        print(f"  {rows[-1]['engine']}: done")
    lengths = tb.lengths
    return rows, (f"{where.split(' ')[0]}: {n} queries, {len(batches)} batch(es) of <= 64, "
                  f"tokens per query mean {lengths.mean():.1f}, max {lengths.max()}")


def _real_row(name: str, t: Timing, base: Timing, cos: np.ndarray,
              **extra: Any) -> dict[str, Any]:
    return {"engine": name, "items_per_s": round(t.rate, 1), "p50_ms": round(t.pct(50), 3),
            "p99_ms": round(t.pct(99), 3), "speedup": round(t.rate / base.rate, 2),
            "mean_cos": round(float(cos.mean()), 6),
            "p1_cos": round(float(np.percentile(cos, 1)), 6),
            "min_cos": round(float(cos.min()), 6), "batches": len(t.call_ms), **extra}


def _dtype(name: str) -> Any:
    import torch

    return {"fp16": torch.float16, "fp32": torch.float32}[name]


def command(argv: list[str] | None) -> str:
    """The command line as run, with the model variable when that chose the model."""
    words = ["python", *(sys.argv if argv is None else ["bench/engine_gpu.py", *argv])]
    env = os.environ.get(MODEL_ENV)
    prefix = f"{MODEL_ENV}={shlex.quote(env)} " if env and "--model" not in words else ""
    return prefix + shlex.join(words)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch
    import transformers

    from engines.source import resolve_model
    from engines.torch_quant import fp8_supported

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        device = f"cuda:{dev.index or 0}"
    write = not args.no_write and (args.write or cuda)
    fp8 = fp8_supported(torch.device(device))
    hf_dtype = _dtype("fp16" if cuda else "fp32")
    skip = set(filter(None, args.skip.split(",")))
    source = resolve_model(args.model)
    meta = {
        "device": device, "device_name": torch.cuda.get_device_name(dev) if cuda else "CPU only",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))) if cuda
        else "n/a", "torch": torch.__version__, "cuda": torch.version.cuda or "none",
        "transformers": transformers.__version__, "machine": machine(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command(argv),
        "iters": args.iters, "warmup": args.warmup, "fp8": fp8, "model": str(source.path),
        "model_id": source.model_id,
        "synthetic_shape": ("2 layers x 128 hidden, 4 heads, 512 intermediate (--quick)"
                            if args.quick else "6 layers x 768 hidden, 12 heads, 3072 "
                            "intermediate") + f", seq {args.seq}", "real_data": "skipped"}
    print(f"device {device} ({meta['device_name']}), torch {meta['torch']}, CUDA "
          f"{meta['cuda']}, fp8 {'yes' if fp8 else 'no'}")
    with tempfile.TemporaryDirectory(prefix="qscore-bench-gpu-") as tmp:
        work = Path(tmp)
        lab = Lab(args, args.engine_root or work / "engines", device)
        synthetic: list[dict[str, Any]] = []
        real: list[dict[str, Any]] = []
        if "synthetic" not in skip:
            print("a. random-weight BERT")
            synthetic = part_synthetic(args, lab, source.path, work, hf_dtype, fp8)
        if "real" not in skip:
            print("b. default model on real queries")
            real, meta["real_data"] = part_real(args, lab, source, hf_dtype, fp8)
    result = {"meta": meta, "synthetic": synthetic, "real": real, "memory": lab.memory}
    result["checks"] = checks(synthetic, real, lab.memory, lab.failures)
    body = tables(result)
    print(body)
    if not cuda:
        print("(a CPU run: the speed targets are for a CUDA GPU; this only proves the script)")
    if write:
        write_section("engine_gpu", body)
        JSON_PATH.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote docs/benchmarks.md (engine_gpu) and {JSON_PATH.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
