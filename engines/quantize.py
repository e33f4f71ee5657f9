"""INT8 engines chosen by measurement: quantization levels, per-node exclusion, a budget.

Levels follow the Bing article's idea of choosing *what* to quantize against a precision
budget; on the fused ONNX Runtime graph they are:
  level 1: the projection and feed-forward MatMuls;
  level 2: level 1 + the fused Attention ops (QKV projection and attention products);
  level 3: everything ONNX Runtime can quantize (adds the embedding layer).
`method="dynamic"` quantizes weights per channel ahead of time and activations at run time;
the static methods (minmax/entropy/percentile) calibrate activation ranges on real queries and
write Q/DQ nodes. On ONNX Runtime's CPU provider only dynamic INT8 runs faster than FP32
(docs/benchmarks.md, "INT8 groundwork"), so `auto` searches dynamic candidates: each level,
then the level with its most sensitive nodes (measured, one at a time) left in FP32, and keeps
the fastest candidate whose accuracy on a validation split stays within `max_drop`.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines.accuracy import cosine_budget, cosine_report, cosines, meets, rounded
from engines.batch import PaddedBatch, pad_sequences, plan_batches
from engines.errors import BuildError
from engines.onnx_runtime import ort_feed

LEVELS = {"1": ["MatMul"], "2": ["MatMul", "Attention"],
          "3": ["MatMul", "Attention", "EmbedLayerNormalization", "Gather"]}
METHODS = ("dynamic", "minmax", "entropy", "percentile")

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class QuantSpec:
    level: str = "auto"  # "1" | "2" | "3" | "auto"
    max_drop: float = 0.005  # allowed 1 - mean cosine to FP32 on the validation split
    method: str = "dynamic"
    calibration: Path | None = None  # queries (TSV qid<TAB>query, or a JSONL query log)
    max_exclude: int = 4  # most nodes left in FP32 by the auto search
    sample_pairs: Path | None = None  # (query, doc) pairs for the Spearman check

    def __post_init__(self) -> None:
        if self.level not in (*LEVELS, "auto"):
            raise BuildError(f"level must be 1, 2, 3 or auto, not {self.level!r}")
        if self.method not in METHODS:
            raise BuildError(f"calibration method must be one of {METHODS}, not {self.method!r}")
        if not 0 < self.max_drop < 1:
            raise BuildError(f"max_drop must be in (0, 1), not {self.max_drop}")

    @property
    def budget(self) -> dict[str, float]:
        """Mean cosine, 1st-percentile cosine and Spearman floors derived from max_drop."""
        return {**cosine_budget(self.max_drop), "spearman": 1 - 2 * self.max_drop}


@dataclass(slots=True)
class Candidate:
    name: str
    level: str
    method: str
    excluded: tuple[str, ...] = ()
    path: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def meets(self, budget: dict[str, float]) -> bool:
        return meets(self.metrics, budget)

    def summary(self) -> dict[str, object]:
        return {"name": self.name, "level": self.level, "method": self.method,
                "excluded_nodes": list(self.excluded),
                **rounded(self.metrics)}


def load_texts(path: Path) -> list[str]:
    """Queries from a TSV (qid<TAB>query) or a JSONL query log ({"query": ...})."""
    import orjson

    texts = []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith(b"{"):
            texts.append(str(orjson.loads(line)["query"]))
        elif b"\t" in line:
            texts.append(line.split(b"\t", 1)[1].decode("utf-8").strip())
    return [t for t in texts if t]


def load_pairs(path: Path, limit: int = 1500) -> tuple[list[str], list[str]]:
    import orjson

    queries, docs = [], []
    for line in path.read_bytes().splitlines():
        row = orjson.loads(line)
        for doc in row.get("docs") or ():
            queries.append(row["query"])
            docs.append(doc)
        if len(queries) >= limit:
            break
    return queries[:limit], docs[:limit]


def encode_texts(tokenizer: object, texts: list[str],
                 max_batch: int = 64) -> list[tuple[np.ndarray, PaddedBatch]]:
    """Texts as length-sorted padded batches, each with the text indices of its rows: the
    fixed batches every accuracy check runs models on."""
    from schemas import QueryItem

    tb = tokenizer.token_batch(  # type: ignore[attr-defined]
        "q", [QueryItem(id=str(i), query=t) for i, t in enumerate(texts)], submitted_at=0)
    return [(rows, pad_sequences([tb.sequence(int(j)) for j in rows]))
            for rows in plan_batches(tb.lengths, max_batch=max_batch, token_budget=1 << 20)]


class Evaluator:
    """Runs models on fixed, length-sorted batches and compares them with the FP32 model."""

    def __init__(self, fp32_path: Path, tokenizer: object, queries: list[str],
                 pair_queries: list[str], pair_docs: list[str], threads: int | None) -> None:
        self.tokenizer = tokenizer
        self.threads = threads
        self.queries = self._batches(queries)
        self.pairs = (self._batches(pair_queries), self._batches(pair_docs))
        self.fp32 = self.outputs(fp32_path)
        self.fp32_rate = self.fp32[3]

    def _batches(self, texts: list[str]) -> list[tuple[np.ndarray, object]]:
        return encode_texts(self.tokenizer, texts)  # type: ignore[return-value]

    def _run(self, session, batches, names) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
        n = sum(len(rows) for rows, _ in batches)
        out: np.ndarray | None = None
        started = time.perf_counter()
        for rows, b in batches:
            res = session.run(None, ort_feed(b, names))[0]
            if out is None:
                out = np.empty((n, *res.shape[1:]), dtype=np.float32)
            out[rows] = res
        return out, n / (time.perf_counter() - started)  # type: ignore[return-value]

    def outputs(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        session.run(None, ort_feed(self.queries[0][1], names))  # warm-up
        emb, rate = self._run(session, self.queries, names)
        q, _ = self._run(session, self.pairs[0], names)
        d, _ = self._run(session, self.pairs[1], names)
        return emb, q, d, rate

    def probe(self, path: Path, n_batches: int = 4) -> float:
        """Mean cosine on a few validation batches only: cheap enough to run per node."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        total, count = 0.0, 0
        for rows, b in self.queries[:n_batches]:
            out = session.run(None, ort_feed(b, names))[0]
            total += float(np.sum(cosines(self.fp32[0][rows], out)))
            count += len(rows)
        return total / count

    def measure(self, path: Path) -> dict[str, float]:
        emb, q, d, rate = self.outputs(path)
        ref_emb, ref_q, ref_d, _ = self.fp32
        rho = spearman(np.sum(q * d, axis=1), np.sum(ref_q * ref_d, axis=1))
        return {**cosine_report(ref_emb, emb), "spearman": float(rho),
                "items_per_s": float(rate), "speedup": float(rate / self.fp32_rate)}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (scores are continuous, so ties are negligible)."""
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def quantize_model(fp32: Path, out: Path, candidate: Candidate,
                   calibration: list[object] | None = None) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    options = {"DefaultTensorType": onnx.TensorProto.FLOAT}  # fused ops defeat shape inference
    ops = LEVELS[candidate.level]
    if candidate.method == "dynamic":
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=ops, nodes_to_exclude=list(candidate.excluded),
                         extra_options=options)
        return
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[candidate.method]
    quantize_static(str(fp32), str(out), _Reader(calibration or []),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    op_types_to_quantize=ops, nodes_to_exclude=list(candidate.excluded),
                    calibrate_method=method, extra_options=options)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over padded batches."""

    def __init__(self, batches: list[object]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._it, None)
        if item is None:
            return None
        _, b = item  # type: ignore[misc]
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask,
                "token_type_ids": b.token_type_ids}

    def rewind(self) -> None:  # some calibrators call it; our batches are read once
        pass


