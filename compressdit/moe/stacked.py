"""Stacked-expert inference: all routed experts of a layer in two ``torch._grouped_mm`` calls.

At small widths (the zoo's DiTs: 256 tokens, experts of 64 neurons) a routed layer's time is mostly per-call
overhead: one ``addmm`` and one ``mm`` per expert on ~100 rows each. Stacking the experts' weights (``[E, d, h]``
and ``[E, h, d_out]``, transposed views of ``[E, h, d]`` copies) lets one grouped matmul per projection serve every
expert's contiguous slice of the gathered rows (``offs``: :meth:`~compressdit.moe.routing.Dispatch.offsets`); on
CPU it computes each slice with the same kernel as the per-expert loop, so the outputs do not change.

The stacked copy is a cache next to the parameters (the checkpoint keeps ``experts.{i}.*``): rebuilt whenever a
weight's storage or version counter changes (``load_state_dict``, ``.to()``, an optimiser step), used only
without autograd, on CPU, in float32 / bfloat16 / float16, and only for layers whose routed weights take at most
:data:`STACK_LIMIT_BYTES` (the copy doubles them; larger layers' matmuls dwarf the per-call overhead anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressdit.moe.routing import Dispatch, ExpertWeights, scatter_back
from compressdit.quant.kernel_registry import version_of

STACK_LIMIT_BYTES = 16 * 2**20  # routed up + down weights of one layer
STACKABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class StackedExperts:
    """One layer's routed experts stacked for ``torch._grouped_mm``: ``up`` ``[E, d, h]``, ``up_bias`` ``[E, h]``
    (or ``None``), ``down`` ``[E, h, d_out]``; ``key`` identifies the weights they were copied from, and
    ``sources`` (detached aliases of them) keeps their storages alive, so that a replaced weight's address cannot
    be reused by its successor and pass for it (as ``kernel_registry.StateKey.storage`` does)."""

    key: tuple
    up: torch.Tensor
    up_bias: torch.Tensor | None
    down: torch.Tensor
    sources: tuple[torch.Tensor, ...] = ()


def _weights(experts: ExpertWeights) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in (*experts.up, *experts.down, *experts.up_bias) if t is not None)


def weights_key(experts: ExpertWeights) -> tuple:
    """Storage address and version counter of every expert weight: changes when any is replaced or edited."""
    return tuple((t.data_ptr(), version_of(t)) for t in _weights(experts))


def stackable(x: torch.Tensor, experts: ExpertWeights) -> bool:
    """Whether :func:`run_stacked` may serve this call: CPU, a grouped-matmul dtype shared by input and weights,
    no autograd, equal expert shapes, and routed weights within :data:`STACK_LIMIT_BYTES`."""
    up, down = experts.up, experts.down
    if x.device.type != "cpu" or x.dtype not in STACKABLE_DTYPES or up[0].dtype != x.dtype:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *up, *down)):
        return False
    if len({t.shape for t in up}) != 1 or len({t.shape for t in down}) != 1:
        return False
    return (up[0].numel() + down[0].numel()) * len(up) * up[0].element_size() <= STACK_LIMIT_BYTES


def stack(experts: ExpertWeights, key: tuple) -> StackedExperts:
    biases = experts.up_bias
    with torch.no_grad():
        return StackedExperts(key=key, up=torch.stack(experts.up).transpose(1, 2),
                              up_bias=None if biases[0] is None else torch.stack(biases),
                              down=torch.stack(experts.down).transpose(1, 2),
                              sources=tuple(t.detach() for t in _weights(experts)))


def run_stacked(x: torch.Tensor, plan: Dispatch, experts: ExpertWeights, stacked: StackedExperts,
                out: torch.Tensor) -> torch.Tensor:
    """:func:`~compressdit.moe.routing.run_grouped_linear` with one grouped matmul per projection."""
    if not plan.rows.shape[0]:
        return out
    offsets = plan.offsets()
    hidden = torch._grouped_mm(x.index_select(0, plan.rows), stacked.up, offs=offsets)
    if stacked.up_bias is not None:
        hidden.add_(stacked.up_bias.index_select(0, plan.row_experts))
    y = torch._grouped_mm(experts.activation(hidden), stacked.down, offs=offsets)
    return scatter_back(y, plan, out)
