"""LRQ-DiT (Yang et al., arXiv 2508.03485): Twin-Log weights + the Adaptive Rotation Scheme (ARS).

Weights: format ``twinlog`` (:mod:`compressdit.quant.twinlog`), its per-row ``eta`` and clipping searched on the
layer's output error under the calibration inputs (``search: output``: the calibrate stage's sampling loop is
replayed with :func:`compressdit.calibration.hessian.capture_input_hessians` hooked, a few layers at a time).
Activations: dynamic, after the optional channel balancing, through a rotation ARS picks per layer: by default
(``select: error``) the one of randomized Hadamard and DuQuant's outlier-aware ``R1 P R2`` (fitted to the input's
calibrated absmax) whose quantized activations cost the least layer-output error on the calibration inputs; with
``select: fluctuation`` the paper's rule on ``J = ||X||_F / sqrt(N C)`` of the layer's input (at the calibration
timestep where it is largest): ``J < threshold`` -> Hadamard, ``J >= threshold`` -> DuQuant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from compressdit.calibration.hessian import capture_input_hessians, hessian_chunks
from compressdit.config_base import StrictConfig
from compressdit.errors import CalibrationError, ConfigError
from compressdit.progress import progress_bar
from compressdit.quant.context import QuantContext
from compressdit.quant.duquant import DEFAULT_STEPS
from compressdit.quant.gptq_calibration import HESSIAN_BUDGET_BYTES, hessian_rounded_layers
from compressdit.quant.lrq_ars import (ARS_CANDIDATES, RotationErrorRecorder, capture_rotation_errors,
                                      prepare_candidates)
from compressdit.quant.methods import METHODS, MethodHandler, rules_need_calibration
from compressdit.quant.transform import LayerRule, check_plan_fits, quantize_layers, resolve_plan
from compressdit.quant.twinlog_layer import TwinLogLinear


@dataclass
class ARSConfig(StrictConfig):
    """Adaptive Rotation Scheme: ``{select: error, steps: 256}`` picks each layer's rotation (Hadamard or DuQuant)
    by the output error of its quantized activations on the calibration inputs (:mod:`compressdit.quant.lrq_ars`);
    ``{select: fluctuation, threshold: 1.0}`` by the paper's ``J >= threshold`` -> DuQuant. ``steps``: DuQuant's
    greedy rotation steps (at most 256)."""

    select: Literal["error", "fluctuation"] = "error"
    threshold: float = 1.0
    steps: int = DEFAULT_STEPS

    def validate(self, where: str) -> None:
        self.require_positive(where, "threshold", "steps")
        if self.steps > DEFAULT_STEPS:
            raise ConfigError(f"{where}.steps: at most {DEFAULT_STEPS} (the stored length of a rotation), "
                              f"got {self.steps}")


@dataclass
class LRQConfig(StrictConfig):
    """YAML (``recipes/lrq-w4a4.yaml``)::

        method: lrq
        rules:
          - {match: "role:embedder", spec: null}
          - {match: "re:.*", spec: {format: twinlog, w_bits: 4, a_bits: 4, a_granularity: per_group,
                                    a_group_size: 16, balance: 0.5}}
        ars: {select: error}      # or {select: fluctuation, threshold: 1.0}; null: the rules' own rotation
        search: output            # TLQ clipping on the layer output error (calibration inputs), or weight

    With ``ars`` set, ARS chooses the rotation of every ``twinlog`` layer, so their specs leave ``rotation``
    unset. Layers of other formats in the rules are quantized as the ``rtn`` method would.
    """

    rules: list[LayerRule] = field(default_factory=list)
    ars: ARSConfig | None = field(default_factory=ARSConfig)
    search: Literal["output", "weight"] = "output"

    def validate(self, where: str) -> None:
        if not self.rules:
            raise ConfigError(f"{where}.rules: at least one rule is needed")
        for i, rule in enumerate(self.rules):
            if self.ars is not None and rule.spec is not None and rule.spec.format == "twinlog" \
                    and rule.spec.rotation != "none":
                raise ConfigError(f"{where}.rules[{i}].spec.rotation: ARS picks each twinlog layer's rotation; "
                                  "leave rotation unset or set ars: null")


def activation_fluctuation(meansq: torch.Tensor) -> float:
    """``J``: the largest over timesteps of ``||X_t||_F / sqrt(N C) = sqrt(mean_c E[x_c^2])`` (``meansq``
    ``[timesteps, C]``, the calibrate stage's per-step mean squares of a layer's input)."""
    return float(meansq.float().mean(-1).sqrt().max())


def _fluctuation(name: str, ctx: QuantContext) -> float:
    stats = ctx.calibration
    if stats is None or name not in stats.meansq:
        raise CalibrationError(f"ARS needs the mean squares of {name}'s input across timesteps: add a calibrate "
                               "stage before quantize (or set ars: null)")
    return activation_fluctuation(stats.meansq[name])


def _relative_output_error(linear: nn.Linear, module: TwinLogLinear, hessian: torch.Tensor | None) -> float:
    w = linear.weight.detach().float()
    diff = w - module.effective_weight()
    if hessian is None:
        return float(diff.pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
    h = hessian.float()
    return float(((diff @ h) * diff).sum() / ((w @ h) * w).sum().clamp_min(1e-30))


@torch.no_grad()
def _twinlog_modules(model: nn.Module, plan: dict, names: list[str], ctx: QuantContext, config: LRQConfig,
                     errors: dict[str, float], ars_errors: dict[str, dict[str, float]]) -> dict[str, nn.Module]:
    """The planned twinlog layers, quantized (not yet swapped in); with ``search: output`` from input Hessians.
    With ARS by error, each layer's rotation is measured on the same replay and written into ``plan`` first."""
    absmax = ctx.input_absmax(names)
    steps = config.ars.steps if config.ars is not None else DEFAULT_STEPS
    by_error = config.ars is not None and config.ars.select == "error"
    modules: dict[str, nn.Module] = {}

    def build(name: str, hessian: torch.Tensor | None) -> None:
        linear = model.get_submodule(name)
        modules[name] = TwinLogLinear.from_linear(linear, plan[name], absmax.get(name), hessian, steps)
        errors[name] = _relative_output_error(linear, modules[name], hessian)

    if config.search == "weight" and not by_error:
        for name in names:
            build(name, None)
        return modules
    what = f"lrq ({'search: output' if config.search == 'output' else 'ARS by error'})"
    ctx.require_calibration(what)
    widths = {n: model.get_submodule(n).in_features for n in names}
    chunks = hessian_chunks(widths, HESSIAN_BUDGET_BYTES) if config.search == "output" else [names]
    with progress_bar("lrq: calibration replay + twin-log search", total=len(names), quiet=ctx.quiet) as bar:
        for chunk in chunks:
            rotations = RotationErrorRecorder()
            with contextlib.ExitStack() as stack:
                hessians = stack.enter_context(capture_input_hessians(model, chunk)) \
                    if config.search == "output" else None
                if by_error:
                    for name in chunk:
                        prepare_candidates(rotations, model.get_submodule(name), name, plan[name], absmax.get(name),
                                           steps)
                    stack.enter_context(capture_rotation_errors(model, chunk, rotations))
                ctx.replay_calibration(model, what)
            for name in chunk:
                if by_error:
                    plan[name] = dataclasses.replace(plan[name], rotation=rotations.best(name))
                    ars_errors[name] = rotations.errors.pop(name)
                    rotations.candidates.pop(name)
                build(name, hessians.pop(name) if hessians is not None else None)
                bar.update(1)
    return modules


