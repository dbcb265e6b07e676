"""The Triton kernels of :mod:`compressdit.quant.gpu_triton` run on CPU in Triton's interpreter (``TRITON_INTERPRET``):
the same kernel source the GPU compiles, executed program by program on CPU tensors, against the PyTorch reference.

Covered here on every machine: the row quantizer's codes and scales (int8 and e4m3, bit for bit, e4m3 ties and
subnormals included), the fused int8 GEMM (tile edges, uneven K, bias, output dtypes, grouped program order) bit for
bit against the reference's epilogue, the autotuner's pruning, and the CUDA impl of ``int8_linear_dyn`` wired to
them. Not covered: the compiled code's speed and the GPU's own conversions (the CUDA tests of test_quant_gpu_ops.py).
"""

from __future__ import annotations

import sys

import pytest
import torch

import compressdit.quant.gpu_ops as gpu_ops
from compressdit.quant.gpu_reference import quantize_rows_reference

# GEMM tiles small enough for the interpreter, still several tiles and k-steps per call
SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA here: the CUDA tests of "
                                "test_quant_gpu_ops.py run these kernels compiled")


@pytest.fixture(scope="module")
def triton_cpu():
    """``gpu_triton`` with its kernels interpreted (tests/conftest.py sets ``TRITON_INTERPRET=1`` off CUDA before
    triton is imported: ``triton.jit`` reads it when decorating, triton's own library functions included)."""
    from triton.runtime.interpreter import InterpretedFunction

    import compressdit.quant.gpu_triton as module

    assert isinstance(module._quantize_rows_kernel, InterpretedFunction)
    return module


def _e4m3_values() -> torch.Tensor:
    """Every finite non-negative float8_e4m3fn value, ascending."""
    values = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return values[torch.isfinite(values)].unique()


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("shape", [(37, 200), (1, 4096), (3, 5000), (0, 64)])  # one block, several blocks, none
def test_row_quantizer_is_the_reference_bit_for_bit(triton_cpu, qdtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * torch.linspace(0.01, 6, shape[1])).bfloat16()
    codes, scales = triton_cpu.quantize_rows(x, qdtype)
    ref_codes, ref_scales = quantize_rows_reference(x, qdtype)
    assert codes.dtype == qdtype and scales.shape == (shape[0], 1)
    assert torch.equal(codes.view(torch.int8), ref_codes.view(torch.int8))
    assert torch.equal(scales, ref_scales)


def test_e4m3_codes_round_ties_to_even_down_to_the_subnormals(triton_cpu):
    """A row whose max is 448 has scale 1: its values are rounded as they are. Every e4m3 value, every midpoint
    between neighbours (ties: to the even code) and a hair either side of each midpoint, both signs."""
    grid = _e4m3_values()
    mids = (grid[1:] + grid[:-1]) / 2
    row = torch.cat([grid, mids, mids * (1 + 2**-20), mids * (1 - 2**-20)])
    row = torch.cat([row, -row])  # the grid holds 0 and 448
    x = row.reshape(1, -1)
    codes, scales = triton_cpu.quantize_rows(x, torch.float8_e4m3fn)
    assert scales.item() == 1.0
    ref = x.to(torch.float8_e4m3fn)  # torch's own conversion: nearest, ties to even
    assert torch.equal(codes.view(torch.uint8), ref.view(torch.uint8))
    ties = codes[0, len(grid):len(grid) + len(mids)].view(torch.uint8)
    assert bool((ties % 2 == 0).all())  # the even neighbour


def test_int8_codes_clamp_and_round_half_to_even(triton_cpu):
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -126.5, -127.0]])
    codes, scales = triton_cpu.quantize_rows(x, torch.int8)
    assert scales.item() == 1.0
    assert codes.tolist() == [[127, 0, 2, 2, 0, -2, 126, -126, -127]]


def test_row_quantizer_reads_rows_with_a_stride(triton_cpu):
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(3))
    view = x[:, :200]  # row stride 300
    codes, scales = triton_cpu.quantize_rows(view, torch.int8)
    ref_codes, ref_scales = quantize_rows_reference(view.contiguous(), torch.int8)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)


def _gemm_inputs(rows: int, in_features: int, out_features: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=gen)
    w_scale = torch.rand(out_features, generator=gen) * 0.02 + 1e-3  # uneven per-row scales
    codes, a_scale = quantize_rows_reference(torch.randn(rows, in_features, generator=gen), torch.int8)
    bias = torch.randn(out_features, generator=gen)
    return codes, a_scale, weight, w_scale, bias


