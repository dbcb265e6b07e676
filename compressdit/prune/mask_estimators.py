"""How a TinyFusion search draws per-sample keep masks and turns their losses into gradients for the logits.

A group of blocks has one logit per keep-pattern (``patterns[g]``: ``[C, size]`` 0/1 rows). Each estimator draws,
for every row of a batch, one pattern per group, and returns the masks ``{(stack, index): [rows]}`` with what it
needs to build the objective from the per-row losses ``[draws, samples]`` (row ``k * samples + b`` is sample ``b``
under its ``k``-th draw):

* ``straight_through`` (the paper's): hard Gumbel-softmax; the masks carry the gradient, so the mean loss
  differentiates to the logits through the gated blocks (a first-order estimate of removing a block).
* ``score_function``: patterns sampled from ``softmax(scaling * logits)``; the logits get the REINFORCE gradient
  of the expected loss with a leave-one-out baseline over the draws of the same sample (common noise, timestep
  and condition), the advantage divided by that sample's mean loss so every timestep counts alike. It measures
  what removing blocks costs (zeroth order) where the first-order estimate misleads.
* ``plackett_luce``: the same gradient, but a group holds one logit per *block*, not per pattern: the kept
  blocks are the ``N`` largest of ``scaling * logits`` + Gumbel noise (a Plackett-Luce draw without
  replacement; the log-probability is that of the drawn order). ``M`` numbers instead of ``C(M, N)`` make wide
  groups (``6:12``: 12 instead of 924) learnable in a few hundred steps.

Either way LoRA weights train on the mean loss through the masked forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from compressdit.prune.depth import BlockKey
from compressdit.registry import Registry


@dataclass(frozen=True)
class Group:
    """Consecutive ``blocks`` of one stack of which ``keep`` stay."""

    stack: str
    blocks: tuple[int, ...]
    keep: int


class MaskDraw(Protocol):
    masks: dict[BlockKey, torch.Tensor]

    def objective(self, losses: torch.Tensor) -> torch.Tensor:
        """The scalar to minimise, from per-row losses ``[draws, samples]``."""


class MaskEstimator(Protocol):
    min_draws: int  # draws per sample the objective needs

    def logit_count(self, table: torch.Tensor) -> int:
        """How many logits a group with keep-patterns ``table`` (``[C, M]``) holds."""

    def draw(self, groups: list[Group], patterns: list[torch.Tensor], logits: list[torch.Tensor],
             scaling: float, tau: float, rows: int) -> MaskDraw: ...

    def pattern_probabilities(self, table: torch.Tensor, logit: torch.Tensor, scaling: float) -> torch.Tensor:
        """The probability of each keep-pattern (``[C]``) under ``logit``."""

    def keep_probability(self, table: torch.Tensor, logit: torch.Tensor, scaling: float) -> torch.Tensor:
        """The probability that each block of the group stays (``[M]``)."""

    def decide(self, table: torch.Tensor, logit: torch.Tensor) -> int:
        """The keep-pattern (row of ``table``) the search settles on."""


MASK_ESTIMATORS: Registry[MaskEstimator] = Registry("tinyfusion mask estimator")


def _masks_from(groups: list[Group], keeps: list[torch.Tensor]) -> dict[BlockKey, torch.Tensor]:
    return {(group.stack, index): keep[:, j] for group, keep in zip(groups, keeps, strict=True)
            for j, index in enumerate(group.blocks)}


def draw_masks(groups: list[Group], patterns: list[torch.Tensor], logits: list[torch.Tensor], scaling: float,
               tau: float, batch: int) -> dict[BlockKey, torch.Tensor]:
    """Per-sample keep masks ``{(stack, index): [batch]}``: per sample and group, one hard (straight-through)
    Gumbel-softmax draw over ``logits * scaling`` picks a keep-pattern."""
    keeps = [F.gumbel_softmax((logit * scaling).expand(batch, -1), tau=tau, hard=True) @ table.to(logit)
             for table, logit in zip(patterns, logits, strict=True)]
    return _masks_from(groups, keeps)


@dataclass
class _MeanLoss:
    masks: dict[BlockKey, torch.Tensor]

    def objective(self, losses: torch.Tensor) -> torch.Tensor:
        return losses.mean()


@dataclass
class _ScoreFunctionDraw:
    masks: dict[BlockKey, torch.Tensor]
    log_probability: torch.Tensor  # [rows]: log-probability of each row's patterns, differentiable in the logits

    def objective(self, losses: torch.Tensor) -> torch.Tensor:
        draws = len(losses)
        if draws < 2:
            raise ValueError("the score-function estimator needs at least 2 draws per sample for its baseline")
        observed = losses.detach()
        baseline = (observed.sum(0, keepdim=True) - observed) / (draws - 1)  # leave-one-out
        scale = observed.mean(0, keepdim=True).clamp_min(1e-12)
        advantage = (observed - baseline) / scale
        return losses.mean() + (advantage * self.log_probability.view_as(losses)).mean()


class _PatternLogits:
    """One logit per keep-pattern; the decision is the pattern of the largest."""

    def logit_count(self, table: torch.Tensor) -> int:
        return len(table)

    def pattern_probabilities(self, table: torch.Tensor, logit: torch.Tensor, scaling: float) -> torch.Tensor:
        return torch.softmax(logit.detach() * scaling, 0)

    def keep_probability(self, table: torch.Tensor, logit: torch.Tensor, scaling: float) -> torch.Tensor:
        return self.pattern_probabilities(table, logit, scaling) @ table.to(logit)

    def decide(self, table: torch.Tensor, logit: torch.Tensor) -> int:
        return int(logit.argmax())


@MASK_ESTIMATORS.register("straight_through")
class StraightThrough(_PatternLogits):
    """Hard Gumbel-softmax at temperature ``tau`` (TinyFusion as published)."""

    min_draws = 1

    def draw(self, groups: list[Group], patterns: list[torch.Tensor], logits: list[torch.Tensor],
             scaling: float, tau: float, rows: int) -> MaskDraw:
        return _MeanLoss(draw_masks(groups, patterns, logits, scaling, tau, rows))


@MASK_ESTIMATORS.register("score_function")
class ScoreFunction(_PatternLogits):
    """Categorical draws from ``softmax(scaling * logits)`` (``tau`` unused) and the REINFORCE gradient."""

    min_draws = 2

    def draw(self, groups: list[Group], patterns: list[torch.Tensor], logits: list[torch.Tensor],
             scaling: float, tau: float, rows: int) -> MaskDraw:
        keeps, log_probability = [], 0.0
        for table, logit in zip(patterns, logits, strict=True):
            log_p = torch.log_softmax(logit * scaling, 0)
            choice = torch.multinomial(log_p.detach().exp(), rows, replacement=True)
            keeps.append(table.to(logit)[choice])
            log_probability = log_probability + log_p[choice]
        return _ScoreFunctionDraw(_masks_from(groups, keeps), log_probability)


PROBABILITY_DRAWS = 8192  # Plackett-Luce pattern probabilities are estimated from this many seeded draws


def _top_blocks(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """0/1 rows marking the ``keep`` largest entries of each row of ``scores`` (none when ``keep`` is 0)."""
    mask = torch.zeros_like(scores)
    return mask.scatter_(-1, scores.topk(keep, -1).indices, 1.0) if keep else mask


@MASK_ESTIMATORS.register("plackett_luce")
class PlackettLuce:
    """One logit per block; ``N`` kept blocks drawn without replacement (Gumbel top-k), REINFORCE gradient."""

    min_draws = 2

    def logit_count(self, table: torch.Tensor) -> int:
        return table.shape[1]

    def draw(self, groups: list[Group], patterns: list[torch.Tensor], logits: list[torch.Tensor],
             scaling: float, tau: float, rows: int) -> MaskDraw:
        keeps, log_probability = [], 0.0
        for group, logit in zip(groups, logits, strict=True):
            scores = (logit * scaling).expand(rows, -1)
            gumbel = -torch.empty_like(scores).exponential_().log()
            order = (scores.detach() + gumbel).argsort(-1, descending=True)
            ordered = scores.gather(-1, order)
            # log P(order[:N]) = sum_j s_(j) - logsumexp(s_(j), s_(j+1), ...)
            tail = ordered.flip(-1).logcumsumexp(-1).flip(-1)
            log_probability = log_probability + (ordered - tail)[:, :group.keep].sum(-1)
            keeps.append(torch.zeros_like(scores).scatter_(-1, order[:, :group.keep], 1.0).detach())
        return _ScoreFunctionDraw(_masks_from(groups, keeps), log_probability)

    def _drawn_sets(self, table: torch.Tensor, logit: torch.Tensor, scaling: float) -> torch.Tensor:
        """``PROBABILITY_DRAWS`` seeded draws of the kept blocks, ``[draws, M]`` 0/1."""
        keep = int(table[0].sum())
        gen = torch.Generator().manual_seed(0)
        scores = logit.detach().float().cpu() * scaling
        gumbel = -torch.empty(PROBABILITY_DRAWS, len(scores)).exponential_(generator=gen).log()
        return _top_blocks(scores + gumbel, keep)

    def pattern_probabilities(self, table: torch.Tensor, logit: torch.Tensor, scaling: float) -> torch.Tensor:
        drawn = self._drawn_sets(table, logit, scaling)
        matches = (drawn @ table.cpu().T == table[0].sum().cpu()).float()  # [draws, C]: the drawn set is pattern c
        return matches.mean(0)

    def keep_probability(self, table: torch.Tensor, logit: torch.Tensor, scaling: float) -> torch.Tensor:
        return self._drawn_sets(table, logit, scaling).mean(0)

    def decide(self, table: torch.Tensor, logit: torch.Tensor) -> int:
        chosen = _top_blocks(logit.detach().float().cpu()[None], int(table[0].sum()))
        return int((table.cpu() == chosen).all(1).float().argmax())
