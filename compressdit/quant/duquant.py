"""Outlier-aware rotation (DuQuant, Lin et al., NeurIPS'24), the rotation LRQ-DiT's ARS uses for layers whose
activations carry salient, channel-concentrated outliers. Pure primitives, no modules.

The transform is ``T = R1 P R2`` on the input dim: ``R1`` and ``R2`` are block-diagonal orthogonal matrices
(blocks of ``B`` channels) and ``P`` a zig-zag channel permutation; ``x -> x T`` online, ``W -> W T`` offline
(``x W^T = (x T)(W T)^T`` as ``T`` is orthogonal). Each block rotation is fitted greedily to the calibrated
per-channel absmax vector ``a``: while it lowers the block's largest entry, the current largest channel is
swapped to the front and the block is multiplied by a Hadamard matrix whose first row is constant, which
spreads that channel evenly over the block. The zig-zag permutation then deals channels, by decreasing
magnitude, to blocks 0..k-1, k-1..0, ... so every block gets a similar share of the outliers before the second
rotation smooths within blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compressdit.quant.rotation import hadamard_block

DEFAULT_BLOCK = 128
DEFAULT_STEPS = 256


def duquant_block(width: int, block: int = DEFAULT_BLOCK) -> int:
    """Block size for a ``width``-channel input: the largest power of two dividing ``width``, at most ``block``."""
    return min(hadamard_block(width), block)


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The orthonormal ``n x n`` Sylvester Hadamard matrix (first row constant ``1/sqrt(n)``)."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


def greedy_rotation(vector: torch.Tensor, steps: int = DEFAULT_STEPS, tries: int = 4, seed: int = 0) -> torch.Tensor:
    """Orthogonal ``[B, B]`` ``R`` that lowers ``max |vector @ R|`` greedily (identity when nothing helps).

    Each step is ``D S H``: ``S`` swaps the current largest channel with channel 0, ``H`` is the Sylvester
    Hadamard (its constant first row spreads that channel evenly) and ``D`` random signs (the best of ``tries``
    seeded draws), so that repeated steps do not re-concentrate what an earlier step spread.
    """
    size = vector.shape[0]
    rotation = torch.eye(size)
    if size == 1:
        return rotation
    base = sylvester_hadamard(size)
    gen = torch.Generator().manual_seed(seed)
    current = vector.float().clone()
    for _ in range(steps):
        top = int(current.abs().argmax())
        swapped = base.clone()
        swapped[[0, top]] = swapped[[top, 0]]  # row ``top`` is now the constant row: channel ``top`` spreads
        best_step, best_peak = None, float(current.abs().max())
        for _ in range(tries):
            step = (torch.randint(0, 2, (size, 1), generator=gen) * 2 - 1).float() * swapped
            peak = float((current @ step).abs().max())
            if peak < best_peak:
                best_step, best_peak = step, peak
        if best_step is None:
            break
        rotation, current = rotation @ best_step, current @ best_step
    return rotation


def zigzag_permutation(magnitude: torch.Tensor, block: int) -> torch.Tensor:
    """``perm`` (int64) such that ``x[..., perm]`` deals channels by decreasing ``magnitude`` to the blocks in
    zig-zag order (0, 1, ..., k-1, k-1, ..., 0, 0, ...)."""
    width = magnitude.shape[0]
    if width % block:
        raise ValueError(f"block {block} does not divide the width {width}")
    blocks = width // block
    order = torch.argsort(magnitude.float(), descending=True, stable=True)
    slots: list[list[int]] = [[] for _ in range(blocks)]
    for rank, channel in enumerate(order.tolist()):
        turn, pos = divmod(rank, blocks)
        slots[pos if turn % 2 == 0 else blocks - 1 - pos].append(channel)
    return torch.tensor([c for slot in slots for c in slot], dtype=torch.int64)


def block_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks)`` along the last dim (``blocks`` ``[k, B, B]``), in ``x``'s dtype."""
    k, size, _ = blocks.shape
    y = x.reshape(*x.shape[:-1], k, size)
    return torch.einsum("...kb,kbc->...kc", y, blocks.to(x.dtype)).reshape(x.shape)


@dataclass(frozen=True)
class OutlierRotation:
    """``T = blockdiag(first) P blockdiag(second)``: ``first``/``second`` ``[k, B, B]``, ``perm`` ``[k*B]``."""

    first: torch.Tensor
    perm: torch.Tensor
    second: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ T`` along the last dim (activations, or weight rows)."""
        return block_rotate(block_rotate(x, self.first)[..., self.perm], self.second)

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ T^T``: undoes :meth:`apply`."""
        y = block_rotate(x, self.second.transpose(1, 2))
        y = y[..., torch.argsort(self.perm)]
        return block_rotate(y, self.first.transpose(1, 2))

    def dense(self) -> torch.Tensor:
        """``T`` as a dense ``[n, n]`` fp32 matrix (for tests and small layers)."""
        return self.apply(torch.eye(self.perm.shape[0]))


def fit_outlier_rotation(absmax: torch.Tensor, block: int = DEFAULT_BLOCK,
                         steps: int = DEFAULT_STEPS) -> OutlierRotation:
    """DuQuant's ``R1 P R2`` fitted to the calibrated per-channel absmax of a layer's input."""
    width = absmax.shape[0]
    size = duquant_block(width, block)
    a = absmax.detach().float().cpu().reshape(-1, size)
    first = torch.stack([greedy_rotation(row, steps) for row in a])
    rotated = block_rotate(a.reshape(-1), first)
    perm = zigzag_permutation(rotated.abs(), size)
    second = torch.stack([greedy_rotation(row, steps) for row in rotated[perm].reshape(-1, size)])
    return OutlierRotation(first, perm, second)