def _apply_lrq(model: nn.Module, config: LRQConfig, ctx: QuantContext) -> dict:
    started = time.perf_counter()
    plan = resolve_plan(model, ctx.adapter, config.rules)
    names = [n for n, s in plan.items() if s is not None and s.format == "twinlog"]
    fluctuation: dict[str, float] = {}
    if config.ars is not None:
        for name in names:
            fluctuation[name] = _fluctuation(name, ctx)
            if config.ars.select == "fluctuation":
                rotation = "duquant" if fluctuation[name] >= config.ars.threshold else "hadamard"
                plan[name] = dataclasses.replace(plan[name], rotation=rotation)
    errors: dict[str, float] = {}
    ars_errors: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        check_plan_fits(model, plan)
        prebuilt = {**hessian_rounded_layers(model, plan, ctx),
                    **_twinlog_modules(model, plan, names, ctx, config, errors, ars_errors)}
        quantize_layers(model, plan, ctx.input_absmax(plan), prebuilt)
    outlier = [n for n in names if plan[n].rotation == "duquant"]
    share = {n: {k: v / max(sum(e.values()), 1e-30) for k, v in e.items()} for n, e in ars_errors.items()}
    ctx.tables.append({
        "title": f"lrq: activation fluctuation J, ARS rotation (share of the candidates' activation error) and "
                 f"twin-log relative {config.search} error per layer",
        "header": ["module", "J", "rotation", "hadamard share", "duquant share", "rel. error"],
        "rows": [[n, round(fluctuation[n], 4) if n in fluctuation else "-", plan[n].rotation,
                  *([round(share[n][k], 4) for k in ARS_CANDIDATES] if n in share else ["-", "-"]),
                  round(errors[n], 6)] for n in names],
    })
    rule = "off" if config.ars is None else (f"by error: {len(outlier)} DuQuant, {len(names) - len(outlier)} Hadamard"
                                             if config.ars.select == "error" else
                                             f"threshold {config.ars.threshold}: {len(outlier)} DuQuant, "
                                             f"{len(names) - len(outlier)} Hadamard")
    ctx.notes.append(f"lrq: {len(names)} twin-log layers ({config.search} search), ARS {rule} "
                     f"({time.perf_counter() - started:.1f} s)")
    return {name: spec for name, spec in plan.items() if spec is not None}


def _needs_calibration(config: LRQConfig) -> bool:
    return config.ars is not None or config.search == "output" or rules_need_calibration(config.rules)


METHODS.add("lrq", MethodHandler(LRQConfig, _apply_lrq, _needs_calibration))
