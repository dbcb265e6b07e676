"""Metric-decoupled mixed precision (ViDiT-Q-MP): measure each layer's sensitivity, allocate bits greedily.

A layer's sensitivity is the damage when it alone is quantized at the low precision, scored with its
group's metric: layers that carry conditioning (cross-attention, adaLN modulation, context stream) by
*condition fidelity* (relative error of the guidance direction ``eps_cond - eps_uncond`` on the
full-precision trajectory); temporal attention of video families that have it separately (role ``temporal``,
adapter with a ``frame_axis``) by *temporal fidelity* (relative error of the frame-to-frame differences of the
final latents); the rest by *image fidelity* (relative error of the final latents, same seeds). Scores are normalised within each group, then layers are promoted to the high precision by
damage per extra weight bit until the average-bits budget is spent.

``budget: codes`` (ViDiT-Q's accounting) counts the code bits only (``w_bits``); ``budget: stored`` counts every
tensor a quantized layer stores except its bias (codes, scales, zero points, balancing scales, low-rank branch),
as measured from the layer's empty module, so ``avg_weight_bits`` is what the checkpoint really holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.evaluate.metrics import relative_error
from compressdit.models.prompt_encoders import encode_conditions, encode_null
from compressdit.models.sampling import sample
from compressdit.plots import plot_to_file
from compressdit.progress import progress_bar
from compressdit.quant.context import QuantContext
from compressdit.quant.formats import FORMATS
from compressdit.quant.spec import LinearQuantSpec

CONDITION_ROLES = frozenset({"cross_q", "cross_kv", "cross_out", "adaln", "context"})
TEMPORAL_ROLES = frozenset({"temporal"})
GROUPS = ("condition", "temporal", "image")


def sensitivity_group(adapter, name: str) -> str:
    """``condition``, ``temporal`` (only for adapters with a frame axis) or ``image``, from the layer's role."""
    role = adapter.role_of(name)
    if role in CONDITION_ROLES:
        return "condition"
    if role in TEMPORAL_ROLES and adapter.frame_axis is not None:
        return "temporal"
    return "image"


@dataclass
class MixedPrecisionConfig(StrictConfig):
    """YAML::

        mixed_precision: {avg_weight_bits: 4.5, high_bits: 8, probe_samples: 16, probe_steps: 10,
                          budget: stored}   # codes (default): w_bits only; stored: scales etc. counted too
    """

    avg_weight_bits: float = 4.5
    budget: Literal["codes", "stored"] = "codes"
    high_bits: int = 8
    probe_samples: int = 16
    probe_steps: int = 10
    guidance: float = 4.0
    seed: int = 4321

    def validate(self, where: str) -> None:
        if not 2.0 <= self.avg_weight_bits <= 16.0:
            raise ConfigError(f"{where}.avg_weight_bits: {self.avg_weight_bits} is out of range [2, 16]")
        if not 2 <= self.high_bits <= 8:
            raise ConfigError(f"{where}.high_bits: {self.high_bits} is out of range [2, 8]")
        if self.probe_samples < 1 or self.probe_steps < 1:
            raise ConfigError(f"{where}: probe_samples and probe_steps must be positive")


@dataclass
class Sensitivity:
    name: str
    group: str
    params: int
    damage: float
    normalised: float = 0.0


