"""Every call of every transformer block during a streamed calibration, recorded to a temporary folder on disk.

What the streamed GPTQ (:mod:`compressdit.streaming`) replays, one block in memory at a time, to collect the
layer-input Hessians the in-memory GPTQ collects by replaying the whole sampling loop: a forward pre-hook (with
keyword arguments) on each block saves the block's inputs (tensors copied whole, on the CPU) as one file per call,
in call order. The float model's inputs are the right ones: in memory every GPTQ layer sees the full-precision
model too. The size is estimated at the first block call (that call's bytes x blocks x calls per block, the
calibration's steps x batches) and refused in one line when it would not fit ``budget_bytes`` (the free disk space
less what the run still has to write, or a stated ``--max-cache``); the bytes written are checked against the same
budget as they grow. The folder is removed on exit, even after an error.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressdit.errors import CalibrationError


def _on_cpu(value: Any) -> Any:
    """``value`` with every tensor copied to the CPU (a copy of its own, not a view of a larger storage)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_on_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    return value


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10 ** 8 else f"{nbytes / 1e6:.2f} MB"


class BlockInputCache:
    """Context manager: a temporary folder under ``scratch`` holding the recorded calls of ``blocks`` (module doc).

    ``calls_per_block``: the calls the calibration makes of each block (for the estimate); ``budget_bytes``: the
    most the recorded inputs may take, ``budget_what`` says where that limit comes from (for the error).
    ``written``: bytes recorded so far; ``calls[prefix]``: calls recorded per block.
    """

    def __init__(self, scratch: Path, blocks: list[tuple[str, nn.Module]], calls_per_block: int,
                 budget_bytes: int, budget_what: str) -> None:
        self.scratch, self.blocks = Path(scratch), blocks
        self.calls_per_block, self.budget, self.budget_what = calls_per_block, budget_bytes, budget_what
        self.calls: dict[str, int] = {prefix: 0 for prefix, _ in blocks}
        self.written = 0
        self.estimate: int | None = None
        self.folder: Path | None = None

    def __enter__(self) -> "BlockInputCache":
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=".compressdit-block-inputs-", dir=self.scratch))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def _path(self, prefix: str, call: int) -> Path:
        return self.folder / f"{prefix}.{call:06d}.pt"

    def _refuse(self, total: int, per_call: int) -> CalibrationError:
        return CalibrationError(
            f"streamed GPTQ caches every block's calibration inputs on disk: about {_size(total)} "
            f"({len(self.blocks)} blocks x {self.calls_per_block} calls x {_size(per_call)}) but "
            f"{self.budget_what} is {_size(self.budget)}; calibrate on fewer samples or steps (calibrate: "
            "samples, steps), or free disk space")

    def _record(self, prefix: str, args: tuple, kwargs: dict) -> None:
        saved = {"args": _on_cpu(args), "kwargs": _on_cpu(kwargs)}
        size = _nbytes(saved)
        if self.estimate is None:
            self.estimate = size * len(self.blocks) * self.calls_per_block
            if self.estimate > self.budget:
                raise self._refuse(self.estimate, size)
        if self.written + size > self.budget:
            raise self._refuse(max(self.estimate, self.written + size), size)
        torch.save(saved, self._path(prefix, self.calls[prefix]))
        self.calls[prefix] += 1
        self.written += size

    @contextlib.contextmanager
    def recording(self) -> Iterator["BlockInputCache"]:
        """Record every block call while open (hooks removed on exit, even after an error)."""
        handles = [block.register_forward_pre_hook(
            lambda module, args, kwargs, prefix=prefix: self._record(prefix, args, kwargs), with_kwargs=True)
            for prefix, block in self.blocks]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def replay(self, prefix: str, block: nn.Module, device: torch.device | str = "cpu") -> None:
        """Call ``block`` (its weights loaded) with each of its recorded inputs, in the order they were recorded."""
        for call in range(self.calls[prefix]):
            saved = torch.load(self._path(prefix, call), map_location=device, weights_only=True)
            block(*saved["args"], **saved["kwargs"])
