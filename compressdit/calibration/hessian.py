"""Per-layer input Hessians ``H = 2 X^T X / n`` accumulated by self-removing hooks (for GPTQ rounding).

Same machinery as :func:`compressdit.calibration.stats.capture_input_absmax`: a forward pre-hook on each named
linear sees its input on every call of the sampling loop (all prompts, timesteps and both guidance branches);
every token is one row of ``X``. ``H`` is ``[in, in]`` fp32 per layer (85 MB for DiT-XL/2's fc2), so callers
capture a few layers at a time (:func:`hessian_chunks`).
"""

from __future__ import annotations

import contextlib
import torch
from torch import nn

from compressdit.calibration.stats import input_hooks
from compressdit.errors import CalibrationError


class HessianRecorder:
    """Running ``X^T X`` and row count per layer name."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            if not torch.isfinite(x).all():
                raise CalibrationError(f"non-finite activation (NaN/inf) entering {name} during Hessian capture")
            if name not in self.sums:
                self.sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                self.rows[name] = 0
            self.sums[name].addmm_(x.T, x)
            self.rows[name] += x.shape[0]

        return record

    def pop(self, name: str) -> torch.Tensor:
        """``2 X^T X / n`` of ``name``'s inputs, released from the recorder."""
        if name not in self.sums:
            raise CalibrationError(f"{name} saw no input during calibration; it cannot be rounded with GPTQ "
                                   "(use rounding: rtn for it)")
        return self.sums.pop(name).mul_(2.0 / self.rows.pop(name))


def capture_input_hessians(model: nn.Module, names: list[str]) -> contextlib.AbstractContextManager[HessianRecorder]:
    """``2 X^T X / n`` of the named linears' inputs (hooks removed on exit, even after an error)."""
    return input_hooks(model, names, HessianRecorder())


def hessian_chunks(widths: dict[str, int], budget_bytes: int) -> list[list[str]]:
    """Split layers (name -> in_features, in order) into runs whose fp32 Hessians fit ``budget_bytes`` together.

    A single layer larger than the budget gets a chunk of its own.
    """
    chunks: list[list[str]] = []
    used = budget_bytes + 1
    for name, width in widths.items():
        size = 4 * width * width
        if used + size > budget_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return chunks