@pytest.mark.parametrize("rows, in_features, out_features", [
    (1, 64, 32),  # one tile
    (37, 96, 72),  # M and N end inside a tile, K = 3 k-steps exactly (EVEN_K)
    (70, 200, 100),  # uneven K (masked last k-step), 5 x 4 tiles: grouped order over more rows than GROUP_M
])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fused_int8_gemm_is_the_reference_epilogue_bit_for_bit(triton_cpu, rows, in_features, out_features,
                                                                with_bias, out_dtype):
    codes, a_scale, weight, w_scale, bias = _gemm_inputs(rows, in_features, out_features)
    bias = bias if with_bias else None
    out = triton_cpu.int8_gemm_fused(codes, a_scale, weight, w_scale, bias, out_dtype, config=SMALL)
    ref = torch.ops.compressdit.int8_gemm_rows(codes, a_scale, weight, w_scale, bias, torch.float32)
    assert out.dtype == out_dtype and out.shape == (rows, out_features)
    assert_rounded_from(out, ref)


def assert_rounded_from(out: torch.Tensor, exact: torch.Tensor) -> None:
    """``out`` is fp32 ``exact`` itself, or in bf16 one of its two neighbours: the interpreter casts fp32 to bf16 by
    truncation (a GPU rounds to nearest even); the fp32 epilogue is checked bit for bit."""
    if out.dtype == torch.float32:
        assert torch.equal(out, exact)
        return
    truncated = (exact.view(torch.int32) & -65536).view(torch.float32).bfloat16()
    assert bool(((out == exact.bfloat16()) | (out == truncated)).all())


def test_fused_int8_gemm_with_no_rows(triton_cpu):
    codes, a_scale, weight, w_scale, bias = _gemm_inputs(0, 64, 32)
    assert triton_cpu.int8_gemm_fused(codes, a_scale, weight, w_scale, bias, torch.float16).shape == (0, 32)


def test_autotuner_keeps_tiles_no_taller_than_the_rows(triton_cpu):
    def kept(rows):
        return sorted({c.kwargs["BLOCK_M"] for c in triton_cpu._prune(triton_cpu.GEMM_CONFIGS, {"M": rows})})

    assert kept(1) == kept(16) == [16]
    assert kept(37) == [16, 32, 64]
    assert kept(4096) == [16, 32, 64, 128, 256]


def test_autotuned_gemm_at_few_rows_runs_its_one_config(triton_cpu):
    """Up to 16 rows one config is left, so the autotuner launches it without benchmarking (the interpreter has no
    benchmarker): the tuned entry point's grid and arguments, checked."""
    codes, a_scale, weight, w_scale, bias = _gemm_inputs(5, 256, 64, seed=4)
    out = triton_cpu.int8_gemm_fused(codes, a_scale, weight, w_scale, bias, torch.float32)
    assert torch.equal(out, torch.ops.compressdit.int8_gemm_rows(codes, a_scale, weight, w_scale, bias,
                                                                 torch.float32))


def test_cuda_impl_of_the_w8a8_op_quantizes_rows_then_runs_the_fused_gemm(triton_cpu, monkeypatch):
    """``int8_linear_dyn``'s CUDA impl (backend ``triton``) on CPU tensors, the interpreted kernels in place of the
    compiled ones: 3-D bf16 input in, the reference's codes and int32 products out."""
    monkeypatch.setitem(sys.modules, "compressdit.quant.gpu_triton", triton_cpu)
    tuned = triton_cpu.int8_gemm_fused
    monkeypatch.setattr(triton_cpu, "int8_gemm_fused", lambda *args: tuned(*args, config=SMALL))
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 9, 96, generator=gen) * torch.linspace(0.1, 4, 96)).bfloat16()
    _, _, weight, w_scale, bias = _gemm_inputs(1, 96, 40, seed=6)
    out = gpu_ops._int8_cuda(x, weight, w_scale, bias, "triton")
    codes, a_scale = quantize_rows_reference(x.reshape(-1, 96), torch.int8)
    exact = torch.ops.compressdit.int8_gemm_rows(codes, a_scale, weight, w_scale, bias, torch.float32)
    assert out.shape == (2, 9, 40) and out.dtype == torch.bfloat16
    assert_rounded_from(out.reshape(-1, 40), exact)
    ref = torch.ops.compressdit.int8_linear_dyn(x, weight, w_scale, bias, "triton")  # the op's CPU reference
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
