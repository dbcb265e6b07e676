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
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from compressdit.quant.rotation import fwht, hadamard_block

DEFAULT_BLOCK = 128
DEFAULT_STEPS = 256
DEFAULT_TRIES = 4


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


def _step_signs(size: int, tries: int, gen: torch.Generator) -> list[torch.Tensor]:
    """The ``tries`` seeded random sign columns one greedy step draws (fit and rebuild draw the same ones)."""
    return [(torch.randint(0, 2, (size, 1), generator=gen) * 2 - 1).float() for _ in range(tries)]


def _apply_step(matrix: torch.Tensor, signs: torch.Tensor, top: int) -> torch.Tensor:
    """``matrix @ (D S H)``: columns scaled by ``signs``, columns 0 and ``top`` swapped, then the Walsh-Hadamard
    transform of every row; elementwise ops only, so a rebuild reproduces it bit for bit on any CPU."""
    y = matrix * signs.reshape(1, -1)
    y[:, [0, top]] = y[:, [top, 0]]
    return fwht(y, y.shape[-1])


def greedy_steps(vector: torch.Tensor, steps: int = DEFAULT_STEPS, tries: int = DEFAULT_TRIES,
                 seed: int = 0) -> torch.Tensor:
    """The greedy rotation of ``vector`` (``[B]``) as step codes: int16 ``[steps]``, ``top * tries + choice`` per
    step taken (the channel spread, the seeded sign draw kept), ``-1`` after the last one.

    Each step is ``D S H``: ``S`` swaps the current largest channel with channel 0, ``H`` is the Sylvester
    Hadamard (its constant first row spreads that channel evenly) and ``D`` random signs (the best of ``tries``
    seeded draws), so that repeated steps do not re-concentrate what an earlier step spread. It stops when no
    draw lowers ``max |vector @ R|``.
    """
    size = vector.shape[0]
    codes = torch.full((steps,), -1, dtype=torch.int16)
    if size == 1:
        return codes
    gen = torch.Generator().manual_seed(seed)
    current = vector.float().reshape(1, -1).clone()
    for i in range(steps):
        top = int(current.abs().argmax())
        best, best_peak = None, float(current.abs().max())
        for choice, signs in enumerate(_step_signs(size, tries, gen)):
            candidate = _apply_step(current, signs, top)
            peak = float(candidate.abs().max())
            if peak < best_peak:
                best, best_peak = (choice, candidate), peak
        if best is None:
            break
        codes[i] = top * tries + best[0]
        current = best[1]
    return codes


