"""GPTQ (Frantar et al., ICLR'23): second-order error-compensating rounding from calibration inputs. Pure.

Columns of ``W [out, in]`` are quantized left to right; the rounding error of each column is spread over the
columns not yet quantized, weighted by the inverse of the layer-input Hessian ``H = 2 X^T X``, so that the layer
output ``X W^T`` (not the weight itself) stays close. Following the paper: dead inputs (zero diagonal) get a
zero weight, ``H`` is damped by ``damp * mean(diag H)``, the inverse comes from a Cholesky factorisation (its upper
factor gives every row of the sequential update at once), and updates are applied lazily in blocks of 128
columns. A group's scale is fitted when the loop reaches the group, on the error-updated weights; with
``act_order`` (columns by decreasing ``diag H``) the contiguous groups' scales are fitted up front ("static
groups") so that the stored layout stays the plain ``[rows, groups]`` of round-to-nearest. Measured caveat: at
2 bits with min/max group ranges fitted in the loop, the compensated weights widen later groups' ranges and on
weakly correlated inputs the result can be ~3% worse than round-to-nearest; ``static_groups``, ``act_order`` or
the MSE range (``w_range: mse``) avoid it (tests/quant/test_quant_gptq.py uses correlated, DiT-like inputs).

The format enters through a :class:`ColumnQuantizer`: ``fit`` a group (or the whole row) to per-row parameters,
``quantize`` one column with them. :class:`IntColumnQuantizer` reproduces :func:`quantize_weight_rtn` exactly
(with ``H`` proportional to the identity GPTQ returns its codes bit for bit); :class:`FPColumnQuantizer` does the
same for the minifloat weights of :mod:`compressdit.quant.fp_weights` (element codes, fp32 absmax / MSE scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from compressdit.quant.fp_weights import FPQuantized, fp_scales
from compressdit.quant.minifloat import Minifloat
from compressdit.quant.primitives import IntQuantized, _mse_shrink, _round_grouped, all_finite, check_bits, int_range

DAMP, BLOCK_SIZE = 0.01, 128


class ColumnQuantizer(Protocol):
    def fit(self, w: torch.Tensor) -> Any:
        """Per-row parameters (e.g. scale, zero) of the columns ``w [rows, size]`` of one group."""

    def quantize(self, column: torch.Tensor, params: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and dequantized values of one column ``[rows]`` under ``params``."""


