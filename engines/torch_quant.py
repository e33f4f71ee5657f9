"""INT8 and FP8 linears for the PyTorch runtime: per-channel weights, per-token activations.

INT8 runs `torch._int_mm` (cuBLASLt's int8 tensor-core GEMM on CUDA, exact int32 accumulation)
and FP8 runs `torch._scaled_mm` with row-wise scales (Hopper's e4m3 tensor cores). Activation
scales are computed per token at run time, so no calibration set can go stale, and one outlier
token costs only its own row's resolution. Both ops also run on CPU, which is how the build
measures accuracy on machines without a GPU (integer accumulation is exact on both).
Which linears: the four per layer (QKV, attention output, FFN in and out); embeddings,
LayerNorms, attention products and the head stay in the float dtype (Bing's "levels").
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

QUANT_PRECISIONS = ("int8", "fp8")
_INT8_MAX = 127.0
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_EPS = 1e-8


def _pad_rows(x: torch.Tensor, multiple: int, minimum: int) -> torch.Tensor:
    """cuBLASLt's int8 path needs more than 16 rows; FP8 wants rows in multiples of 16."""
    m = x.shape[0]
    target = max(minimum, -(-m // multiple) * multiple)
    return x if target == m else F.pad(x, (0, 0, 0, target - m))


def _per_channel(linear: nn.Linear, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights scaled per output channel into [-qmax, qmax] (fp32, [out, in]) and the scales
    as a contiguous fp32 [1, out] row, the layout both GEMMs broadcast against."""
    w = linear.weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=_EPS) / qmax
    return (w / scale[:, None]).clamp(-qmax, qmax), scale[None, :].contiguous()


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype) -> None:
        super().__init__()
        w, scale = _per_channel(linear, _INT8_MAX)
        # [out, in] row-major; `.t()` at call time is the column-major operand cuBLASLt wants.
        self.register_buffer("weight_q", torch.round(w).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", linear.bias.detach().to(out_dtype))
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).float()
        m = x2.shape[0]
        scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=_EPS) / _INT8_MAX
        xq = torch.round(x2 / scale).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
        if xq.is_cuda:
            acc = torch._int_mm(_pad_rows(xq, 8, 32), self.weight_q.t())[:m]
        else:
            # PyTorch's CPU _int_mm is a naive loop (~50x slower than BLAS); float64 GEMM
            # gives the same integers exactly (|sums| < 2^53) for CPU accuracy checks.
            acc = xq.double() @ self.weight_q.double().t()
        # int32 -> fp32 before scaling: int32 sums overflow fp16's range.
        y = (acc.float() * scale * self.weight_scale).to(self.out_dtype) + self.bias
        return y.view(*lead, -1)


class Fp8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype) -> None:
        super().__init__()
        w, scale = _per_channel(linear, _FP8_MAX)
        self.register_buffer("weight_q", w.to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", linear.bias.detach().to(out_dtype))
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).float()
        m = x2.shape[0]
        scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=_EPS) / _FP8_MAX
        xq = _pad_rows((x2 / scale).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn), 16, 16)
        scale = _pad_rows(scale, 16, 16).contiguous()
        # Row-wise scaled FP8 GEMMs produce bf16 on CUDA; one cast back to the model's dtype.
        y = torch._scaled_mm(xq, self.weight_q.t(), scale_a=scale, scale_b=self.weight_scale,
                             out_dtype=torch.bfloat16)[:m]
        return (y.to(self.out_dtype) + self.bias).view(*lead, -1)


def quantize_linears(model: nn.Module, precision: str, names: Iterable[str],
                     *, out_dtype: torch.dtype) -> list[str]:
    """Swap the named nn.Linear submodules for quantized ones in place; returns those swapped."""
    if precision not in QUANT_PRECISIONS:
        raise ValueError(f"precision {precision!r} is not a quantized precision "
                         f"{QUANT_PRECISIONS}")
    cls = Int8Linear if precision == "int8" else Fp8Linear
    swapped = []
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is not an nn.Linear")
        setattr(parent, attr, cls(linear, out_dtype))
        swapped.append(name)
    return swapped


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: Hopper (sm_90) and later; CPU runs it (slowly) for accuracy checks."""
    if device.type == "cpu":
        return hasattr(torch, "float8_e4m3fn")
    return torch.cuda.get_device_capability(device) >= (8, 9)
