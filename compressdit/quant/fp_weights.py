"""Minifloat weights with fp32 scales per output channel or per group (FP4DiT's E2M1 / E3M0 / E1M2). Pure.

A weight row (or each run of ``group_size`` inputs of it) gets one fp32 scale ``s`` so that its absmax lands on the
element format's largest value (``w_range: mse`` shrinks that range to the one of a small grid of candidates with
the lowest squared weight error, as :func:`compressdit.quant.primitives.quantize_weight_rtn` does for integers);
each weight is then ``s * q`` with ``q`` the element rounded to nearest even (:meth:`Minifloat.round`). The
format's value grid is also what AdaRound rounds on: :func:`grid_neighbours` gives each scaled weight's grid points
below and above. Example::

    >>> q = quantize_weight_fp(torch.tensor([[0.3, -3.0, 1.2, 6.0]]), MINIFLOATS.get("e2m1"))
    >>> q.scale, q.dequantized()
    (tensor([[1.]]), tensor([[0.5000, -3.0000, 1.0000, 6.0000]]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressdit.quant.minifloat import Minifloat
from compressdit.quant.primitives import MSE_CHUNK, all_finite

MSE_SHRINKS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 .. 0.5: the range fractions w_range: mse tries


@dataclass
class FPQuantized:
    """Element codes ``uint8 [out, in]`` and fp32 scales ``[out, groups]`` (one group: per output channel)."""

    codes: torch.Tensor
    scale: torch.Tensor
    element: Minifloat
    group_size: int | None

    def dequantized(self) -> torch.Tensor:
        return dequantize_weight_fp(self.codes, self.scale, self.element)


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[out, in]`` -> ``[out, groups, size]``."""
    rows, cols = weight.shape
    size = cols if group_size is None else group_size
    if cols % size:
        raise ValueError(f"in_features {cols} is not divisible by group_size {size}")
    return weight.reshape(rows, cols // size, size)


def fp_scales(weight: torch.Tensor, element: Minifloat, group_size: int | None = None,
              weight_range: str = "minmax") -> torch.Tensor:
    """fp32 scales ``[out, groups]``: absmax / max value, or the MSE-best shrink of it (``weight_range: mse``)."""
    w = _grouped(weight.detach().float(), group_size)
    rows = w.shape[0]
    top = w.abs().amax(-1, keepdim=True).clamp_min(1e-12) / element.max_value
    if weight_range == "minmax":
        return top[..., 0]
    w, top = w.reshape(-1, w.shape[-1]), top.reshape(-1, 1)
    best = top.clone()
    step = max(1, MSE_CHUNK // w.shape[1])  # a cache-sized slice of groups at a time: same ops, same choices
    for start in range(0, w.shape[0], step):
        part, part_top, chosen = w[start:start + step], top[start:start + step], best[start:start + step]
        best_err = torch.full_like(part_top, float("inf"))
        for shrink in MSE_SHRINKS:
            scale = part_top * shrink
            err = (element.round(part / scale) * scale - part).square().sum(-1, keepdim=True)
            better = err < best_err
            chosen.copy_(torch.where(better, scale, chosen))
            best_err = torch.where(better, err, best_err)
    return best.reshape(rows, -1)


def quantize_weight_fp(weight: torch.Tensor, element: Minifloat, group_size: int | None = None,
                       weight_range: str = "minmax", scale: torch.Tensor | None = None) -> FPQuantized:
    """Round-to-nearest-even minifloat codes of ``weight [out, in]`` (scales fitted unless ``scale`` is given)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if not all_finite(weight):
        raise ValueError("weight contains NaN or inf")
    scale = fp_scales(weight, element, group_size, weight_range) if scale is None else scale.float()
    w = _grouped(weight.detach().float(), group_size)
    codes = element.encode(w / scale.unsqueeze(-1)).reshape(weight.shape)
    return FPQuantized(codes, scale, element, group_size)


def dequantize_weight_fp(codes: torch.Tensor, scale: torch.Tensor, element: Minifloat,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes [out, in]`` decoded and multiplied by their row's (group's) scale ``[out, groups]``."""
    rows, cols = codes.shape
    values = element.decode(codes).reshape(rows, scale.shape[1], cols // scale.shape[1])
    return (values * scale.float().unsqueeze(-1)).reshape(rows, cols).to(dtype)


def expand_scale(scale: torch.Tensor, cols: int) -> torch.Tensor:
    """Per-group scales ``[out, groups]`` repeated to one per weight ``[out, in]``."""
    return scale.float().repeat_interleave(cols // scale.shape[1], dim=1)


def grid_neighbours(x: torch.Tensor, element: Minifloat) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid points of ``element`` just below and above each scaled weight ``x`` (equal where ``x`` is on the grid
    or saturates): AdaRound chooses between the two."""
    magnitudes = element.values().to(x.device)
    grid = torch.cat([-magnitudes.flip(0)[:-1], magnitudes])  # ascending, 0 once
    x = x.float().clamp(grid[0], grid[-1])
    upper_index = torch.searchsorted(grid, x, right=False)  # first grid point >= x
    upper = grid[upper_index.clamp(max=len(grid) - 1)]
    lower = torch.where(upper == x, upper, grid[(upper_index - 1).clamp(min=0)])
    return lower, upper
