"""Per-layer, per-channel input statistics captured across timesteps by self-removing hooks."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compressdit.errors import CalibrationError

R = TypeVar("R")  # a recorder with ``hook(name)``
_MEANSQ = "meansq::"  # key prefix of the mean squares in a saved stats file


@dataclass
class ActivationStats:
    """``absmax[name]``: ``[timesteps, in_features]`` max |x| of each linear's input per sampling step;
    ``meansq[name]``: the same shape, mean of x^2 over the step's tokens (empty in caches from before it)."""

    absmax: dict[str, torch.Tensor]
    timesteps: list[int]
    meansq: dict[str, torch.Tensor] = field(default_factory=dict)

    def channel_absmax(self, name: str) -> torch.Tensor:
        """Max over all timesteps, per input channel."""
        return self.absmax[name].amax(0)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tensors = {**{k: v.contiguous() for k, v in self.absmax.items()},
                   **{_MEANSQ + k: v.contiguous() for k, v in self.meansq.items()}}
        save_file(tensors, str(tmp),
                  metadata={"timesteps": json.dumps(self.timesteps)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "ActivationStats":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            timesteps = json.loads(handle.metadata()["timesteps"])
        tensors = load_file(str(path))
        return cls({k: v for k, v in tensors.items() if not k.startswith(_MEANSQ)}, timesteps,
                   {k[len(_MEANSQ):]: v for k, v in tensors.items() if k.startswith(_MEANSQ)})


class _Recorder:
    def __init__(self) -> None:
        self.step = 0
        self.per_step: dict[str, dict[int, torch.Tensor]] = {}
        self.squares: dict[str, dict[int, tuple[torch.Tensor, int]]] = {}  # sum of x^2 per channel, token count

    def hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if not torch.isfinite(x).all():
                raise CalibrationError(f"non-finite activation (NaN/inf) entering {name} at sampling step {self.step}")
            rows = x.reshape(-1, x.shape[-1])
            current = rows.abs().amax(0).float().cpu()
            steps = self.per_step.setdefault(name, {})
            steps[self.step] = torch.maximum(steps[self.step], current) if self.step in steps else current
            total, count = self.squares.setdefault(name, {}).get(self.step, (0.0, 0))
            self.squares[name][self.step] = (total + rows.float().pow(2).sum(0).cpu(), count + rows.shape[0])

        return record


@contextlib.contextmanager
def input_hooks(model: nn.Module, names: list[str], recorder: R) -> Iterator[R]:
    """Hook ``recorder.hook(name)`` before each named module's forward; removed on exit, even after an error."""
    handles = [model.get_submodule(name).register_forward_pre_hook(recorder.hook(name)) for name in names]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def capture_input_absmax(model: nn.Module, names: list[str]) -> contextlib.AbstractContextManager[_Recorder]:
    """Per-channel input absmax of the named linears, per sampling step (hooks removed on exit)."""
    return input_hooks(model, names, _Recorder())


def stats_from_recorder(recorder: _Recorder, timesteps: list[int]) -> ActivationStats:
    if not recorder.per_step:
        raise CalibrationError("calibration captured no activations (empty calibration set?)")
    absmax = {name: torch.stack([steps[i] for i in sorted(steps)]) for name, steps in recorder.per_step.items()}
    meansq = {name: torch.stack([steps[i][0] / steps[i][1] for i in sorted(steps)])
              for name, steps in recorder.squares.items()}
    return ActivationStats(absmax, timesteps, meansq)


def cache_key(model: nn.Module, settings: dict) -> str:
    """Hash of the model's weights summary and the calibration settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        if tensor.is_floating_point() and tensor.numel():
            digest.update(f"{float(tensor.float().sum()):.6e}".encode())
    return digest.hexdigest()[:20]
