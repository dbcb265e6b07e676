"""``mob``: Mixture of Blocks, every block stack the adapter lists runs ``active`` of each ``group`` of blocks per
sample (:mod:`compressdit.moe.blocks`, :mod:`compressdit.moe.mob`).

A following ``distill`` with ``layer_map: groups`` (the group feature loss: each group's output matched to the
dense model's at the same block) and ``balance_weight`` / ``router_z_weight`` trains blocks and routers towards the
dense model. The saved checkpoint records each stack's layout in ``quantization_config.structure.mob``, so it
reloads with stock ``from_pretrained`` after ``import compressdit``.
"""

from __future__ import annotations

from compressdit.moe.blocks import routed_stacks
from compressdit.moe.mob import MoBConfig, mixture_of_blocks
from compressdit.stages.base import STAGES, PipelineState, Stage
from compressdit.stages.moe import routed_conversion
from compressdit.stages.prune_width import calibration_batches


class MoBStage(Stage):
    config_class = MoBConfig

    def run(self, state: PipelineState, config: MoBConfig) -> None:
        def describe(layouts, before, total, active):
            stacks = ", ".join(f"{name}: {lay.groups()} groups of {lay.group}, {lay.active} active"
                               for name, lay in layouts.items())
            note = (f"mob ({config.batches} x {config.batch_size} calibration samples, seed {config.seed}): {stacks}; "
                    f"routers on pooled hidden states, fitted to per-sample block importance; parameters {before:,} "
                    f"dense -> {total:,} total, {active:,} activated per sample ({active / before:.1%})")
            rows = [[f"{name}.{i}", b.position, b.layout.active, b.layout.group]
                    for name, blocks in routed_stacks(state.model).items() for i, b in enumerate(blocks)]
            return note, {"title": "Mixture of Blocks", "header": ["block", "position in group", "active", "group"],
                          "rows": rows}

        routed_conversion(state, "mob", lambda: mixture_of_blocks(state.model, state.adapter, config,
                                                                  calibration_batches(state, config, "mob")), describe)


STAGES.add("mob", MoBStage())
