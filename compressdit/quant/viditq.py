"""ViDiT-Q (Zhao et al., ICLR'25): static-dynamic channel balancing, rotation, metric-decoupled MP.

Weights: static per output channel (or group). Activations: dynamic per token, which absorbs the
variation across timesteps and CFG branches. Channel balancing divides activations by a per-channel
scale from calibration statistics (folded into the weights offline), and an optional randomized
Hadamard rotation spreads what varies over time. With ``mixed_precision`` each layer's sensitivity is
measured and the most sensitive layers get ``high_bits`` under an average-bits budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.quant.context import QuantContext
from compressdit.quant.methods import METHODS, MethodHandler, apply_plan, rules_need_calibration
from compressdit.quant.mixed_precision import MixedPrecisionConfig, mixed_precision_plan
from compressdit.quant.transform import LayerRule, resolve_plan


@dataclass
class ViDiTQConfig(StrictConfig):
    """YAML::

        method: viditq
        rules:
          - {match: "role:embedder", spec: null}
          - {match: "re:.*", spec: {w_bits: 4, a_bits: 8, balance: 0.2, rotation: hadamard}}
        mixed_precision: {avg_weight_bits: 4.5, high_bits: 8}   # optional (ViDiT-Q-MP)

    ``balance`` is SmoothQuant's migration strength (ViDiT-Q's alpha is ``1 - balance``).
    """

    rules: list[LayerRule] = field(default_factory=list)
    mixed_precision: MixedPrecisionConfig | None = None

    def validate(self, where: str) -> None:
        if not self.rules:
            raise ConfigError(f"{where}.rules: at least one rule is needed")


def _apply_viditq(model: nn.Module, config: ViDiTQConfig, ctx: QuantContext) -> dict:
    plan = resolve_plan(model, ctx.adapter, config.rules)
    if config.mixed_precision is not None:
        plan = mixed_precision_plan(model, plan, ctx, config.mixed_precision)
    return apply_plan(model, plan, ctx)


def _needs_calibration(config: ViDiTQConfig) -> bool:
    """Balancing and static scales use activation statistics; mixed precision samples calibration conditions."""
    return rules_need_calibration(config.rules) or config.mixed_precision is not None


def _plan_rules(config: ViDiTQConfig) -> list[LayerRule] | None:
    """The rules (layer by layer), unless mixed precision ranks the layers against each other."""
    return None if config.mixed_precision is not None else config.rules


METHODS.add("viditq", MethodHandler(ViDiTQConfig, _apply_viditq, _needs_calibration, _plan_rules))
