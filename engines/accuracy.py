"""How engines are checked against PyTorch FP32: reference outputs, cosines and budgets.

Every builder (ONNX Runtime, torch, TensorRT), the ONNX Runtime INT8 search and the benchmarks
compare an engine's outputs with a reference the same way, so the arithmetic lives here once:
`torch_outputs` runs a PyTorch module on fixed padded batches (the FP32 reference, or the torch
backend's candidate), `cosines` compares embeddings row by row, `cosine_report` summarises them,
and `cosine_budget`/`meets` say whether a summary is within a precision budget. Imports nothing
else from engines, so any module may use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# An FP16 engine (torch or TensorRT) must reach this cosine to FP32 on every checked item.
FP16_MIN_COSINE = 0.999


def torch_outputs(model: Any, batches: Sequence[tuple[np.ndarray, Any]],
                  device: Any) -> np.ndarray:
    """`model`'s float32 outputs on `batches` ((text rows, padded batch) pairs, as
    engines.quantize.encode_texts makes them), each row written back at its text's index."""
    import torch

    n = sum(len(rows) for rows, _ in batches)
    out: np.ndarray | None = None
    with torch.inference_mode():
        for rows, b in batches:
            feeds = [torch.from_numpy(a).to(device) for a in
                     (b.input_ids, b.attention_mask, b.token_type_ids)]
            res = model(*feeds).float().cpu().numpy()
            if out is None:
                out = np.empty((n, *res.shape[1:]), dtype=np.float32)
            out[rows] = res
    assert out is not None
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine of two [n, dim] arrays, in float64 so rounding never reads as error.

    A zero row gives 0, not NaN: NaN would compare as passing every `< threshold` check."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a64 * b64, axis=1) / np.maximum(
        np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1), 1e-12)


def cosine_report(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Mean, 1st-percentile and min cosine of `got` to `ref`: what every budget is set on."""
    cos = cosines(ref, got)
    return {"mean_cosine": float(cos.mean()), "p1_cosine": float(np.percentile(cos, 1)),
            "min_cosine": float(cos.min())}


def cosine_budget(max_drop: float) -> dict[str, float]:
    """Mean and 1st-percentile cosine floors for an allowed mean drop of `max_drop`: the tail
    may drop four times as far as the mean."""
    return {"mean_cosine": 1 - max_drop, "p1_cosine": 1 - 4 * max_drop}


def meets(metrics: dict[str, float], budget: dict[str, float]) -> bool:
    """Whether every floor in `budget` is reached (a metric not measured never is)."""
    return all(metrics.get(k, 0.0) >= v for k, v in budget.items())


def rounded(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics as manifests and messages record them (6 decimals)."""
    return {k: round(v, 6) for k, v in metrics.items()}
