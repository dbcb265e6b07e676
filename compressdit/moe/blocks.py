"""Mixture of Blocks (MoB, Dense2MoE: Zheng et al., ICCV 2025, arXiv 2510.09094): each sample runs only some of a
stack's blocks.

A stack's blocks are cut into consecutive groups of ``group`` blocks; a router per group reads the hidden states
entering the group (pooled over tokens: their mean and standard deviation, which carry the noise level and so the
timestep, layer-normalised) and picks the ``active`` blocks each sample runs. A skipped block is the identity for
that sample; a chosen block's output is ``g * block(x) + (1 - g) * x`` with the unit gate ``g`` (value 1, the
gradient of the router's log-probability, :func:`compressdit.moe.routing.unit_gates`), so with ``active == group``
the model equals the dense one exactly, and the router learns from the distillation loss. Each block runs once, on
the samples that chose it (gathered along the batch, scattered back): the compute per sample falls with the blocks
it skips.

Storage: a :class:`RoutedBlock` shares its block's parameter, buffer and child dictionaries, so every tensor
keeps its stock name (``transformer_blocks.3.attn1.to_q.weight``) and the router adds
``transformer_blocks.{first block of the group}.mob_router.{weight,bias}``. The checkpoint's structure manifest
records each stack's :class:`MoBLayout` (``structure.mob``) so that stock ``from_pretrained`` rebuilds the routed
blocks after ``import compressdit``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.models.base import BlockStack
from compressdit.moe.layers import activated_parameters as per_token
from compressdit.moe.routing import top_k, unit_gates

HIDDEN = "hidden_states"  # the block argument the router reads (the image stream of every family)


@dataclass
class MoBLayout(StrictConfig):
    """The routed shape of one block stack (one entry of the checkpoint's ``structure.mob``, keyed by the stack's
    attribute)::

        transformer_blocks: {blocks: 12, group: 4, active: 2, features: 256}

    ``blocks`` in the stack, cut into groups of ``group`` consecutive blocks of which ``active`` run per sample;
    ``features``: the router's input width (twice the hidden width: pooled mean and standard deviation).
    """

    blocks: int
    group: int
    active: int
    features: int

    def validate(self, where: str) -> None:
        self.require_positive(where, "blocks", "group", "active", "features")
        if self.active > self.group:
            raise ConfigError(f"{where}: active {self.active} exceeds the group of {self.group} blocks; choose "
                              f"active <= group")
        if self.blocks % self.group:
            raise ConfigError(f"{where}: the stack's {self.blocks} blocks do not split into groups of {self.group}; "
                              "choose a group size that divides the block count")

    def groups(self) -> int:
        return self.blocks // self.group



def pooled_features(hidden: torch.Tensor) -> torch.Tensor:
    """The router input of hidden states ``[B, ..., D]``: mean and standard deviation over every token axis,
    concatenated and layer-normalised (no affine), float32 ``[B, 2 D]``."""
    flat = hidden.float().reshape(len(hidden), -1, hidden.shape[-1])
    feats = torch.cat([flat.mean(1), flat.std(1, correction=0)], -1)
    return F.layer_norm(feats, feats.shape[-1:])


class GroupRoute:
    """One group's routing decision for the forward in progress (set by the group's first block, read by its
    others): per sample and block, whether it runs and its gate; and the router logits of the decision."""

    def __init__(self) -> None:
        self.keep: torch.Tensor | None = None
        self.gates: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def decide(self, router: nn.Linear, hidden: torch.Tensor, active: int) -> torch.Tensor:
        """Route the samples of ``hidden`` (the group's input); the logits ``[B, group]``."""
        logits = router(pooled_features(hidden).to(router.weight.dtype))
        probs, chosen = top_k(logits, active)
        gates = unit_gates(probs, chosen)
        self.gates = torch.zeros_like(probs).scatter(1, chosen, gates)
        self.keep = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device).scatter(1, chosen, True)
        self.logits = logits
        return logits


