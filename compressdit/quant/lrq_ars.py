"""LRQ-DiT's Adaptive Rotation Scheme, chosen by measured error: each twin-log layer takes the candidate rotation
(randomized Hadamard or DuQuant's ``R1 P R2``) under which quantizing its balanced, rotated input costs the
least layer-output error on the calibration inputs.

The paper's rule, ``J = ||X||_F / sqrt(N C) >= 1`` -> DuQuant, is kept as ``ars: {select: fluctuation}``; ``J``
is the input's RMS, so it depends on the layer's scale rather than on how concentrated its outliers are (on
dit-fmnist it sent 39 of 84 layers to DuQuant, most of them worse off than under Hadamard).

The error of candidate ``T`` for a layer ``y = x W^T`` with balancing ``s``: the sum over every calibration
token of ``||(Q(x' T) - x' T) (W' T)^T||^2``, ``x' = x / s``, ``W' = W s``, ``Q`` the spec's activation
quantizer (the float weight: it isolates what the rotation is for). Accumulated by a self-removing forward
pre-hook per layer while the calibrate stage's sampling loop is replayed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from compressdit.calibration.stats import input_hooks
from compressdit.errors import CalibrationError
from compressdit.quant.activations import quantize_input
from compressdit.quant.rotation import balancing_scale
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.twinlog_layer import INPUT_ROTATIONS

ARS_CANDIDATES = ("hadamard", "duquant")


@dataclass
class _Candidate:
    spec: LinearQuantSpec
    rotation: Any                                          # the rotation's prepared (runtime) form
    apply: Callable[[torch.Tensor, Any], torch.Tensor]     # its INPUT_ROTATIONS entry's apply
    weight: torch.Tensor                                   # W' T, [out, in]


@dataclass
class RotationErrorRecorder:
    """Per layer: the balancing divisor and each candidate's rotated weight; accumulated output errors."""

    scales: dict[str, torch.Tensor | None] = field(default_factory=dict)
    candidates: dict[str, dict[str, _Candidate]] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            if self.scales[name] is not None:
                x = x / self.scales[name]
            for label, c in self.candidates[name].items():
                rotated = c.apply(x, c.rotation)
                error = quantize_input(rotated, c.spec) - rotated
                self.errors[name][label] += float((error @ c.weight.T).pow(2).sum())
            self.rows[name] += x.shape[0]

        return record

    def best(self, name: str) -> str:
        """The candidate with the lowest accumulated error (the first of ``ARS_CANDIDATES`` on a tie)."""
        if not self.rows.get(name):
            raise CalibrationError(f"{name} saw no input while ARS measured its rotations")
        return min(self.errors[name], key=lambda label: (self.errors[name][label], ARS_CANDIDATES.index(label)))


@torch.no_grad()
def prepare_candidates(recorder: RotationErrorRecorder, linear: nn.Linear, name: str, spec: LinearQuantSpec,
                       absmax: torch.Tensor | None, steps: int) -> None:
    """Fit every candidate rotation of ``name`` to its balanced calibrated absmax, as the layer will."""
    weight = linear.weight.detach().float()
    scale = None
    if spec.balance is not None:
        if absmax is None:
            raise CalibrationError(f"{name}: channel balancing needs calibration statistics (run a calibrate stage)")
        scale = balancing_scale(absmax.to(weight.device).float(), weight, spec.balance)
        weight, absmax = weight * scale, absmax.to(weight.device).float() / scale
    recorder.scales[name] = scale
    recorder.candidates[name], recorder.errors[name], recorder.rows[name] = {}, {}, 0
    for label in ARS_CANDIDATES:
        entry = INPUT_ROTATIONS.get(label)
        states = {k: v.to(weight.device) for k, v in entry.fit(linear.in_features, absmax, steps).items()}
        rotation = entry.prepare(states)
        recorder.candidates[name][label] = _Candidate(spec, rotation, entry.apply, entry.apply(weight, rotation))
        recorder.errors[name][label] = 0.0


def capture_rotation_errors(model: nn.Module, names: list[str], recorder: RotationErrorRecorder
                            ) -> contextlib.AbstractContextManager[RotationErrorRecorder]:
    """Accumulate each prepared candidate's output error on the named layers' inputs (hooks removed on exit)."""
    return input_hooks(model, names, recorder)
