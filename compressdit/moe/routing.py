"""Routing primitives (pure functions, no modules): top-k choice, gates, grouped dispatch, router losses.

Execution groups the tokens by expert: the ``N * k`` (token, expert) assignments are sorted by expert
(:func:`dispatch`), each expert gathers its tokens (``index_select``), runs its matmuls on them, and adds its
gated output back into the layer's output (``index_add_``, :func:`run_grouped`). No Python loop runs over tokens,
only over experts. Per-expert gathers keep every temporary small (at the zoo's sizes, one gather of all ``N * k``
rows plus one ``cat`` cost more than the experts' own matmuls saved), and unit gates (exactly 1) are skipped where
no gradient flows (``gates=None``).

Capacity: execution is *dropless* — every token reaches all of its ``k`` experts whatever the load (the slices
simply have different lengths), so no token is dropped or padded and the output does not depend on the batch.
Load imbalance costs time, not quality; the load-balancing loss (:func:`balance_loss`) keeps it in check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Dispatch:
    """The ``N * k`` (token, expert) assignments grouped by expert: ``tokens[e]`` the tokens expert ``e`` serves
    (ascending), ``gates[e]`` their gates (``None``: all exactly 1)."""

    tokens: list[torch.Tensor]
    gates: list[torch.Tensor] | None

    @property
    def counts(self) -> list[int]:
        return [len(t) for t in self.tokens]


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router probabilities (softmax over all experts, float32) and the indices of the ``k`` largest logits."""
    probs = logits.float().softmax(-1)
    return probs, logits.topk(k, dim=-1).indices


def unit_gates(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Gates of value exactly 1 whose gradient is that of the chosen experts' log-probabilities
    (``p / stop_grad(p)``): a full top-k reproduces the dense FFN exactly, and the router still learns."""
    picked = probs.gather(-1, chosen).clamp_min(torch.finfo(probs.dtype).tiny)
    return picked / picked.detach()


def softmax_gates(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The chosen experts' probabilities renormalised to sum to ``k`` (so a uniform router gives unit gates)."""
    picked = probs.gather(-1, chosen)
    return picked * (chosen.shape[-1] / picked.sum(-1, keepdim=True))


GATES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"unit": unit_gates,
                                                                          "softmax": softmax_gates}


def dispatch(chosen: torch.Tensor, gates: torch.Tensor | None, experts: int) -> Dispatch:
    """Sort the assignments ``chosen`` ``[N, k]`` (expert indices) by expert (stable: token order kept) and cut
    them into one slice per expert; ``gates`` ``[N, k]`` follow (``None``: unit gates, nothing to multiply)."""
    flat = chosen.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=experts).tolist()
    tokens = (order // chosen.shape[-1]).split(counts)
    return Dispatch(tokens=list(tokens),
                    gates=None if gates is None else list(gates.reshape(-1)[order].split(counts)))


def run_grouped(x: torch.Tensor, plan: Dispatch, experts: list[Callable[[torch.Tensor], torch.Tensor]],
                out: torch.Tensor) -> torch.Tensor:
    """Add ``sum over chosen e of gate * expert_e(x)`` per token of ``x`` ``[N, d]`` into ``out`` ``[N, d_out]``
    (in place; returned): per expert, gather its tokens, one call, gate, scatter-add. Experts without tokens
    are not called."""
    for e, (expert, tokens) in enumerate(zip(experts, plan.tokens)):
        if not len(tokens):
            continue
        y = expert(x.index_select(0, tokens))
        if plan.gates is not None:
            y = y * plan.gates[e].unsqueeze(-1).to(y.dtype)
        out.index_add_(0, tokens, y)
    return out


def load_fractions(chosen: torch.Tensor, experts: int) -> torch.Tensor:
    """Fraction of all assignments that went to each expert (sums to 1)."""
    counts = torch.bincount(chosen.reshape(-1), minlength=experts).float()
    return counts / counts.sum().clamp_min(1.0)


def balance_loss(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (Fedus et al., arXiv 2101.03961): ``f_e``
    the fraction of assignments to expert ``e`` (top-k, no gradient), ``P_e`` its mean router probability.
    Equals 1 for a perfectly balanced router and grows with imbalance."""
    logits = logits.reshape(-1, logits.shape[-1])
    probs, chosen = top_k(logits, k)
    experts = logits.shape[-1]
    return experts * (load_fractions(chosen, experts) * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE, Zoph et al., arXiv 2202.08906): keeps logits small."""
    return logits.float().logsumexp(-1).pow(2).mean()
