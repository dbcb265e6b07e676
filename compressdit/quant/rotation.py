"""Pure channel-balancing and Hadamard-rotation primitives (ViDiT-Q, QuaRot). No modules here."""

from __future__ import annotations

import math

import torch


def hadamard_block(n: int) -> int:
    """Largest power of two dividing ``n``: the block size of a block-diagonal Hadamard of width ``n``."""
    if n <= 0:
        raise ValueError(f"width must be positive, got {n}")
    return n & (-n)


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over consecutive ``block``-sized chunks of the last dim."""
    if block <= 0 or block & (block - 1) or x.shape[-1] % block:
        raise ValueError(f"block {block} must be a power of two dividing the width {x.shape[-1]}")
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    h = 1
    while h < block:
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return (y.reshape(shape) / math.sqrt(block)).to(x.dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """A seeded random +-1 diagonal (int8) that makes the rotation a randomized Hadamard."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(torch.int8)


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x @ (diag(signs) H)`` along the last dim; applied to both activations and weight rows."""
    return fwht(x * signs.to(x.dtype), hadamard_block(x.shape[-1]))


def balancing_scale(act_absmax: torch.Tensor, weight: torch.Tensor, migration: float) -> torch.Tensor:
    """Per-input-channel divisor ``s`` for activations (weights are multiplied by it).

    ``s_j = a_j^migration / w_j^(1 - migration)`` with ``a_j`` the calibrated max |x_j| and ``w_j``
    max |W[:, j]|. ``migration`` is SmoothQuant's alpha: 0.5 splits the range evenly; near 0 makes the
    weights flat (good for W4). ViDiT-Q writes the same quantity with alpha_vidit = 1 - migration.
    """
    if not 0.0 <= migration <= 1.0:
        raise ValueError(f"migration must be in [0, 1], got {migration}")
    a = act_absmax.float().clamp_min(1e-5)
    w = weight.detach().float().abs().amax(0).clamp_min(1e-5)
    s = a.pow(migration) / w.pow(1.0 - migration)
    return s.clamp(1e-4, 1e4)
