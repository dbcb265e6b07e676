"""GPTQ in a streamed run: the in-memory rounding, from Hessians collected one block at a time.

The in-memory GPTQ (:func:`compressdit.quant.gptq_calibration.hessian_rounded_layers`) replays the calibration's
sampling loop on the full-precision model with input-Hessian hooks on a chunk of layers at a time. A streamed run
cannot hold the model, and FLUX's Hessians alone (0.6-0.9 GB for each 12288- and 15360-input layer, about 60 GB in
all) cannot be held or written at once. So, during the streamed calibration pass, every block call's inputs are
recorded to a temporary folder on disk (:class:`~compressdit.calibration.block_inputs.BlockInputCache`; the layers
kept in memory throughout, outside the blocks, get their Hessians right there); then, as each block is read to be
quantized, its recorded calls are replayed with the same hooks on the same chunks, and each layer is rounded by the
same :func:`~compressdit.quant.gptq_calibration.rounded_from_hessians`. A layer sees the same inputs in the same
order as in memory, so its Hessian, and its codes and scales, equal the in-memory ones (``tests/test_streaming.py``).
Memory: one block, the Hessians of one chunk (:data:`HESSIAN_BUDGET_BYTES`) and GPTQ's working copies of one.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from compressdit.calibration.block_inputs import BlockInputCache
from compressdit.calibration.hessian import HessianRecorder, capture_input_hessians, hessian_chunks
from compressdit.calibration.streamed import resident_names
from compressdit.errors import CalibrationError
from compressdit.memory import release_free_heap
from compressdit.models import ModelAdapter
from compressdit.quant.gptq_calibration import (HESSIAN_BUDGET_BYTES, chunked_hessians, hessian_layers,
                                                rounded_from_hessians)
from compressdit.quant.spec import LinearQuantSpec

DISK_MARGIN_BYTES = 1 << 30  # left free on the scratch disk besides the output


def cache_budget(scratch: Path, output_bytes: int, output_folder: Path, max_cache: int | None) -> tuple[int, str]:
    """The bytes the block-input cache may take, and what sets that limit (for the refusal): ``max_cache`` when
    given and smaller, else the free space at ``scratch`` less the output still to be written there (when it is
    on the same disk) and a 1 GiB margin."""
    scratch.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(scratch).free
    output_folder = next((p for p in [output_folder, *output_folder.parents] if p.exists()), scratch)
    same_disk = output_folder.stat().st_dev == scratch.stat().st_dev
    room = free - (output_bytes if same_disk else 0) - DISK_MARGIN_BYTES
    if max_cache is not None and max_cache < room:
        return max_cache, "--max-cache"
    return max(room, 0), (f"the free space at {scratch} ({free / 1e9:.2f} GB) less the output "
                          f"({output_bytes / 1e9:.2f} GB) and a 1 GiB margin")


def _trimmed(hessians: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``hessians``, the C heap trimmed after each layer is rounded (before the next Hessian is collected): the
    rounding's temporaries would otherwise stay resident under the next, larger one."""
    for item in hessians:
        yield item
        del item
        release_free_heap()


class StreamedGPTQ:
    """Context manager for one streamed run (module doc): ``calibrating()`` around the streamed calibration,
    ``rounded(prefix)`` as each unit (``""``: outside the blocks; else a block prefix) is quantized."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, plan: dict[str, LinearQuantSpec], calibrate,
                 scratch: Path, budget: tuple[int, str], device: torch.device | str = "cpu") -> None:
        self.model, self.plan, self.device = model, plan, device
        self.names = hessian_layers(plan)
        kept = set(resident_names(model, adapter))
        self.resident = [n for n in self.names if f"{n}.weight" in kept]
        size = sum(4 * model.get_submodule(n).in_features ** 2 for n in self.resident)
        if size > HESSIAN_BUDGET_BYTES:
            raise CalibrationError(f"streamed GPTQ holds the Hessians of the layers kept in memory ({self.resident[0]} "
                                   f"and {len(self.resident) - 1} more: {size / 1e9:.2f} GB) through the calibration, "
                                   f"more than {HESSIAN_BUDGET_BYTES / 1e9:.2f} GB; round them with rtn")
        calls = calibrate.steps * math.ceil(calibrate.samples / calibrate.batch_size)
        self.cache = BlockInputCache(scratch, adapter.blocks(model), calls, *budget)
        self.hessians: dict[str, torch.Tensor] = {}
        self.replays = 0

    def __enter__(self) -> "StreamedGPTQ":
        self.cache.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.hessians.clear()
        self.cache.__exit__(exc_type, exc, tb)

    @contextlib.contextmanager
    def calibrating(self) -> Iterator[None]:
        """Record every block call to the cache and the kept layers' Hessians while open."""
        with self.cache.recording(), capture_input_hessians(self.model, self.resident) as recorder:
            yield
        self._keep(recorder)

    def _keep(self, recorder: HessianRecorder) -> None:
        self.hessians = {name: recorder.pop(name) for name in self.resident}

    @torch.no_grad()
    def rounded(self, prefix: str, in_unit, input_absmax: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
        """Quantized modules of the unit's GPTQ layers (``in_unit(name)``), its weights loaded in the model."""
        names = [n for n in self.names if in_unit(n)]
        kept = [n for n in names if n in self.hessians]
        modules = rounded_from_hessians(self.model, self.plan, ((n, self.hessians.pop(n)) for n in kept),
                                        input_absmax)
        replayed = [n for n in names if n not in modules]
        if replayed:
            block = self.model.get_submodule(prefix)
            chunks = hessian_chunks({n: self.model.get_submodule(n).in_features for n in replayed},
                                    HESSIAN_BUDGET_BYTES)
            self.replays += len(chunks)
            modules.update(rounded_from_hessians(self.model, self.plan, _trimmed(chunked_hessians(
                self.model, chunks, lambda: self.cache.replay(prefix, block, self.device))), input_absmax))
        return modules

    def note(self, calibrate) -> str:
        files = sum(self.cache.calls.values())
        return (f"gptq: {len(self.names)} layers rounded from input Hessians over {calibrate.samples} samples x "
                f"{calibrate.steps} steps as in memory: each block's {files // max(len(self.cache.calls), 1)} "
                f"recorded calls ({self.cache.written / 1e6:.1f} MB cached on disk for {len(self.cache.calls)} "
                f"blocks, removed at the end) replayed {self.replays} times in all, one chunk of Hessians of at most "
                f"{HESSIAN_BUDGET_BYTES / 2 ** 30:g} GiB at a time")