@dataclass(frozen=True)
class IntColumnQuantizer:
    """Signed integer codes with per-row scales (and zero points when asymmetric), as round-to-nearest."""

    bits: int
    symmetric: bool = True
    weight_range: str = "minmax"

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        grouped = w.unsqueeze(1)
        shrink = _mse_shrink(grouped, self.bits, self.symmetric) if self.weight_range == "mse" else 1.0
        _, scale, zero = _round_grouped(grouped, self.bits, self.symmetric, shrink)
        return scale[:, 0], None if zero is None else zero[:, 0]

    def quantize(self, column: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = params
        qmin, qmax = int_range(self.bits)
        if zero is None:
            codes = torch.round(column / scale).clamp(qmin, qmax)
            return codes, codes * scale
        codes = torch.round(column / scale + zero).clamp(qmin, qmax)
        return codes, (codes - zero) * scale


@dataclass(frozen=True)
class FPColumnQuantizer:
    """Minifloat element codes with one fp32 scale per row (per group), as :func:`quantize_weight_fp`."""

    element: Minifloat
    weight_range: str = "minmax"

    def fit(self, w: torch.Tensor) -> torch.Tensor:
        return fp_scales(w, self.element, None, self.weight_range)[:, 0]

    def quantize(self, column: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.element.encode(column / scale)
        return codes, self.element.decode(codes) * scale


def _upper_inverse_factor(private: Callable[[], torch.Tensor], damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; more damping if ``H`` is near singular.

    ``private()`` gives a fresh copy of ``H`` each attempt, stored column-major (LAPACK's layout: the transpose of
    a contiguous tensor), damped in place on its diagonal (the same numbers as adding ``damp * mean * I``). The
    copy is factored, inverted and factored again in place, so torch's LAPACK wrappers need no buffer of their
    own: one ``[in, in]`` matrix exists here besides the caller's ``H`` (FLUX's 15360-input layers: 0.9 GB each)
    and the numbers are those of the out-of-place calls on ``H``. The factor is returned in that layout."""
    info = torch.zeros((), dtype=torch.int32)
    for attempt in range(4):
        h = private()
        assert h.stride(0) == 1, "private() must give a column-major copy"
        h.diagonal().add_((damp * 10 ** attempt) * h.diagonal().mean())
        torch.linalg.cholesky_ex(h, out=(h, info))
        if not info:
            torch.cholesky_inverse(h, out=h)
            torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
            if not info:
                return h
        del h
    n = private().shape[0]
    raise ValueError(f"the input Hessian [{n}x{n}] is not positive definite even "
                     f"with damping {damp * 1000:g} x mean diagonal; calibrate on more inputs")


def _block_size(group_size: int | None, block_size: int) -> int:
    """Blocks hold whole groups, so a group's columns are all up to date when its scale is fitted."""
    if group_size is None:
        return block_size
    return max(block_size // group_size, 1) * group_size


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, quantizer: ColumnQuantizer,
                  group_size: int | None = None, act_order: bool = False, static_groups: bool = False,
                  damp: float = DAMP, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, list]:
    """GPTQ rounding of ``weight [out, in]`` given the input Hessian ``[in, in]``.

    Returns ``(codes [out, in], params)``: ``params[g]`` is ``quantizer.fit``'s result for contiguous group ``g``
    (one entry when ``group_size`` is None), in the original column order. ``static_groups`` fits every group's
    parameters on the original weight before the loop (always so with ``act_order``).
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match in_features {cols}")
    if group_size is not None and cols % group_size:
        raise ValueError(f"in_features {cols} is not divisible by group_size {group_size}")
    if not all_finite(weight) or not all_finite(hessian):
        raise ValueError("weight or Hessian contains NaN or inf")
    w = weight.detach().float().clone()
    h = hessian.detach().float()  # not modified: the factorisation works on private copies
    diagonal = h.diagonal().clone()
    dead = diagonal == 0
    diagonal[dead] = 1.0  # an input that never fires: its weight cannot matter, quantize it as zero
    w[:, dead] = 0.0
    groups = 1 if group_size is None else cols // group_size
    size = cols if group_size is None else group_size
    params: list = [None] * groups
    fit_in_loop = group_size is not None and not (act_order or static_groups)
    if not fit_in_loop:  # fitted up front on the (dead-zeroed) weight
        params = [quantizer.fit(w[:, g * size:(g + 1) * size]) for g in range(groups)]
    perm = torch.argsort(diagonal, descending=True, stable=True) if act_order else None
    if perm is not None:
        w = w[:, perm]

    def private() -> torch.Tensor:  # H with the dead inputs' diagonal at 1, in the loop's column order, column-major
        copy = (h.mT.contiguous() if perm is None else h.mT[perm[:, None], perm]).mT
        copy.diagonal().copy_(diagonal if perm is None else diagonal[perm])
        return copy

    u = _upper_inverse_factor(private, damp)
    group_of = [c // size for c in (range(cols) if perm is None else perm.tolist())]  # original group per column
    codes = torch.zeros_like(w)
    step = _block_size(group_size, block_size)
    for start in range(0, cols, step):
        end = min(start + step, cols)
        block, u_block = w[:, start:end].clone(), u[start:end, start:end].contiguous()
        errors = torch.zeros_like(block)
        for j in range(end - start):
            col = start + j
            if fit_in_loop and col % size == 0:
                params[col // size] = quantizer.fit(block[:, j:j + size])
            code, value = quantizer.quantize(block[:, j], params[group_of[col]])
            codes[:, col] = code
            error = (block[:, j] - value) / u_block[j, j]
            block[:, j + 1:].addr_(error, u_block[j, j + 1:], alpha=-1.0)
            errors[:, j] = error
        w[:, end:] -= errors @ u[start:end, end:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, params


def gptq_quantize_int(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
                      symmetric: bool = True, weight_range: str = "minmax", act_order: bool = False,
                      static_groups: bool = False, damp: float = DAMP, block_size: int = BLOCK_SIZE) -> IntQuantized:
    """:func:`gptq_quantize` with integer codes: the same :class:`IntQuantized` as round-to-nearest gives."""
    check_bits(bits, "weight bits")
    quantizer = IntColumnQuantizer(bits, symmetric, weight_range)
    codes, params = gptq_quantize(weight, hessian, quantizer, group_size, act_order, static_groups, damp,
                                  block_size)
    scale = torch.stack([p[0] for p in params], dim=1)
    zero = None if symmetric else torch.stack([p[1] for p in params], dim=1)
    return IntQuantized(codes.to(torch.int8), scale, zero, bits, group_size)


def gptq_quantize_fp(weight: torch.Tensor, hessian: torch.Tensor, element: Minifloat, group_size: int | None = None,
                     weight_range: str = "minmax", act_order: bool = False, static_groups: bool = False,
                     damp: float = DAMP, block_size: int = BLOCK_SIZE) -> FPQuantized:
    """:func:`gptq_quantize` with minifloat codes: the same :class:`FPQuantized` as round-to-nearest gives."""
    codes, scales = gptq_quantize(weight, hessian, FPColumnQuantizer(element, weight_range), group_size, act_order,
                                  static_groups, damp, block_size)
    return FPQuantized(codes.to(torch.uint8), torch.stack(scales, dim=1), element, group_size)