class _Probe:
    """Full-precision references computed once: final latents and the trajectory's guidance directions."""

    def __init__(self, model: nn.Module, ctx: QuantContext, config: MixedPrecisionConfig) -> None:
        if not ctx.conditions:
            raise ConfigError("mixed precision needs calibration conditions: add a calibrate stage before quantize")
        if ctx.adapter.drives_pipeline:  # its probes call the transformer outside the pipeline's loop
            raise ctx.adapter.cannot_sample()
        self.model, self.ctx, self.config = model, ctx, config
        self.conditions = (ctx.conditions * config.probe_samples)[: config.probe_samples]
        adapter = ctx.adapter
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.final = sample(adapter, model, self.conditions, ctx.scheduler, steps=config.probe_steps,
                            guidance=config.guidance, seed=config.seed, prompt_encoder=ctx.prompt_encoder,
                            on_step=lambda i, t, x, p: self.records.append((t.reshape(1), x.clone(), None)))
        self.cond = encode_conditions(adapter, model, self.conditions, ctx.prompt_encoder)
        self.uncond = encode_null(adapter, model, len(self.conditions), ctx.prompt_encoder)
        self.directions = [self._direction(t, x) for t, x, _ in self.records]

    @torch.no_grad()
    def _direction(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        adapter = self.ctx.adapter
        return (adapter.predict(self.model, x, t, self.cond) - adapter.predict(self.model, x, t, self.uncond)).float()

    @torch.no_grad()
    def image_damage(self) -> float:
        latents = sample(self.ctx.adapter, self.model, self.conditions, self.ctx.scheduler,
                         steps=self.config.probe_steps, guidance=self.config.guidance, seed=self.config.seed,
                         prompt_encoder=self.ctx.prompt_encoder)
        return relative_error(latents, self.final)

    @torch.no_grad()
    def temporal_damage(self) -> float:
        axis = self.ctx.adapter.frame_axis
        latents = sample(self.ctx.adapter, self.model, self.conditions, self.ctx.scheduler,
                         steps=self.config.probe_steps, guidance=self.config.guidance, seed=self.config.seed,
                         prompt_encoder=self.ctx.prompt_encoder)
        return relative_error(torch.diff(latents, dim=axis), torch.diff(self.final, dim=axis))

    def damage(self, group: str) -> float:
        return {"condition": self.condition_damage, "temporal": self.temporal_damage,
                "image": self.image_damage}[group]()

    @torch.no_grad()
    def condition_damage(self) -> float:
        errors = [relative_error(self._direction(t, x), ref)
                  for (t, x, _), ref in zip(self.records, self.directions)]
        return float(sum(errors) / len(errors))


def measure_sensitivity(model: nn.Module, plan: dict[str, LinearQuantSpec], ctx: QuantContext,
                        config: MixedPrecisionConfig) -> list[Sensitivity]:
    """Quantize each planned layer alone at its (low) spec and score the damage with its group's metric."""
    probe = _Probe(model, ctx, config)
    absmax = ctx.input_absmax(plan)
    results = []
    with progress_bar("mixed precision: sensitivity", total=len(plan), quiet=ctx.quiet) as bar:
        for name, spec in plan.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            original = getattr(parent, child)
            group = sensitivity_group(ctx.adapter, name)
            probe_spec = dataclasses.replace(spec, rounding="rtn", act_order=False)  # GPTQ: RTN as the proxy
            setattr(parent, child, FORMATS.get(spec.format).quantize(original, probe_spec, absmax.get(name)))
            try:
                damage = probe.damage(group)
            finally:
                setattr(parent, child, original)
            results.append(Sensitivity(name, group, original.weight.numel(), damage))
            bar.update(1)
    for group in GROUPS:
        members = [s for s in results if s.group == group]
        if members:
            scale = sorted(s.damage for s in members)[len(members) // 2] or 1e-12
            for s in members:
                s.normalised = s.damage / scale
    return results


def stored_bits(linear: nn.Linear, spec: LinearQuantSpec) -> float:
    """Bits per weight ``linear`` stores quantized as ``spec``: every tensor of its (empty, meta-device) quantized
    module but the bias, over ``in_features * out_features``."""
    module = FORMATS.get(spec.format).module_class(linear.in_features, linear.out_features, linear.bias is not None,
                                                   spec, device="meta", dtype=linear.weight.dtype)
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    stored = sum(t.size().numel() * t.element_size() for name, t in tensors.items()  # size(): stored, not logical
                 if t is not None and name.rpartition(".")[2] != "bias")
    return 8 * stored / (linear.in_features * linear.out_features)


def check_base_fits(base: float, low_bits: int, avg_weight_bits: float) -> None:
    """One-line error when every layer at the low precision already stores more than the budget."""
    if base > avg_weight_bits + 1e-6:
        raise ConfigError(f"mixed precision: W{low_bits} alone stores {base:.3f} bits per weight with scales "
                          f"counted, over the budget avg_weight_bits {avg_weight_bits}; raise the budget, use "
                          "budget: codes, or a low-precision spec with fewer scales (larger groups, no balancing)")


def allocate_bits(sensitivities: list[Sensitivity], low_bits: int, high_bits: int, avg_weight_bits: float,
                  stored: dict[str, tuple[float, float]] | None = None) -> dict[str, int]:
    """Greedy: promote layers by normalised damage per extra weight bit while the average stays in budget.

    ``stored``: name -> (bits per weight at ``low_bits``, at ``high_bits``) with scales counted (``budget:
    stored``); without it a layer costs its code bits."""
    cost_of = {s.name: stored[s.name] if stored else (float(low_bits), float(high_bits)) for s in sensitivities}
    total = sum(s.params for s in sensitivities)
    base = sum(cost_of[s.name][0] * s.params for s in sensitivities) / total
    check_base_fits(base, low_bits, avg_weight_bits)
    budget = (avg_weight_bits - base) * total
    extra = {name: high - low for name, (low, high) in cost_of.items()}
    bits = {s.name: low_bits for s in sensitivities}
    ranked = sorted(sensitivities, key=lambda s: s.normalised / (s.params * extra[s.name]), reverse=True)
    for s in ranked:
        cost = s.params * extra[s.name]
        if cost <= budget + 1e-6 * total:  # tolerate float rounding at an exact boundary
            bits[s.name] = high_bits
            budget -= cost
    return bits


def mixed_precision_plan(model: nn.Module, plan: dict[str, LinearQuantSpec | None], ctx: QuantContext,
                         config: MixedPrecisionConfig) -> dict[str, LinearQuantSpec | None]:
    """Return ``plan`` with ``w_bits`` raised to ``high_bits`` on the layers that need it most."""
    active = {n: s for n, s in plan.items() if s is not None}
    lows = {s.w_bits for s in active.values()}
    if len(lows) != 1:
        raise ConfigError(f"mixed precision starts from one low weight precision; the rules give {sorted(lows)}")
    low = lows.pop()
    stored = None
    if config.budget == "stored":
        stored = {name: (stored_bits(model.get_submodule(name), spec),
                         stored_bits(model.get_submodule(name), dataclasses.replace(spec, w_bits=config.high_bits)))
                  for name, spec in active.items()}
    sensitivities = measure_sensitivity(model, active, ctx, config)
    bits = allocate_bits(sensitivities, low, config.high_bits, config.avg_weight_bits, stored)
    out = dict(plan)
    for name, spec in active.items():
        out[name] = dataclasses.replace(spec, w_bits=bits[name])
    total = sum(s.params for s in sensitivities)
    average = sum(bits[s.name] * s.params for s in sensitivities) / total
    counted = "" if stored is None else ", {:.3f} with scales counted".format(
        sum(stored[s.name][bits[s.name] != low] * s.params for s in sensitivities) / total)
    ctx.notes.append(f"mixed precision: average weight bits {average:.3f}{counted} (budget {config.avg_weight_bits}, "
                     f"{config.budget}), {sum(b != low for b in bits.values())} of {len(bits)} layers at "
                     f"W{config.high_bits}")
    ctx.tables.append({
        "title": "mixed-precision sensitivity (damage when quantized alone) and allocation",
        "header": ["module", "group", "params", "damage", "normalised", "w bits"],
        "rows": [[s.name, s.group, s.params, round(s.damage, 6), round(s.normalised, 3), bits[s.name]]
                 for s in sorted(sensitivities, key=lambda s: -s.normalised)],
    })
    ctx.figures["Mixed-precision sensitivity"] = _plot_sensitivity(sensitivities, bits, config.high_bits)
    return out


def _plot_sensitivity(sensitivities: list[Sensitivity], bits: dict[str, int], high_bits: int) -> str:
    def draw(ax) -> None:
        colors = ["tab:red" if bits[s.name] == high_bits else "tab:blue" for s in sensitivities]
        ax.bar(range(len(sensitivities)), [s.normalised for s in sensitivities], color=colors)
        ax.set_yscale("log")
        ax.set_ylabel("normalised damage (log)")
        ax.set_xticks(range(len(sensitivities)), [s.name for s in sensitivities], rotation=90, fontsize=5)
        ax.set_title(f"sensitivity per layer (red: W{high_bits}, blue: low bits)")

    return plot_to_file(draw, width=min(20, 2 + 0.18 * len(sensitivities)), height=4)
