"""compressdit's Q4_K / Q5_K writers produce the bytes that gguf's reader and diffusers' GGUF dequantizer decode."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from diffusers.quantizers.gguf.utils import dequantize_functions

from compressdit.io.gguf_kquants import K_QUANTIZERS, QK_K

# relative RMS error of Gaussian rows (RTN over 32-weight sub-blocks with 6-bit scales); Q4_0 / Q5_0 reach
# 0.085 / 0.042 on the same data
MAX_RELATIVE_RMSE = {"Q4_K": 0.08, "Q5_K": 0.04}


def _data() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 2 * QK_K)) * rng.uniform(0.01, 3.0, (16, 1))).astype(np.float32)
    x[0] = 0.0
    x[1, :QK_K] = 5.0  # constant (positive) super-block: min clamps to 0, one exact level
    x[2, :QK_K] = -2.0  # constant negative super-block: represented by the min alone
    return x


@pytest.mark.parametrize("name", sorted(K_QUANTIZERS))
def test_k_quant_round_trip(name):
    qtype = gguf.GGMLQuantizationType[name]
    x = _data()
    packed = K_QUANTIZERS[name](x)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert packed.dtype == np.uint8 and packed.shape == (16, 2 * QK_K // block * size)
    decoded = gguf.quants.dequantize(packed, qtype)
    assert np.array_equal(decoded[0], x[0])
    np.testing.assert_allclose(decoded[1, :QK_K], 5.0, rtol=1e-3)
    np.testing.assert_allclose(decoded[2, :QK_K], -2.0, rtol=1e-3)
    rest = x[3:]
    rmse = np.sqrt(((decoded[3:] - rest) ** 2).mean() / (rest**2).mean())
    assert rmse < MAX_RELATIVE_RMSE[name]
    # diffusers' torch dequantizer reads the same bytes the same way
    blocks = torch.from_numpy(packed).reshape(-1, size)
    theirs = dequantize_functions[qtype](blocks, block, size, dtype=torch.float32).reshape(decoded.shape)
    np.testing.assert_allclose(theirs.numpy(), decoded, rtol=1e-3, atol=1e-5)


def test_k_quants_need_256_wide_rows():
    with pytest.raises(ValueError, match="multiple of 256"):
        K_QUANTIZERS["Q4_K"](np.zeros((2, 128), np.float32))
