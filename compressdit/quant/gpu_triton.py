"""Triton kernels behind :mod:`compressdit.quant.gpu_ops` (imported only where ``triton`` is installed).

- :func:`quantize_rows`: symmetric dynamic per-row (per-token) quantization in one pass over each row:
  row absmax -> fp32 scale ``max(absmax, 1e-8) / qmax`` -> codes, int8 (round half to even, like
  ``torch.round``) or float8 e4m3 (clamped to +-448, rounded to nearest even in fp32 before the cast). Same
  numbers as the PyTorch reference.
- :func:`int8_gemm_fused`: ``int8 [M, K] x int8 [N, K]^T`` with int32 accumulation and the epilogue
  ``acc * a_scale[m] * w_scale[n] + bias[n]`` fused, written straight in the output dtype: the int32
  matrix never goes to memory (with ``torch._int_mm`` it costs as much traffic as the GEMM's inputs).

Tested against the PyTorch reference in Triton's interpreter on CPU (tests/quant/test_quant_gpu_triton.py: every
test run) and on a GPU by the CUDA tests of tests/quant/test_quant_gpu_ops.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, QMAX: tl.constexpr,
                          TO_INT8: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        mask = start + offs < K
        v = tl.load(x_ptr + row * stride_x + start + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, 0), 1e-8) / QMAX
    tl.store(scale_ptr + row, scale)
    for start in range(0, K, BLOCK):
        mask = start + offs < K
        v = tl.div_rn(tl.load(x_ptr + row * stride_x + start + offs, mask=mask, other=0.0).to(tl.float32), scale)
        if TO_INT8:
            # 1.5 * 2**23: (v + m) - m rounds |v| < 2**22 to the nearest even integer in fp32, like torch.round
            v = tl.minimum(tl.maximum((v + 12582912.0) - 12582912.0, -QMAX - 1.0), QMAX)
            tl.store(q_ptr + row * stride_q + start + offs, v.to(tl.int8), mask=mask)
        else:
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
            # rounded to the e4m3 grid here (nearest, ties to even), so that the conversion below is exact whatever
            # rounding it does (Triton's interpreter truncates): the grid's step at |v| is 2**(e - 3), e = the
            # exponent of v, at least -6 (subnormals); |v| * 2**(3 - e) < 16 is rounded with the trick above; the
            # sign goes back on after (-0.0 stays -0.0, as torch's cast gives)
            bits = v.to(tl.int32, bitcast=True)
            e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
            up = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2**(3 - e)
            down = ((124 + e) << 23).to(tl.float32, bitcast=True)  # 2**(e - 3)
            v = ((tl.abs(v) * up + 12582912.0) - 12582912.0) * down
            v = tl.where(bits < 0, -v, v)
            tl.store(q_ptr + row * stride_q + start + offs, v.to(tl.float8e4nv), mask=mask)


def quantize_rows(x2d: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[M, K]`` (``int8`` or ``float8_e4m3fn``) and fp32 scales ``[M, 1]`` of a 2-D ``x``."""
    rows, cols = x2d.shape
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    codes = torch.empty(rows, cols, dtype=qdtype, device=x2d.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x2d.device)
    to_int8 = qdtype == torch.int8
    block = min(4096, triton.next_power_of_2(cols))
    if rows:
        _quantize_rows_kernel[(rows,)](x2d, codes, scales, cols, x2d.stride(0), codes.stride(0),
                                       QMAX=127.0 if to_int8 else 448.0, TO_INT8=to_int8, BLOCK=block,
                                       num_warps=8 if block >= 2048 else 4)
    return codes, scales


def _config(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages,
                         num_warps=warps)


GEMM_CONFIGS = [_config(128, 128, 128, 3, 8), _config(128, 256, 128, 3, 8), _config(256, 128, 128, 3, 8),
                _config(64, 128, 128, 4, 4), _config(32, 128, 128, 4, 4), _config(16, 64, 256, 4, 4)]


def _prune(configs, named_args, **kwargs):
    """Drop tiles much taller than M (they compute padding); keep at least one."""
    rows = named_args["M"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(rows))]
    return kept or configs[-1:]


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, stride_am, stride_ak,
                      stride_bn, stride_bk, stride_cm, stride_cn, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n  # grouped order: neighbouring programs share A tiles in L2
    group = pid // width
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_a = offs_m % M  # wrapped rows/cols are computed and masked at the store
    cols_b = offs_n % N
    a_ptrs = a_ptr + rows_a[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + cols_b[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out = acc.to(tl.float32) * tl.load(sa_ptr + rows_a)[:, None] * tl.load(sb_ptr + cols_b)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols_b).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


_int8_gemm_tuned = triton.autotune(configs=GEMM_CONFIGS, key=["M", "N", "K"],
                                   prune_configs_by={"early_config_prune": _prune})(_int8_gemm_kernel)


def int8_gemm_fused(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """``(a @ weight^T) * a_scale * w_scale + bias`` in ``out_dtype``: a ``[M, K]`` int8, weight ``[N, K]`` int8,
    a_scale ``[M, 1]`` / w_scale ``[N]`` fp32, bias ``[N]`` or None. ``config`` (``BLOCK_M``, ``BLOCK_N``,
    ``BLOCK_K``, ``GROUP_M``, ``num_warps``...) skips the autotuner (once per M, N, K) with fixed tiles."""
    rows, cols = a.shape
    out_features = weight.shape[0]
    out = torch.empty(rows, out_features, dtype=out_dtype, device=a.device)
    if rows == 0:
        return out

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(out_features, meta["BLOCK_N"]),)

    kernel = _int8_gemm_tuned if config is None else _int8_gemm_kernel
    kernel[grid](a, weight, out, a_scale, w_scale, bias if bias is not None else w_scale, rows, out_features, cols,
                 a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
                 HAS_BIAS=bias is not None, **(config or {}))
    return out
