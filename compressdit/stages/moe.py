"""``moe``: Dense2MoE, every dense FFN the adapter lists becomes a mixture of experts (:mod:`compressdit.moe`).

A following ``distill`` (with ``balance_weight`` / ``router_z_weight``) trains experts and routers towards the
dense model. The saved checkpoint stores the MoE layers natively and records their layouts in
``quantization_config.structure.moe``, so it reloads with stock ``from_pretrained`` after ``import compressdit``.
"""

from __future__ import annotations

import time

from compressdit.errors import ConfigError
from compressdit.io.save import record_structure
from compressdit.moe.dense2moe import Dense2MoEConfig, dense2moe
from compressdit.moe.blocks import activated_parameters
from compressdit.moe.layers import moe_layers
from compressdit.stages.base import STAGES, PipelineState, Stage, parameter_count, structure_pass
from compressdit.stages.prune_width import calibration_batches


def routed_conversion(state: PipelineState, name: str, convert, describe, refusal: str = "") -> None:
    """The frame the ``moe`` and ``mob`` stages share: refuse a model that already has quantized layers, run
    ``convert(batches)`` inside a structure pass and record the structure, put ``describe(result, dense, total,
    activated)``'s ``(note, table)`` before the notes the conversion added, and time the stage."""
    if state.quant_specs:
        raise ConfigError(f"{name}: the model already has quantized layers; put {name} before quantize{refusal}")
    started = time.perf_counter()
    model = state.model
    before = parameter_count(model)
    first_note = len(state.notes)
    with structure_pass(model):
        result = convert()
    record_structure(model)
    note, table = describe(result, before, parameter_count(model), activated_parameters(model))
    state.notes.insert(first_note, note)
    state.tables.append(table)
    state.timings[f"{name}_s"] = round(time.perf_counter() - started, 2)


class MoEStage(Stage):
    config_class = Dense2MoEConfig

    def run(self, state: PipelineState, config: Dense2MoEConfig) -> None:
        if not state.quant_specs and moe_layers(state.model):  # a quantized model gets routed_conversion's refusal
            raise ConfigError("moe: the model already has MoE layers; run moe once")

        def describe(layers, before, total, active):
            layout = next(iter(layers.values())).layout
            note = (f"moe ({config.grouping} grouping, {config.batches} x {config.batch_size} calibration samples, "
                    f"seed {config.seed}): {len(layers)} FFNs -> {layout.experts} routed experts of "
                    f"{layout.expert_hidden} neurons, top-{layout.top_k}, shared expert of {layout.shared_hidden} "
                    f"neurons ({config.activated_fraction():.1%} of each FFN active per token, plus its router); "
                    f"parameters {before:,} dense -> {total:,} total, {active:,} activated per token "
                    f"({active / before:.1%}); execution groups tokens by expert, dropless (no capacity limit)")
            rows = [[name, m.layout.experts, m.layout.expert_hidden, m.layout.top_k, m.layout.shared_hidden,
                     sum(p.numel() for p in m.parameters()), m.layout.parameters_per_token()]
                    for name, m in layers.items()]
            return note, {"title": "MoE layers (Dense2MoE)", "header": [
                "layer", "experts", "expert neurons", "top-k", "shared neurons", "parameters", "activated"],
                "rows": rows}

        routed_conversion(state, "moe", lambda: dense2moe(state.model, state.adapter, config,
                                                          calibration_batches(state, config, "moe")), describe,
                          refusal=" (it replaces the FFN layers the quantization specs describe)")


STAGES.add("moe", MoEStage())
