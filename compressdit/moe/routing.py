"""Routing primitives (pure functions, no modules): top-k choice, gates, grouped dispatch, router losses.

Execution groups the tokens by expert: the ``N * k`` (token, expert) assignments are sorted by expert
(:func:`dispatch`, one sort, one host sync for the counts), one ``index_select`` gathers them into a buffer grouped
by expert, each expert runs its matmuls on its contiguous slice, and one gated ``index_add_`` adds the results
back into the layer's output (:func:`run_grouped`). No Python loop runs over tokens, only over experts; for plain
linear experts (:func:`run_grouped_linear`) the loop is one ``addmm``/``mm`` per expert and projection on weight
tensors (no module calls), with a single activation call over all experts' hidden rows. Unit gates (exactly 1) are
skipped where no gradient flows (``gates=None``).

Capacity: execution is *dropless* — every token reaches all of its ``k`` experts whatever the load (the slices
simply have different lengths), so no token is dropped or padded and the output does not depend on the batch.
Load imbalance costs time, not quality; the load-balancing loss (:func:`balance_loss`) keeps it in check.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Dispatch:
    """The ``N * k`` (token, expert) assignments grouped by expert: ``rows[i]`` the token of the ``i``-th assignment,
    expert by expert (each expert's tokens ascending), ``row_experts[i]`` its expert, ``counts[e]`` how many expert
    ``e`` serves, ``row_gates`` their gates in the same order (``None``: all exactly 1)."""

    rows: torch.Tensor
    row_experts: torch.Tensor
    counts: list[int]
    row_gates: torch.Tensor | None = None

    def offsets(self) -> torch.Tensor:
        """Where each expert's rows end (``int32``, the ``offs`` of ``torch._grouped_mm``)."""
        return torch.tensor(list(itertools.accumulate(self.counts)), dtype=torch.int32, device=self.rows.device)

    @property
    def tokens(self) -> list[torch.Tensor]:
        """The tokens of each expert."""
        return list(self.rows.split(self.counts))

    @property
    def gates(self) -> list[torch.Tensor] | None:
        """The gates of each expert's tokens (``None``: all exactly 1)."""
        return None if self.row_gates is None else list(self.row_gates.split(self.counts))


@dataclass
class ExpertWeights:
    """Plain linear experts as tensors: expert ``e`` is ``down[e] @ act(up[e] @ x + up_bias[e])``."""

    up: list[torch.Tensor]
    up_bias: list[torch.Tensor | None]
    down: list[torch.Tensor]
    activation: Callable[[torch.Tensor], torch.Tensor]


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
    """Sort the assignments ``chosen`` ``[N, k]`` (expert indices) by expert (stable: token order kept); ``gates``
    ``[N, k]`` follow (``None``: unit gates, nothing to multiply). One host sync: the per-expert counts."""
    flat = chosen.reshape(-1)
    row_experts, order = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts).tolist()
    return Dispatch(rows=order // chosen.shape[-1], row_experts=row_experts, counts=counts,
                    row_gates=None if gates is None else gates.reshape(-1)[order])


def scatter_back(y: torch.Tensor, plan: Dispatch, out: torch.Tensor) -> torch.Tensor:
    """Add the grouped rows ``y`` ``[N * k, d_out]``, gated, into their tokens' rows of ``out`` (in place)."""
    if plan.row_gates is not None:
        y = y * plan.row_gates.unsqueeze(-1).to(y.dtype)
    return out.index_add_(0, plan.rows, y)


def run_grouped(x: torch.Tensor, plan: Dispatch, experts: list[Callable[[torch.Tensor], torch.Tensor]],
                out: torch.Tensor) -> torch.Tensor:
    """Add ``sum over chosen e of gate * expert_e(x)`` per token of ``x`` ``[N, d]`` into ``out`` ``[N, d_out]``
    (in place; returned): one gather of the grouped rows, one call per expert on its contiguous slice, one gated
    scatter-add. Experts without tokens are not called."""
    xs = x.index_select(0, plan.rows)
    parts = [expert(chunk) for expert, chunk in zip(experts, xs.split(plan.counts)) if len(chunk)]
    if not parts:
        return out
    return scatter_back(torch.cat(parts) if len(parts) > 1 else parts[0], plan, out)


def _linears(chunks: list[torch.Tensor], counts: list[int], weights: list[torch.Tensor],
             biases: list[torch.Tensor | None], out: torch.Tensor | None) -> torch.Tensor:
    """``chunk @ weight.T + bias`` per non-empty chunk, stacked: into ``out``'s row slices when given (no autograd),
    else concatenated."""
    if out is None:
        return torch.cat([torch.nn.functional.linear(c, w, b)
                          for c, n, w, b in zip(chunks, counts, weights, biases) if n])
    for c, n, w, b, o in zip(chunks, counts, weights, biases, out.split(counts)):
        if n:
            torch.mm(c, w.t(), out=o) if b is None else torch.addmm(b, c, w.t(), out=o)
    return out


def run_grouped_linear(x: torch.Tensor, plan: Dispatch, experts: ExpertWeights, out: torch.Tensor) -> torch.Tensor:
    """:func:`run_grouped` for plain linear experts, on their weight tensors: one gather, the up projections of
    all experts into one buffer, one activation call, the down projections into another, one gated scatter-add.
    Without autograd the matmuls write straight into the buffers' row slices (no ``cat``)."""
    rows, counts = plan.rows.shape[0], plan.counts
    if not rows:
        return out
    xs = x.index_select(0, plan.rows)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *experts.up, *experts.down))
    hidden, y = (None, None) if grad else (xs.new_empty(rows, experts.up[0].shape[0]),
                                           xs.new_empty(rows, experts.down[0].shape[0]))
    hidden = experts.activation(_linears(xs.split(counts), counts, experts.up, experts.up_bias, hidden))
    y = _linears(hidden.split(counts), counts, experts.down, [None] * len(counts), y)
    return scatter_back(y, plan, out)


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
