"""Routing records: router logits captured per forward (hooks as a context manager), the router losses over
them, and expert load per timestep."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from compressdit.moe.blocks import group_routers
from compressdit.moe.layers import moe_layers
from compressdit.moe.routing import balance_loss, top_k, z_loss

TIMESTEP_BINS = 10  # expert load is reported per tenth of the timestep range


@dataclass
class RoutedForward:
    """One MoE layer's router logits ``[N, E]`` in one forward, and its ``top_k``."""

    layer: str
    logits: torch.Tensor
    top_k: int


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[list[RoutedForward]]:
    """Inside the ``with``, the list fills with every MoE layer's router logits on every forward (in call order),
    and every Mixture-of-Blocks group's (one row per sample, its "experts" the group's blocks); the hooks are
    removed on exit. Empty for a model without routers."""
    records: list[RoutedForward] = []
    handles = []
    routers = {name: (layer.router, layer.top_k) for name, layer in moe_layers(model).items()}
    routers.update({name: (block.mob_router, block.layout.active) for name, block in group_routers(model).items()})
    try:
        for name, (router, k) in routers.items():
            def hook(module, args, output, name=name, k=k):
                records.append(RoutedForward(name, output, k))

            handles.append(router.register_forward_hook(hook))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def router_losses(records: list[RoutedForward]) -> dict[str, torch.Tensor]:
    """Mean over the recorded forwards of the load-balancing loss and the router z-loss (empty: no MoE)."""
    if not records:
        return {}
    return {"balance": torch.stack([balance_loss(r.logits, r.top_k) for r in records]).mean(),
            "router_z": torch.stack([z_loss(r.logits) for r in records]).mean()}


class ExpertLoad:
    """Assignments per (layer, timestep bin, expert), accumulated over forwards, and router entropy."""

    def __init__(self, max_timestep: float = 1000.0, bins: int = TIMESTEP_BINS) -> None:
        self.max_timestep, self.bins = max_timestep, bins
        self.counts: dict[str, torch.Tensor] = {}
        self.entropy_sum, self.entropy_n = 0.0, 0

    @torch.no_grad()
    def add(self, records: list[RoutedForward], timestep: torch.Tensor) -> None:
        """Count the records' top-k choices; ``timestep`` ``[B]`` of the batch (each sample's tokens are a
        contiguous ``N / B`` rows of the logits)."""
        bins = (timestep.float().cpu() / self.max_timestep * self.bins).long().clamp(0, self.bins - 1)
        for r in records:
            probs, chosen = top_k(r.logits.detach().reshape(-1, r.logits.shape[-1]), r.top_k)
            experts = probs.shape[-1]
            sample_bins = bins.repeat_interleave(len(chosen) // len(bins)).to(chosen.device)
            flat = (sample_bins[:, None] * experts + chosen).reshape(-1).cpu()
            counts = torch.bincount(flat, minlength=self.bins * experts).view(self.bins, experts)
            self.counts[r.layer] = self.counts.get(r.layer, torch.zeros_like(counts)) + counts
            self.entropy_sum += float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).sum())
            self.entropy_n += len(probs)

    def fractions(self) -> dict[str, list[list[float]]]:
        """Per layer, per timestep bin, each expert's share of the bin's assignments."""
        return {name: (c / c.sum(-1, keepdim=True).clamp_min(1)).tolist() for name, c in self.counts.items()}

    def summary(self) -> dict:
        """Mean router entropy (nats) and, per timestep bin, the busiest expert's share averaged over layers
        (``1 / experts`` when perfectly balanced)."""
        if not self.counts:
            return {}
        busiest = torch.stack([(c / c.sum(-1, keepdim=True).clamp_min(1)).max(-1).values for c in self.counts.values()])
        return {"router_entropy": self.entropy_sum / max(self.entropy_n, 1),
                "busiest_share_per_bin": busiest.mean(0).tolist(),
                "experts": max(c.shape[-1] for c in self.counts.values()), "bins": self.bins}
