"""SVDQuant's low-rank branch (Li et al., ICLR'25): W = L_up @ L_down + R, the rank-r part kept in 16 bits and
only the residual R quantized, so the weight's dominant directions (where smoothing moved activation outliers)
never meet the 4-bit grid. Pure functions on tensors.

The branch is refined as in the paper's calibration: L <- SVD_r(W - Q(W - L)), repeated while the weight
error ``||W - L - Q(W - L)||`` drops (at most ``iterations`` times).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

DEFAULT_ITERATIONS = 8
# randomized SVD (torch.svd_lowrank) above this many times the rank on the short side: the full SVD of a
# 4608 x 1152 layer takes ~1 s per refinement on one CPU thread, the randomized one ~0.1 s
_RANDOMIZED_ABOVE = 8


@dataclass(frozen=True)
class LowRankSplit:
    """``weight ~= up @ down + dequantized residual``: ``up [out, r]``, ``down [r, in]`` (fp32)."""

    up: torch.Tensor
    down: torch.Tensor
    error: float  # Frobenius norm of weight - up @ down - Q(residual), relative to |weight|
    iterations: int


def svd_factors(weight: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of ``weight`` as ``(up [out, r], down [r, in])``: singular values
    split evenly between the factors (balanced magnitudes in 16 bits)."""
    rows, cols = weight.shape
    if not 1 <= rank <= min(rows, cols):
        raise ValueError(f"rank {rank} must be in [1, {min(rows, cols)}] for a {rows} x {cols} weight")
    w = weight.float()
    if min(rows, cols) > _RANDOMIZED_ABOVE * rank:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # svd_lowrank draws a random projection: seeded, global RNG restored
        try:
            u, s, v = torch.svd_lowrank(w, q=min(rank + 16, min(rows, cols)), niter=4)
        finally:
            torch.random.set_rng_state(generator_state)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].t()
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    return u * root, root[:, None] * vh


def low_rank_split(weight: torch.Tensor, rank: int, quantize: Callable[[torch.Tensor], torch.Tensor],
                   iterations: int = DEFAULT_ITERATIONS) -> LowRankSplit:
    """Split ``weight`` into a rank-``rank`` branch and a residual for ``quantize`` (residual -> its dequantized
    value); the branch minimises the weight error after quantization over the refinement iterations."""
    w = weight.float()
    norm = float(w.norm()) or 1.0
    up, down = svd_factors(w, rank)
    best: LowRankSplit | None = None
    for step in range(1, max(1, iterations) + 1):
        branch = up @ down
        error = float((w - branch - quantize(w - branch)).norm()) / norm
        if best is not None and error >= best.error:
            break
        best = LowRankSplit(up, down, error, step)
        up, down = svd_factors(w - quantize(w - branch), rank, seed=step)
    return best
