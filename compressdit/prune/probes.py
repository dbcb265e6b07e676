"""Linear probes of every block and the replaceability they imply (PPCL's stages 1.1 and 1.2).

A probe is a ridge-regularised linear map from a block's input to each stream it returns, fitted in closed form
from accumulated normal equations. A block's replaceability is the linear CKA of the last block's image tokens
with that block swapped for its probe against the unmodified model's::

    probes, r2 = fit_probes(model, adapter, batches, ridge=1e-3)
    replaceability = simulate(model, adapter, probes, batches[:2])
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from compressdit.models.base import BlockStack, ModelAdapter
from compressdit.prune.depth import BlockKey, block_inputs

IMAGE_STREAM = "hidden_states"


class _NormalEquations:
    """Accumulates ``[X, 1]^T [X, 1]``, ``[X, 1]^T Y`` and ``Y`` moments of token rows, in float64."""

    def __init__(self) -> None:
        self.xtx = self.xty = None
        self.y_sum = self.y_sq = 0.0
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).double()
        x = torch.cat([x, x.new_ones(len(x), 1)], 1)
        if self.xtx is None:
            self.xtx, self.xty = x.T @ x, x.T @ y
        else:
            self.xtx += x.T @ x
            self.xty += x.T @ y
        self.y_sum = self.y_sum + y.sum(0)
        self.y_sq = self.y_sq + (y * y).sum()
        self.rows += len(x)

    def solve(self, ridge: float) -> tuple[torch.Tensor, float]:
        """Probe weights ``[D_in + 1, D_out]`` (bias last) and the fit's R^2 on the accumulated rows."""
        dim = len(self.xtx) - 1
        scale = float(torch.diagonal(self.xtx)[:dim].mean().clamp_min(1e-12))
        eye = torch.eye(len(self.xtx), dtype=self.xtx.dtype, device=self.xtx.device)
        eye[dim, dim] = 0  # the bias is not shrunk
        weights = torch.linalg.solve(self.xtx + ridge * scale * eye, self.xty)
        # residual sum of squares from the moments: |Y|^2 - 2 tr(W^T X^T Y) + tr(W^T X^T X W)
        rss = self.y_sq - 2 * (weights * self.xty).sum() + (weights * (self.xtx @ weights)).sum()
        total = self.y_sq - (self.y_sum * self.y_sum).sum() / self.rows
        return weights, float(1 - rss / total.clamp_min(1e-30))


def _probe(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    w = weights.to(x.dtype)
    return x @ w[:-1] + w[-1]


@contextmanager
def forward_hooks(hooks: dict[nn.Module, Callable]) -> Iterator[None]:
    handles = [module.register_forward_hook(hook, with_kwargs=True) for module, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def stacks_by_name(adapter: ModelAdapter) -> dict[str, BlockStack]:
    return {s.attribute: s for s in adapter.block_stacks}


def fit_probes(model: nn.Module, adapter: ModelAdapter, batches: list[tuple], ridge: float
               ) -> tuple[dict[BlockKey, dict[str, torch.Tensor]], dict[BlockKey, float]]:
    """Per block and returned stream a linear probe input -> output; and the image stream's R^2 per block."""
    stacks = stacks_by_name(adapter)
    equations: dict[BlockKey, dict[str, _NormalEquations]] = {}

    def recorder(key: BlockKey) -> Callable:
        def hook(module, args, kwargs, output):
            inputs, outputs = block_inputs(module, args, kwargs), stacks[key[0]].unpack(output)
            for name, y in outputs.items():
                if y is not None:  # a stream the block does not return (SD3's last block: no text tokens)
                    equations[key].setdefault(name, _NormalEquations()).add(inputs[name], y)
        return hook

    hooks = {}
    for stack, index, block in adapter.block_list(model):
        equations[(stack, index)] = {}
        hooks[block] = recorder((stack, index))
    with torch.no_grad(), forward_hooks(hooks):
        for x_t, timestep, cond in batches:
            adapter.predict(model, x_t, timestep, cond)
    probes, r2 = {}, {}
    for key, streams in equations.items():
        probes[key] = {}
        for name, eq in streams.items():
            probes[key][name], fit = eq.solve(ridge)
            if name == IMAGE_STREAM:
                r2[key] = fit
    return probes, r2


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations with rows as examples."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).square().sum()
    norm = (x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt()
    return float(cross / norm.clamp_min(1e-30))


def simulate(model: nn.Module, adapter: ModelAdapter, probes: dict[BlockKey, dict[str, torch.Tensor]],
             batches: list[tuple]) -> dict[BlockKey, float]:
    """Per block the linear CKA of the last block's image tokens with that block swapped for its probe."""
    stacks = stacks_by_name(adapter)
    listed = adapter.block_list(model)
    last = listed[-1][2]
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs, output):
        captured.append(stacks[listed[-1][0]].unpack(output)[IMAGE_STREAM])

    def swap(key: BlockKey) -> Callable:
        def hook(module, args, kwargs, output):
            inputs = block_inputs(module, args, kwargs)
            return stacks[key[0]].pack({name: _probe(probes[key][name], inputs[name]) if name in probes[key] else None
                                        for name in stacks[key[0]].returns})
        return hook

    def final_tokens(extra: dict[nn.Module, Callable]) -> torch.Tensor:
        captured.clear()
        with forward_hooks(extra), forward_hooks({last: capture}):
            for x_t, timestep, cond in batches:
                adapter.predict(model, x_t, timestep, cond)
        return torch.cat(captured)

    with torch.no_grad():
        reference = final_tokens({})
        return {(stack, index): linear_cka(final_tokens({block: swap((stack, index))}), reference)
                for stack, index, block in listed}
