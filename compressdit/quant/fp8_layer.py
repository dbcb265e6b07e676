"""FP8 linear (format ``fp8``): E4M3 weights per output channel with fp32 scales, dynamic per-token E4M3 activations.

Checkpoint tensors: ``.weight`` ``float8_e4m3fn [out, in]``, ``.weight_scale`` ``float32 [out, 1]`` (the
compressed-tensors / ModelOpt channel-wise layout), ``.bias`` in the model's dtype. The forward pass is the
``compressdit::fp8_linear`` op: ``torch._scaled_mm`` with row-wise scales on CUDA devices of compute
capability >= 8.9, the PyTorch reference (same E4M3 rounding, fp32 matmul) everywhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compressdit.errors import ConfigError
from compressdit.quant.gpu_ops import fp8_linear
from compressdit.quant.gpu_reference import fp8_linear_reference, quantize_fp8_weight
from compressdit.quant.kernel_registry import needs_autograd, run_kernel
from compressdit.quant.layers import PackedParameter, QuantizedLinear, QuantState
from compressdit.quant.spec import LinearQuantSpec, reject_unused_fields

FP8_DTYPE = torch.float8_e4m3fn


class FP8Linear(QuantizedLinear):
    """``nn.Linear`` with an E4M3 weight; ``a_bits: 8`` quantizes activations to E4M3 per token, ``null`` keeps
    them in the model's dtype (weight-only: dequantize, then matmul).

    YAML (``recipes/fp8.yaml``)::

        - {match: "re:.*", spec: {format: fp8, w_bits: 8, a_bits: 8}}
    """

    quantized_tensors = ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LinearQuantSpec,
                 device=None, dtype=None) -> None:
        self._init_shape(in_features, out_features, spec)
        self.weight = PackedParameter.empty((out_features, in_features), FP8_DTYPE, out_features, in_features, device)
        self.weight_scale = QuantState(torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self._init_bias(bias, device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LinearQuantSpec,
                    input_absmax: torch.Tensor | None = None) -> "FP8Linear":
        """Scale each output row so its absmax lands on 448, then round to E4M3 (round to nearest even)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, spec,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        codes, scale = quantize_fp8_weight(linear.weight.detach())
        module.weight.data = codes
        module.weight_scale.copy_(scale)
        if module.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(dtype)

    def fp32_decoding(self) -> tuple | None:
        """The E4M3 codes as bytes, the value of each of the 256, the channel scales. A weight that ``module.to(dtype)``
        widened (E4M3 values, exact in any wider float) is encoded back, exactly."""
        values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        codes = self.weight.data
        codes = codes if codes.dtype == torch.float8_e4m3fn else codes.to(torch.float8_e4m3fn)
        return ("bytes", codes.view(torch.uint8), values, self.weight_scale.float().reshape(-1).contiguous())

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = run_kernel(self, x)  # cuda-fp8 on GPUs of compute capability 8.9+
        if out is not None:
            return out
        if needs_autograd(self, x):  # the op has no backward: its PyTorch twin has
            return self.reference_forward(x)
        return self.reference_linear(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ground truth every kernel is tested against (PyTorch E4M3 rounding, fp32 matmul, any device)."""
        if self.spec.a_bits == 8:
            return fp8_linear_reference(x, self.weight, self.weight_scale, self.bias)
        return self.reference_linear(x)

    def reference_linear(self, x: torch.Tensor) -> torch.Tensor:
        """E4M3 per-token activations (the op's reference off CUDA) or, weight-only, dequantize then matmul."""
        if self.spec.a_bits == 8:
            return fp8_linear(x, self.weight, self.weight_scale, self.bias)
        return F.linear(x, self.effective_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def validate_fp8_spec(spec: LinearQuantSpec, where: str) -> None:
    """Only what the layer implements: E4M3 per output channel, activations E4M3 per token or unquantized."""
    if spec.vector_dim is not None or spec.codebook_size is not None or spec.row_scale:
        raise ConfigError(f"{where}: vector_dim / codebook_size / row_scale belong to format 'vq', not 'fp8'")
    if spec.w_bits != 8:
        raise ConfigError(f"{where}.w_bits: format 'fp8' stores 8-bit E4M3 weights; set w_bits: 8 "
                          f"(got {spec.w_bits}) or use format 'int'")
    if spec.a_bits not in (None, 8):
        raise ConfigError(f"{where}.a_bits: format 'fp8' quantizes activations to E4M3 (a_bits: 8) or not at all "
                          f"(null), got {spec.a_bits}")
    reject_unused_fields(spec, where, ("group_size", "w_symmetric: false", "w_range: mse", "balance", "rotation",
                                       "low_rank", "a_granularity other than per_token"),
                         "has one scale per output channel and per token", " (or use format 'int')")


def fp8_fits(name: str, linear: nn.Linear, spec: LinearQuantSpec) -> None:
    """Every width fits: widths that are not multiples of 16 run the reference path instead of ``_scaled_mm``."""
    if linear.in_features < 1 or linear.out_features < 1:
        raise ConfigError(f"{name}: an empty linear ({linear.in_features} -> {linear.out_features}) has nothing "
                          "to quantize")
