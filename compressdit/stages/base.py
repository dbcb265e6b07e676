"""The stage contract and the state passed explicitly from stage to stage."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from compressdit.cache import default_cache_dir
from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.io.sources import ModelSource, load_source
from compressdit.models.base import ModelAdapter
from compressdit.registry import Registry


@dataclass
class PipelineState:
    """What stages read and write; nothing global."""

    source: ModelSource
    adapter: ModelAdapter
    model: nn.Module
    workdir: Path
    reference_spec: str
    calibration: Any = None
    quant_specs: dict = field(default_factory=dict)
    report: dict | None = None
    timings: dict = field(default_factory=dict)
    quiet: bool = False
    cache_dir: Path | None = None
    recipe_name: str = ""
    notes: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    calibration_conditions: list = field(default_factory=list)
    calibration_config: Any = None  # the calibrate stage's settings (steps, guidance, seed), for GPTQ's Hessian pass
    # teacher block each student block came from, {stack attribute: indices} (set by depth pruning; used by
    # distill's ``layer_map: auto``)
    block_origin: dict | None = None
    # the evaluation baseline (an ``evaluate.engine.Entry``), built by the orchestrator before a stage that
    # ``needs_baseline`` runs: a peer applied to the reference, or another recipe's stages run on it
    baseline: Any = None
    _reference: ModelSource | None = field(default=None, repr=False)

    def reference(self) -> ModelSource:
        """The uncompressed model (``state.model`` was edited in place), loaded from ``reference_spec`` once and
        kept: the evaluation baseline and the evaluate stage share it (neither changes it). Its prompts go through
        the source's encoder (one text encoder and one embedding cache for both)."""
        if self._reference is None:
            self._reference = load_source(self.reference_spec, name=self.reference_spec)
            self._reference.prompt_encoder = self.source.prompt_encoder
        return self._reference

    def cache_folder(self) -> Path:
        """``cache_dir``, or the default cache folder when none was given."""
        return self.cache_dir if self.cache_dir is not None else default_cache_dir()


class Stage(ABC):
    """A stage parses its config (strict) and mutates the pipeline state."""

    config_class: ClassVar[type[StrictConfig]]
    needs_checkpoint: ClassVar[bool] = False  # the pipeline writes the checkpoint before such a stage
    needs_baseline: ClassVar[bool] = False  # the pipeline builds ``state.baseline`` (config.baseline) before it
    #: runs on a model sampled only through its pipeline's own ``__call__`` (``models/driven.py``): the stage
    #: samples, if at all, with ``models.sampling.sample`` and never calls the transformer itself
    runs_driven: ClassVar[bool] = False
    #: runs on a model loaded already quantized (a compressdit checkpoint as MODEL); the others train or reshape
    #: float weights and are refused before any work
    runs_quantized: ClassVar[bool] = False

    def parse(self, data: Any, where: str) -> StrictConfig:
        return self.config_class.from_dict(data, where)

    @abstractmethod
    def run(self, state: PipelineState, config: StrictConfig) -> None:
        """Apply the stage to ``state`` (in place)."""


@dataclass
class MethodStageConfig(StrictConfig):
    """``- STAGE: {method: NAME, ...method keys}``; the keys are checked by the method's own config."""

    method: str
    options: Any = None

    def to_dict(self) -> dict:
        return {"method": self.method, **self.options.to_dict()}


class MethodStage(Stage):
    """A stage that dispatches to a registry of methods, each with a ``config_class``."""

    methods: ClassVar[Registry]

    def parse(self, data: Any, where: str) -> MethodStageConfig:
        if not isinstance(data, dict) or "method" not in data:
            raise ConfigError(f"{where}: needs a 'method' (one of: {', '.join(self.methods)})")
        data = dict(data)
        method = data.pop("method")
        if method not in self.methods:
            raise ConfigError(f"{where}.method: unknown method {method!r}; known: {', '.join(self.methods)}")
        return self.config_class(method, self.methods.get(method).config_class.from_dict(data, where))


STAGES: Registry[Stage] = Registry("stage")


@contextmanager
def structure_pass(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for a structural stage's calibration pass, with the global RNG (CPU and the model's
    GPU) left as it was: the stages draw from their own seeded generators, tracing draws from the global one.
    Training mode is restored on exit, also on error."""
    device = next(model.parameters()).device
    training = model.training
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        try:
            yield model.eval()
        finally:
            model.train(training)


def parameter_count(model: nn.Module) -> int:
    """Every parameter element of ``model`` (packed quantized weights count their logical size)."""
    return sum(p.numel() for p in model.parameters())
