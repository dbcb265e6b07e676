"""CPU kernels of quantized linears (see :mod:`compressdit.quant.kernel_registry`).

- ``cpu-w8a8-onednn``: W8A8 (int8 per-channel symmetric weights, dynamic symmetric int8 activations per
  token or per tensor) as a real u8 x s8 -> s32 oneDNN GEMM. The activation codes are exactly the
  reference's (``round(x / s)``, ``s = absmax / 127`` per token), shifted by 128 into uint8 with zero point
  128 and a unit scale; the per-token and per-channel scales and the bias are applied to the fp32 output.
  So the spec's semantics are kept (not fbgemm's per-tensor asymmetric activations) and outputs equal the
  reference up to fp32 summation order.
- ``cpu-int4-weight``: weight-only (or fake-quantized activations) int codes of 2-4 bits, groups of
  32/64/128/256 or per channel, via ``_weight_int4pack_mm_for_cpu``: activations are rounded to bf16
  (its fast path) and so are the group scales and the product; the bias is added in fp32. Up to
  ``INT4_PACKED_MAX_ROWS["cpu"]`` rows per call; above, the weight is dequantized per call into bf16 (from
  a nibble copy of the codes, 0.5 byte per weight) for a dense bf16 GEMM, which beats the packed GEMM there
  (1.5-2.2x fp32 against 0.6-1.05x at M = 256..1024 on DiT-XL/2 shapes, one thread, AVX512-BF16 EPYC).
- ``cpu-int8-weight``: weight-only int codes of 5-8 bits per channel (symmetric) via
  ``_weight_int8pack_mm`` on bf16 activations (per-channel scales applied in fp32 afterwards); above
  ``INT8_MAX_ROWS`` rows the dequantize reference (cheap for int8 codes) + fp32 GEMM is faster. bf16 rounding
  is about half the W8 quantization error here (measured in the tests), not negligible.
- ``cpu-vq-dense``: VQ weights decoded once at prepack into a dense fp32 weight (costs 4 bytes per
  weight of RAM at run time; the checkpoint stays VQ), then a plain float matmul.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from compressdit.quant.gpu_reference import (INT4_PACKED_MAX_ROWS, dequantize_nibbles, int4_uses_packed_gemm,
                                             pack_nibbles)
from compressdit.quant.kernel_registry import KERNELS, Kernel
from compressdit.quant.activations import quantize_input

INT4_GROUPS = (32, 64, 128, 256)
INT8_MAX_ROWS = 64   # above: dequantize + fp32 GEMM beats _weight_int8pack_mm (bench/layer_kernels.py)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


# Low-level ``torch.library`` registration: ~2 us per call through the dispatcher, against ~17 us for the
# ``torch.library.custom_op`` wrapper (which matters at one token: the whole W8A8 GEMV takes ~0.1 ms).
_LIB = torch.library.Library("compressdit", "FRAGMENT")


def _define(schema: str):
    """Register the decorated function as the CPU impl of ``compressdit::<schema>``; returns the op."""
    name = schema.split("(", 1)[0]

    def decorate(impl):
        _LIB.define(schema)
        for key in ("CPU", "MkldnnCPU"):  # MkldnnCPU: oneDNN's prepacked weight is an mkldnn tensor
            _LIB.impl(name, impl, key)
        return getattr(torch.ops.compressdit, name)

    return decorate


# --- W8A8: oneDNN u8s8 GEMM with the reference's symmetric activation codes ------------------------------

@_define("w8a8_linear_cpu(Tensor x, Tensor packed, Tensor w_scale, Tensor w_zero, Tensor? bias, bool per_token, "
         "int out_features) -> Tensor")
def w8a8_linear_cpu(x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                    bias: Optional[torch.Tensor], per_token: bool, out_features: int) -> torch.Tensor:
    """``x @ W^T + b`` with dynamic symmetric int8 activations (per token or tensor) and int8 weights."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    magnitude = x2.abs()  # abs().amax(): linalg.vector_norm(inf) is ~10x slower on CPU
    a_scale = (magnitude.amax(-1, keepdim=True) if per_token else magnitude.amax().reshape(1, 1))
    a_scale = a_scale.clamp_min(1e-8) / 127
    # |x / s| <= 127; int8 then +128 with uint8 wrap-around = the uint8 code (float -> uint8 casts are 3x slower)
    codes = torch.round(x2 / a_scale).to(torch.int8).view(torch.uint8).add_(128)
    acc = torch.ops.onednn.qlinear_pointwise(codes, 1.0, 128, packed, w_scale, w_zero, None, 1.0, 0,
                                             torch.float32, "none", [], "")
    out = acc * a_scale if bias is None else torch.addcmul(bias, acc, a_scale)
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


