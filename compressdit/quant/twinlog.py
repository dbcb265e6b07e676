"""Twin-Log Quantization (TLQ, LRQ-DiT, arXiv 2508.03485): pure primitives, no modules.

Weights split by sign; each side's magnitudes are quantized uniformly in the log domain,
``L = log2(|w| + eta)``, with its own per-row step ``delta`` and lower end ``low``; dequantization is
``sign * (2^(low + q * delta) - eta)``. Log levels put more codes where DiT weights are dense (near
zero) and fewer in the long tails; ``eta`` (per row, a fraction of the row's absmax) moves the grid
between logarithmic (small ``eta``) and near-uniform (large ``eta``).

Codes are signed ``b``-bit integers (what :func:`compressdit.quant.primitives.pack_codes` packs): ``c >= 0``
is level ``c`` of the positive side, ``c < 0`` level ``-c - 1`` of the negative side, so each side has
``2^(b-1)`` levels. Parameters per row: ``delta [rows, 2]`` and ``low [rows, 2]`` (positive side first) and
``eta [rows, 1]``, all fp32.

The clipping (the upper percentile of each side's magnitudes) and ``eta`` are chosen per row by a grid
search on the layer's output error ``dW H dW^T`` when the calibration inputs' ``H = 2 X^T X / n`` is given,
else on the weight error (the paper's criterion).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressdit.quant.primitives import check_bits

# eta as a fraction of each row's absmax; clipping percentiles of each side's magnitudes
ETA_GRID = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
PERCENTILE_GRID = (1.0, 0.999, 0.99, 0.98)
_QUANTILE_LIMIT = 1 << 24  # torch.quantile refuses larger inputs (pytorch #64947)


@dataclass(frozen=True)
class TwinLogQuantized:
    """Signed codes ``int8 [rows, cols]`` and the per-row parameters of both sides (fp32)."""

    codes: torch.Tensor
    delta: torch.Tensor  # [rows, 2]: log2 step of the positive / negative side
    low: torch.Tensor    # [rows, 2]: log2 of the smallest magnitude (+ eta) of each side
    eta: torch.Tensor    # [rows, 1]
    bits: int

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return twinlog_dequantize(self.codes, self.delta, self.low, self.eta, dtype)


def twinlog_dequantize(codes: torch.Tensor, delta: torch.Tensor, low: torch.Tensor, eta: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``sign * (2^(low_s + q * delta_s) - eta)`` with side ``s`` and level ``q`` read from each signed code."""
    c = codes.to(torch.int32)
    negative = c < 0
    level = torch.where(negative, -c - 1, c).float()
    side = negative.long()
    step = delta.float().gather(1, side)
    base = low.float().gather(1, side)
    magnitude = torch.exp2(base + level * step) - eta.float()
    return torch.where(negative, -magnitude, magnitude).to(dtype)


