"""Dense2MoE: turn each dense FFN into a mixture of experts with the same weights (Zheng et al., ICCV 2025,
arXiv 2510.09094; shared experts as DiT-MoE, feizc/DiT-MoE).

The FFN's ``H`` hidden neurons are cut into ``experts + shared_experts`` equal chunks: the
``shared_experts`` chunks of most important neurons form one always-on shared expert, the rest are clustered
into ``experts`` routed experts (:mod:`compressdit.moe.grouping`: Taylor importance across timesteps, or
co-activation). Each routed expert keeps its neurons' rows of the up projection and columns of the down
projection; the router's row for an expert is the centroid of its neurons' input weights (and biases), so at
initialisation it routes a token to the experts whose neurons it excites most on average. With all experts
active and unit gates the MoE computes the dense FFN exactly. A token activates ``(shared_experts + top_k) /
(experts + shared_experts)`` of the FFN's weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from compressdit.distill.sources import CalibrationDraws
from compressdit.errors import CalibrationError, ConfigError
from compressdit.models.base import DenseFFN, ModelAdapter
from compressdit.moe.grouping import NEURON_GROUPINGS, NeuronRecord, split_neurons
from compressdit.moe.layers import MoEFeedForward, MoELayout, TailSum


@dataclass
class Dense2MoEConfig(CalibrationDraws):
    """How the FFNs become MoE layers. YAML::

        - moe: {experts: 7, shared_experts: 1, top_k: 3, grouping: taylor, batches: 4, batch_size: 32}

    ``experts`` routed experts, ``top_k`` of them per token, plus ``shared_experts`` expert-sized chunks that
    form one always-on shared expert (0: none); ``experts + shared_experts`` must divide every FFN's hidden size.
    ``grouping``: ``taylor`` (needs gradients: the denoising loss on ``batches`` x ``batch_size`` noised latents
    of ``data``, random timesteps) or ``coactivation`` (activations only). ``gating``: ``unit`` or ``softmax``.
    """

    experts: int = 7
    top_k: int = 3
    shared_experts: int = 1
    grouping: str = "taylor"
    gating: Literal["unit", "softmax"] = "unit"
    batch_size: int = 32
    max_tokens: int = 8192  # activations kept per FFN for clustering (a seeded subsample beyond that)
    iterations: int = 10

    def validate(self, where: str) -> None:
        self.validate_draws(where)
        self.require_positive(where, "experts", "top_k", "max_tokens", "iterations")
        self.require_non_negative(where, "shared_experts")
        if self.top_k > self.experts:
            raise ConfigError(f"{where}: top_k {self.top_k} exceeds experts {self.experts}; choose top_k <= experts")
        if self.grouping not in NEURON_GROUPINGS:
            raise ConfigError(f"{where}.grouping: unknown {self.grouping!r}; known: {', '.join(NEURON_GROUPINGS)}")

    def chunks(self) -> int:
        return self.experts + self.shared_experts

    def activated_fraction(self) -> float:
        """Fraction of each FFN's weights a token uses (router not counted)."""
        return (self.shared_experts + self.top_k) / self.chunks()


