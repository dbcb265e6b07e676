"""How a dense FFN's hidden neurons are grouped into experts: neuron profiles + balanced clustering.

A *neuron grouping* reads the calibration record of one FFN (its hidden activations ``h`` ``[samples, tokens,
H]`` after the activation and, for Taylor, the loss gradient ``g`` on them) and gives every neuron an importance
(which neurons form the always-on shared expert) and a profile vector (neurons with similar profiles share an
expert). Both groupings cluster the profiles into equal-size experts (:func:`balanced_clusters`).

- ``taylor``: first-order Taylor importance of neuron ``j`` for sample ``b``, ``|sum_t h[b,t,j] g[b,t,j]|``
  (Molchanov et al., CVPR 2019, arXiv 1906.10771), over samples drawn at random timesteps; the profile is the
  per-sample vector, so neurons that matter for the same samples and timesteps land together.
- ``coactivation``: MoEfication's co-activation (Zhang et al., arXiv 2110.01786): the profile is the positive
  part of the neuron's activation on each token, importance its mean activation times its down-projection norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from compressdit.registry import Registry


@dataclass
class NeuronRecord:
    """Calibration record of one FFN: activations ``[samples, tokens, H]``, their loss gradients (or ``None``),
    and the down projection's weight ``[out, H]``."""

    activations: torch.Tensor
    gradients: torch.Tensor | None
    down_weight: torch.Tensor


@dataclass(frozen=True)
class NeuronGrouping:
    """``profile(record) -> (profiles [H, M], importance [H])`` and whether it needs loss gradients."""

    profile: Callable[[NeuronRecord], tuple[torch.Tensor, torch.Tensor]]
    needs_gradients: bool


def _taylor(record: NeuronRecord) -> tuple[torch.Tensor, torch.Tensor]:
    per_sample = (record.activations * record.gradients).sum(1).abs()  # [samples, H]
    return per_sample.T.contiguous(), per_sample.sum(0)


def _coactivation(record: NeuronRecord) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = record.activations.reshape(-1, record.activations.shape[-1]).clamp_min(0)  # [N, H]
    importance = tokens.mean(0) * record.down_weight.float().norm(dim=0)
    return tokens.T.contiguous(), importance


NEURON_GROUPINGS: Registry[NeuronGrouping] = Registry("neuron grouping")
NEURON_GROUPINGS.add("taylor", NeuronGrouping(_taylor, needs_gradients=True))
NEURON_GROUPINGS.add("coactivation", NeuronGrouping(_coactivation, needs_gradients=False))


def _balanced_assign(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """Each row to a column, ``size`` rows per column: pairs taken greedily in order of decreasing similarity."""
    rows, cols = similarity.shape
    assignment = torch.full((rows,), -1, dtype=torch.long)
    room = [size] * cols
    left = rows
    for flat in torch.argsort(similarity.reshape(-1), descending=True).tolist():
        row, col = divmod(flat, cols)
        if assignment[row] < 0 and room[col]:
            assignment[row] = col
            room[col] -= 1
            left -= 1
            if not left:
                break
    return assignment


def balanced_clusters(profiles: torch.Tensor, clusters: int, iterations: int = 10, seed: int = 0) -> list[torch.Tensor]:
    """Split the rows of ``profiles`` ``[n, M]`` into ``clusters`` groups of equal size (``n`` divisible), by
    balanced spherical k-means on centred, normalised profiles; groups of sorted row indices."""
    n = profiles.shape[0]
    size = n // clusters
    x = profiles.float() - profiles.float().mean(0, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:clusters]]
    assignment = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        new = _balanced_assign(x @ centroids.T, size)
        if torch.equal(new, assignment):
            break
        assignment = new
        centroids = torch.stack([x[assignment == c].mean(0) for c in range(clusters)])
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return [torch.nonzero(assignment == c).flatten() for c in range(clusters)]


def split_neurons(record: NeuronRecord, grouping: NeuronGrouping, experts: int, shared_neurons: int,
                  iterations: int = 10, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(shared neuron indices, [indices of each routed expert])``: the ``shared_neurons`` most important
    neurons are shared, the rest clustered into ``experts`` equal groups."""
    profiles, importance = grouping.profile(record)
    order = torch.argsort(importance.float(), descending=True)
    shared, rest = order[:shared_neurons].sort().values, order[shared_neurons:].sort().values
    groups = balanced_clusters(profiles[rest], experts, iterations, seed)
    return shared, [rest[g] for g in groups]
