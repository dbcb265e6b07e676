"""Calibration across processes (``accelerate launch`` / ``torchrun``; gloo on CPU, NCCL on GPUs).

The calibration batches are dealt round-robin to the ranks (``rank_batches``); each rank samples its batches with
the latents a single process draws for them, so each batch runs exactly as it would in one process. The per-step,
per-channel maxima are then reduced across ranks (``reduce_max``, one all-reduce): every rank ends with the
statistics one process computes, bit for bit (a maximum does not depend on the order it is taken in). The sums of
squares behind the mean squares are summed the same way (``reduce_sums``), equal to one process's up to the rounding
of a different summation order.

``compressdit quantize`` under ``accelerate launch`` runs each rank's share of the calibration this way; the stages
after the last calibrate stage (quantize: deterministic) run on rank 0 alone, which writes the output, and the other
ranks exit (:func:`compressdit.pipeline.run_recipe`).
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


def reduce_sums(squares: dict[str, dict[int, tuple[torch.Tensor, int]]], widths: dict[str, int], steps: int,
                state: PartialState | None = None) -> dict[str, dict[int, tuple[torch.Tensor, int]]]:
    """Sum of every rank's ``{layer: {step: (sum of x^2 per channel, token count)}}`` as one all-reduce (float64, so
    that the order of the ranks' partial sums barely shows); a ``(layer, step)`` no rank saw stays absent."""
    state = state or PartialState()
    if state.num_processes == 1:
        return squares
    slots = [(name, step) for name in widths for step in range(steps)]
    counts = torch.tensor([float(squares.get(name, {}).get(step, (None, 0))[1]) for name, step in slots],
                          dtype=torch.float64)
    values = torch.cat([squares.get(name, {}).get(step, (torch.zeros(widths[name]), 0))[0].double()
                        for name, step in slots])
    flat = torch.cat([counts, values]).to(state.device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    counts, values = flat[:len(slots)], flat[len(slots):]
    out: dict[str, dict[int, tuple[torch.Tensor, int]]] = {}
    offset = 0
    for (name, step), count in zip(slots, counts.tolist()):
        chunk = values[offset:offset + widths[name]]
        offset += widths[name]
        if count:
            out.setdefault(name, {})[step] = (chunk.float(), int(count))
    return out
