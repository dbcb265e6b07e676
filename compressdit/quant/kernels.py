"""Integer execution paths. Each has the PyTorch reference (dequantize, then matmul) as its ground truth.

``int8_linear`` runs W8A8 as a real INT8 x INT8 -> INT32 GEMM (``torch._int_mm``: cuBLASLt on CUDA;
oneDNN's s8s8 GEMM on CPU, where the ``cpu-int8-gemm`` kernel uses it for small layers and one row) and rescales by the activation and weight scales.
The registry's ``cuda-w8a8-int8`` kernel runs it for per-tensor activations (more than 16 rows).
"""

from __future__ import annotations

import torch

from compressdit.quant.primitives import int_range


def quantize_activation_int8(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 codes of ``x`` ([rows, K]) and their scales ([rows, 1] or [1, 1])."""
    qmax = int_range(8)[1]
    if granularity == "per_token":
        scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-8) / qmax
    else:
        scale = x.abs().amax().float().clamp_min(1e-8).reshape(1, 1) / qmax
    codes = torch.round(x.float() / scale).clamp(-qmax - 1, qmax).to(torch.int8)
    return codes, scale


def int8_linear(x: torch.Tensor, weight_codes: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, granularity: str = "per_token") -> torch.Tensor:
    """``x @ W^T + b`` with int8 activations (dynamic) and int8 per-output-channel weights, int32 accumulate."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    codes, a_scale = quantize_activation_int8(x2, granularity)
    acc = torch._int_mm(codes, weight_codes.t())
    out = acc.float() * a_scale * weight_scale.reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*shape[:-1], weight_codes.shape[0])
