"""``quantize``: resolve the method's config, apply it, record the per-module specs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from compressdit.config_base import StrictConfig
from compressdit.errors import CalibrationError, ConfigError
from compressdit.quant.context import QuantContext
from compressdit.quant import viditq, vq4dit  # noqa: F401  (register the methods)
from compressdit.quant.methods import METHODS
from compressdit.stages.base import STAGES, PipelineState, Stage


@dataclass
class QuantizeConfig(StrictConfig):
    """``- quantize: {method: NAME, ...method keys}``; the keys are checked by the method's config."""

    method: str
    options: Any = None

    def to_dict(self) -> dict:
        return {"method": self.method, **self.options.to_dict()}


class QuantizeStage(Stage):
    config_class = QuantizeConfig

    def parse(self, data: Any, where: str) -> QuantizeConfig:
        if not isinstance(data, dict) or "method" not in data:
            raise ConfigError(f"{where}: needs a 'method' (one of: {', '.join(METHODS)})")
        data = dict(data)
        method = data.pop("method")
        if method not in METHODS:
            raise ConfigError(f"{where}.method: unknown method {method!r}; known: {', '.join(METHODS)}")
        return QuantizeConfig(method, METHODS.get(method).config_class.from_dict(data, f"{where}"))

    def run(self, state: PipelineState, config: QuantizeConfig) -> None:
        handler = METHODS.get(config.method)
        if handler.needs_calibration(config.options) and state.calibration is None:
            raise CalibrationError(f"method {config.method!r} as configured needs a calibrate stage before quantize "
                                   "(channel balancing, static scales and mixed precision use its statistics)")
        started = time.perf_counter()
        ctx = QuantContext(adapter=state.adapter, calibration=state.calibration,
                           scheduler=state.source.scheduler or state.adapter.scheduler(state.model),
                           conditions=list(state.calibration_conditions), quiet=state.quiet)
        specs = handler.apply(state.model, config.options, ctx)
        state.quant_specs.update(specs)
        state.tables.extend(ctx.tables)
        state.notes.extend(ctx.notes)
        state.figures.update(ctx.figures)
        state.timings["quantize_s"] = round(time.perf_counter() - started, 2)


STAGES.add("quantize", QuantizeStage())
