"""Per-layer activation format by calibration error: FP4DiT's choice of format by measured error, for the inputs.

FP4DiT (arXiv 2503.15465) picks each layer's weight format by calibration error and fixes the activation format
(E3M2 at 6 bits). With several candidate ``a_formats`` of the spec's width, the calibrate stage's sampling loop is
replayed once with a forward pre-hook on every candidate layer that fake-quantizes the layer's input in each
format and accumulates the relative layer-output error over all prompts, timesteps and guidance branches::

    err(f) = sum ||(Q_f(x) - x) W^T||^2 / sum ||x W^T||^2        (full-precision W, bias left out)

and the layer takes the format of lowest error. The hook only reads; the replay sees the full-precision model.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from compressdit.calibration.stats import input_hooks
from compressdit.errors import CalibrationError, ConfigError
from compressdit.quant.activations import ACTIVATION_FORMATS, quantize_input
from compressdit.quant.context import QuantContext
from compressdit.quant.spec import LinearQuantSpec


def validate_activation_candidates(formats: list[str], where: str) -> None:
    """Known, distinct, element formats (block formats carry their own granularity) of one bit width."""
    unknown = [f for f in formats if f not in ACTIVATION_FORMATS]
    blocks = [f for f in formats if f in ACTIVATION_FORMATS and ACTIVATION_FORMATS.get(f).block is not None]
    widths = {ACTIVATION_FORMATS.get(f).bits for f in formats if f not in unknown} - {None}
    if unknown or blocks or len(set(formats)) != len(formats) or len(widths) > 1:
        raise ConfigError(f"{where}: a list of distinct activation element formats of one width (e.g. [e3m2, e2m3] "
                          f"at 6 bits; int fits any width; no block formats) out of {', '.join(ACTIVATION_FORMATS)}; "
                          f"got {formats}")


class ActivationErrorRecorder:
    """Running output error of each candidate activation format, and the output energy, per layer."""

    def __init__(self, candidates: dict[str, list[LinearQuantSpec]]) -> None:
        self.candidates = candidates
        self.errors = {name: [0.0] * len(specs) for name, specs in candidates.items()}
        self.energy = {name: 0.0 for name in candidates}

    def hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            weight = module.weight.detach().float()
            self.energy[name] += float((x @ weight.T).square().sum())
            for i, spec in enumerate(self.candidates[name]):
                self.errors[name][i] += float(((quantize_input(x, spec) - x) @ weight.T).square().sum())

        return record

    def relative(self, name: str) -> list[float]:
        if self.energy[name] <= 0.0:
            raise CalibrationError(f"{name} saw no (non-zero) input during calibration; its activation format "
                                   "cannot be chosen (give it one a_format)")
        return [e / self.energy[name] for e in self.errors[name]]


@torch.no_grad()
def choose_activation_formats(model: nn.Module, plan: dict[str, LinearQuantSpec | None], formats: list[str],
                              ctx: QuantContext) -> tuple[dict[str, LinearQuantSpec | None], list[list]]:
    """``plan`` with each candidate layer's ``a_format`` (layers whose spec quantizes activations in one of
    ``formats``) replaced by the lowest-error one, and a table row per layer (module, role, errors, chosen)."""
    names = [n for n, s in plan.items() if s is not None and s.a_bits is not None and s.a_format in formats]
    if len(formats) < 2 or not names:
        return plan, []
    candidates = {}
    for name in names:
        specs = [dataclasses.replace(plan[name], a_format=f) for f in formats]
        for spec in specs:
            spec.validate(f"{name} (a_format {spec.a_format})")
        candidates[name] = specs
    with input_hooks(model, names, ActivationErrorRecorder(candidates)) as recorder:
        ctx.replay_calibration(model, "choosing each layer's activation format (or list a single a_format)")
    chosen, rows = dict(plan), []
    for name in names:
        errors = recorder.relative(name)
        best = min(range(len(formats)), key=errors.__getitem__)
        chosen[name] = candidates[name][best]
        rows.append([name, ctx.adapter.role_of(name) or "-", *(round(e, 7) for e in errors), formats[best]])
    return chosen, rows
