"""Quantization methods: one typed config + one registered handler each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.models.base import ModelAdapter
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule, quantize_layers, resolve_plan
from compressdit.registry import Registry


@dataclass(frozen=True)
class MethodHandler:
    config_class: type[StrictConfig]
    apply: Callable[[nn.Module, ModelAdapter, Any, Any], dict[str, LinearQuantSpec]]
    needs_calibration: Callable[[Any], bool]


METHODS: Registry[MethodHandler] = Registry("quantization method")


@dataclass
class RTNConfig(StrictConfig):
    """Round-to-nearest min/max (the baseline every method is compared with).

    Weights per output channel (or per group), activations per token / per tensor (dynamic) or
    static from calibration. Layers chosen by ordered rules, first match wins. YAML::

        method: rtn
        rules:
          - {match: "role:embedder", spec: null}
          - {match: "re:.*", spec: {w_bits: 8, a_bits: 8, a_granularity: per_token}}
    """

    rules: list[LayerRule] = field(default_factory=list)
    name: ClassVar[str] = "rtn"

    def validate(self, where: str) -> None:
        if not self.rules:
            raise ConfigError(f"{where}.rules: at least one rule is needed")


def _apply_rtn(model: nn.Module, adapter: ModelAdapter, config: RTNConfig, calibration) -> dict:
    plan = resolve_plan(model, adapter, config.rules)
    absmax = None
    if calibration is not None:
        absmax = {name: calibration.channel_absmax(name) for name in plan if name in calibration.absmax}
    with torch.no_grad():
        quantize_layers(model, plan, absmax)
    return {name: spec for name, spec in plan.items() if spec is not None}


METHODS.add("rtn", MethodHandler(
    config_class=RTNConfig,
    apply=_apply_rtn,
    needs_calibration=lambda cfg: any(r.spec is not None and r.spec.a_bits and r.spec.a_granularity == "static"
                                      for r in cfg.rules),
))
