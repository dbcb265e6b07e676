"""Calibration of a model larger than memory: its own sampling loop, one transformer block in memory at a time.

The model is the ``meta`` skeleton of :mod:`compressdit.streaming`. :class:`BlockStreamer` keeps what lies outside
the blocks in memory (embedders, head, and the submodules of a first block the model calls outside its block loop:
``BlockStack.first_block_reads``) and, through forward hooks on every block, reads a block's tensors from the lazy
shards as the block is called and drops them back to ``meta`` when it returns. The calibrate stage's own
:func:`~compressdit.stages.calibrate.run_calibration` then runs unchanged on the skeleton: the same statistic hooks
see the same inputs as on a model loaded in memory, so the statistics are the in-memory ones, and no block input
is cached (except by a GPTQ recipe, :mod:`compressdit.streaming_gptq`, which records them to disk). Every calibration batch reads the weights once per denoising step (cond and uncond share a call), so a
batch size of at least the sample count reads them ``steps`` times. On a ``device`` (e.g. ``cuda``) the resident
part, the block being called and the activations live there, so one block's weights at a time take device memory;
the statistics are gathered on the CPU as in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compressdit.calibration.stats import ActivationStats
from compressdit.io.shards import LazyWeights
from compressdit.io.sources import ModelSource
from compressdit.models import ModelAdapter
from compressdit.stages.base import PipelineState
from compressdit.stages.calibrate import run_calibration


def release(module: nn.Module, names: list[str]) -> None:
    """Move the named tensors of ``module`` (names relative to it) to ``meta``; other tensors (non-persistent
    buffers: sin-cos tables) stay."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner)
        tensor = getattr(sub, attr)
        setattr(sub, attr, nn.Parameter(tensor.to("meta"), requires_grad=False)
                if isinstance(tensor, nn.Parameter) else tensor.to("meta"))


def resident_names(model: nn.Module, adapter: ModelAdapter) -> list[str]:
    """The tensors a streamed run keeps in memory throughout: those outside the blocks, and those of the first
    block's submodules that the model calls outside its block loop (``BlockStack.first_block_reads``)."""
    prefixes = [p for p, _ in adapter.blocks(model)]
    kept = [f"{stack.attribute}.0.{path}" for stack in adapter.block_stacks for path in stack.first_block_reads
            if len(getattr(model, stack.attribute))]
    return [n for n in model.state_dict() if not any(n.startswith(p + ".") for p in prefixes)
            or any(n.startswith(k + ".") for k in kept)]


class BlockStreamer:
    """Context manager: the skeleton ``model`` runs with its blocks read from ``weights`` one at a time (module doc).

    ``peak``: the most blocks ever in memory at once (1); ``loads``: blocks read so far. Tensors are read onto
    ``device``, where the model's own buffers (sin-cos tables) go too while it runs. On exit the hooks are removed,
    every tensor read goes back to ``meta`` and the buffers back where they were, even after an error.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, weights: LazyWeights,
                 device: torch.device | str = "cpu") -> None:
        self.model, self.weights, self.device = model, weights, device
        self.buffers: list[tuple[nn.Module, str, torch.Tensor]] = []  # (owner, name, tensor before the move)
        self.like = model.state_dict()  # meta: shapes and dtypes config.json defines
        self.blocks = adapter.blocks(model)
        prefixes = [p for p, _ in self.blocks]
        self.resident = resident_names(model, adapter)
        resident = set(self.resident)
        self.own = {p: [n for n in self.like if n.startswith(p + ".") and n not in resident] for p in prefixes}
        self.live: set[str] = set()
        self.peak = self.loads = 0
        self.handles: list = []

    def _load(self, prefix: str, block: nn.Module) -> None:
        self.weights.load_into(block, self.own[prefix], self.like, prefix, device=self.device)
        self.live.add(prefix)
        self.loads += 1
        self.peak = max(self.peak, len(self.live))

    def _release(self, prefix: str, block: nn.Module) -> None:
        release(block, [n[len(prefix) + 1:] for n in self.own[prefix]])
        self.live.discard(prefix)

    def __enter__(self) -> "BlockStreamer":
        try:
            self.weights.load_into(self.model, self.resident, self.like, device=self.device)
            for owner in self.model.modules():
                for name, tensor in owner.named_buffers(recurse=False):
                    if tensor is not None and not tensor.is_meta:
                        self.buffers.append((owner, name, tensor))
                        setattr(owner, name, tensor.to(self.device))
            for prefix, block in self.blocks:
                self.handles.append(block.register_forward_pre_hook(
                    lambda module, args, prefix=prefix: self._load(prefix, module)))
                self.handles.append(block.register_forward_hook(
                    lambda module, args, output, prefix=prefix: self._release(prefix, module)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        blocks = dict(self.blocks)
        for prefix in list(self.live):
            self._release(prefix, blocks[prefix])
        release(self.model, self.resident)
        for owner, name, tensor in self.buffers:
            setattr(owner, name, tensor)
        self.buffers.clear()


@torch.no_grad()
def streamed_calibration(source: ModelSource, adapter: ModelAdapter, weights: LazyWeights, config,
                         quiet: bool = False, device: torch.device | str = "cpu"
                         ) -> tuple[ActivationStats, BlockStreamer, list]:
    """The calibrate stage (``config``: its ``CalibrateConfig``) run on ``source.transformer``, the skeleton, with
    blocks streamed from ``weights`` onto ``device``; returns the statistics, the streamer (``peak``, ``loads``) and the
    calibration conditions. Not cached: the cache key sums the weights, which are not in memory."""
    state = PipelineState(source=source, adapter=adapter, model=source.transformer, workdir=Path("."),
                          reference_spec=source.name, quiet=quiet, cache_dir=None)
    with BlockStreamer(source.transformer, adapter, weights, device) as streamer:
        stats = run_calibration(state, config)
    return stats, streamer, state.calibration_conditions
