"""``quantize``: resolve the method's config, apply it, record the per-module specs."""

from __future__ import annotations

import time
from compressdit.errors import CalibrationError
from compressdit.quant.context import QuantContext
from compressdit.quant import fp4dit, lrq, viditq, vq4dit  # noqa: F401  (register the methods)
from compressdit.quant.methods import METHODS
from compressdit.stages.base import STAGES, MethodStage, MethodStageConfig, PipelineState


class QuantizeConfig(MethodStageConfig):
    """``- quantize: {method: NAME, ...method keys}``; the keys are checked by the method's config."""


class QuantizeStage(MethodStage):
    config_class = QuantizeConfig
    runs_driven = True
    runs_quantized = True
    methods = METHODS

    def run(self, state: PipelineState, config: QuantizeConfig) -> None:
        handler = METHODS.get(config.method)
        if handler.needs_calibration(config.options) and state.calibration is None:
            raise CalibrationError(f"method {config.method!r} as configured needs a calibrate stage before quantize "
                                   "(channel balancing, static scales and mixed precision use its statistics)")
        started = time.perf_counter()
        ctx = QuantContext(adapter=state.adapter, calibration=state.calibration,
                           scheduler=state.source.scheduler or state.adapter.scheduler(state.model),
                           conditions=list(state.calibration_conditions), quiet=state.quiet,
                           prompt_encoder=state.source.prompt_encoder,
                           calibration_config=state.calibration_config)
        specs = handler.apply(state.model, config.options, ctx)
        state.quant_specs.update(specs)
        state.tables.extend(ctx.tables)
        state.notes.extend(ctx.notes)
        state.figures.update(ctx.figures)
        state.timings["quantize_s"] = round(time.perf_counter() - started, 2)


STAGES.add("quantize", QuantizeStage())
