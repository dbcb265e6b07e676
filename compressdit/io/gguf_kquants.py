"""Writers for llama.cpp's Q4_K and Q5_K blocks, which the ``gguf`` package can read but not write.

A K-quant super-block holds 256 weights as 8 sub-blocks of 32: ``w = d * sc[j] * q - dmin * m[j]`` with
``q`` of 4 (Q4_K) or 5 (Q5_K) bits, 6-bit sub-block scales ``sc`` and mins ``m``, and fp16 ``d`` / ``dmin``
per super-block (``ggml-common.h``: ``block_q4_K`` = d, dmin, scales[12], qs[128]; ``block_q5_K`` adds
qh[32] before qs). Scales and mins come from each sub-block's min/max (min clamped at zero, as llama.cpp's
``make_qkx`` searches start from); the byte layout is the one ``gguf.quants.Q4_K.dequantize_blocks`` reads,
which the tests check by round trip.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

QK_K = 256
SUB = 32


def _super_blocks(array: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    array = np.asarray(array, dtype=np.float32)
    if array.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows that are a multiple of {QK_K} wide, got {array.shape[-1]}")
    return array.reshape(-1, QK_K // SUB, SUB), array.shape


def _scales(blocks: np.ndarray, levels: int):
    """fp16 ``d``/``dmin`` per super-block, 6-bit ``sc``/``m`` per sub-block and the codes ``q`` in [0, levels]."""
    low = np.minimum(blocks.min(axis=-1), 0.0)
    high = blocks.max(axis=-1)
    scale = (high - low) / levels  # [n, 8]
    minimum = -low
    d = (scale.max(axis=-1) / 63).astype(np.float16)
    dmin = (minimum.max(axis=-1) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin32 > 0, np.rint(minimum / dmin32), 0).clip(0, 63).astype(np.uint8)
        step = (d32 * sc)[..., None]
        offset = (dmin32 * m)[..., None]
        q = np.where(step > 0, np.rint((blocks + offset) / step), 0).clip(0, levels).astype(np.uint8)
    return d, dmin, sc, m, q


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The 12-byte 6-bit packing of 8 scales and 8 mins (``get_scale_min_k4`` in ggml)."""
    lo_sc, hi_sc, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    first = lo_sc | ((hi_sc & 0x30) << 2)
    second = lo_m | ((hi_m & 0x30) << 2)
    third = (hi_sc & 0x0F) | ((hi_m & 0x0F) << 4)
    return np.concatenate([first, second, third], axis=-1).astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Low 4 bits of sub-blocks 2g and 2g+1 share byte ``32 g + l`` (low and high nibble)."""
    low = q[:, 0::2, :] & 0x0F
    high = q[:, 1::2, :] & 0x0F
    return (low | (high << 4)).reshape(len(q), -1).astype(np.uint8)


def _header(d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray) -> list[np.ndarray]:
    return [d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), _pack_scales(sc, m)]


def quantize_q4_k(array: np.ndarray) -> np.ndarray:
    """``array`` ``[..., K]`` (K a multiple of 256) -> Q4_K bytes ``[..., K / 256 * 144]``."""
    blocks, shape = _super_blocks(array)
    d, dmin, sc, m, q = _scales(blocks, 15)
    out = np.concatenate([*_header(d, dmin, sc, m), _nibbles(q)], axis=-1)
    return out.reshape(*shape[:-1], -1)


def quantize_q5_k(array: np.ndarray) -> np.ndarray:
    """``array`` ``[..., K]`` (K a multiple of 256) -> Q5_K bytes ``[..., K / 256 * 176]``."""
    blocks, shape = _super_blocks(array)
    d, dmin, sc, m, q = _scales(blocks, 31)
    high = ((q >> 4) & 1).astype(np.uint8)  # [n, 8, 32]: bit j of qh[l] is sub-block j's fifth bit
    qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1).astype(np.uint8)
    out = np.concatenate([*_header(d, dmin, sc, m), qh, _nibbles(q)], axis=-1)
    return out.reshape(*shape[:-1], -1)


K_QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k}
