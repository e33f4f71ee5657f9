"""The golden set: reference outputs every artifact carries, so a loaded engine can prove it is
the engine that was built before it serves (a hot reload checks it before the swap).

At build time, just before an artifact is moved into place, the engine is loaded from its build
directory and run on a fixed set of real queries (the held-out third of the shipped sample log,
which neither calibration nor validation uses); the padded inputs and the outputs are stored in
`golden.npz`, a file of the artifact like any other (checksummed in the manifest). Checking a
loaded engine runs the same inputs in one batch (the batch the outputs were made with, so a
dynamically quantized engine sees the same activation ranges) and compares: cosine per row for
the similarity head, absolute difference of probabilities for the classifier head, within a
budget that depends on the precision (another CPU's or GPU's kernels round differently; a
corrupt, truncated or mismatched engine misses it by far).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.accuracy import cosines
from engines.batch import PaddedBatch, pad_sequences
from engines.errors import ArtifactError
from engines.protocol import Engine

GOLDEN_FILE = "golden.npz"
GOLDEN_QUERIES = 32
# Similarity: the lowest cosine allowed between an output and its golden row.
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.999, "int8": 0.995, "fp8": 0.995}
# Classifier: the largest difference allowed between a probability and its golden value.
MAX_PROB_DIFF = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 2e-3, "int8": 0.02, "fp8": 0.02}


@dataclass(frozen=True, slots=True)
class GoldenReport:
    ok: bool
    metric: str  # "min_cosine" or "max_prob_diff"
    worst: float
    budget: float
    queries: int
    seconds: float
    reason: str = ""

    def summary(self) -> dict[str, object]:
        return {"ok": self.ok, self.metric: round(self.worst, 6), "budget": self.budget,
                "queries": self.queries, "seconds": round(self.seconds, 3),
                **({"reason": self.reason} if self.reason else {})}


def golden_queries(n: int = GOLDEN_QUERIES) -> list[str]:
    """`n` real queries from the third of the sample log no build step uses, in a fixed order."""
    from engines.quantize import shuffled_texts
    from engines.source import default_sample_log

    texts = shuffled_texts(default_sample_log())
    return texts[2 * (len(texts) // 3):][:n]


def golden_inputs(artifact: Path, max_length: int) -> PaddedBatch:
    """The golden queries tokenized with the artifact's own tokenizer, padded as one batch."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(artifact / "tokenizer" / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    encodings = tok.encode_batch(golden_queries())
    return pad_sequences([np.asarray(e.ids, dtype=np.int64) for e in encodings])


def write_golden(engine: Engine, work: Path) -> Path:
    """Run `engine` on the golden inputs and store inputs and outputs in `work`."""
    batch = golden_inputs(work, engine.manifest.max_length)
    outputs = np.asarray(engine.run(batch), dtype=np.float32)
    path = work / GOLDEN_FILE
    with path.open("wb") as f:
        np.savez(f, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 token_type_ids=batch.token_type_ids, outputs=outputs)
    return path


def check_golden(engine: Engine) -> GoldenReport:
    """Run the artifact's golden inputs through `engine` and compare with the stored outputs.

    Raises ArtifactError when the artifact has no golden set (built before it existed: rebuild
    it) or an unreadable one; a mismatch is a report with ok=False and the reason."""
    m = engine.manifest
    path = engine.path / GOLDEN_FILE
    if not path.is_file():
        raise ArtifactError(engine.path, f"no {GOLDEN_FILE} (built before golden sets existed): "
                                         "rebuild it to check it before serving")
    try:
        with np.load(path) as data:
            batch = PaddedBatch(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                                token_type_ids=data["token_type_ids"])
            expected = np.asarray(data["outputs"], dtype=np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise ArtifactError(engine.path, f"{GOLDEN_FILE} is unreadable: {exc}") from None
    started = time.perf_counter()
    try:
        got = np.asarray(engine.run(batch), dtype=np.float32)
    except Exception as exc:  # a broken engine fails its check, it does not crash the caller
        return _report(m.head, m.precision, float("nan"), len(expected), started,
                       f"the engine failed on the golden set: {type(exc).__name__}: {exc}")
    if got.shape != expected.shape:
        return _report(m.head, m.precision, float("nan"), len(expected), started,
                       f"outputs of shape {got.shape}, the golden set has {expected.shape}")
    if m.head == "similarity":
        worst = float(cosines(got, expected).min())
    else:
        worst = float(np.abs(got.reshape(-1) - expected.reshape(-1)).max())
    return _report(m.head, m.precision, worst, len(expected), started)


def _report(head: str, precision: str, worst: float, n: int, started: float,
            reason: str = "") -> GoldenReport:
    seconds = time.perf_counter() - started
    if head == "similarity":
        budget = MIN_COSINE.get(precision, MIN_COSINE["int8"])
        ok = not reason and worst >= budget
        metric = "min_cosine"
    else:
        budget = MAX_PROB_DIFF.get(precision, MAX_PROB_DIFF["int8"])
        ok = not reason and worst <= budget
        metric = "max_prob_diff"
    if not ok and not reason:
        reason = (f"golden set {metric} {worst:.6f} is outside the {precision} budget "
                  f"{budget} ({n} queries)")
    return GoldenReport(ok=ok, metric=metric, worst=worst, budget=budget, queries=n,
                        seconds=seconds, reason=reason)
