"""``moe``: Dense2MoE, every dense FFN the adapter lists becomes a mixture of experts (:mod:`compressdit.moe`).

A following ``distill`` (with ``balance_weight`` / ``router_z_weight``) trains experts and routers towards the
dense model. The saved checkpoint stores the MoE layers natively and records their layouts in
``quantization_config.structure.moe``, so it reloads with stock ``from_pretrained`` after ``import compressdit``.
"""

from __future__ import annotations

import time

from compressdit.errors import ConfigError
from compressdit.io.structure import record_structure
from compressdit.moe.dense2moe import Dense2MoEConfig, dense2moe
from compressdit.moe.blocks import activated_parameters
from compressdit.moe.layers import moe_layers
from compressdit.stages.base import STAGES, PipelineState, Stage, parameter_count, structure_pass
from compressdit.stages.prune_width import calibration_batches


class MoEStage(Stage):
    config_class = Dense2MoEConfig

    def run(self, state: PipelineState, config: Dense2MoEConfig) -> None:
        if state.quant_specs:
            raise ConfigError("moe: the model already has quantized layers; put moe before quantize (it replaces "
                              "the FFN layers the quantization specs describe)")
        if moe_layers(state.model):
            raise ConfigError("moe: the model already has MoE layers; run moe once")
        started = time.perf_counter()
        model = state.model
        before = parameter_count(model)
        first_note = len(state.notes)
        with structure_pass(model):
            layers = dense2moe(model, state.adapter, config, calibration_batches(state, config, "moe"))
        record_structure(model)
        total, active = parameter_count(model), activated_parameters(model)
        layout = next(iter(layers.values())).layout
        state.notes.insert(first_note, (
            f"moe ({config.grouping} grouping, {config.batches} x {config.batch_size} calibration samples, seed "
            f"{config.seed}): {len(layers)} FFNs -> {layout.experts} routed experts of {layout.expert_hidden} "
            f"neurons, top-{layout.top_k}, shared expert of {layout.shared_hidden} neurons "
            f"({config.activated_fraction():.1%} of each FFN active per token, plus its router); parameters "
            f"{before:,} dense -> {total:,} total, {active:,} activated per token ({active / before:.1%}); "
            "execution groups tokens by expert, dropless (no capacity limit)"))
        rows = [[name, m.layout.experts, m.layout.expert_hidden, m.layout.top_k, m.layout.shared_hidden,
                 sum(p.numel() for p in m.parameters()), m.layout.parameters_per_token()]
                for name, m in layers.items()]
        state.tables.append({"title": "MoE layers (Dense2MoE)", "header": [
            "layer", "experts", "expert neurons", "top-k", "shared neurons", "parameters", "activated"],
            "rows": rows})
        state.timings["moe_s"] = round(time.perf_counter() - started, 2)


STAGES.add("moe", MoEStage())