def _side_quantiles(magnitude: torch.Tensor, mask: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """``[len(qs), rows]`` quantiles of each row's magnitudes under ``mask`` (NaN for a row with none)."""
    values = torch.where(mask, magnitude, torch.full_like(magnitude, float("nan")))
    rows = max(1, _QUANTILE_LIMIT // max(1, values.shape[1]))
    return torch.cat([torch.nanquantile(chunk, qs, dim=1) for chunk in values.split(rows)], dim=1)


@dataclass(frozen=True)
class _SideStats:
    """Per row and side (``[rows, 2]``): smallest magnitude, and the clipped largest for each percentile."""

    smallest: torch.Tensor
    clipped: dict[float, torch.Tensor]


def _side_stats(weight: torch.Tensor, percentiles: tuple[float, ...]) -> _SideStats:
    magnitude = weight.abs()
    qs = torch.tensor((0.0, *percentiles), dtype=torch.float32, device=weight.device)
    sides = [_side_quantiles(magnitude, mask, qs) for mask in (weight >= 0, weight < 0)]
    stacked = torch.stack(sides, dim=-1).nan_to_num(0.0)  # [1 + P, rows, 2]; an empty side is never used
    return _SideStats(stacked[0], {p: stacked[i + 1] for i, p in enumerate(percentiles)})


def twinlog_encode(weight: torch.Tensor, bits: int, eta: torch.Tensor, smallest: torch.Tensor,
                   largest: torch.Tensor) -> TwinLogQuantized:
    """Codes for ``weight`` on the grid spanning ``[smallest, largest]`` magnitudes per row and side
    (``[rows, 2]``) with offset ``eta`` (``[rows, 1]``); magnitudes outside are clipped to the end levels."""
    check_bits(bits)
    levels = 2 ** (bits - 1)
    low = torch.log2(smallest + eta)
    high = torch.log2(torch.maximum(largest, smallest) + eta)
    delta = ((high - low) / max(levels - 1, 1)).clamp_min(1e-8)
    negative = weight < 0
    side = negative.long()
    log_magnitude = torch.log2(weight.abs() + eta)
    level = torch.round((log_magnitude - low.gather(1, side)) / delta.gather(1, side)).clamp(0, levels - 1)
    codes = torch.where(negative, -level - 1, level).to(torch.int8)
    return TwinLogQuantized(codes, delta, low, eta, bits)


def _row_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    diff = weight - approx
    if hessian is None:
        return diff.pow(2).sum(1)
    return ((diff @ hessian) * diff).sum(1)


def _take(best: TwinLogQuantized | None, new: TwinLogQuantized, better: torch.Tensor) -> TwinLogQuantized:
    if best is None:
        return new
    rows = better[:, None]
    return TwinLogQuantized(torch.where(rows, new.codes, best.codes), torch.where(rows, new.delta, best.delta),
                            torch.where(rows, new.low, best.low), torch.where(rows, new.eta, best.eta), new.bits)


def twinlog_quantize(weight: torch.Tensor, bits: int, hessian: torch.Tensor | None = None,
                     eta_grid: tuple[float, ...] = ETA_GRID,
                     percentile_grid: tuple[float, ...] = PERCENTILE_GRID) -> TwinLogQuantized:
    """TLQ of a ``[rows, cols]`` weight: per row, the ``eta`` and clipping percentiles (one per side) with the
    lowest output error ``dW H dW^T`` (``hessian`` ``[cols, cols]``), or weight error without one.

    The search is joint over ``eta`` x percentile (both sides alike), then refines each side's percentile
    with the other fixed. Every candidate is scored on its own dequantized codes, so the returned codes and
    parameters dequantize to exactly the weight that won.
    """
    check_bits(bits)
    if not eta_grid or not percentile_grid or not all(0.0 < p <= 1.0 for p in percentile_grid):
        raise ValueError(f"eta_grid must be non-empty and percentiles in (0, 1], got {eta_grid}, {percentile_grid}")
    w = weight.detach().float()
    h = None if hessian is None else hessian.to(w.device, torch.float32)
    stats = _side_stats(w, percentile_grid)
    absmax = w.abs().amax(1, keepdim=True).clamp_min(1e-12)
    best: TwinLogQuantized | None = None
    best_error = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_eta = torch.zeros_like(absmax)
    best_p = torch.zeros_like(stats.smallest)  # [rows, 2]: chosen clipped magnitude per side

    def consider(eta: torch.Tensor, largest: torch.Tensor) -> None:
        nonlocal best
        candidate = twinlog_encode(w, bits, eta, stats.smallest, largest)
        error = _row_error(w, candidate.dequantized(), h)
        better = error < best_error
        best = _take(best, candidate, better)
        best_error.copy_(torch.where(better, error, best_error))
        best_eta.copy_(torch.where(better[:, None], eta, best_eta))
        best_p.copy_(torch.where(better[:, None], largest, best_p))

    for fraction in eta_grid:
        for p in percentile_grid:
            consider(absmax * fraction, stats.clipped[p])
    for side in (0, 1):
        chosen_eta, chosen = best_eta.clone(), best_p.clone()
        for p in percentile_grid:
            largest = chosen.clone()
            largest[:, side] = stats.clipped[p][:, side]
            consider(chosen_eta, largest)
    return best
