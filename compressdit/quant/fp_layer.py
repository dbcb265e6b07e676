"""Minifloat-weight linears (formats ``e2m1``, ``e3m0``, ``e1m2``): FP4DiT's 4-bit FP weights.

Checkpoint tensors: ``.weight`` ``uint8 [out, in/2]`` (two 4-bit element codes per byte, element ``2i`` in the low
nibble, as NVFP4 / MXFP4), ``.weight_scale`` ``float32 [out, groups]`` (one scale per output channel, or per
``group_size`` inputs), ``.bias`` in the model's dtype. Activations follow the spec's ``a_format`` (FP4DiT: dynamic
per-token E4M3 at 8 bits, E3M2 / E2M3 at 6). Execution is the dequantize reference on every device: decode the
weight, fake-quantize the input, matmul in the input's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from compressdit.errors import ConfigError
from compressdit.quant.activations import check_activation_fits
from compressdit.quant.fp_weights import FPQuantized, dequantize_weight_fp, quantize_weight_fp
from compressdit.quant.gptq import gptq_quantize_fp
from compressdit.quant.layers import PackedParameter, QuantizedLinear, QuantState
from compressdit.quant.minifloat import MINIFLOATS, pack_nibbles, unpack_nibbles
from compressdit.quant.spec import LinearQuantSpec, reject_unused_fields

FP_WEIGHT_FORMATS = ("e2m1", "e3m0", "e1m2")  # 4-bit elements, stored as packed nibbles
FP_ROUNDINGS = ("rtn", "gptq", "adaround")


class MinifloatLinear(QuantizedLinear):
    """``nn.Linear`` with 4-bit minifloat weights (``spec.format``) and fp32 per-channel / per-group scales.

    YAML (``recipes/fp4-w4a8.yaml``; the ``fp4dit`` method may switch a layer to another 4-bit format)::

        - {match: "re:.*", spec: {format: e2m1, w_bits: 4, group_size: 64, rounding: adaround,
                                  a_bits: 8, a_format: e4m3, a_granularity: per_token}}
    """

    quantized_tensors = ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LinearQuantSpec,
                 device=None, dtype=None) -> None:
        self._init_shape(in_features, out_features, spec)
        self.element = MINIFLOATS.get(spec.format)
        groups = in_features // spec.group_size if spec.group_size else 1
        self.weight = PackedParameter.empty((out_features, in_features // 2), torch.uint8, out_features, in_features,
                                            device)
        self.weight_scale = QuantState(torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self._init_bias(bias, device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LinearQuantSpec, input_absmax: torch.Tensor | None = None,
                    hessian: torch.Tensor | None = None) -> "MinifloatLinear":
        """Round-to-nearest-even codes, or GPTQ's error-compensated ones from ``hessian`` (``rounding: gptq``);
        ``rounding: adaround`` layers are built by block reconstruction instead and arrive through
        :meth:`from_quantized`."""
        element = MINIFLOATS.get(spec.format)
        if spec.rounding == "gptq":
            if hessian is None:
                raise ValueError("rounding 'gptq' needs the layer's input Hessian from calibration (run a calibrate "
                                 "stage before quantize)")
            q = gptq_quantize_fp(linear.weight.detach(), hessian.to(linear.weight.device), element,
                                 spec.group_size, spec.w_range, act_order=spec.act_order)
            return cls.from_quantized(linear, spec, q)
        if spec.rounding != "rtn":
            raise ValueError(f"rounding {spec.rounding!r} reconstructs whole blocks from calibration inputs; build "
                             "the layer with MinifloatLinear.from_quantized (run a calibrate stage before quantize)")
        q = quantize_weight_fp(linear.weight.detach(), element, spec.group_size, spec.w_range)
        return cls.from_quantized(linear, spec, q)

    @classmethod
    def from_quantized(cls, linear: nn.Linear, spec: LinearQuantSpec, q: FPQuantized) -> "MinifloatLinear":
        """A layer holding the codes and scales ``q`` of ``linear``'s weight (and its bias)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, spec,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        module.weight.data = pack_nibbles(q.codes).to(module.weight.device)
        module.weight_scale.data = q.scale.float().contiguous().to(module.weight.device)
        if module.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def codes(self) -> torch.Tensor:
        """Element codes ``uint8 [out, in]``."""
        return unpack_nibbles(self.weight.data)

    def fp32_decoding(self) -> tuple | None:
        """The stored nibbles, the element's 16 values, the group scales (``dequantize_weight_fp``: value * scale)."""
        codes = torch.arange(16, dtype=torch.uint8)
        return ("nibbles", self.weight.data, self.element.decode(codes).float().contiguous(),
                self.weight_scale.float().contiguous(), None)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded weight (no input transform: the same as :meth:`effective_weight`)."""
        return dequantize_weight_fp(self.codes(), self.weight_scale, self.element, dtype)

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantized_weight(dtype)


def validate_fp_weight_spec(spec: LinearQuantSpec, where: str) -> None:
    """4-bit elements, symmetric absmax (or MSE) scales per channel / group, dynamic activations."""
    if spec.vector_dim is not None or spec.codebook_size is not None or spec.row_scale:
        raise ConfigError(f"{where}: vector_dim / codebook_size / row_scale belong to format 'vq', not "
                          f"{spec.format!r}")
    element = MINIFLOATS.get(spec.format)
    if spec.w_bits != element.bits:
        raise ConfigError(f"{where}.w_bits: format {spec.format!r} stores {element.bits}-bit "
                          f"E{element.exponent_bits}M{element.mantissa_bits} weights; set w_bits: {element.bits} "
                          f"(got {spec.w_bits})")
    reject_unused_fields(spec, where, ("w_symmetric: false", "balance", "rotation", "low_rank",
                                       "a_granularity: static"), "takes symmetric weight scales and dynamic activations")


def fp_weight_fits(name: str, linear: nn.Linear, spec: LinearQuantSpec) -> None:
    if spec.group_size and linear.in_features % spec.group_size:
        raise ConfigError(f"{name}: in_features {linear.in_features} is not divisible by group_size "
                          f"{spec.group_size}; pick a divisor or null")
    if linear.in_features % 2:
        raise ConfigError(f"{name}: in_features {linear.in_features} is odd; 4-bit {spec.format} codes are packed "
                          "two per byte")
    check_activation_fits(name, linear, spec)
