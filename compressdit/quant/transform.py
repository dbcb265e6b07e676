"""Model-level transforms: resolve layer rules to a per-module plan, swap modules, build empty ones."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import torch
from diffusers.models.activations import GELU
from torch import nn

from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.models.base import ROLES, ModelAdapter
from compressdit.models.lookup import registered_adapter
from compressdit.quant.formats import FORMATS
from compressdit.quant.layers import QuantizedLinear
from compressdit.quant.native_gelu import swap_activation
from compressdit.quant.spec import LinearQuantSpec


@dataclass
class LayerRule(StrictConfig):
    """One ordered rule: ``match`` is an exact module name, ``re:REGEX`` (full match) or ``role:ROLE``.

    ``spec: null`` keeps the matched layers in full precision. YAML::

        - {match: "role:embedder", spec: null}
        - {match: "re:transformer_blocks\\.0\\..*", spec: {w_bits: 8, a_bits: 8}}
    """

    match: str
    spec: LinearQuantSpec | None = None

    def validate(self, where: str) -> None:
        if self.match.startswith("re:"):
            try:
                re.compile(self.match[3:])
            except re.error as exc:
                raise ConfigError(f"{where}.match: invalid regex {self.match[3:]!r}: {exc}") from None
        elif self.match.startswith("role:") and self.match[5:] not in ROLES:
            raise ConfigError(f"{where}.match: unknown role {self.match[5:]!r}; roles: {', '.join(ROLES)}")

    def matches(self, name: str, role: str | None) -> bool:
        if self.match.startswith("re:"):
            return re.fullmatch(self.match[3:], name) is not None
        if self.match.startswith("role:"):
            return role == self.match[5:]
        return name == self.match


def resolve_plan(model: nn.Module, adapter: ModelAdapter, rules: list[LayerRule]) -> dict[str, LinearQuantSpec | None]:
    """First matching rule wins for every linear layer; unmatched layers stay in full precision. A rule naming
    one module exactly that is no linear layer of ``model`` is an error (a typo would quantize it silently)."""
    plan: dict[str, LinearQuantSpec | None] = {}
    for name in adapter.linear_layers(model):
        role = adapter.role_of(name)
        plan[name] = next((rule.spec for rule in rules if rule.matches(name, role)), None)
    for rule in rules:
        if not rule.match.startswith(("re:", "role:")) and rule.match not in plan:
            close = difflib.get_close_matches(rule.match, list(plan), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"rule match {rule.match!r} names no linear layer of {type(model).__name__}{hint}")
    return plan


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name``; a tanh GELU projection whose ``proj`` becomes quantized runs its GELU natively
    from then on, and back when a float layer returns (:mod:`compressdit.quant.native_gelu`)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    activation = _activation_after(model, parent_name, parent, child)
    if activation is not None:
        swap_activation(activation, isinstance(module, QuantizedLinear))


def _activation_after(model: nn.Module, parent_name: str, parent: nn.Module, child: str) -> nn.Module | None:
    """The activation module that reads the output of ``parent.<child>``: a diffusers GELU projection's own, or the
    one of a parallel MLP of ``model``'s adapter whose up projection that is; ``None`` where none is known."""
    if child == "proj" and isinstance(parent, GELU):
        return parent
    adapter = registered_adapter(model)
    for mlp in adapter.parallel_mlps if adapter is not None else ():
        if child == mlp.up and re.fullmatch(mlp.block, parent_name):
            return getattr(parent, mlp.activation, None)
    return None


def _linear(model: nn.Module, name: str, where: str) -> nn.Linear:
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"{where} names module {name!r}, which the model does not have") from None
    if not isinstance(linear, nn.Linear):
        raise ConfigError(f"{where} names {name!r}, a {type(linear).__name__}, not a Linear")
    return linear


def check_plan_fits(model: nn.Module, plan: dict[str, LinearQuantSpec | None]) -> None:
    """Raise a clear error when a layer's width does not fit its spec (e.g. group size)."""
    for name, spec in plan.items():
        if spec is None:
            continue
        linear = _linear(model, name, "quantization plan")
        if isinstance(linear, QuantizedLinear):
            raise ConfigError(f"{name} is already quantized ({linear.spec.label}); a recipe quantizes a layer once")
        FORMATS.get(spec.format).check_fits(name, linear, spec)


@torch.no_grad()
def quantize_layers(model: nn.Module, plan: dict[str, LinearQuantSpec | None],
                    input_absmax: dict[str, torch.Tensor] | None = None,
                    prebuilt: dict[str, nn.Module] | None = None) -> nn.Module:
    """Replace every planned ``nn.Linear`` by its quantized module (in place); ``prebuilt`` modules (e.g. GPTQ's,
    quantized from calibration Hessians) are swapped in as they are."""
    check_plan_fits(model, plan)
    for name, spec in plan.items():
        if spec is None:
            continue
        if prebuilt and name in prebuilt:
            set_module(model, name, prebuilt[name])
            continue
        linear = model.get_submodule(name)
        stats = (input_absmax or {}).get(name)
        set_module(model, name, FORMATS.get(spec.format).quantize(linear, spec, stats))
    return model


def build_empty_layers(model: nn.Module, plan: dict[str, LinearQuantSpec]) -> nn.Module:
    """Swap planned linears for empty quantized modules (on the linears' device, e.g. ``meta``)."""
    for name, spec in plan.items():
        linear = _linear(model, name, "quantization_config")
        set_module(model, name, FORMATS.get(spec.format).empty(linear, spec))
    return model


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def dequantize_layers(model: nn.Module) -> nn.Module:
    """Replace every quantized module by a plain ``nn.Linear`` with the dequantized weight."""
    for name, module in list(quantized_modules(model).items()):
        set_module(model, name, module.to_float_linear())
    return model
