"""Block-importance baselines measured along the model's own sampling trajectory (CFG included).

Each criterion is registered in :data:`BLOCK_IMPORTANCE` and called as
``criterion(model, adapter, conditions, scheduler, steps, guidance, seed)``; it returns
``{(stack attribute, index): score}`` for every block, higher meaning more important.
:func:`keep_lowest_score` turns scores into the ``keep`` map of :func:`compressdit.prune.depth.remove_blocks`.

    scores = block_influence(model, adapter, conditions, adapter.scheduler(model), steps=10, guidance=4.0)
    remove_blocks(model, adapter, keep_lowest_score(scores, adapter, model, ratio=0.25))
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from compressdit.errors import ConfigError
from compressdit.models.base import ModelAdapter
from compressdit.models.sampling import sample
from compressdit.prune.depth import BlockKey, block_inputs, skip_blocks
from compressdit.registry import Registry

Scores = dict[BlockKey, float]
Criterion = Callable[..., Scores]
BLOCK_IMPORTANCE: Registry[Criterion] = Registry("block importance")

# diffusers names the image tokens ``hidden_states`` in the inputs and outputs of every supported block kind
IMAGE_STREAM = "hidden_states"


@contextmanager
def _forward_hooks(hooks: dict[nn.Module, Callable]) -> Iterator[None]:
    handles = []
    try:
        for module, hook in hooks.items():
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def block_influence(model: nn.Module, adapter: ModelAdapter, conditions: list[Any], scheduler, steps: int = 10,
                    guidance: float = 4.0, seed: int = 0, prompt_encoder=None) -> Scores:
    """ShortGPT's Block Influence (Men et al. 2024, arXiv 2403.03853): ``1 - cos(block input, block output)``.

    Cosine over channels per token of the image stream (``hidden_states``), also for joint blocks, whose
    text stream is not measured; averaged over tokens and batch (conditional and unconditional halves alike)
    per sampling step, then over steps. A block that leaves its input unchanged scores 0.
    """
    stacks = {s.attribute: s for s in adapter.block_stacks}
    this_step: dict[BlockKey, list[torch.Tensor]] = {}
    per_step: dict[BlockKey, list[torch.Tensor]] = {}

    def hook_for(key: BlockKey) -> Callable:
        def hook(module, args, kwargs, output):
            x_in = block_inputs(module, args, kwargs)[IMAGE_STREAM]
            x_out = stacks[key[0]].unpack(output)[IMAGE_STREAM]
            cosine = F.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
            this_step[key].append((1 - cosine).mean())
        return hook

    def close_step(i, t, latents, prediction) -> None:
        for key, values in this_step.items():
            per_step[key].append(torch.stack(values).mean())
            values.clear()

    hooks = {}
    for stack, index, block in adapter.block_list(model):
        this_step[(stack, index)], per_step[(stack, index)] = [], []
        hooks[block] = hook_for((stack, index))
    with _forward_hooks(hooks):
        sample(adapter, model, conditions, scheduler, steps=steps, guidance=guidance, seed=seed, on_step=close_step,
               prompt_encoder=prompt_encoder)
    return {key: max(float(torch.stack(values).mean()), 0.0) for key, values in per_step.items()}


@torch.no_grad()
def removal_error(model: nn.Module, adapter: ModelAdapter, conditions: list[Any], scheduler, steps: int = 10,
                  guidance: float = 4.0, seed: int = 0, prompt_encoder=None) -> Scores:
    """Relative error ``||x - x_full|| / ||x_full||`` of the final latents with one block skipped.

    Every run starts from the same seeded noise; one sampling run per block plus the reference. A block
    whose removal gives non-finite latents scores ``inf``.
    """
    def run() -> torch.Tensor:
        return sample(adapter, model, conditions, scheduler, steps=steps, guidance=guidance, seed=seed,
                      prompt_encoder=prompt_encoder)

    reference = run().double()
    scale = reference.norm().clamp_min(torch.finfo(torch.float64).tiny)
    scores = {}
    for stack, index, _ in adapter.block_list(model):
        with skip_blocks(model, adapter, {(stack, index)}):
            error = float((run().double() - reference).norm() / scale)
        scores[(stack, index)] = error if math.isfinite(error) else math.inf
    return scores


BLOCK_IMPORTANCE.add("block_influence", block_influence)
BLOCK_IMPORTANCE.add("removal_error", removal_error)


def keep_lowest_score(scores: Scores, adapter: ModelAdapter, model: nn.Module, ratio: float) -> dict[str, list[int]]:
    """The ``keep`` map dropping the ``ratio`` fraction of blocks with the lowest scores, stack by stack.

    Each stack of ``n`` blocks drops ``floor(ratio * n + 0.5)`` of its own (scores of different block kinds
    are not compared, and Flux's two stacks shrink alike), but never a ``keep_last`` block and never its
    last remaining one. Equal scores drop the earlier block first.
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"pruning ratio must be in [0, 1), got {ratio}")
    blocks = [(stack, index) for stack, index, _ in adapter.block_list(model)]
    missing, extra = sorted(set(blocks) - set(scores)), sorted(set(scores) - set(blocks))
    if missing or extra:
        raise ConfigError(f"scores do not match the blocks of {type(model).__name__}: missing {missing}, "
                          f"unknown {extra}; score the same model")
    keep = {}
    for stack in adapter.block_stacks:
        count = len(getattr(model, stack.attribute))
        candidates = range(count - 1) if stack.keep_last else range(count)
        drop_count = min(math.floor(ratio * count + 0.5), len(candidates), count - 1)
        ranked = sorted(candidates, key=lambda i: (scores[(stack.attribute, i)], i))
        dropped = set(ranked[:drop_count])
        keep[stack.attribute] = [i for i in range(count) if i not in dropped]
    return keep
