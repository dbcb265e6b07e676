"""Quantization methods: one typed config + one registered handler each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.quant.context import QuantContext
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.adaround_calibration import reconstructed_layers
from compressdit.quant.gptq_calibration import hessian_rounded_layers
from compressdit.quant.rounding import ROUNDINGS
from compressdit.quant.transform import LayerRule, check_plan_fits, quantize_layers, resolve_plan
from compressdit.registry import Registry


@dataclass(frozen=True)
class MethodHandler:
    config_class: type[StrictConfig]
    apply: Callable[[nn.Module, Any, QuantContext], dict[str, LinearQuantSpec]]
    needs_calibration: Callable[[Any], bool]
    # the ordered rules that alone give a config's plan (each layer from its own weights and statistics, nothing
    # decided over layers jointly); None (or returning None for a config) elsewhere. With ``needs_calibration``
    # false, what a float checkpoint can be quantized with as it loads
    plan_rules: Callable[[Any], list[LayerRule] | None] | None = None

    def layer_plan(self, model: nn.Module, config: Any, ctx: QuantContext) -> dict[str, LinearQuantSpec | None] | None:
        """The per-layer plan where :attr:`plan_rules` gives one (every layer quantized from its own weights and
        calibration statistics alone, so that quantizing block by block equals ``apply``: streaming); None where
        layers are quantized jointly."""
        rules = None if self.plan_rules is None else self.plan_rules(config)
        return None if rules is None else resolve_plan(model, ctx.adapter, rules)


METHODS: Registry[MethodHandler] = Registry("quantization method")


def rules_need_calibration(rules: list[LayerRule]) -> bool:
    return any(r.spec is not None and (r.spec.balance is not None or (r.spec.a_bits and
                                                                      r.spec.a_granularity == "static")
                                       or ROUNDINGS.get(r.spec.rounding).needs_hessian
                                       or ROUNDINGS.get(r.spec.rounding).reconstructs_blocks)
               for r in rules)


@dataclass
class RTNConfig(StrictConfig):
    """Round-to-nearest min/max (the baseline every method is compared with), or GPTQ where a spec says
    ``rounding: gptq`` (needs a calibrate stage: the layer-input Hessians come from its sampling run).

    Weights per output channel (or per group), activations per token / per tensor (dynamic) or
    static from calibration. Layers chosen by ordered rules, first match wins. YAML::

        method: rtn
        rules:
          - {match: "role:embedder", spec: null}
          - {match: "re:.*", spec: {w_bits: 8, a_bits: 8, a_granularity: per_token}}
    """

    rules: list[LayerRule] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if not self.rules:
            raise ConfigError(f"{where}.rules: at least one rule is needed")


def apply_plan(model: nn.Module, plan: dict[str, LinearQuantSpec | None], ctx: QuantContext) -> dict:
    with torch.no_grad():
        check_plan_fits(model, plan)
        prebuilt = {**hessian_rounded_layers(model, plan, ctx), **reconstructed_layers(model, plan, ctx)}
        quantize_layers(model, plan, ctx.input_absmax(plan), prebuilt)
    return {name: spec for name, spec in plan.items() if spec is not None}


def _apply_rtn(model: nn.Module, config: RTNConfig, ctx: QuantContext) -> dict:
    return apply_plan(model, resolve_plan(model, ctx.adapter, config.rules), ctx)


METHODS.add("rtn", MethodHandler(RTNConfig, _apply_rtn, lambda cfg: rules_need_calibration(cfg.rules),
                                 lambda cfg: cfg.rules))