@contextmanager
def record_hidden(ffns: dict[str, DenseFFN]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Inside the ``with``, each FFN's down projection input is appended per forward (a parallel MLP's: the fused
    projection's whole input, the hidden from ``down_offset`` on); the hooks are removed on exit."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in ffns}
    handles = []
    try:
        for name, ffn in ffns.items():
            handles.append(ffn.down.register_forward_pre_hook(
                lambda module, args, name=name: captured[name].append(args[0])))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def calibration_records(model: nn.Module, adapter: ModelAdapter, ffns: dict[str, DenseFFN], batches: Iterable,
                        needs_gradients: bool, max_tokens: int, seed: int = 0) -> dict[str, NeuronRecord]:
    """Hidden activations (and, with ``needs_gradients``, the gradients of the denoising MSE on them) of every
    FFN over ``batches`` of :class:`~compressdit.prune.width.CalibrationBatch`; no parameter gradient is kept."""
    acts: dict[str, list[torch.Tensor]] = {name: [] for name in ffns}
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in ffns}
    for batch in batches:
        with torch.set_grad_enabled(needs_gradients), record_hidden(ffns) as hidden:
            latents = batch.latents.detach().requires_grad_(needs_gradients)
            pred = adapter.predict(model, latents, batch.timestep, batch.cond)
            if needs_gradients:
                tensors = [hidden[n][0] for n in ffns]
                loss = F.mse_loss(pred.float(), batch.target.float())
                for (name, ffn), g in zip(ffns.items(), torch.autograd.grad(loss, tensors)):
                    g = g[..., ffn.down_offset:]
                    grads[name].append(g.detach().float().reshape(len(pred), -1, g.shape[-1]).cpu())
        for name, ffn in ffns.items():
            h = hidden[name][0][..., ffn.down_offset:].detach().float()
            acts[name].append(h.reshape(len(pred), -1, h.shape[-1]).cpu())
    if not any(acts.values()):
        raise CalibrationError("moe: no calibration batch reached the FFNs")
    records = {}
    for name, ffn in ffns.items():
        a = torch.cat(acts[name])
        g = torch.cat(grads[name]) if needs_gradients else None
        keep = max(1, max_tokens // a.shape[1])  # whole samples, at most max_tokens tokens
        index = torch.randperm(len(a), generator=torch.Generator().manual_seed(seed))[:keep].sort().values
        records[name] = NeuronRecord(a[index], None if g is None else g[index], ffn.down_weight().detach().cpu())
    return records


def layout_for(ffn: DenseFFN, config: Dense2MoEConfig, name: str) -> MoELayout:
    hidden = ffn.up.out_features
    if hidden % config.chunks():
        raise ConfigError(f"moe: {name} has {hidden} hidden neurons, which experts + shared_experts = "
                          f"{config.chunks()} does not divide; choose a divisor of {hidden}")
    size = hidden // config.chunks()
    return MoELayout(dim=ffn.up.in_features, dim_out=ffn.down.out_features, experts=config.experts,
                     expert_hidden=size, top_k=config.top_k, shared_hidden=size * config.shared_experts,
                     activation=ffn.activation, bias=ffn.up.bias is not None, gating=config.gating)


@torch.no_grad()
def build_moe(ffn: DenseFFN, layout: MoELayout, shared: torch.Tensor, groups: list[torch.Tensor]) -> MoEFeedForward:
    """The MoE FFN holding ``ffn``'s weights: routed expert ``e`` gets neurons ``groups[e]``, the shared expert
    ``shared``; the router rows are the centroids of each expert's up-projection rows (and biases)."""
    w1, w2 = ffn.up.weight, ffn.down_weight()
    b1 = ffn.up.bias
    moe = MoEFeedForward(layout).to(device=w1.device, dtype=w1.dtype)
    parts = [(moe.experts[e], groups[e]) for e in range(layout.experts)]
    parts += [(moe.shared, shared)] if moe.shared is not None else []
    for expert, idx in parts:
        idx = idx.to(w1.device)
        expert.up.weight.copy_(w1[idx])
        expert.down.weight.copy_(w2[:, idx])
        if b1 is not None:
            expert.up.bias.copy_(b1[idx])
    for e, idx in enumerate(groups):
        idx = idx.to(w1.device)
        moe.router.weight[e] = w1[idx].mean(0)
        moe.router.bias[e] = b1[idx].mean() if b1 is not None else 0.0
    if moe.bias is not None:
        moe.bias.copy_(ffn.down.bias if ffn.down.bias is not None else torch.zeros_like(moe.bias))
    return moe


def dense2moe(model: nn.Module, adapter: ModelAdapter, config: Dense2MoEConfig,
              batches: Iterable | None = None) -> dict[str, MoEFeedForward]:
    """Replace every FFN the adapter lists by its MoE split (in place); the new layers by name.

    ``batches`` (``CalibrationBatch``es) feed the neuron grouping; every FFN's hidden size is checked first.
    """
    ffns = adapter.feed_forwards(model)
    if not ffns:
        raise ConfigError(f"moe: the {adapter.family} adapter lists no FFN to split (ffn_modules)")
    layouts = {name: layout_for(ffn, config, name) for name, ffn in ffns.items()}
    if batches is None:
        raise CalibrationError("moe: neuron grouping needs calibration batches")
    grouping = NEURON_GROUPINGS.get(config.grouping)
    records = calibration_records(model, adapter, ffns, batches, grouping.needs_gradients, config.max_tokens,
                                  config.seed)
    converted = {}
    for name, ffn in ffns.items():
        layout = layouts[name]
        shared, groups = split_neurons(records[name], grouping, layout.experts, layout.shared_hidden,
                                       config.iterations, config.seed)
        converted[name] = build_moe(ffn, layout, shared, groups)
        replace_ffn(model, name, ffn, converted[name])
    return converted


@torch.no_grad()
def replace_ffn(model: nn.Module, name: str, ffn: DenseFFN, moe: MoEFeedForward) -> None:
    """Put ``moe`` in the place of the FFN ``name``; a parallel MLP's activation module becomes an identity and its
    fused output projection a :class:`~compressdit.moe.layers.TailSum` keeping the other branch's columns."""
    model.set_submodule(name, moe)
    if ffn.down_offset:
        weight = ffn.down.weight
        tail = TailSum(ffn.down_offset, ffn.down.out_features).to(device=weight.device, dtype=weight.dtype)
        tail.proj.weight.copy_(weight[:, :ffn.down_offset])
        model.set_submodule(ffn.activation_module, nn.Identity())
        model.set_submodule(ffn.down_module, tail)
