"""Distillation losses (TinyFusion "Masked KD"): output, per-block feature and data loss; layer maps; hooks.

The output loss matches student and teacher predictions (noise for epsilon models, velocity for flow models:
whatever ``adapter.predict`` returns); the data loss is the family's ordinary training loss on real latents.
Feature loss pairs student block ``i`` with teacher block ``j``. Blocks are numbered in execution order over
all block stacks (``adapter.block_list``): Flux's double-stream blocks first, then its single-stream ones.
Only the image stream (``hidden_states``) of a block's output is matched.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compressdit.errors import ConfigError
from compressdit.models.base import ModelAdapter
from compressdit.moe.blocks import routed_stacks

IMAGE_STREAM = "hidden_states"
LayerMap = list[tuple[int, int]]  # (student block, teacher block) in execution order


def output_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between student and teacher predictions."""
    if student.shape != teacher.shape:
        raise ConfigError(f"student predicts shape {list(student.shape)} but the teacher {list(teacher.shape)}: "
                          "distil between models with the same latent shape")
    return F.mse_loss(student.float(), teacher.float())


def data_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The ordinary diffusion / flow-matching loss: MSE to the objective's target."""
    return F.mse_loss(prediction.float(), target.float())


def massive_activation_mask(hidden: torch.Tensor, num_std: float = 2.0) -> torch.Tensor:
    """``True`` where an entry is kept: ``|h - mean| < num_std * std``, mean and std per sample over all of
    its other dimensions (TinyFusion's "massive activation" masking)."""
    flat = hidden.detach().float().reshape(len(hidden), -1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, keepdim=True)
    return ((flat - mean).abs() < num_std * std).view_as(hidden)


def feature_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask_massive: bool = False,
                 names: Sequence[str] | None = None) -> torch.Tensor:
    """Mean over matched block pairs of the MSE between features; with ``mask_massive`` each side's massive
    activations are zeroed first (masks computed separately for student and teacher)."""
    if not student:
        raise ConfigError("feature loss needs at least one matched block pair")
    terms = []
    for k, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.shape != t.shape:
            pair = names[k] if names else f"pair {k}"
            raise ConfigError(f"feature shapes differ for {pair}: student {list(s.shape)}, teacher {list(t.shape)}; "
                              "map student blocks to teacher blocks of the same width (layer_map) or set "
                              "feature_weight: 0")
        s, t = s.float(), t.float()
        if mask_massive:
            s, t = s * massive_activation_mask(s), t * massive_activation_mask(t)
        terms.append(F.mse_loss(s, t))
    return torch.stack(terms).mean()


def _stack_counts(adapter: ModelAdapter, model: nn.Module) -> list[tuple[str, int, int]]:
    """``(stack attribute, first execution-order index, block count)`` per stack."""
    out, start = [], 0
    for stack in adapter.block_stacks:
        count = len(getattr(model, stack.attribute))
        out.append((stack.attribute, start, count))
        start += count
    return out


