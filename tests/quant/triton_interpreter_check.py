"""Run by tests/quant/test_quant_gpu_ops.py with TRITON_INTERPRET=1: the Triton kernels on CPU vs the reference."""

from __future__ import annotations

import torch

from compressdit.quant.gpu_reference import int8_linear_reference, quantize_rows_reference
from compressdit.quant.gpu_triton import int8_gemm_fused, quantize_rows
from compressdit.quant.primitives import quantize_weight_rtn

TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}  # several tiles, a ragged K and M


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    for rows, cols in ((5, 96), (3, 5000)):  # one block per row; a row longer than a block
        x = torch.randn(rows, cols, generator=gen) * torch.linspace(0.1, 5, cols)
        for qdtype in (torch.int8, torch.float8_e4m3fn):
            codes, scale = quantize_rows(x, qdtype)
            expected_codes, expected_scale = quantize_rows_reference(x, qdtype)
            assert torch.equal(scale, expected_scale), (rows, cols, qdtype)
            if qdtype == torch.int8:  # the interpreter's e4m3 cast is not the hardware's (tested on CUDA)
                assert torch.equal(codes, expected_codes), (rows, cols)
    for rows, in_features, out_features, bias in ((7, 128, 40, True), (20, 100, 24, False)):
        weight = torch.randn(out_features, in_features, generator=gen)
        q = quantize_weight_rtn(weight, 8)
        w_scale = q.scale.reshape(-1)
        b = torch.randn(out_features, generator=gen) if bias else None
        x = torch.randn(rows, in_features, generator=gen)
        codes, a_scale = quantize_rows(x, torch.int8)
        out = int8_gemm_fused(codes, a_scale, q.codes, w_scale, b, torch.float32, TILES)
        torch.testing.assert_close(out, int8_linear_reference(x, q.codes, w_scale, b), rtol=1e-5, atol=1e-4)
    print("ok")


if __name__ == "__main__":
    main()