def _quiet_onnxruntime_logging() -> None:
    # quantize_dynamic logs a pre-processing hint through the root logger on every call.
    import logging

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))


def shuffled_texts(source: Path) -> list[str]:
    """A query file's distinct texts shuffled with a fixed seed: an order that does not
    depend on the file's, and the one every third of it (split_texts, the golden set) is cut
    from."""
    texts = sorted(set(load_texts(source)))
    rng = np.random.default_rng(0)
    return [texts[i] for i in rng.permutation(len(texts))]


def split_texts(source: Path, minimum: int = 50) -> tuple[list[str], list[str]]:
    """Calibration and validation thirds of a query file (the last third is never used here:
    engines.golden takes its queries from it)."""
    texts = shuffled_texts(source)
    third = len(texts) // 3
    if third < minimum:
        raise BuildError(f"{source}: {len(texts)} distinct queries; an accuracy check needs "
                         f">= {3 * minimum}")
    return texts[:third], texts[third: 2 * third]


def choose(fp32: Path, work: Path, spec: QuantSpec, tokenizer: object, say: Progress,
           threads: int | None = None) -> tuple[Candidate, list[Candidate], dict[str, object]]:
    """Build and measure candidates in `work`; return the chosen one, all, and data facts."""
    from engines.source import default_sample_log

    _quiet_onnxruntime_logging()
    source = spec.calibration or default_sample_log()
    calibrate, validate = split_texts(source)
    pair_q, pair_d = load_pairs(spec.sample_pairs or default_sample_log())
    say(f"measuring FP32 on {len(validate)} validation queries and {len(pair_q)} pairs")
    ev = Evaluator(fp32, tokenizer, validate[:1000], pair_q, pair_d, threads)
    calib_batches = ev._batches(calibrate[:300]) if spec.method != "dynamic" else None
    levels = ["3", "2", "1"] if spec.level == "auto" else [spec.level]
    candidates: list[Candidate] = []

    def build(candidate: Candidate) -> Candidate:
        candidate.path = work / f"{candidate.name}.onnx"
        quantize_model(fp32, candidate.path, candidate, calib_batches)  # type: ignore[arg-type]
        candidate.metrics = ev.measure(candidate.path)
        say(f"{candidate.name}: {candidate.metrics['speedup']:.2f}x, mean cosine "
            f"{candidate.metrics['mean_cosine']:.4f}")
        candidates.append(candidate)
        return candidate

    budget = spec.budget
    ranked: list[str] | None = None
    for level in levels:
        base = build(Candidate(f"level{level}-{spec.method}", level, spec.method))
        if base.meets(budget) or spec.level != "auto" or spec.max_exclude < 1:
            continue  # (ranking measures every node alone: only when exclusions may follow)
        if ranked is None:
            ranked = sensitivity(fp32, work, spec, ev, calib_batches, say)
        in_level = [n for n in ranked if n.split("\0")[1] in LEVELS[level]]
        in_level = [n.split("\0")[0] for n in in_level]
        for k in range(1, spec.max_exclude + 1):
            if build(Candidate(f"level{level}-{spec.method}-minus{k}", level, spec.method,
                               tuple(in_level[:k]))).meets(budget):
                break
    meeting = [c for c in candidates if c.meets(budget)]
    if spec.level != "auto":
        chosen = candidates[0]
    elif meeting:
        chosen = max(meeting, key=lambda c: c.metrics["items_per_s"])
    else:
        best = max(candidates, key=lambda c: c.metrics["mean_cosine"])
        raise BuildError(f"no INT8 candidate meets max_drop {spec.max_drop} (best: "
                         f"{best.name}, mean cosine {best.metrics['mean_cosine']:.4f}); "
                         "raise --max-drop, allow more exclusions, or use --precision fp32")
    facts = {"calibration_file": source.name, "calibration_sha256": file_digest(source),
             "calibration_queries": len(calibrate), "validation_queries": len(validate[:1000]),
             "pairs": len(pair_q), "fp32_items_per_s": round(ev.fp32_rate, 1)}
    return chosen, candidates, facts


def sensitivity(fp32: Path, work: Path, spec: QuantSpec, ev: Evaluator,
                calib_batches: list[object] | None, say: Progress) -> list[str]:
    """Nodes ranked by how much leaving each one alone in FP32 (everything else quantized at
    level 3) raises mean cosine on a slice of the validation split; "name\\0op_type"."""
    import onnx

    nodes = [(n.name, n.op_type) for n in onnx.load(str(fp32)).graph.node
             if n.op_type in LEVELS["3"]]
    say(f"measuring the sensitivity of {len(nodes)} nodes")
    gains = []
    for name, op in nodes:
        probe = Candidate("probe", "3", spec.method, (name,), work / "probe.onnx")
        quantize_model(fp32, probe.path, probe, calib_batches)  # type: ignore[arg-type]
        gains.append((ev.probe(probe.path), f"{name}\0{op}"))
    return [n for _, n in sorted(gains, reverse=True)]


def install(chosen: Candidate, target_model: Path) -> None:
    assert chosen.path is not None
    shutil.copyfile(chosen.path, target_model)
