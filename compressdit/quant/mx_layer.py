"""Block-scaled FP linears: NVFP4, MXFP4 and MXFP8 weights (formats ``nvfp4``, ``mxfp4``, ``mxfp8``).

Checkpoint tensors, in the layout ModelOpt's unified Hugging Face export writes (``[out, in]`` row-major, scales
not swizzled):

============  ====================================  ====================================  =======================
format        ``.weight``                           ``.weight_scale``                     ``.weight_scale_2``
============  ====================================  ====================================  =======================
``nvfp4``     ``uint8 [out, in/2]`` E2M1 nibbles    ``float8_e4m3fn [out, in/16]``        ``float32 []`` (tensor)
``mxfp4``     ``uint8 [out, in/2]`` E2M1 nibbles    ``uint8 [out, in/32]`` E8M0 exponents  --
``mxfp8``     ``float8_e4m3fn [out, in]``           ``uint8 [out, in/32]`` E8M0 exponents  --
============  ====================================  ====================================  =======================

Nibbles: element ``2i`` in the low four bits, ``2i + 1`` in the high four (ModelOpt's order). SVDQuant's recipe on
these formats adds ``.smooth_scale`` (``float32 [in]``, channel balancing folded into the weight) and the 16-bit
low-rank branch ``.low_rank_down [r, in]`` / ``.low_rank_up [out, r]`` (only the residual is block-quantized), as the
``int`` format stores them; ModelOpt's export has no such tensors. Activations are
quantized dynamically (``a_format: nvfp4`` computes its tensor scale from each input), so no ``.input_scale``
(ModelOpt's static, calibrated activation amax) is stored. Execution on CPU and GPU is the dequantize reference:
decode the weight, fake-quantize the input, matmul in the input's dtype (no FP4 tensor-core kernel here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compressdit.quant.activations import Grid, element_grid, quantize_input
from compressdit.quant.cpu_native import fake_quantize_grid
from compressdit.quant.kernel_registry import kernel_cache, run_cached, runs_low_rank
from compressdit.quant.layers import PackedParameter, QuantizedLinear, QuantState
from compressdit.quant.minifloat import Minifloat, pack_nibbles, unpack_nibbles
from compressdit.quant.mx_primitives import (E2M1, E4M3, MX_BLOCK, NVFP4_BLOCK, e8m0_decode, mx_dequantize,
                                             mx_quantize, nvfp4_block_values, nvfp4_dequantize, nvfp4_quantize)
from compressdit.quant.primitives import all_finite
from compressdit.quant.spec import LinearQuantSpec
from compressdit.registry import Registry


@dataclass(frozen=True)
class BlockCodec:
    """A block-scaled weight format: element codes + one scale per ``block`` inputs (+ an fp32 tensor scale)."""

    element: Minifloat
    block: int
    scale_dtype: torch.dtype
    tensor_scale: bool
    quantize: Callable[[torch.Tensor], tuple]  # weight -> (codes uint8, block scales, tensor scale or None)
    dequantize: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    #: (block scales, tensor scale or None) -> fp32 ``[..., K / block]``: what ``dequantize`` multiplies each block's
    #: element values by, bit for bit
    block_values: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    #: the dynamic fake quantization the weight's round trip is, bit for bit (NVFP4's: its activation grid), or None
    grid: Grid | None = None

    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        """``dequantize(*quantize(weight))`` (fp32): where the format's round trip is a :class:`Grid`'s, one C pass
        (``fake_quantize_grid``, the same numbers; SVDQuant's branch refinement takes it ~17 times a layer: on a
        1152 -> 4608 NVFP4 weight the PyTorch codec took 3.2 of the split's 4.4 s on one thread)."""
        w = weight.detach().float().contiguous()
        if self.grid is not None and all_finite(w):  # non-finite: the codec's own error
            fast = fake_quantize_grid(w, self.block, self.grid.rule, self.grid.top, self.grid.mantissa,
                                      self.grid.min_exp)
            if fast is not None:
                return fast
        return self.dequantize(*self.quantize(weight))

    @property
    def w_bits(self) -> int:
        return self.element.bits

    @property
    def packed(self) -> bool:
        return self.element.bits == 4


BLOCK_CODECS: Registry[BlockCodec] = Registry("block-scaled weight format")
BLOCK_CODECS.add("nvfp4", BlockCodec(E2M1, NVFP4_BLOCK, torch.float8_e4m3fn, True, nvfp4_quantize,
                                     nvfp4_dequantize, nvfp4_block_values, element_grid(E2M1, rule=2)))
BLOCK_CODECS.add("mxfp4", BlockCodec(E2M1, MX_BLOCK, torch.uint8, False, lambda w: (*mx_quantize(w, E2M1), None),
                                     lambda codes, scale, _: mx_dequantize(codes, scale, E2M1),
                                     lambda scale, _: e8m0_decode(scale)))
BLOCK_CODECS.add("mxfp8", BlockCodec(E4M3, MX_BLOCK, torch.uint8, False, lambda w: (*mx_quantize(w, E4M3), None),
                                     lambda codes, scale, _: mx_dequantize(codes, scale, E4M3),
                                     lambda scale, _: e8m0_decode(scale)))


class BlockFPLinear(QuantizedLinear):
    """``nn.Linear`` with NVFP4 / MXFP4 / MXFP8 weights (``spec.format``); activations as the spec's ``a_format``.

    YAML (``recipes/nvfp4.yaml``)::

        - {match: "re:.*", spec: {format: nvfp4, w_bits: 4, group_size: 16,
                                  a_bits: 4, a_format: nvfp4, a_granularity: per_group}}

    With SVDQuant's smoothing and low-rank branch (``recipes/svdquant-nvfp4.yaml``): add ``balance: 0.5,
    low_rank: 16`` (calibration statistics needed).
    """

    quantized_tensors = ("weight", "weight_scale", "smooth_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LinearQuantSpec,
                 device=None, dtype=None) -> None:
        self._init_shape(in_features, out_features, spec)
        self.codec = BLOCK_CODECS.get(spec.format)
        shape, storage = ((out_features, in_features // 2), torch.uint8) if self.codec.packed else \
            ((out_features, in_features), torch.float8_e4m3fn)
        self.weight = PackedParameter.empty(shape, storage, out_features, in_features, device)
        self.weight_scale = QuantState(torch.ones(out_features, in_features // self.codec.block, device=device)
                                       .to(self.codec.scale_dtype))
        if self.codec.tensor_scale:
            self.weight_scale_2 = QuantState(torch.ones((), dtype=torch.float32, device=device))
            self.quantized_tensors = ("weight", "weight_scale", "weight_scale_2", "smooth_scale")
        else:
            self.weight_scale_2 = None
        self._optional_state("smooth_scale", spec.balance is not None, torch.ones(in_features), device)
        self._init_bias(bias, device, dtype)
        self._init_low_rank(device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LinearQuantSpec,
                    input_absmax: torch.Tensor | None = None) -> "BlockFPLinear":
        """Round the weight to the format (scales from each block's absmax, elements to nearest even); with
        ``balance``, the calibrated ``input_absmax`` balancing folded in first; with ``low_rank``, only the residual
        of the 16-bit branch is rounded."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, spec,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        weight = linear.weight.detach().float()
        weight, _ = module.fold_balancing(weight, input_absmax)
        weight = module.split_low_rank(weight, module.codec.round_trip)
        module.load_codes(*module.codec.quantize(weight))
        if module.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def load_codes(self, codes: torch.Tensor, scale: torch.Tensor, tensor_scale: torch.Tensor | None) -> None:
        """Element codes ``uint8 [out, in]``, block scales (the format's scale dtype), tensor scale (NVFP4)."""
        data = pack_nibbles(codes) if self.codec.packed else codes.view(torch.float8_e4m3fn)
        self.weight.data = data.to(self.weight.device)
        self.weight_scale.data = scale.to(self.codec.scale_dtype).to(self.weight.device)
        if self.weight_scale_2 is not None:
            self.weight_scale_2.copy_(tensor_scale.reshape(()))

    def codes(self) -> torch.Tensor:
        """Element codes ``uint8 [out, in]``."""
        return unpack_nibbles(self.weight.data) if self.codec.packed else self.weight.data.view(torch.uint8)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded block-quantized weight (the residual, in the balanced input space, where those apply)."""
        return self.codec.dequantize(self.codes(), self.weight_scale, self.weight_scale_2).to(dtype)

    def fp32_decoding(self) -> tuple | None:
        """4-bit elements: the stored nibbles, the element's 16 values, and each block's fp32 scale as the codec's
        decoder computes it (block and tensor scales together: its value of a code worth exactly 1)."""
        if not self.codec.packed:
            return None
        scale = self.codec.block_values(self.weight_scale, self.weight_scale_2)
        return ("nibbles", self.weight.data,
                self.codec.element.decode(torch.arange(16, dtype=torch.uint8)).float().contiguous(),
                scale.float().contiguous(), None)

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        weight = self.with_low_rank(self.dequantized_weight(torch.float32))
        if self.smooth_scale is not None:
            weight = weight / self.smooth_scale
        return weight.to(dtype)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The folded balancing applied to activations (identity without it)."""
        return x if self.smooth_scale is None else x / self.smooth_scale.to(x.dtype)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The registered kernel on the balanced input (``cpu-decoded-dense`` on CPU), plus the low-rank branch (in
        the kernel where it runs it: balancing, GEMM and branch in one op); the reference where none applies."""
        cache = kernel_cache(self, x)
        if cache is None:
            return self.reference_forward(x)
        if runs_low_rank(cache):
            return run_cached(self, cache, x, untransformed=True)
        x = self.transform_input(x)
        return self._add_low_rank(run_cached(self, cache, x), x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Balance the input, fake-quantize it, decoded residual weight, matmul; plus the low-rank branch on the
        balanced, unquantized input."""
        if self.smooth_scale is None and self.low_rank_up is None:
            return self.reference_linear(x)
        x = self.transform_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = F.linear(quantize_input(x, self.spec), self.dequantized_weight(x.dtype), bias)
        return self._add_low_rank(out, x)