@torch.library.register_fake("compressdit::w8a8_linear_cpu")
def _(x, packed, w_scale, w_zero, bias, per_token, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def _w8a8_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    return (device.type == "cpu" and spec.format == "int" and spec.w_bits == 8 and spec.a_bits == 8
            and spec.group_size is None and spec.w_symmetric and spec.a_granularity in ("per_token", "per_tensor")
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack"))


def _w8a8_prepack(layer) -> dict:
    return {"packed": torch.ops.onednn.qlinear_prepack(layer.weight.data.contiguous(), None),
            "w_scale": layer.weight_scale.reshape(-1).float().contiguous(),
            "w_zero": torch.zeros(layer.out_features, dtype=torch.long),
            "bias": None if layer.bias is None else layer.bias.detach().float().contiguous()}


def _w8a8_run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    return w8a8_linear_cpu(x, b["packed"], b["w_scale"], b["w_zero"], b["bias"],
                           layer.spec.a_granularity == "per_token", layer.out_features)


# --- weight-only int4 (tinygemm layout for CPU) -------------------------------------------------------------

@_define("int4_weight_linear_cpu(Tensor x, Tensor packed, Tensor scales_zeros, Tensor nibbles, Tensor scale, "
         "Tensor? zero, int group_size, Tensor? bias, int out_features) -> Tensor")
def int4_weight_linear_cpu(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, nibbles: torch.Tensor,
                           scale: torch.Tensor, zero: Optional[torch.Tensor], group_size: int,
                           bias: Optional[torch.Tensor], out_features: int) -> torch.Tensor:
    """``x @ W^T + b`` with W = (q - 8) * scale + zero per group, activations in bf16.

    Up to ``INT4_PACKED_MAX_ROWS["cpu"]`` rows: the packed int4 GEMM; above: W dequantized into bf16 for this
    call (``nibbles``: codes + 8 two per byte, ``scale``/``zero``: bf16 ``[out, in / group]``), a dense GEMM.
    """
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if int4_uses_packed_gemm(x2.shape[0], "cpu"):
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_zeros).float()
    else:
        out = F.linear(x2, dequantize_nibbles(nibbles, scale, zero, group_size)).float()
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


@torch.library.register_fake("compressdit::int4_weight_linear_cpu")
def _(x, packed, scales_zeros, nibbles, scale, zero, group_size, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def _int4_group(spec, in_features: int) -> int | None:
    if spec.group_size is not None:
        return spec.group_size if spec.group_size in INT4_GROUPS else None
    return next((g for g in reversed(INT4_GROUPS[:3]) if in_features % g == 0), None)


def _int4_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    out_features, in_features = shape
    group = _int4_group(spec, in_features)
    return (device.type == "cpu" and spec.format == "int" and spec.w_bits <= 4 and group is not None
            and in_features % group == 0 and out_features % 16 == 0)


def _int4_prepack(layer) -> dict:
    group = _int4_group(layer.spec, layer.in_features)
    codes = layer.codes().to(torch.int32) + 8                      # [-8, 7] -> [0, 15]
    scale = layer.weight_scale.float()
    zero = torch.zeros_like(scale) if layer.weight_zero is None else -layer.weight_zero.float() * scale
    repeat = layer.in_features // group // scale.shape[1]        # per-channel: one scale for every group
    scale, zero = (t.repeat_interleave(repeat, dim=1) if repeat != 1 else t for t in (scale, zero))
    return {"packed": torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1),
            "scales_zeros": torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous(),
            "nibbles": pack_nibbles(layer.codes()),
            "scale": scale.to(torch.bfloat16).contiguous(),
            "zero": None if layer.weight_zero is None else zero.to(torch.bfloat16).contiguous(),
            "group": group, "bias": None if layer.bias is None else layer.bias.detach().float()}


def _fake_quantize_input(layer, x: torch.Tensor) -> torch.Tensor:
    return quantize_input(x, layer.spec, layer.input_scale)


def _int4_run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    return int4_weight_linear_cpu(_fake_quantize_input(layer, x), b["packed"], b["scales_zeros"], b["nibbles"],
                                  b["scale"], b["zero"], b["group"], b["bias"], layer.out_features)


# --- weight-only int8 per channel ------------------------------------------------------------------------

@_define("int8_weight_linear_cpu(Tensor x, Tensor codes, Tensor ones, Tensor w_scale, Tensor? bias) -> Tensor")
def int8_weight_linear_cpu(x: torch.Tensor, codes: torch.Tensor, ones: torch.Tensor, w_scale: torch.Tensor,
                           bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ W^T + b`` with W = codes * scale per output channel, bf16 activations, scales applied in fp32."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    out = torch._weight_int8pack_mm(x2, codes, ones).float() * w_scale
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).reshape(*x.shape[:-1], codes.shape[0])


@torch.library.register_fake("compressdit::int8_weight_linear_cpu")
def _(x, codes, ones, w_scale, bias):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


def _int8_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    return (device.type == "cpu" and spec.format == "int" and spec.w_bits > 4 and spec.group_size is None
            and spec.w_symmetric)


def _int8_prepack(layer) -> dict:
    return {"codes": layer.codes().contiguous(), "ones": torch.ones(layer.out_features, dtype=torch.bfloat16),
            "w_scale": layer.weight_scale.reshape(-1).float(),
            "bias": None if layer.bias is None else layer.bias.detach().float()}


def _int8_run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    if _rows(x) > INT8_MAX_ROWS:
        return layer.reference_linear(x)
    return int8_weight_linear_cpu(_fake_quantize_input(layer, x), b["codes"], b["ones"], b["w_scale"], b["bias"])


# --- VQ: decode once -------------------------------------------------------------------------------------

def _vq_prepack(layer) -> dict:
    return {"weight": layer.effective_weight(torch.float32),
            "bias": None if layer.bias is None else layer.bias.detach().float()}


def _vq_run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    bias = None if b["bias"] is None else b["bias"].to(x.dtype)
    return F.linear(x, b["weight"].to(x.dtype), bias)


KERNELS.add("cpu-w8a8-onednn", Kernel(
    _w8a8_applies, _w8a8_prepack, _w8a8_run, priority=20,
    description="oneDNN u8s8 int8 GEMM, the spec's dynamic symmetric activation codes, scales in fp32"))
KERNELS.add("cpu-int4-weight", Kernel(
    _int4_applies, _int4_prepack, _int4_run, priority=10,
    description=f"_weight_int4pack_mm_for_cpu (bf16 activations, bf16 group scales) up to "
                f"{INT4_PACKED_MAX_ROWS['cpu']} rows, else dequantize to bf16 + bf16 GEMM"))
KERNELS.add("cpu-int8-weight", Kernel(
    _int8_applies, _int8_prepack, _int8_run, priority=10,
    description=f"_weight_int8pack_mm (bf16 activations) up to {INT8_MAX_ROWS} rows, else dequantize"))
KERNELS.add("cpu-vq-dense", Kernel(
    lambda spec, device, shape: device.type == "cpu" and spec.format == "vq", _vq_prepack, _vq_run, priority=10,
    description="VQ weight decoded once at load into a dense fp32 weight (4 bytes per weight of RAM)"))
