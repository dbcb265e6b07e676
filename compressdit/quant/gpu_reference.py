"""PyTorch ground truth of the GPU ops (:mod:`compressdit.quant.gpu_ops`) and the weight layouts they take.

Pure functions on any device. Activations: symmetric dynamic per-row (per-token) scales
``max(|x|_row, 1e-8) / qmax`` in fp32, codes ``round(x / scale)`` (int8) or ``x / scale`` cast to
float8 e4m3 (fp8). Matmuls here run in fp32 on the dequantized values.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0


def quantize_rows_reference(x2d: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[M, K]`` (``int8`` or ``float8_e4m3fn``) and fp32 scales ``[M, 1]`` of a 2-D ``x``."""
    qmax = INT8_MAX if qdtype == torch.int8 else FP8_MAX
    scale = x2d.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-8) / qmax
    q = x2d.float() / scale
    if qdtype == torch.int8:
        return torch.round(q).clamp(-qmax - 1, qmax).to(torch.int8), scale
    return q.clamp(-qmax, qmax).to(qdtype), scale


def _fake_quantized_rows(x: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    codes, scale = quantize_rows_reference(x.reshape(-1, x.shape[-1]), qdtype)
    return codes.float() * scale


def int8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bias: Optional[torch.Tensor]) -> torch.Tensor:
    """W8A8: per-token int8 ``x`` times int8 ``weight [N, K]`` scaled per row by ``weight_scale [N]``."""
    w = weight.float() * weight_scale.reshape(-1, 1).float()
    out = F.linear(_fake_quantized_rows(x, torch.int8), w, None if bias is None else bias.float())
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def quantize_fp8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 weight ``[N, K]`` and its fp32 per-output-channel scales ``[N, 1]`` (absmax maps to 448)."""
    return quantize_rows_reference(weight.detach(), torch.float8_e4m3fn)


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-token e4m3 ``x`` times e4m3 ``weight [N, K]`` scaled per row by ``weight_scale [N, 1]``, in fp32."""
    w = weight.float() * weight_scale.reshape(-1, 1).float()
    out = F.linear(_fake_quantized_rows(x, torch.float8_e4m3fn), w, None if bias is None else bias.float())
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def int4_linear_reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Weight-only int4: ``codes [N, K]`` in [-8, 7], ``weight = (codes - zero) * scale`` per group, fp32 matmul."""
    rows, cols = codes.shape
    groups = scale.shape[1]
    q = codes.float().reshape(rows, groups, cols // groups)
    if zero is not None:
        q = q - zero.float().unsqueeze(-1)
    w = (q * scale.float().unsqueeze(-1)).reshape(rows, cols)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def _torch_at_least(major: int, minor: int) -> bool:
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return version >= (major, minor)


def inner_k_tiles(in_features: int) -> int:
    """tinygemm's ``innerKTiles`` (8, 4 or 2): the largest whose tile (16 x it) divides ``in_features``."""
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"in_features {in_features} is not a multiple of 32, which tinygemm's int4 packing needs")


def pack_int4(codes: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """tinygemm's packed int4 weight on ``device`` from signed codes ``[N, K]`` in [-8, 7].

    CUDA takes ``uint8 [N, K/2]`` (even column in the high nibble) since torch 2.5 and ``int32 [N, K]``
    before; the CPU kernel (``_for_cpu``) takes ``int32 [N, K]``. Unsigned value ``q = code + 8``.
    """
    device = torch.device(device)
    q = (codes.to(device=device, dtype=torch.int32) + 8)
    if q.min() < 0 or q.max() > 15:
        raise ValueError("int4 codes must lie in [-8, 7]")
    tiles = inner_k_tiles(codes.shape[1])
    if device.type == "cuda":
        if _torch_at_least(2, 5):
            q = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(q.contiguous(), tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), tiles)


def tinygemm_scales_and_zeros(scale: torch.Tensor, zero: Optional[torch.Tensor], group_size: int,
                              in_features: int) -> torch.Tensor:
    """``bf16 [K / group_size, N, 2]`` for tinygemm from our ``scale``/``zero`` ``[N, groups]``.

    Ours: ``w = (c - z) * s`` with ``c`` in [-8, 7]; tinygemm: ``w = (q - 8) * s + z'`` with ``q = c + 8``, so
    ``z' = -z * s``. Per-channel (or coarser) scales are repeated over the finer tinygemm groups.
    """
    groups = in_features // group_size
    if groups % scale.shape[1]:
        raise ValueError(f"{scale.shape[1]} scale groups per row cannot be split into {groups} groups of "
                         f"{group_size}")
    repeat = groups // scale.shape[1]
    s = scale.float().repeat_interleave(repeat, dim=1)
    z = torch.zeros_like(s) if zero is None else -zero.float().repeat_interleave(repeat, dim=1) * s
    return torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


# Row counts up to which the packed int4 GEMM runs; above, the weight is dequantized into bf16 for the call and
# multiplied by a dense bf16 GEMM. CPU (one thread, AVX512-BF16 EPYC, DiT-XL/2 shapes, bench/layer_kernels.py):
# _weight_int4pack_mm_for_cpu wins at 64 rows on all four shapes, the dense path is 1.5-1.8x faster at 256.
# CUDA (H200, bench/results/gpu_kernels_h200.md): tinygemm grows ~0.4 us per row (fc1: 13 us at 16 rows, 109 at
# 256, 413 at 1024, 1630 at 4096) while a per-call decode + cuBLAS (the vq-decode+cublas column) stays at
# 50-240 us; at 256 rows tinygemm is still ahead on all four shapes, at 1024 behind on three. Not yet measured
# for int4 itself on a GPU: conservative, rerun bench/gpu_kernels.py to move it.
INT4_PACKED_MAX_ROWS = {"cpu": 64, "cuda": 256}


def int4_uses_packed_gemm(rows: int, device_type: str) -> bool:
    """Whether ``rows`` activation rows on ``device_type`` run the packed int4 GEMM (else dequantize + dense)."""
    return rows <= INT4_PACKED_MAX_ROWS.get(device_type, INT4_PACKED_MAX_ROWS["cpu"])


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K/2]`` holding ``code + 8`` of signed codes ``[N, K]`` in [-8, 7], even column low."""
    q = codes.to(torch.int16) + 8
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).contiguous()


def dequantize_nibbles(nibbles: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                       group_size: int) -> torch.Tensor:
    """bf16 ``[N, K]`` weight ``(q - 8) * scale + zero`` (tinygemm's convention) from :func:`pack_nibbles`.

    ``scale`` / ``zero``: ``[N, K / group_size]``; the arithmetic runs in bf16, like the packed GEMMs' scales.
    """
    rows, groups = scale.shape
    q = torch.stack([nibbles & 15, nibbles >> 4], -1).view(rows, groups, group_size).to(torch.bfloat16).sub_(8)
    weight = q.mul_(scale.to(torch.bfloat16).unsqueeze(-1))
    if zero is not None:
        weight = weight.add_(zero.to(torch.bfloat16).unsqueeze(-1))
    return weight.view(rows, groups * group_size)
