"""FP4DiT (arXiv 2503.15465): per-layer 4-bit FP weight format by calibration error, then scale-aware AdaRound.

The paper gives the FFN up-projection (before GELU) E3M0 and other layers E2M1 (or E1M2). Here nothing is
hard-coded: for every planned layer whose spec names one of ``formats``, the calibrate stage's sampling loop is
replayed once with input-Hessian hooks (:mod:`compressdit.calibration.hessian`), and the layer takes the format
whose round-to-nearest weight gives the lowest layer-output error over the calibration inputs,
``E||X (W - W_q)^T||^2 / E||X W^T||^2 = tr(dW H dW^T) / tr(W H W^T)`` with ``H = 2 X^T X / n`` (exact, no
sampling of rows). The chosen formats are recorded per module in the checkpoint manifest. Layers then round as
their spec says (``rounding: adaround``: block-output reconstruction over the calibration timesteps with this
config's ``adaround`` settings). Activations are the spec's (dynamic per-token E4M3 at A8, E3M2 at A6, the paper's);
with several ``a_formats`` (e.g. ``[e3m2, e2m3]`` at A6) each layer's activation format is chosen the same way,
by its measured layer-output error over the calibration inputs (:mod:`compressdit.quant.activation_choice`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from compressdit.calibration.hessian import hessian_chunks
from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.progress import progress_bar
from compressdit.quant.activation_choice import choose_activation_formats, validate_activation_candidates
from compressdit.quant.adaround import AdaRoundSettings
from compressdit.quant.adaround_calibration import reconstructed_layers
from compressdit.quant.context import QuantContext
from compressdit.quant.fp_layer import FP_WEIGHT_FORMATS
from compressdit.quant.fp_weights import quantize_weight_fp
from compressdit.quant.gptq_calibration import HESSIAN_BUDGET_BYTES, hessian_rounded_layers, layer_hessians
from compressdit.quant.methods import METHODS, MethodHandler, rules_need_calibration
from compressdit.quant.minifloat import MINIFLOATS
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule, check_plan_fits, quantize_layers, resolve_plan


@dataclass
class FP4DiTConfig(StrictConfig):
    """FP4DiT: each planned layer's 4-bit FP format chosen among ``formats`` by measured layer-output error, then
    rounded as its spec says; ``a_formats`` (optional, one width) lets each layer's activation format be chosen
    the same way (``[]``: the spec's). YAML (``recipes/fp4-w4a8.yaml``; ``recipes/fp4-w4a6.yaml`` adds
    ``a_formats: [e3m2, e2m3]``)::

        method: fp4dit
        formats: [e2m1, e3m0, e1m2]
        adaround: {iters: 300}
        rules:
          - {match: "role:embedder", spec: null}
          - {match: "role:head", spec: null}
          - {match: "re:.*", spec: {format: e2m1, w_bits: 4, group_size: 64, rounding: adaround,
                                    a_bits: 8, a_format: e4m3, a_granularity: per_token}}
    """

    rules: list[LayerRule] = field(default_factory=list)
    formats: list[str] = field(default_factory=lambda: list(FP_WEIGHT_FORMATS))
    adaround: AdaRoundSettings = field(default_factory=AdaRoundSettings)
    a_formats: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if not self.rules:
            raise ConfigError(f"{where}.rules: at least one rule is needed")
        unknown = [f for f in self.formats if f not in FP_WEIGHT_FORMATS]
        if not self.formats or unknown or len(set(self.formats)) != len(self.formats):
            raise ConfigError(f"{where}.formats: a list of distinct 4-bit FP weight formats out of "
                              f"{', '.join(FP_WEIGHT_FORMATS)}; got {self.formats}")
        if self.a_formats:
            validate_activation_candidates(self.a_formats, f"{where}.a_formats")


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative layer-output error ``tr(dW H dW^T) / tr(W H W^T)`` for inputs of second moment ``H / 2``."""
    delta = (quantized - weight).float()
    return float(((delta @ hessian) * delta).sum() / ((weight @ hessian) * weight).sum().clamp_min(1e-30))