def resolve_layer_map(adapter: ModelAdapter, student: nn.Module, teacher: nn.Module, layer_map: Any = "auto",
                      origin: dict[str, Sequence[int]] | Sequence[int] | None = None) -> LayerMap:
    """Student/teacher block pairs, in execution-order indices.

    ``layer_map`` is ``"auto"``, a list of teacher blocks (one per student block) or a list of
    ``[student, teacher]`` pairs. ``"groups"`` (Mixture of Blocks: the group feature loss) pairs the last block
    of every routed group of the student, i.e. the group's output, with the teacher block of the same index.
    ``"auto"`` maps, per stack, each student block to the teacher block it came
    from when ``origin`` lists those (``{stack: kept teacher indices}``, or a plain list for single-stack
    families, e.g. the kept indices after depth pruning); else proportionally, student ``i`` of ``S`` to teacher
    ``round((i + 1) T / S) - 1`` of ``T`` (halves round up), so the last blocks always pair.
    """
    s_stacks, t_stacks = _stack_counts(adapter, student), _stack_counts(adapter, teacher)
    s_total, t_total = sum(c for *_, c in s_stacks), sum(c for *_, c in t_stacks)
    if layer_map == "auto":
        pairs = _auto_map(s_stacks, t_stacks, origin)
    elif layer_map == "groups":
        pairs = _group_map(student, s_stacks)
    elif isinstance(layer_map, (list, tuple)) and all(isinstance(v, int) for v in layer_map):
        if len(layer_map) != s_total:
            raise ConfigError(f"layer_map lists {len(layer_map)} teacher blocks but the student has {s_total} "
                              "blocks; give one teacher block per student block, or [student, teacher] pairs")
        pairs = list(enumerate(layer_map))
    elif isinstance(layer_map, (list, tuple)) and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in layer_map):
        pairs = [(int(s), int(t)) for s, t in layer_map]
    else:
        raise ConfigError(f"layer_map must be 'auto', a list of teacher blocks or [student, teacher] pairs, "
                          f"got {layer_map!r}")
    for s, t in pairs:
        if not (0 <= s < s_total and 0 <= t < t_total):
            raise ConfigError(f"layer_map pair [{s}, {t}] is out of range: the student has {s_total} blocks "
                              f"(0..{s_total - 1}), the teacher {t_total} (0..{t_total - 1})")
    return pairs


def _group_map(student: nn.Module, s_stacks) -> LayerMap:
    routed = routed_stacks(student)
    if not routed:
        raise ConfigError("layer_map 'groups' needs a student with routed blocks (run the mob stage first); "
                          "use layer_map: auto otherwise")
    pairs = []
    for attr, start, _ in s_stacks:
        for i, block in enumerate(routed.get(attr, [])):
            if block.position == block.layout.group - 1:
                pairs.append((start + i, start + i))
    return pairs


def _auto_map(s_stacks, t_stacks, origin) -> LayerMap:
    if origin is not None and not isinstance(origin, dict):
        if len(s_stacks) != 1:
            raise ConfigError(f"block origin for a model with stacks {[a for a, *_ in s_stacks]} must be a mapping "
                              "{stack: teacher indices}")
        origin = {s_stacks[0][0]: origin}
    pairs = []
    for (attr, s_start, s_count), (_, t_start, t_count) in zip(s_stacks, t_stacks, strict=True):
        if origin is not None and attr in origin:
            source = [int(j) for j in origin[attr]]
            if len(source) != s_count or any(not 0 <= j < t_count for j in source):
                raise ConfigError(f"block origin of {attr} lists {source} but the student has {s_count} blocks there "
                                  f"and the teacher {t_count}; give one teacher index (0..{t_count - 1}) per "
                                  "student block")
        elif s_count > t_count:
            raise ConfigError(f"the student has {s_count} blocks in {attr} but the teacher only {t_count}: its blocks "
                              "cannot be mapped to the teacher's; pass layer_map pairs or set feature_weight: 0")
        else:
            source = [((i + 1) * 2 * t_count + s_count) // (2 * s_count) - 1 for i in range(s_count)]
        pairs += [(s_start + i, t_start + j) for i, j in enumerate(source)]
    return pairs


@contextmanager
def capture_features(model: nn.Module, adapter: ModelAdapter,
                     blocks: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Inside the ``with`` block, the dict fills with the image-stream output of each listed block (by
    execution-order index) on every forward; the hooks are removed on exit, also after an exception."""
    listed = adapter.block_list(model)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for index in blocks:
            attribute, _, block = listed[index]
            stack = adapter.block_stack(attribute)
            if IMAGE_STREAM not in stack.returns:
                raise ConfigError(f"blocks of {attribute} return {stack.returns}, no {IMAGE_STREAM!r} to match")

            def hook(module, args, output, index=index, stack=stack):
                captured[index] = stack.unpack(output)[IMAGE_STREAM]

            handles.append(block.register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
