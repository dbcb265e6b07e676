"""How integer weight codes are rounded (``spec.rounding``): one registered handler per rounding.

``rtn`` rounds each weight to its nearest code; ``gptq`` compensates each column's rounding error on the columns
not yet quantized, from the layer-input Hessian gathered over the calibration prompts and timesteps (see
:mod:`compressdit.quant.gptq`). Both give the same codes + scales layout, so checkpoints and kernels are unchanged.
``adaround`` (minifloat formats only) is learned per block, not per weight: its layers are built by
:mod:`compressdit.quant.adaround_calibration`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from compressdit.quant.gptq import gptq_quantize_int
from compressdit.quant.primitives import IntQuantized, quantize_weight_rtn
from compressdit.quant.rotation import rotate
from compressdit.quant.spec import LinearQuantSpec
from compressdit.registry import Registry


@dataclass(frozen=True)
class WeightRounding:
    """``quantize(weight, spec, hessian)`` -> codes + scales; ``needs_hessian``: calibration must supply ``H``."""

    quantize: Callable[[torch.Tensor, LinearQuantSpec, torch.Tensor | None], IntQuantized]
    needs_hessian: bool
    reconstructs_blocks: bool = False  # learned per block from calibration (quant/adaround_calibration.py)


ROUNDINGS: Registry[WeightRounding] = Registry("rounding")


def _rtn(weight: torch.Tensor, spec: LinearQuantSpec, hessian: torch.Tensor | None) -> IntQuantized:
    return quantize_weight_rtn(weight, spec.w_bits, spec.group_size, spec.w_symmetric, spec.w_range)


def _gptq(weight: torch.Tensor, spec: LinearQuantSpec, hessian: torch.Tensor | None) -> IntQuantized:
    if hessian is None:
        raise ValueError("rounding 'gptq' needs the layer's input Hessian from calibration (run a calibrate stage "
                         "before quantize)")
    return gptq_quantize_int(weight, hessian.to(weight.device), spec.w_bits, spec.group_size, spec.w_symmetric,
                             spec.w_range, act_order=spec.act_order)


def transformed_hessian(hessian: torch.Tensor, smooth_scale: torch.Tensor | None,
                        rotation_signs: torch.Tensor | None) -> torch.Tensor:
    """``H`` of the inputs the quantized weight really sees: ``x / s`` (balancing), then ``x R`` (rotation)."""
    h = hessian.float()
    if smooth_scale is not None:
        s = smooth_scale.to(h.device, torch.float32)
        h = h / s[:, None] / s[None, :]
    if rotation_signs is not None:
        h = rotate(rotate(h, rotation_signs).T.contiguous(), rotation_signs)  # R^T H R (H symmetric)
    return h


ROUNDINGS.add("rtn", WeightRounding(_rtn, needs_hessian=False))
ROUNDINGS.add("gptq", WeightRounding(_gptq, needs_hessian=True))


def _block_reconstructed(weight: torch.Tensor, spec: LinearQuantSpec, hessian: torch.Tensor | None) -> IntQuantized:
    raise ValueError(f"rounding 'adaround' is learned per block from calibration inputs; format {spec.format!r} "
                     "does not support it")


ROUNDINGS.add("adaround", WeightRounding(_block_reconstructed, needs_hessian=False, reconstructs_blocks=True))