def choose_formats(model: nn.Module, plan: dict[str, LinearQuantSpec | None], formats: list[str],
                   ctx: QuantContext) -> tuple[dict[str, LinearQuantSpec | None], list[list]]:
    """The plan with each candidate layer's format replaced by its lowest-error one, and a table of the errors."""
    names = [n for n, s in plan.items() if s is not None and s.format in formats]
    if len(formats) < 2 or not names:
        return plan, []
    chosen, rows = dict(plan), []
    chunks = hessian_chunks({n: model.get_submodule(n).in_features for n in names}, HESSIAN_BUDGET_BYTES)
    hessians = layer_hessians(model, chunks, ctx, "fp4dit's choice of each layer's FP format (or list a single format)")
    with progress_bar("fp4dit: format per layer", total=len(names), quiet=ctx.quiet) as bar:
        for name, hessian in hessians:
            spec = plan[name]
            weight = model.get_submodule(name).weight.detach().float()
            errors = {fmt: output_error(weight, quantize_weight_fp(weight, MINIFLOATS.get(fmt), spec.group_size,
                                                                   spec.w_range).dequantized(), hessian)
                      for fmt in formats}
            best = min(formats, key=errors.__getitem__)
            chosen[name] = dataclasses.replace(spec, format=best)
            rows.append([name, ctx.adapter.role_of(name) or "-", *(round(errors[f], 6) for f in formats), best])
            bar.update(1)
    return chosen, rows


def _apply_fp4dit(model: nn.Module, config: FP4DiTConfig, ctx: QuantContext) -> dict:
    started = time.perf_counter()
    plan = resolve_plan(model, ctx.adapter, config.rules)
    with torch.no_grad():
        check_plan_fits(model, plan)
        plan, rows = choose_formats(model, plan, config.formats, ctx)
    if rows:
        ctx.tables.append({"title": "fp4dit: relative layer-output error of each FP format (round-to-nearest) "
                                    "over the calibration inputs, and the format chosen",
                           "header": ["module", "role", *config.formats, "chosen"], "rows": rows})
        by_role: dict[str, dict[str, int]] = {}
        for row in rows:
            counts = by_role.setdefault(row[1], {})
            counts[row[-1]] = counts.get(row[-1], 0) + 1
        ctx.notes.append("fp4dit formats chosen by layer-output error: " + "; ".join(
            f"{role}: " + ", ".join(f"{fmt} x{n}" for fmt, n in sorted(c.items())) for role, c in by_role.items())
            + f" ({time.perf_counter() - started:.1f} s)")
    started = time.perf_counter()
    plan, rows = choose_activation_formats(model, plan, config.a_formats, ctx)
    if rows:
        ctx.tables.append({"title": "fp4dit: relative layer-output error of each activation format over the "
                                    "calibration inputs, and the format chosen",
                           "header": ["module", "role", *config.a_formats, "chosen"], "rows": rows})
        counts: dict[str, int] = {}
        for row in rows:
            counts[row[-1]] = counts.get(row[-1], 0) + 1
        ctx.notes.append("fp4dit activation formats chosen by layer-output error: " + ", ".join(
            f"{fmt} x{n}" for fmt, n in sorted(counts.items())) + f" ({time.perf_counter() - started:.1f} s)")
    with torch.no_grad():
        prebuilt = {**hessian_rounded_layers(model, plan, ctx),
                    **reconstructed_layers(model, plan, ctx, config.adaround)}
        quantize_layers(model, plan, ctx.input_absmax(plan), prebuilt)
    return {name: spec for name, spec in plan.items() if spec is not None}


METHODS.add("fp4dit", MethodHandler(FP4DiTConfig, _apply_fp4dit,
                                    lambda cfg: len(cfg.formats) > 1 or len(cfg.a_formats) > 1
                                    or rules_need_calibration(cfg.rules)))
