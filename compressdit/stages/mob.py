"""``mob``: Mixture of Blocks, every block stack the adapter lists runs ``active`` of each ``group`` of blocks per
sample (:mod:`compressdit.moe.blocks`, :mod:`compressdit.moe.mob`).

A following ``distill`` with ``layer_map: groups`` (the group feature loss: each group's output matched to the
dense model's at the same block) and ``balance_weight`` / ``router_z_weight`` trains blocks and routers towards the
dense model. The saved checkpoint records each stack's layout in ``quantization_config.structure.mob``, so it
reloads with stock ``from_pretrained`` after ``import compressdit``.
"""

from __future__ import annotations

import time

from compressdit.errors import ConfigError
from compressdit.io.structure import record_structure
from compressdit.moe.blocks import activated_parameters, routed_stacks
from compressdit.moe.mob import MoBConfig, mixture_of_blocks
from compressdit.stages.base import STAGES, PipelineState, Stage, parameter_count, structure_pass
from compressdit.stages.prune_width import calibration_batches


class MoBStage(Stage):
    config_class = MoBConfig

    def run(self, state: PipelineState, config: MoBConfig) -> None:
        if state.quant_specs:
            raise ConfigError("mob: the model already has quantized layers; put mob before quantize")
        started = time.perf_counter()
        model = state.model
        before = parameter_count(model)
        first_note = len(state.notes)
        with structure_pass(model):
            layouts = mixture_of_blocks(model, state.adapter, config, calibration_batches(state, config, "mob"))
        record_structure(model)
        total, active = parameter_count(model), activated_parameters(model)
        stacks = ", ".join(f"{name}: {lay.groups()} groups of {lay.group}, {lay.active} active"
                           for name, lay in layouts.items())
        state.notes.insert(first_note, (
            f"mob ({config.batches} x {config.batch_size} calibration samples, seed {config.seed}): {stacks}; routers "
            f"on pooled hidden states, fitted to per-sample block importance; parameters {before:,} dense -> "
            f"{total:,} total, {active:,} activated per sample ({active / before:.1%})"))
        rows = [[f"{name}.{i}", b.position, b.layout.active, b.layout.group]
                for name, blocks in routed_stacks(model).items() for i, b in enumerate(blocks)]
        state.tables.append({"title": "Mixture of Blocks", "header": ["block", "position in group", "active",
                                                                      "group"], "rows": rows})
        state.timings["mob_s"] = round(time.perf_counter() - started, 2)


STAGES.add("mob", MoBStage())
