"""GPU execution of quantized linears as ``torch.library`` ops, each with a fake impl and a reference.

Ops (``torch.ops.compressdit.*``, defined with :func:`compressdit.quant.op_library.define_op`: the reference
is the CPU implementation, the CUDA kernels the CUDA one):

- ``int8_linear_dyn(x, weight int8 [N, K], weight_scale fp32 [N], bias?, backend)``: W8A8, dynamic
  per-token int8 activations. ``backend="triton"``: one Triton pass quantizes ``x``, a Triton GEMM with the
  scales and bias in its epilogue writes ``x.dtype``; ``"cublas"``: ``torch._int_mm`` (cuBLASLt) + a
  PyTorch epilogue. Reference: fake-quantized ``x`` @ dequantized weight in fp32.
- ``fp8_linear(x, weight float8_e4m3fn [N, K], weight_scale fp32 [N, 1], bias?)``: dynamic per-token e4m3
  activations, ``torch._scaled_mm`` with row-wise scales (compute capability >= 8.9). Reference: the same
  e4m3 rounding, then an fp32 matmul.
- ``int4_linear(x, packed, scales_and_zeros bf16 [K/g, N, 2], group_size, bias?, nibbles?)``: int4 weight-only,
  tinygemm (``aten._weight_int4pack_mm``) in bf16; ``packed`` is the device's own layout from
  :func:`pack_int4` (CUDA: ``_convert_weight_to_int4pack``; CPU: its ``_for_cpu`` twin), weight =
  ``(q - 8) * scale + zero`` with ``q`` in [0, 15]. Given ``nibbles`` (``pack_nibbles``), calls of more than
  ``INT4_PACKED_MAX_ROWS[device]`` rows dequantize the weight into bf16 and run a dense GEMM (cuBLAS) instead.

Wiring contract (for the kernel registry of :class:`~compressdit.quant.layers.QuantLinear`)::

    kernel = gpu_kernel_for(spec, device, in_features, out_features)   # GpuKernel or None
    prepared = kernel.prepare(layer)     # once, after the layer is on ``device``: dict of tensors
    y = kernel(layer.transform_input(x), prepared, layer.bias)          # [..., K] -> [..., N], x.dtype

``None`` means no GPU kernel fits (not CUDA, spec or shape unsupported, GPU too old): use the reference.
Covered: ``int`` W8A8 (symmetric per-channel weights, ``a_granularity: per_token``, K and N multiples of 8),
``int`` W4A16 (groups of 32..256, or per channel; K a multiple of 32), ``fp8`` with ``a_bits: 8`` (K, N
multiples of 16, compute capability 8.9+). :func:`kernel_for_spec` is the same choice without the device
check (the ops then run their references: CPU tests of the wiring). Equal configurations return the same
``GpuKernel`` instance, so a compiled block's graph serves every layer.
``prepare`` reads the layer's saved tensors and returns views of them (int8, fp8) or a repacked copy (int4:
keep it as a non-persistent buffer, never in the checkpoint). ``kernel(...)`` is one op call, so
``torch.compile`` sees an opaque node with a fake impl. ``COMPRESSDIT_INT8_BACKEND=cublas|triton`` picks the
int8 backend (default ``triton`` where importable).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from compressdit.quant.gpu_reference import (FP8_MAX, dequantize_nibbles, fp8_linear_reference,
                                             int4_linear_reference, int4_uses_packed_gemm, int8_linear_reference,
                                             pack_int4, quantize_rows_reference,
                                             tinygemm_scales_and_zeros)
from compressdit.quant.op_library import define_op
from compressdit.quant.spec import LinearQuantSpec

INT8_BACKENDS = ("triton", "cublas")
TINYGEMM_GROUPS = (256, 128, 64, 32)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def default_int8_backend() -> str:
    name = os.environ.get("COMPRESSDIT_INT8_BACKEND") or ("triton" if triton_available() else "cublas")
    if name not in INT8_BACKENDS:
        raise ValueError(f"COMPRESSDIT_INT8_BACKEND={name!r}; choose one of {INT8_BACKENDS}")
    return name


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], in_features: int, out: int) -> None:
    if x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={in_features}")
    if bias is not None and tuple(bias.shape) != (out,):
        raise ValueError(f"bias must be [{out}] (one per output feature), got {tuple(bias.shape)}")


# ------------------------------------------------------------------------------------------------ int8 W8A8

def _int8_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                    backend: str) -> torch.Tensor:
    _check(x, weight, bias, weight.shape[1], weight.shape[0])
    return int8_linear_reference(x, weight, weight_scale, bias)


def _int8_cuda(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
               backend: str) -> torch.Tensor:
    _check(x, weight, bias, weight.shape[1], weight.shape[0])
    x2 = _rows(x)
    if backend == "triton":
        from compressdit.quant.gpu_triton import int8_gemm_fused, quantize_rows

        codes, a_scale = quantize_rows(x2, torch.int8)
        out = int8_gemm_fused(codes, a_scale, weight, weight_scale, bias, x.dtype)
    else:  # cuBLASLt torch._int_mm + a PyTorch epilogue: the decomposed form, run eagerly
        return int8_linear_decomposed(x, weight, weight_scale, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _int8_fake(x, weight, weight_scale, bias, backend):
    _check(x, weight, bias, weight.shape[1], weight.shape[0])
    return x.new_empty(*x.shape[:-1], weight.shape[0])


define_op("int8_linear_dyn(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, str backend) -> Tensor",
          {"CompositeExplicitAutograd": _int8_reference, "CUDA": _int8_cuda}, _int8_fake)


def _int8_gemm_reference(codes: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor,
                         weight_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    acc = codes.double() @ weight.double().t()  # exact: |sum| < 127 * 128 * K < 2 ** 53
    out = acc.float() * a_scale.float() * weight_scale.reshape(1, -1).float()
    return (out if bias is None else out + bias.float()).to(out_dtype)


def _int8_gemm_cuda(codes: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    if not triton_available():
        return _int_mm_epilogue(codes, a_scale, weight, weight_scale, bias, out_dtype)
    from compressdit.quant.gpu_triton import int8_gemm_fused

    return int8_gemm_fused(codes, a_scale, weight, weight_scale, bias, out_dtype)


def _int8_gemm_fake(codes, a_scale, weight, weight_scale, bias, out_dtype):
    return codes.new_empty(codes.shape[0], weight.shape[0], dtype=out_dtype)


define_op("int8_gemm_rows(Tensor codes, Tensor a_scale, Tensor weight, Tensor weight_scale, Tensor? bias, "
          "ScalarType out_dtype) -> Tensor", {"CompositeExplicitAutograd": _int8_gemm_reference, "CUDA": _int8_gemm_cuda}, _int8_gemm_fake)


def int8_linear_dyn(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                    backend: str | None = None) -> torch.Tensor:
    """``x @ W^T + b`` with int8 ``W`` ``[N, K]`` (per-row fp32 ``weight_scale [N]``) and per-token int8 ``x``.

    ``backend=None``: under ``torch.compile`` on CUDA, :func:`int8_linear_traced` (Inductor fuses the row
    quantization into the op producing ``x``); otherwise the op with :func:`default_int8_backend`. A named
    backend always runs the op.
    """
    if backend is None and compiling_for_cuda(x):
        return int8_linear_traced(x, weight, weight_scale, bias)
    args = (x, weight, weight_scale.reshape(-1), bias, backend or default_int8_backend())
    return _int8_cuda(*args) if _eager_cuda(x) else torch.ops.compressdit.int8_linear_dyn(*args)


# ------------------------------------------------------------------------------------------------ under torch.compile

def _eager_cuda(x: torch.Tensor) -> bool:
    """Eager on CUDA: the wrappers call the CUDA impl directly (what the dispatcher would run, minus its round
    trip into Python); traced code and other devices go through the op."""
    return x.device.type == "cuda" and not torch.compiler.is_compiling()


def compiling_for_cuda(x: torch.Tensor) -> bool:
    """Whether ``x`` is being traced by ``torch.compile`` for a CUDA device (then the decomposed forms run)."""
    return torch.compiler.is_compiling() and x.device.type == "cuda"


def int8_linear_traced(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    """What ``torch.compile`` traces for W8A8 on CUDA: the row quantization as plain ATen ops, then the
    GEMM with its scale and bias epilogue fused (``compressdit::int8_gemm_rows``, opaque).

    Traced, the per-token quantization fuses into the LayerNorm / modulation kernel that produces ``x`` and
    is computed once for layers sharing an input (``to_q`` / ``to_k`` / ``to_v``: AOTAutograd's CSE); the
    int32 accumulator never reaches memory. Same codes and int32 products as the op.
    """
    _check(x, weight, bias, weight.shape[1], weight.shape[0])
    codes, a_scale = quantize_rows_reference(_rows(x), torch.int8)
    out = torch.ops.compressdit.int8_gemm_rows(codes, a_scale, weight, weight_scale.reshape(-1), bias, x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _int_mm_epilogue(codes: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLASLt ``torch._int_mm`` (int32 out) then the scale and bias epilogue in PyTorch."""
    rows = codes.shape[0]
    if rows <= 16:  # torch._int_mm needs more than 16 rows
        codes = F.pad(codes, (0, 0, 0, 32 - rows))
    acc = torch._int_mm(codes, weight.t())[:rows]
    out = acc.float() * a_scale * weight_scale.reshape(1, -1).float()
    return (out if bias is None else out + bias.float()).to(out_dtype)


def int8_linear_decomposed(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The int8 op as plain ATen ops: row quantization, ``torch._int_mm``, epilogue (the ``cublas`` backend)."""
    _check(x, weight, bias, weight.shape[1], weight.shape[0])
    codes, a_scale = quantize_rows_reference(_rows(x), torch.int8)
    out = _int_mm_epilogue(codes, a_scale, weight, weight_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear_decomposed(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The fp8 op as plain ATen ops (row quantization to e4m3, ``torch._scaled_mm``) for Inductor: the
    quantization fuses into the kernel producing ``x``, the bias into what follows (as for int8)."""
    _check(x, weight, bias, weight.shape[1], weight.shape[0])
    codes, a_scale = quantize_rows_reference(_rows(x), torch.float8_e4m3fn)
    out = torch._scaled_mm(codes, weight.t(), scale_a=a_scale, scale_b=weight_scale.reshape(1, -1).float(),
                           out_dtype=torch.bfloat16, use_fast_accum=True)
    out = out if bias is None else out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


# ------------------------------------------------------------------------------------------------ fp8

_SCALED_MM_TAKES_BIAS = [True]  # emptied once if torch._scaled_mm refuses a bias with row-wise scales

def fp8_supported(device: torch.device) -> bool:
    """``torch._scaled_mm`` with e4m3 inputs needs compute capability 8.9 (Ada) or newer."""
    if device.type != "cuda":
        return False
    props = torch.cuda.get_device_properties(device)  # (constant-folded by torch.compile, unlike the capability)
    return (props.major, props.minor) >= (8, 9)


def _fp8_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    _check(x, weight, bias, weight.shape[1], weight.shape[0])
    return fp8_linear_reference(x, weight, weight_scale, bias)


def _fp8_cuda(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    _check(x, weight, bias, weight.shape[1], weight.shape[0])
    if not fp8_supported(x.device) or weight.shape[1] % 16 or weight.shape[0] % 16:
        return fp8_linear_reference(x, weight, weight_scale, bias)
    x2 = _rows(x)
    if triton_available():
        from compressdit.quant.gpu_triton import quantize_rows

        codes, a_scale = quantize_rows(x2, torch.float8_e4m3fn)
    else:
        codes, a_scale = quantize_rows_reference(x2, torch.float8_e4m3fn)
    scale_b = weight_scale.reshape(1, -1).float()
    fused_bias = None if bias is None or not _SCALED_MM_TAKES_BIAS else bias.to(torch.bfloat16)
    try:
        out = torch._scaled_mm(codes, weight.t(), scale_a=a_scale, scale_b=scale_b, bias=fused_bias,
                               out_dtype=torch.bfloat16, use_fast_accum=True)
    except RuntimeError:
        if fused_bias is None:
            raise
        _SCALED_MM_TAKES_BIAS.clear()  # this torch/GPU has no bias epilogue with row-wise scales
        out = torch._scaled_mm(codes, weight.t(), scale_a=a_scale, scale_b=scale_b, out_dtype=torch.bfloat16,
                               use_fast_accum=True)
    if bias is not None and fused_bias is None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _fp8_fake(x, weight, weight_scale, bias):
    _check(x, weight, bias, weight.shape[1], weight.shape[0])
    return x.new_empty(*x.shape[:-1], weight.shape[0])


define_op("fp8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor",
          {"CompositeExplicitAutograd": _fp8_reference, "CUDA": _fp8_cuda}, _fp8_fake)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ W^T + b`` with e4m3 ``W`` ``[N, K]`` (fp32 ``weight_scale [N, 1]``) and per-token e4m3 ``x``.

    Under ``torch.compile`` on a CUDA device of compute capability 8.9+ with K, N multiples of 16:
    :func:`fp8_linear_decomposed`; otherwise the op."""
    if (compiling_for_cuda(x) and weight.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0
            and fp8_supported(x.device)):
        return fp8_linear_decomposed(x, weight, weight_scale, bias)
    if _eager_cuda(x):
        return _fp8_cuda(x, weight, weight_scale, bias)
    return torch.ops.compressdit.fp8_linear(x, weight, weight_scale, bias)


# ------------------------------------------------------------------------------------------------ int4 tinygemm

def _int4_cpu(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
              bias: Optional[torch.Tensor], nibbles: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _int4_run(x, packed, scales_and_zeros, group_size, bias, nibbles,
                     torch.ops.aten._weight_int4pack_mm_for_cpu)


def _int4_cuda(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
               bias: Optional[torch.Tensor], nibbles: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _int4_run(x, packed, scales_and_zeros, group_size, bias, nibbles, torch.ops.aten._weight_int4pack_mm)


def _int4_run(x, packed, scales_and_zeros, group_size, bias, nibbles, packed_mm) -> torch.Tensor:
    """tinygemm up to ``INT4_PACKED_MAX_ROWS[device]`` rows (or without ``nibbles``), else dequantize + GEMM."""
    x2 = _rows(x).to(torch.bfloat16).contiguous()
    if nibbles is None or int4_uses_packed_gemm(x2.shape[0], x.device.type):
        out = packed_mm(x2, packed, group_size, scales_and_zeros)
    else:
        scale, zero = scales_and_zeros.unbind(-1)  # [K/g, N] each
        out = F.linear(x2, dequantize_nibbles(nibbles, scale.t(), zero.t(), group_size))
    out = out if bias is None else out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], scales_and_zeros.shape[1])


def _int4_fake(x, packed, scales_and_zeros, group_size, bias, nibbles=None):
    return x.new_empty(*x.shape[:-1], scales_and_zeros.shape[1])


define_op("int4_linear(Tensor x, Tensor packed, Tensor scales_and_zeros, int group_size, Tensor? bias, "
          "Tensor? nibbles=None) -> Tensor", {"CompositeExplicitAutograd": _int4_cpu, "CUDA": _int4_cuda}, _int4_fake)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                bias: Optional[torch.Tensor], nibbles: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + b`` with a tinygemm-packed int4 ``W`` (from :func:`pack_int4` on the same device).

    With ``nibbles`` (:func:`~compressdit.quant.gpu_reference.pack_nibbles` of the same codes), calls of more
    than ``INT4_PACKED_MAX_ROWS[device]`` rows dequantize ``W`` into bf16 and run a dense GEMM instead.
    """
    if _eager_cuda(x):
        return _int4_cuda(x, packed, scales_and_zeros, group_size, bias, nibbles)
    return torch.ops.compressdit.int4_linear(x, packed, scales_and_zeros, group_size, bias, nibbles)


# ------------------------------------------------------------------------------------------------ wiring

@dataclass(frozen=True)
class GpuKernel:
    """One GPU execution path for a quantized layer: ``prepare(layer)`` once, then ``kernel(x, prepared, bias)``."""

    name: str
    prepare: Callable[[torch.nn.Module], dict[str, torch.Tensor]]
    run: Callable[[torch.Tensor, dict[str, torch.Tensor], Optional[torch.Tensor]], torch.Tensor]

    def __call__(self, x: torch.Tensor, prepared: dict[str, torch.Tensor],
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
        return self.run(x, prepared, bias)


@functools.cache  # one instance per configuration: torch.compile reuses one graph for all layers
def _int8_kernel(backend: str | None) -> GpuKernel:
    """``backend=None``: decomposed under ``torch.compile`` (for Inductor's fusions), else the default backend."""
    def prepare(layer):
        return {"weight": layer.weight.data, "weight_scale": layer.weight_scale.reshape(-1).float()}

    return GpuKernel(f"int8-{backend or 'auto'}", prepare,
                     lambda x, p, bias: int8_linear_dyn(x, p["weight"], p["weight_scale"], bias, backend))


@functools.cache  # one instance per configuration: torch.compile reuses one graph for all layers
def _fp8_kernel() -> GpuKernel:
    def prepare(layer):
        return {"weight": layer.weight.data, "weight_scale": layer.weight_scale}

    return GpuKernel("fp8-scaled-mm", prepare, lambda x, p, bias: fp8_linear(x, p["weight"], p["weight_scale"], bias))


def int4_group_size(spec: LinearQuantSpec, in_features: int) -> int | None:
    """tinygemm's group size for ``spec``: its own, or (per channel) the largest group that divides K."""
    if spec.group_size is not None:
        return spec.group_size if spec.group_size in TINYGEMM_GROUPS else None
    return next((g for g in TINYGEMM_GROUPS if in_features % g == 0), None)


@functools.cache  # one instance per configuration: torch.compile reuses one graph for all layers
def _int4_kernel(group_size: int) -> GpuKernel:
    def prepare(layer):
        scale, zero = layer.weight_scale, layer.weight_zero
        codes = layer.codes()
        return {"packed": pack_int4(codes, layer.weight.device), "nibbles": layer.offset_nibbles(),
                "scales_and_zeros": tinygemm_scales_and_zeros(scale, zero, group_size, layer.in_features)}

    return GpuKernel("int4-tinygemm", prepare, lambda x, p, bias: int4_linear(x, p["packed"], p["scales_and_zeros"],
                                                                            group_size, bias, p["nibbles"]))


def kernel_for_spec(spec: LinearQuantSpec, in_features: int, out_features: int,
                    capability: tuple[int, int] = (9, 0), int8_backend: str | None = None) -> GpuKernel | None:
    """The kernel for ``spec`` and this shape on a GPU of ``capability``, whatever the current device (the ops
    run their references off CUDA: tests and benchmarks check the wiring on CPU with this)."""
    if spec.format == "fp8":
        fits = spec.a_bits == 8 and in_features % 16 == 0 and out_features % 16 == 0
        return _fp8_kernel() if fits and capability >= (8, 9) else None
    if spec.format != "int" or not spec.w_symmetric and spec.w_bits == 8:
        return None
    if (spec.w_bits, spec.a_bits) == (8, 8) and spec.group_size is None and spec.a_granularity == "per_token":
        return _int8_kernel(int8_backend) if in_features % 8 == 0 and out_features % 8 == 0 else None
    if spec.w_bits == 4 and spec.a_bits is None and capability >= (8, 0):
        group = int4_group_size(spec, in_features)
        return _int4_kernel(group) if group and in_features % 32 == 0 and out_features % 16 == 0 else None
    return None


def gpu_kernel_for(spec: LinearQuantSpec, device: torch.device | str, in_features: int,
                   out_features: int) -> GpuKernel | None:
    """The GPU kernel for a layer with ``spec`` on ``device``, or ``None`` (then the reference path runs)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return kernel_for_spec(spec, in_features, out_features, torch.cuda.get_device_capability(device))


__all__ = ["FP8_MAX", "GpuKernel", "fp8_linear", "fp8_linear_reference", "gpu_kernel_for", "int4_linear",
           "int4_linear_reference", "int8_linear_dyn", "kernel_for_spec", "int8_linear_reference", "pack_int4"]
