"""Block-scaled FP formats as pure functions: NVFP4 and the OCP MX formats (MXFP4, MXFP8). No modules here.

**NVFP4** (16 values per block along the last dim): an fp32 tensor scale ``s_T = amax / (6 * 448)``, one
E4M3 block scale ``s_b = e4m3(amax_b / (6 * s_T))`` per block (0 -> 1, as ModelOpt does), E2M1 elements
``q = rne(clip(x / (s_b * s_T), +-6))``; ``x_hat = q * s_b * s_T``.

**MXFP4 / MXFP8** (32 values per block): a power-of-two E8M0 scale ``2^(s - 127)`` stored as ``uint8 s`` and
E2M1 (MXFP4) or E4M3 (MXFP8) elements. The scale exponent is ``ceil(log2(amax_b / elem_max))`` as in ModelOpt's
``MXFP4QTensor`` (no element saturates); OCP MX v1.0's reference uses ``floor(log2 amax_b) - emax_elem``,
which saturates the top of some blocks, and torchao's inference default (RCEIL) matches ours. Fake-quantized
values may therefore differ slightly between libraries.
"""

from __future__ import annotations

import torch

from compressdit.quant.minifloat import MINIFLOATS, Minifloat
from compressdit.quant.primitives import all_finite

E2M1, E4M3 = MINIFLOATS.get("e2m1"), MINIFLOATS.get("e4m3")
NVFP4_BLOCK, MX_BLOCK = 16, 32
E8M0_BIAS, E8M0_MIN, E8M0_MAX = 127, -127, 127  # 0xFF (exponent 128) is NaN: never produced


def blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[..., K]`` -> ``[..., K / block, block]``."""
    if x.shape[-1] % block:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the block size {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _ste(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded`` in the forward pass, identity gradient to ``x`` (straight-through)."""
    return x + (rounded - x).detach()


# --- NVFP4 -------------------------------------------------------------------------------------------------

def block_absmax(x_blocks: torch.Tensor) -> torch.Tensor:
    """``x_blocks.abs().amax(-1)`` (NaN propagates) for a power-of-two last dimension, as a tree of halves: on 16-wide
    blocks 2.4x faster than the reduction over the short last dimension."""
    m = x_blocks.detach().abs()
    while m.shape[-1] > 1 and m.shape[-1] % 2 == 0:
        half = m.shape[-1] // 2
        m = torch.maximum(m[..., :half], m[..., half:])
    return m.amax(-1)


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """fp32 scalar ``amax / (6 * 448)`` (1 for an all-zero or empty tensor)."""
    if x.numel():
        low, high = torch.aminmax(x.detach())  # one pass, no |x| copy: 6x faster than abs().amax()
        amax = torch.maximum(high, low.neg()).float()
    else:
        amax = x.new_zeros((), dtype=torch.float32)
    return torch.where(amax > 0, amax / (E2M1.max_value * E4M3.max_value), torch.ones_like(amax))


def nvfp4_block_scales(x_blocks: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """E4M3-rounded block scales (fp32 values) of ``[..., blocks, 16]``; a zero scale becomes 1."""
    amax = block_absmax(x_blocks).float()
    scale = E4M3.round(amax / (E2M1.max_value * tensor_scale))
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def nvfp4_quantize(weight: torch.Tensor, tensor_scale: torch.Tensor | None = None):
    """E2M1 codes ``uint8 [..., K]``, block scales ``float8_e4m3fn [..., K/16]``, tensor scale (fp32 scalar)."""
    if not all_finite(weight):
        raise ValueError("weight contains NaN or inf")
    w = blocks(weight.detach().float(), NVFP4_BLOCK)
    tensor_scale = nvfp4_tensor_scale(w) if tensor_scale is None else tensor_scale.float()
    block_scale = nvfp4_block_scales(w, tensor_scale)
    codes = E2M1.encode(w / (block_scale * tensor_scale).unsqueeze(-1))
    return codes.reshape(weight.shape), block_scale.to(torch.float8_e4m3fn), tensor_scale


def nvfp4_block_values(block_scale: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``[..., K/16]``: what each block's elements are multiplied by (block times tensor scale)."""
    return block_scale.float() * tensor_scale.float()


def nvfp4_dequantize(codes: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of NVFP4 ``codes [..., K]`` with their block and tensor scales."""
    values = blocks(E2M1.decode(codes), NVFP4_BLOCK)
    return (values * nvfp4_block_values(block_scale, tensor_scale).unsqueeze(-1)).reshape(codes.shape)


def nvfp4_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """Dynamic NVFP4 quantize-dequantize of activations (tensor scale from this ``x``), straight-through."""
    xb = blocks(x.float(), NVFP4_BLOCK)  # fp32 math whatever x's dtype: tiny scales underflow in fp16
    tensor_scale = nvfp4_tensor_scale(xb)
    scale = (nvfp4_block_scales(xb, tensor_scale) * tensor_scale).unsqueeze(-1)
    q = xb / scale
    return (_ste(q, E2M1.round(q)) * scale).reshape(x.shape).to(x.dtype)


# --- MX (E8M0 power-of-two scales) -------------------------------------------------------------------------

def mx_scale_exponents(x_blocks: torch.Tensor, element: Minifloat) -> torch.Tensor:
    """int32 ``ceil(log2(amax_b / elem_max))`` per block, clamped to E8M0's [-127, 127] (-127 for zero blocks)."""
    ratio = block_absmax(x_blocks).float() / element.max_value
    mantissa, exponent = torch.frexp(ratio)  # ratio = m * 2^e, m in [0.5, 1): ceil(log2) = e, or e - 1 at m = 0.5
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    exponent = torch.where(ratio > 0, exponent, torch.full_like(exponent, E8M0_MIN))
    return exponent.clamp(E8M0_MIN, E8M0_MAX)


def mx_quantize(weight: torch.Tensor, element: Minifloat, block: int = MX_BLOCK):
    """Element codes ``uint8 [..., K]`` and E8M0 scales ``uint8 [..., K / block]`` (biased exponents)."""
    if not all_finite(weight):
        raise ValueError("weight contains NaN or inf")
    w = blocks(weight.detach().float(), block)
    exponent = mx_scale_exponents(w, element)
    codes = element.encode(w / torch.exp2(exponent.float()).unsqueeze(-1))
    return codes.reshape(weight.shape), (exponent + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``2^(s - 127)`` of E8M0 bytes."""
    return torch.exp2(scale.float() - E8M0_BIAS)


def mx_dequantize(codes: torch.Tensor, scale: torch.Tensor, element: Minifloat) -> torch.Tensor:
    """fp32 values of MX element ``codes [..., K]`` with E8M0 ``scale [..., K / block]``."""
    block = codes.shape[-1] // scale.shape[-1]
    values = blocks(element.decode(codes), block)
    return (values * e8m0_decode(scale).unsqueeze(-1)).reshape(codes.shape)


def mx_fake_quantize(x: torch.Tensor, element: Minifloat, block: int = MX_BLOCK) -> torch.Tensor:
    """Dynamic MX quantize-dequantize of activations, straight-through."""
    xb = blocks(x.float(), block)  # fp32 math: 2^-127 underflows in fp16
    scale = torch.exp2(mx_scale_exponents(xb, element).float()).unsqueeze(-1)
    q = xb / scale
    return (_ste(q, element.round(q)) * scale).reshape(x.shape).to(x.dtype)