def decoded_steps(codes: torch.Tensor, size: int, tries: int = DEFAULT_TRIES,
                  seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    """:func:`greedy_steps`' codes of one block as its steps in order: each one's sign draw (fp32 ``[B]``) and the
    channel it spreads."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for code in codes.tolist():
        if code < 0:
            break
        steps.append((_step_signs(size, tries, gen)[code % tries].reshape(-1), code // tries))
    return steps


def rotation_from_steps(codes: torch.Tensor, size: int, tries: int = DEFAULT_TRIES, seed: int = 0) -> torch.Tensor:
    """The orthogonal ``[B, B]`` matrix of :func:`greedy_steps`' codes (identity when no step was taken)."""
    rotation = torch.eye(size)
    for signs, top in decoded_steps(codes, size, tries, seed):
        rotation = _apply_step(rotation, signs, top)
    return rotation


def greedy_rotation(vector: torch.Tensor, steps: int = DEFAULT_STEPS, tries: int = DEFAULT_TRIES,
                    seed: int = 0) -> torch.Tensor:
    """Orthogonal ``[B, B]`` ``R`` that lowers ``max |vector @ R|`` greedily (identity when nothing helps)."""
    return rotation_from_steps(greedy_steps(vector, steps, tries, seed), vector.shape[0], tries, seed)


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
    """``T = blockdiag(first) P blockdiag(second)``: ``first``/``second`` ``[k, B, B]``, ``perm`` ``[k*B]``;
    ``transposed``: ``T^T`` dense, where :meth:`with_dense` found one GEMM cheaper than the three steps."""

    first: torch.Tensor
    perm: torch.Tensor
    second: torch.Tensor
    transposed: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ T`` along the last dim (activations, or weight rows)."""
        if self.transposed is not None:
            return F.linear(x, self.transposed.to(x.dtype))
        return block_rotate(block_rotate(x, self.first)[..., self.perm.long()], self.second)

    def with_dense(self) -> "OutlierRotation":
        """This rotation applied as one dense GEMM where that costs at most the two block products' multiply-adds
        (``k <= 2`` blocks: every layer of up to 256 inputs): a zoo layer's 512 x 128 input took 330 us through the
        two batched block products and the gather at one thread, 80 us as one GEMM. The same ``T`` up to fp32
        rounding."""
        if self.first.shape[0] > 2:
            return self
        return replace(self, transposed=self.dense().t().contiguous())

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ T^T``: undoes :meth:`apply`."""
        y = block_rotate(x, self.second.transpose(1, 2))
        y = y[..., torch.argsort(self.perm.long())]
        return block_rotate(y, self.first.transpose(1, 2))

    def dense(self) -> torch.Tensor:
        """``T`` as a dense ``[n, n]`` fp32 matrix (for tests and small layers)."""
        return self.apply(torch.eye(self.perm.shape[0]))


def perm_dtype(width: int) -> torch.dtype:
    """The narrowest integer dtype that holds a channel index of a ``width``-channel input."""
    return torch.int16 if width <= torch.iinfo(torch.int16).max else torch.int32


@dataclass(frozen=True)
class OutlierRotationCodes:
    """What a checkpoint stores of ``R1 P R2``: each block rotation as its greedy step codes (int16
    ``[k, steps]``, :func:`greedy_steps`) and ``P`` as an index vector (int16 ``[k*B]``) -- about
    ``4 * steps / B + 2`` bytes per input channel instead of ``8 B`` for two dense fp32 block matrices.
    :meth:`rotation` rebuilds the dense blocks bit for bit (elementwise ops and seeded draws only)."""

    first: torch.Tensor
    perm: torch.Tensor
    second: torch.Tensor

    def rotation(self) -> OutlierRotation:
        size = self.perm.shape[0] // self.first.shape[0]
        blocks = [torch.stack([rotation_from_steps(row, size) for row in codes.cpu()])
                  for codes in (self.first, self.second)]
        return OutlierRotation(blocks[0], self.perm.cpu().long(), blocks[1])

    def steps(self) -> "RotationSteps":
        """The same ``T`` as its steps (:class:`RotationSteps`)."""
        size = self.perm.shape[0] // self.first.shape[0]
        per_block = [decoded_steps(row, size) for codes in (self.first, self.second) for row in codes.cpu()]
        flat = [step for steps in per_block for step in steps]
        return RotationSteps(torch.tensor([len(steps) for steps in per_block], dtype=torch.int32),
                             torch.tensor([top for _, top in flat], dtype=torch.int32),
                             torch.stack([signs for signs, _ in flat]) if flat else torch.empty(0, size),
                             self.perm.cpu().long())


@dataclass(frozen=True)
class RotationSteps:
    """``T = R1 P R2`` as the greedy steps themselves rather than dense blocks: per block of ``R1``, then of ``R2``,
    its steps in order, each a sign draw and the channel it spreads (:func:`_apply_step`). Applied to activations they
    cost ~10 operations an element a step where the dense blocks cost ``B`` multiply-adds, and calibrated layers take
    few: the zoo DiT's and a PixArt's DuQuant layers 0-1 a block (their ``T`` mostly the permutation). The same ``T``
    as :meth:`OutlierRotationCodes.rotation` up to fp32 rounding; ``apply`` is the PyTorch reference of the C pass
    (``compressdit_duquant_layer_rows``), bit for bit."""

    counts: torch.Tensor  # int32 [2 k]: the steps of each block of R1, then of each block of R2
    tops: torch.Tensor  # int32 [S]: the channel each step spreads (the steps in that order)
    signs: torch.Tensor  # fp32 [S, B]: each step's signs
    perm: torch.Tensor  # int64 [k B]: P as an index vector

    @property
    def block(self) -> int:
        return self.perm.shape[0] * 2 // self.counts.shape[0]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ T`` along the last dim of an fp32 ``x``: on each block of its rows, every step's operations as
        :func:`rotation_from_steps` does them on the identity's, in order; the permutation between the halves."""
        k, size = self.counts.shape[0] // 2, self.block
        y = x.reshape(-1, k, size).clone()
        counts, tops, step = self.counts.tolist(), self.tops.tolist(), 0
        for half in (0, 1):
            if half:
                y = y.reshape(-1, k * size)[:, self.perm].reshape(-1, k, size)
            for b in range(k):
                for _ in range(counts[half * k + b]):
                    y[:, b] = _apply_step(y[:, b], self.signs[step], tops[step])
                    step += 1
        return y.reshape(x.shape)


def fit_outlier_rotation(absmax: torch.Tensor, block: int = DEFAULT_BLOCK,
                         steps: int = DEFAULT_STEPS) -> OutlierRotationCodes:
    """DuQuant's ``R1 P R2`` fitted to the calibrated per-channel absmax of a layer's input."""
    width = absmax.shape[0]
    size = duquant_block(width, block)
    a = absmax.detach().float().cpu().reshape(-1, size)
    first = torch.stack([greedy_steps(row, steps) for row in a])
    rotated = block_rotate(a.reshape(-1), torch.stack([rotation_from_steps(row, size) for row in first]))
    perm = zigzag_permutation(rotated.abs(), size)
    second = torch.stack([greedy_steps(row, steps) for row in rotated[perm].reshape(-1, size)])
    return OutlierRotationCodes(first, perm.to(perm_dtype(width)), second)
