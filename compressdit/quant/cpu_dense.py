"""CPU kernels of *small* quantized linears: the weight decoded once at prepack, a dense GEMM per call.

On layers of up to ``DENSE_MAX_WEIGHT`` weights (the zoo models' 128..640-wide linears) the per-call decode
of the packed codes (``cpu-int4-weight`` above ``INT4_PACKED_MAX_ROWS`` rows) and the packed int4 GEMM cost
more than the GEMM itself, so these layers keep a decoded copy of their weight at run time and say so in
their kernel name:

- ``cpu-int-dense-bf16``: the small layers ``cpu-int4-weight`` applies to (2-4 bits) decoded once into
  bf16 (2 bytes per weight of RAM at run time, at most ``2 * DENSE_MAX_WEIGHT`` bytes per layer; the
  checkpoint stays packed), activations rounded to bf16 (as ``cpu-int4-weight`` does), a bf16 GEMM (1.2-1.8x
  an fp32 one at 256 rows on AVX512-BF16 CPUs), the bias added in fp32. Dynamic quantized activations (W4A8
  with groups) enter the GEMM as their integer codes (exact in bf16), the product is scaled per row after;
  static scales fake-quantize first. Either way the codes are the reference's.
- ``cpu-fp8-dense``: FP8 (E4M3) weights decoded once into fp32 (4 bytes per weight at run time), the
  reference's per-token E4M3 activations, an fp32 GEMM: the reference's numbers without its per-call decode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressdit.quant.kernel_registry import KERNELS, Kernel
from compressdit.quant.activations import quantize_input
from compressdit.quant.cpu_native import bf16_to_float, fake_quantize_e4m3_rows, float_to_bf16
from compressdit.quant.primitives import int_range

DENSE_MAX_WEIGHT = 1 << 18  # in_features * out_features: 512 KiB of bf16 per layer at most


def fake_quantize_input(x: torch.Tensor, bits: int | None, granularity: str,
                        static_scale: torch.Tensor | None) -> torch.Tensor:
    """:func:`~compressdit.quant.primitives.fake_quantize_activation`'s values without its gradient path.

    Fewer passes (in place, no straight-through term, whose forward value is the rounded code exactly);
    for inference kernels only.
    """
    if bits is None:
        return x
    qmin, qmax = int_range(bits)
    if static_scale is not None:
        scale = static_scale.to(x.dtype)
        return (x / scale).clamp_(qmin, qmax).round_().mul_(scale)
    magnitude = x.abs()
    scale = magnitude.amax(-1, keepdim=True) if granularity == "per_token" else magnitude.amax()
    scale = scale.clamp_min_(1e-8).div_(qmax)
    return (x / scale).round_().mul_(scale)  # |x / scale| <= qmax: no clamp needed


def _fast_int_path(spec) -> bool:
    """Integer activations per token / per tensor / static: :func:`fake_quantize_input`'s few passes apply."""
    return spec.a_format == "int" and spec.a_granularity in ("per_token", "per_tensor", "static")


def quantize_layer_input(layer, x: torch.Tensor) -> torch.Tensor:
    """``x`` fake-quantized as ``layer.spec`` says: the fast integer path where it applies, else the activation
    format's own quantizer (per-group, minifloat, NVFP4 / MX blocks)."""
    spec = layer.spec
    if spec.a_bits is None or _fast_int_path(spec):
        return fake_quantize_input(x, spec.a_bits, spec.a_granularity, layer.input_scale)
    return quantize_input(x, spec, layer.input_scale)


def _small(shape: tuple[int, int]) -> bool:
    return shape[0] * shape[1] <= DENSE_MAX_WEIGHT


def _dense_bf16_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    """The small layers of ``cpu-int4-weight``'s specs (same bf16 numerics; other specs keep the reference)."""
    return _small(shape) and KERNELS.get("cpu-int4-weight").applies(spec, device, shape)


def _dense_bf16_prepack(layer) -> dict:
    return {"weight": layer.dequantized_weight(torch.float32).to(torch.bfloat16).contiguous(),
            "bias": None if layer.bias is None else layer.bias.detach().float()}


def _dense_bf16_run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    spec = layer.spec
    x2 = x.reshape(-1, x.shape[-1])
    if spec.a_bits is not None and layer.input_scale is None and _fast_int_path(spec):
        # dynamic integer codes (exact in bf16) times W, then each row by its scale: fewer passes than x * s
        magnitude = x2.abs()
        scale = magnitude.amax(-1, keepdim=True) if spec.a_granularity == "per_token" else magnitude.amax()
        scale = scale.clamp_min_(1e-8).div_(int_range(spec.a_bits)[1])
        out = F.linear((x2 / scale).round_().to(torch.bfloat16), b["weight"]).float()
        out = out.mul_(scale) if b["bias"] is None else torch.addcmul(b["bias"], out, scale)
    else:  # the casts around the bf16 GEMM in one single-threaded C pass each
        x2 = quantize_layer_input(layer, x2)
        x2 = x2 if x2.dtype is torch.float32 and x2.is_contiguous() else x2.float().contiguous()
        out = bf16_to_float(F.linear(float_to_bf16(x2), b["weight"]), b["bias"])
    return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def _fp8_dense_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    return device.type == "cpu" and spec.format == "fp8"


def _fp8_dense_prepack(layer) -> dict:
    return {"weight": layer.effective_weight(torch.float32).contiguous(),
            "bias": None if layer.bias is None else layer.bias.detach().float()}


def _fp8_dense_run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.dtype is torch.float32 and x2.is_contiguous() else x2.float().contiguous()
    if layer.spec.a_bits == 8:  # quantize_rows_reference's scale, clamp and E4M3 rounding, one fused pass
        x2 = fake_quantize_e4m3_rows(x2)
    return F.linear(x2, b["weight"], b["bias"]).to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


KERNELS.add("cpu-int-dense-bf16", Kernel(
    _dense_bf16_applies, _dense_bf16_prepack, _dense_bf16_run, priority=15,
    description=f"layers of up to {DENSE_MAX_WEIGHT} weights: int codes decoded once into a dense bf16 weight "
                "(2 bytes per weight of RAM), bf16 activations, bf16 GEMM, fp32 bias"))
KERNELS.add("cpu-fp8-dense", Kernel(
    _fp8_dense_applies, _fp8_dense_prepack, _fp8_dense_run, priority=10,
    description="E4M3 weight decoded once into a dense fp32 weight (4 bytes per weight of RAM), per-token E4M3 "
                "activations as the reference, fp32 GEMM"))
