"""Calibration across processes (``accelerate launch`` / ``torchrun``; gloo on CPU, NCCL on GPUs).

The calibration batches are dealt round-robin to the ranks (``rank_batches``); each rank samples its batches with
the latents a single process draws for them, so each batch runs exactly as it would in one process. The per-step,
per-channel maxima are then reduced across ranks (``reduce_max``, one all-reduce): every rank ends with the
statistics one process computes, bit for bit (a maximum does not depend on the order it is taken in).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import PartialState


def rank_batches(count: int, batch_size: int, state: PartialState | None = None) -> list[tuple[int, int]]:
    """``(start, end)`` of this rank's calibration batches: batch ``i`` goes to rank ``i % num_processes``."""
    state = state or PartialState()
    starts = range(0, count, batch_size)
    return [(s, min(s + batch_size, count)) for i, s in enumerate(starts)
            if i % state.num_processes == state.process_index]


def reduce_max(per_step: dict[str, dict[int, torch.Tensor]], widths: dict[str, int], steps: int,
               state: PartialState | None = None) -> dict[str, dict[int, torch.Tensor]]:
    """Element-wise max of every rank's ``{layer: {step: [in_features]}}`` (non-negative maxima), as one
    all-reduce; a ``(layer, step)`` no rank saw stays absent. A single process gets ``per_step`` back."""
    state = state or PartialState()
    if state.num_processes == 1:
        return per_step
    slots = [(name, step) for name in widths for step in range(steps)]
    seen = torch.tensor([float(step in per_step.get(name, {})) for name, step in slots])
    values = torch.cat([per_step.get(name, {}).get(step, torch.zeros(widths[name])).float()
                        for name, step in slots])
    flat = torch.cat([seen, values]).to(state.device)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    flat = flat.cpu()
    seen, values = flat[:len(slots)], flat[len(slots):]
    out: dict[str, dict[int, torch.Tensor]] = {}
    offset = 0
    for (name, step), present in zip(slots, seen.tolist()):
        chunk = values[offset:offset + widths[name]]
        offset += widths[name]
        if present:
            out.setdefault(name, {})[step] = chunk.clone()
    return out
