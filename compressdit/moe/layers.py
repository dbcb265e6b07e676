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
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.moe.cpu_native import moe_ffn
from compressdit.moe.routing import GATES, ExpertWeights, dispatch, run_grouped, run_grouped_linear, top_k
from compressdit.moe.stacked import StackedExperts, run_stacked, stack, stackable, weights_key

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


def _unhooked(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def _linear_parts(expert: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """``(up.weight, up.bias, down.weight)`` of an :class:`Expert` of plain ``nn.Linear``s without hooks (nor a
    replaced ``forward``), which can run on its weights without calling the modules; ``None`` for any other
    (quantized, LoRA-wrapped, hooked). Reads the module dicts directly: ``nn.Module.__getattr__`` costs more than
    the small matmuls' own overhead at the zoo's sizes."""
    if type(expert) is not Expert or not _unhooked(expert):
        return None
    up, down = expert._modules["up"], expert._modules["down"]
    if type(up) is not nn.Linear or type(down) is not nn.Linear or not (_unhooked(up) and _unhooked(down)):
        return None
    return up._parameters["weight"], up._parameters["bias"], down._parameters["weight"]


def _plain_linear(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` of a plain, unhooked ``nn.Linear``; ``None`` for any other module."""
    if type(linear) is not nn.Linear or not _unhooked(linear):
        return None
    return linear._parameters["weight"], linear._parameters["bias"]


class MoEFeedForward(nn.Module):
    """Drop-in for a diffusers ``FeedForward``: ``forward(hidden_states) -> hidden_states`` of width ``dim_out``.

    Tokens are grouped by expert (:mod:`compressdit.moe.routing`, dropless). On CPU without autograd, a layer of
    plain fp32 modules runs as one fused pass (:mod:`compressdit.moe.cpu_native`). Plain experts run on their weight
    tensors (:func:`~compressdit.moe.routing.run_grouped_linear`; small CPU layers without autograd through one
    grouped matmul per projection, :mod:`compressdit.moe.stacked`); quantized, wrapped or hooked experts run as
    modules (:func:`~compressdit.moe.routing.run_grouped`); all paths compute the same output. With
    ``top_k == experts`` and unit gates it computes exactly the dense FFN it was split from (up to float
    summation order).
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
        self._stacked: StackedExperts | None = None  # inference cache (compressdit.moe.stacked), not saved

    def _apply(self, fn, recurse=True):
        self._stacked = None  # moved or cast weights: the stacked copy is rebuilt on the next forward
        return super()._apply(fn, recurse)

    def _stacked_for(self, weights: ExpertWeights) -> StackedExperts:
        key = weights_key(weights)
        if self._stacked is None or self._stacked.key != key:
            self._stacked = stack(weights, key)
        return self._stacked

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates ``[N, k]`` and chosen experts ``[N, k]`` of the tokens ``x`` ``[N, dim]``."""
        probs, chosen = top_k(self.router(x), self.top_k)
        return GATES[self.layout.gating](probs, chosen), chosen

    def _gates_needed(self) -> bool:
        """Unit gates are exactly 1: only their gradient (to the router) needs them computed."""
        return self.layout.gating != "unit" or (torch.is_grad_enabled() and self.router.weight.requires_grad)

    def _plain_experts(self) -> ExpertWeights | None:
        """The routed experts as weight tensors when all are plain (:func:`_linear_parts`), else ``None``."""
        if _global_forward_hooks or _global_forward_pre_hooks:
            return None
        parts = [_linear_parts(expert) for expert in self.experts._modules.values()]
        if None in parts:
            return None
        ups, biases, downs = zip(*parts)
        return ExpertWeights(up=list(ups), up_bias=list(biases), down=list(downs),
                             activation=ACTIVATIONS[self.layout.activation])

    def _shared_and_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The output buffer the routed experts add into: shared expert + bias (or the bias, or zeros)."""
        shared, bias = self.shared, self.bias
        if shared is None:
            return x.new_zeros(x.shape[0], self.layout.dim_out) if bias is None else bias.expand(x.shape[0], -1).clone()
        parts = None if _global_forward_hooks or _global_forward_pre_hooks else _linear_parts(shared)
        if parts is None:
            return shared(x) if bias is None else shared(x) + bias
        up, up_bias, down = parts
        hidden = ACTIVATIONS[self.layout.activation](F.linear(x, up, up_bias))
        return F.linear(hidden, down) if bias is None else torch.addmm(bias, hidden, down.t())

    def _native(self, x: torch.Tensor, weights: ExpertWeights | None) -> torch.Tensor | None:
        """The layer through :func:`~compressdit.moe.cpu_native.moe_ffn` when it serves this call (no autograd,
        plain router, shared expert and experts, stackable), else ``None``."""
        if torch.is_grad_enabled() or weights is None or not stackable(x, weights):
            return None
        router = _plain_linear(self.router)
        shared = None if self.shared is None else _linear_parts(self.shared)
        if router is None or (shared is None and self.shared is not None):
            return None
        gates = None if self.layout.gating == "unit" else GATES[self.layout.gating]
        return moe_ffn(x, router, self.top_k, shared, self._stacked_for(weights), self.bias,
                       ACTIVATIONS[self.layout.activation], self.layout.activation, gates)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        weights = self._plain_experts()
        out = self._native(x, weights)
        if out is not None:
            return out.reshape(*shape[:-1], self.layout.dim_out)
        if self._gates_needed():
            gates, chosen = self.route(x)
        else:
            gates, chosen = None, self.router(x).topk(self.top_k, dim=-1).indices
        out = self._shared_and_bias(x)  # the routed experts add into it
        plan = dispatch(chosen, gates, len(self.experts))
        if weights is None:
            out = run_grouped(x, plan, list(self.experts), out)
        elif stackable(x, weights):
            out = run_stacked(x, plan, weights, self._stacked_for(weights), out)
        else:
            out = run_grouped_linear(x, plan, weights, out)
        return out.reshape(*shape[:-1], self.layout.dim_out)

    def extra_repr(self) -> str:
        lay = self.layout
        return (f"experts={lay.experts}x{lay.expert_hidden}, top_k={self.top_k}, shared={lay.shared_hidden}, "
                f"activation={lay.activation}, gating={lay.gating}")


class TailSum(nn.Module):
    """``proj(x[..., :head]) + x[..., head:]``: a block's fused output projection once Dense2MoE has turned the
    parallel MLP it also projected into a :class:`MoEFeedForward` (FLUX single-stream blocks: ``proj_out`` of
    ``cat([attention, mlp])``). The MoE already ends in the down projection and the fused bias, so the tail of the
    input (``out_features`` wide) is added as it is and ``proj`` keeps the head's columns, without bias: a plain
    ``nn.Linear`` that quantization, pruning and LoRA see as any other. Stored as ``proj.weight``."""

    def __init__(self, head_features: int, out_features: int) -> None:
        super().__init__()
        self.head_features, self.out_features = head_features, out_features
        self.proj = nn.Linear(head_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.head_features
        return self.proj(x[..., :head]) + x[..., head:]

    def extra_repr(self) -> str:
        return f"head_features={self.head_features}, out_features={self.out_features}"


def moe_layers(model: nn.Module) -> dict[str, MoEFeedForward]:
    """Every MoE FFN of ``model`` by fully qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEFeedForward)}



def activated_parameters(model: nn.Module) -> int:
    """Parameters one token's forward uses: every parameter, less the routed experts a token skips."""
    total = sum(p.numel() for p in model.parameters())
    for layer in moe_layers(model).values():
        total -= sum(p.numel() for p in layer.parameters()) - layer.layout.parameters_per_token()
    return total
