"""The mixture-of-experts FFN that replaces a dense one: routed experts, an optional shared expert, a router.

Stored natively (plain tensors, stock ``save_pretrained``): ``experts.{i}.up.*``, ``experts.{i}.down.weight``,
``shared.up.*`` / ``shared.down.weight``, ``router.weight`` / ``router.bias`` and ``bias`` (the dense down
projection's bias, added once). Its shape is a :class:`MoELayout`, which the checkpoint's structure manifest
records per layer (:mod:`compressdit.io.structure`) so that ``from_pretrained`` rebuilds the layer before loading.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.moe.routing import GATES, dispatch, run_grouped, top_k

ACTIVATIONS = {"gelu": F.gelu, "gelu-tanh": functools.partial(F.gelu, approximate="tanh")}


@dataclass
class MoELayout(StrictConfig):
    """The shape of one MoE FFN (one entry of the checkpoint's ``structure.moe``)::

        {dim: 128, dim_out: 128, experts: 7, expert_hidden: 64, shared_hidden: 64, top_k: 3,
         activation: gelu-tanh, bias: true, gating: unit}

    ``experts`` routed experts of ``expert_hidden`` neurons each, ``top_k`` of them per token, plus an always-on
    shared expert of ``shared_hidden`` neurons (0: none). ``gating``: ``unit`` (gates of value 1, gradient of the
    router's log-probabilities) or ``softmax`` (chosen probabilities renormalised to sum to ``top_k``).
    """

    dim: int
    dim_out: int
    experts: int
    expert_hidden: int
    top_k: int
    shared_hidden: int = 0
    activation: str = "gelu-tanh"
    bias: bool = True
    gating: Literal["unit", "softmax"] = "unit"

    def validate(self, where: str) -> None:
        self.require_positive(where, "dim", "dim_out", "experts", "expert_hidden", "top_k")
        self.require_non_negative(where, "shared_hidden")
        if self.top_k > self.experts:
            raise ConfigError(f"{where}: top_k {self.top_k} exceeds the {self.experts} routed experts")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{where}.activation: unknown {self.activation!r}; known: {', '.join(ACTIVATIONS)}")

    def parameters_per_token(self) -> int:
        """Parameters a token's forward touches: router, shared expert, ``top_k`` routed experts, bias."""
        expert = self.dim * self.expert_hidden + self.expert_hidden * self.dim_out + self.bias * self.expert_hidden
        shared = self.dim * self.shared_hidden + self.shared_hidden * self.dim_out + self.bias * self.shared_hidden
        return self.dim * self.experts + self.experts + shared + self.top_k * expert + self.bias * self.dim_out


class Expert(nn.Module):
    """``down(act(up(x)))`` without the down projection's bias (the MoE layer adds it once)."""

    def __init__(self, dim: int, hidden: int, dim_out: int, activation: str, bias: bool) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim_out, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(ACTIVATIONS[self.activation](self.up(x)))


class MoEFeedForward(nn.Module):
    """Drop-in for a diffusers ``FeedForward``: ``forward(hidden_states) -> hidden_states`` of width ``dim_out``.

    Tokens are grouped by expert (:mod:`compressdit.moe.routing`, dropless). With ``top_k == experts`` and
    unit gates it computes exactly the dense FFN it was split from (up to float summation order).
    """

    def __init__(self, layout: MoELayout) -> None:
        super().__init__()
        self.layout = layout
        self.top_k = layout.top_k
        make = functools.partial(Expert, layout.dim, dim_out=layout.dim_out, activation=layout.activation,
                                 bias=layout.bias)
        self.experts = nn.ModuleList([make(layout.expert_hidden) for _ in range(layout.experts)])
        self.shared = make(layout.shared_hidden) if layout.shared_hidden else None
        self.router = nn.Linear(layout.dim, layout.experts)
        self.bias = nn.Parameter(torch.zeros(layout.dim_out)) if layout.bias else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates ``[N, k]`` and chosen experts ``[N, k]`` of the tokens ``x`` ``[N, dim]``."""
        probs, chosen = top_k(self.router(x), self.top_k)
        return GATES[self.layout.gating](probs, chosen), chosen

    def _gates_needed(self) -> bool:
        """Unit gates are exactly 1: only their gradient (to the router) needs them computed."""
        return self.layout.gating != "unit" or (torch.is_grad_enabled() and self.router.weight.requires_grad)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self._gates_needed():
            gates, chosen = self.route(x)
        else:
            gates, chosen = None, self.router(x).topk(self.top_k, dim=-1).indices
        if self.shared is not None:  # the output starts as shared expert + bias; routed experts add into it
            out = self.shared(x) if self.bias is None else self.shared(x) + self.bias
        else:
            out = x.new_zeros(x.shape[0], self.layout.dim_out) if self.bias is None else \
                self.bias.expand(x.shape[0], -1).clone()
        out = run_grouped(x, dispatch(chosen, gates, len(self.experts)), list(self.experts), out)
        return out.reshape(*shape[:-1], self.layout.dim_out)

    def extra_repr(self) -> str:
        lay = self.layout
        return (f"experts={lay.experts}x{lay.expert_hidden}, top_k={self.top_k}, shared={lay.shared_hidden}, "
                f"activation={lay.activation}, gating={lay.gating}")


def moe_layers(model: nn.Module) -> dict[str, MoEFeedForward]:
    """Every MoE FFN of ``model`` by fully qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEFeedForward)}



def activated_parameters(model: nn.Module) -> int:
    """Parameters one token's forward uses: every parameter, less the routed experts a token skips."""
    total = sum(p.numel() for p in model.parameters())
    for layer in moe_layers(model).values():
        total -= sum(p.numel() for p in layer.parameters()) - layer.layout.parameters_per_token()
    return total
