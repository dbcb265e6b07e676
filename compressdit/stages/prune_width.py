"""``prune_width``: remove MLP hidden channels and attention heads inside the blocks (:mod:`compressdit.prune.width`).

The block count and hidden size stay, so a following ``distill`` pairs every student block with the teacher
block of the same index (``layer_map: auto``). The saved checkpoint records the pruned shapes in
``quantization_config.structure`` and reloads with stock ``from_pretrained`` after ``import compressdit``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from compressdit.distill.data import BatchSampler, condition_table, select
from compressdit.distill.objectives import objective_for
from compressdit.distill.sources import CalibrationDraws
from compressdit.errors import ConfigError
from compressdit.prune.width import WIDTH_IMPORTANCE, CalibrationBatch, WidthConfig, WidthUnit, prune_width, width_units
from compressdit.stages.base import STAGES, PipelineState, Stage, parameter_count, structure_pass
from compressdit.stages.distill import state_data


@dataclass
class PruneWidthConfig(WidthConfig, CalibrationDraws):
    """Every ``WidthConfig`` key plus the calibration data of gradient-based importances. YAML::

        - prune_width: {ffn_ratio: 0.3, head_ratio: 0.3, importance: taylor, batches: 8, batch_size: 64}

    ``taylor`` (first-order ``|w * dL/dw|``, Molchanov et al., CVPR 2019, arXiv 1906.10771) sums the gradients of
    ``batches`` batches of ``batch_size`` noised latents of the ``data`` source (:mod:`compressdit.distill.sources`;
    default ``auto``: Fashion-MNIST encoded by the model's VAE for the zoo's models, the teacher's own samples for
    any other; cached and shared with ``distill``), conditions dropped with ``condition_dropout``, every draw from
    a generator seeded with ``seed``. ``magnitude`` reads no data.
    """

    batches: int = 8
    batch_size: int = 64

    def validate(self, where: str) -> None:
        super().validate(where)
        if not (self.ffn_ratio or self.head_ratio):
            raise ConfigError(f"{where}: nothing to prune; set ffn_ratio and/or head_ratio above 0")
        self.validate_draws(where)


def calibration_batches(state: PipelineState, config: PruneWidthConfig,
                        stage: str = "prune_width") -> Iterator[CalibrationBatch]:
    """``config.batches`` batches drawn as the distillation trainer draws them, each paired with its diffusion
    target (noise or velocity).

    Not the unpruned model's own prediction: before pruning, the MSE to it is zero and so are its gradients.
    The data target makes Taylor scores measure each channel's share of the denoising loss. The data is loaded
    here; the batches are drawn lazily, from a generator seeded with ``config.seed`` (the global RNG is untouched).
    """
    adapter, model = state.adapter, state.model
    data = state_data(state, config.data)
    state.notes.append(f"{stage} data: {data.note}")
    scheduler = state.source.scheduler
    sampler = BatchSampler(data, objective_for(adapter, dict(scheduler.config) if scheduler is not None else None),
                           config.condition_dropout)
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    table = condition_table(adapter, model, data).to(device, dtype)

    def draw() -> Iterator[CalibrationBatch]:
        gen = torch.Generator().manual_seed(config.seed)
        for _ in range(config.batches):
            batch = sampler.draw(config.batch_size, gen)
            yield CalibrationBatch(batch.x_t.to(device, dtype), batch.timestep.to(device),
                                   select(table, batch.condition_rows), batch.target.to(device))

    return draw()


def _kind(unit: WidthUnit) -> str:
    return "heads" if unit.head_dim else "ffn"


def _size(unit: WidthUnit) -> int:
    """Heads of an attention unit, hidden channels of an MLP unit."""
    return unit.channels // unit.head_dim if unit.head_dim else unit.channels


def _removed_by_role(before: list[WidthUnit], after: dict[str, WidthUnit]) -> str:
    totals: dict[tuple[str, str], list[int]] = {}
    for unit in before:
        total = totals.setdefault((unit.role, _kind(unit)), [0, 0, 0])
        total[0] += _size(unit) - _size(after[unit.name])
        total[1] += _size(unit)
        total[2] += 1
    return "; ".join(f"{role}: {removed}/{size} {'heads' if kind == 'heads' else 'channels'} removed in {units} "
                     f"{'attention' if kind == 'heads' else 'MLP'}{'s' if units != 1 else ''}"
                     for (role, kind), (removed, size, units) in totals.items())


def _prune(state: PipelineState, config: PruneWidthConfig) -> tuple[list[WidthUnit], dict[str, WidthUnit]]:
    """Prune ``state.model`` in place; the units before, and by name after."""
    model, adapter = state.model, state.adapter
    before = width_units(model, adapter, config)
    if not before:
        raise ConfigError(f"prune_width: no unit of roles {config.roles} in blocks {config.blocks or 'all'} has a "
                          "non-zero ratio; check roles, blocks, ffn_ratio and head_ratio")
    needs_data = WIDTH_IMPORTANCE.get(config.importance).needs_gradients
    batches = calibration_batches(state, config) if needs_data else None
    prune_width(model, adapter, config, calibration_batches=batches)
    return before, {u.name: u for u in width_units(model, adapter, config)}


class PruneWidthStage(Stage):
    config_class = PruneWidthConfig

    def run(self, state: PipelineState, config: PruneWidthConfig) -> None:
        if state.quant_specs:
            raise ConfigError("prune_width: the model already has quantized layers; put prune_width before quantize "
                              "(it reshapes the layers the quantization specs describe)")
        started = time.perf_counter()
        before = parameter_count(state.model)
        first_note = len(state.notes)  # the data source's note (Taylor) follows this stage's summary
        with structure_pass(state.model):  # tracing the MLPs (width_units' example input) draws from the global RNG
            units, pruned = _prune(state, config)
        after = parameter_count(state.model)
        data = (f"; taylor scores from {config.batches} batches x {config.batch_size} noised latents (MSE to "
                f"the diffusion target, seed {config.seed})"
                if WIDTH_IMPORTANCE.get(config.importance).needs_gradients else "")
        state.notes.insert(first_note, f"prune_width ({config.importance}, ffn_ratio {config.ffn_ratio}, head_ratio "
                           f"{config.head_ratio}): parameters {before:,} -> {after:,} ({after / before:.1%}); "
                           f"{_removed_by_role(units, pruned)}{data}")
        rows = [[u.name, u.role, _kind(u), _size(u), _size(pruned[u.name])]
                for u in units if _size(u) != _size(pruned[u.name])]
        state.tables.append({"title": f"width pruning ({config.importance}): heads and MLP channels per unit",
                             "header": ["unit", "role", "kind", "before", "after"], "rows": rows})
        state.timings["prune_width_s"] = round(time.perf_counter() - started, 2)


STAGES.add("prune_width", PruneWidthStage())
