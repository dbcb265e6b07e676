"""Dense -> Mixture of Blocks: route every block stack the adapter lists (:mod:`compressdit.moe.blocks`), routers
initialised from the dense model's per-sample block importance.

Initialisation: on calibration samples (noised latents at random timesteps) the dense model runs every block;
block ``b``'s importance for sample ``s`` is its relative update ``||block(x) - x|| / ||x||``. Each group's router
is the ridge regression of its blocks' importances (scaled to unit spread) on the pooled features the router reads,
so at the start a sample runs the blocks that change its hidden states most at its noise level, and distillation
(:mod:`compressdit.distill.trainer`, with the group feature loss ``layer_map: groups``) refines the choice.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from compressdit.distill.sources import CalibrationDraws
from compressdit.errors import CalibrationError, ConfigError
from compressdit.models.base import BlockStack, ModelAdapter
from compressdit.moe.blocks import HIDDEN, MoBLayout, pooled_features, route_blocks, routed_stacks


@dataclass
class MoBConfig(CalibrationDraws):
    """How every block stack becomes a mixture of blocks. YAML::

        - mob: {group: 4, active: 2, batches: 4, batch_size: 64, data: auto}

    Groups of ``group`` consecutive blocks (it must divide every stack's block count), ``active`` of them run
    per sample. The router initialisation reads ``batches`` x ``batch_size`` noised latents of ``data`` at random
    timesteps (``ridge``: the regularisation, relative to the features' mean variance).
    """

    group: int = 4
    active: int = 2
    ridge: float = 0.1

    def validate(self, where: str) -> None:
        self.validate_draws(where)
        self.require_positive(where, "group", "active")
        if self.active > self.group:
            raise ConfigError(f"{where}: active {self.active} exceeds group {self.group}; choose active <= group")
        if self.ridge < 0:
            raise ConfigError(f"{where}.ridge: must be >= 0, got {self.ridge}")


@contextmanager
def record_blocks(model: nn.Module, stacks: Iterable[BlockStack]) -> Iterator[dict[str, list[tuple]]]:
    """Inside the ``with``, each stack's list fills with ``(input hidden states, output hidden states)`` per block
    call, in call order; the hooks are removed on exit."""
    records: dict[str, list[tuple]] = {s.attribute: [] for s in stacks}
    handles = []
    try:
        for stack in stacks:
            for block in getattr(model, stack.attribute):
                signature = inspect.signature(block.forward)

                def hook(module, args, kwargs, output, stack=stack, signature=signature):
                    hidden = signature.bind(*args, **kwargs).arguments[HIDDEN]
                    records[stack.attribute].append((hidden.detach(), stack.unpack(output)[HIDDEN].detach()))

                handles.append(block.register_forward_hook(hook, with_kwargs=True))
        yield records
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def block_statistics(model: nn.Module, adapter: ModelAdapter, stacks: list[BlockStack],
                     batches: Iterable) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per stack: the router features of every block's input ``[blocks, samples, F]`` and every block's
    per-sample importance ``[blocks, samples]`` over ``batches`` of ``CalibrationBatch``es."""
    feats: dict[str, list[torch.Tensor]] = {s.attribute: [] for s in stacks}
    importance: dict[str, list[torch.Tensor]] = {s.attribute: [] for s in stacks}
    for batch in batches:
        with record_blocks(model, stacks) as records:
            adapter.predict(model, batch.latents, batch.timestep, batch.cond)
        for stack in stacks:
            calls = records[stack.attribute]
            feats[stack.attribute].append(torch.stack([pooled_features(x).cpu() for x, _ in calls]))
            change = [((y.float() - x.float()).flatten(1).norm(dim=1) / x.float().flatten(1).norm(dim=1)
                       .clamp_min(1e-12)).cpu() for x, y in calls]
            importance[stack.attribute].append(torch.stack(change))
    if not any(feats.values()):
        raise CalibrationError("mob: no calibration batch reached the blocks")
    return {a: (torch.cat(feats[a], 1), torch.cat(importance[a], 1)) for a in feats}


def fit_router(router: nn.Linear, features: torch.Tensor, targets: torch.Tensor, ridge: float) -> None:
    """Ridge regression of ``targets`` ``[S, group]`` on ``features`` ``[S, F]`` into the router's weights."""
    mean_f, mean_t = features.mean(0), targets.mean(0)
    fc, tc = features - mean_f, targets - mean_t
    gram = fc.T @ fc
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    weight = torch.linalg.solve(gram + lam * torch.eye(len(gram)), fc.T @ tc).T  # [group, F]
    with torch.no_grad():
        router.weight.copy_(weight.to(router.weight))
        router.bias.copy_((mean_t - weight @ mean_f).to(router.bias))


def mixture_of_blocks(model: nn.Module, adapter: ModelAdapter, config: MoBConfig,
                      batches: Iterable | None = None) -> dict[str, MoBLayout]:
    """Route every stack of ``model`` (in place), routers fitted on ``batches``; the layouts by stack attribute."""
    if routed_stacks(model):
        raise ConfigError("mob: the model's blocks are already routed; run mob once")
    stacks = [s for s in adapter.block_stacks if len(getattr(model, s.attribute))]
    layouts = {}
    for stack in stacks:
        count = len(getattr(model, stack.attribute))
        if count % config.group:
            raise ConfigError(f"mob: {stack.attribute} has {count} blocks, which groups of {config.group} do not "
                              f"split; choose a group size that divides {count}")
    if batches is None:
        raise CalibrationError("mob: router initialisation needs calibration batches")
    stats = block_statistics(model, adapter, stacks, batches)
    for stack in stacks:
        feats, importance = stats[stack.attribute]
        count = len(importance)
        layout = MoBLayout(blocks=count, group=config.group, active=config.active, features=feats.shape[-1])
        routed = route_blocks(model, stack, layout)
        targets = importance / importance.std().clamp_min(1e-12)  # logits of unit spread
        for g in range(layout.groups()):
            first = g * layout.group
            fit_router(routed[first].mob_router, feats[first], targets[first:first + layout.group].T, config.ridge)
        layouts[stack.attribute] = layout
    return layouts