class RoutedBlock(nn.Module):
    """A transformer block that runs only for the samples its group's router chose (identity for the others).

    It shares the block's ``_parameters``, ``_buffers`` and ``_modules`` (state-dict names and submodule
    replacement, e.g. Dense2MoE or quantization, act on the block itself); the group's first block also holds the
    router, ``mob_router``. Attributes the model reads from a block (DiT's head reads ``norm1.emb`` of block 0)
    resolve to the shared children.
    """

    def __init__(self, block: nn.Module, stack: BlockStack, position: int, route: GroupRoute, layout: MoBLayout,
                 router: nn.Linear | None = None) -> None:
        super().__init__()
        self.__dict__["inner"] = block  # not a child: its children are ours
        for shared in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            self.__dict__[shared] = block.__dict__[shared]
        if router is not None:
            self.mob_router = router
        self.__dict__.update(stack=stack, position=position, route=route, layout=layout,
                             signature=inspect.signature(block.forward))

    def train(self, mode: bool = True) -> "RoutedBlock":
        self.inner.training = mode
        return super().train(mode)

    def forward(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        values = bound.arguments
        hidden = values[HIDDEN]
        if self.position == 0:
            self.route.decide(self.mob_router, hidden, self.layout.active)
        keep, gates = self.route.keep[:, self.position], self.route.gates[:, self.position]
        streams = {name: values[name] for name in self.stack.returns}
        if not bool(keep.any()):
            return self.stack.pack(streams)
        batch = len(hidden)
        index = None if bool(keep.all()) else keep.nonzero().squeeze(1)
        if index is not None:  # the chosen samples only: every per-sample tensor argument, gathered
            for name, value in values.items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
                    values[name] = value.index_select(0, index)
        outputs = self.stack.unpack(self.inner(*bound.args, **bound.kwargs))
        g = gates if index is None else gates.index_select(0, index)
        mixed = {}
        for name, x in streams.items():
            y = outputs[name]
            gate = g.to(y.dtype).reshape(-1, *[1] * (y.dim() - 1))
            x_part = x if index is None else x.index_select(0, index)
            out = gate * y + (1 - gate) * x_part  # exactly y where the gate is 1 (its value always is)
            mixed[name] = out if index is None else x.index_copy(0, index, out)
        return self.stack.pack(mixed)

    def extra_repr(self) -> str:
        lay = self.layout
        return f"{type(self.inner).__name__}, group position {self.position}, {lay.active} of {lay.group} active"


def routed_stacks(model: nn.Module) -> dict[str, list[RoutedBlock]]:
    """The routed blocks of every stack that has them, by stack attribute."""
    out: dict[str, list[RoutedBlock]] = {}
    for name, module in model.named_children():
        if isinstance(module, nn.ModuleList) and module and all(isinstance(b, RoutedBlock) for b in module):
            out[name] = list(module)
    return out


def route_blocks(model: nn.Module, stack: BlockStack, layout: MoBLayout) -> list[RoutedBlock]:
    """Wrap every block of ``model.<stack.attribute>`` in place (empty routers: fill them, or load weights)."""
    blocks = getattr(model, stack.attribute)
    if len(blocks) != layout.blocks:
        raise ConfigError(f"mob: {stack.attribute} has {len(blocks)} blocks but the layout lists {layout.blocks}")
    param = next(blocks.parameters())
    routed = []
    for g in range(layout.groups()):
        route = GroupRoute()
        router = nn.Linear(layout.features, layout.group, device=param.device, dtype=torch.float32)
        for j in range(layout.group):
            i = g * layout.group + j
            routed.append(RoutedBlock(blocks[i], stack, j, route, layout, router if j == 0 else None))
            blocks[i] = routed[-1]
    return routed


def group_routers(model: nn.Module) -> dict[str, RoutedBlock]:
    """The first block of every routed group (it holds the group's ``mob_router``), keyed by the router's name."""
    return {f"{attr}.{i}.mob_router": block
            for attr, blocks in routed_stacks(model).items() for i, block in enumerate(blocks) if block.position == 0}


def activated_parameters(model: nn.Module) -> int:
    """Parameters one sample's forward uses per token on average: every parameter, less the routed experts a token
    skips (Dense2MoE) and, in routed stacks, the ``(group - active) / group`` share of each block (routers
    counted in full). Exact when the blocks of a group are of one size."""
    total = per_token(model)
    for blocks in routed_stacks(model).values():
        for block in blocks:
            router = getattr(block, "mob_router", None)
            own = per_token(block) - (sum(p.numel() for p in router.parameters()) if router is not None else 0)
            total -= own * (block.layout.group - block.layout.active) / block.layout.group
    return round(total)
