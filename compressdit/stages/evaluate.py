"""``evaluate``: candidate vs reference vs baseline, same seeds; writes report.{json,md,html}."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.evaluate.driven import evaluate_driven
from compressdit.evaluate.engine import Entry, EvalSettings, evaluate
from compressdit.evaluate.report import write_report
from compressdit.io.sources import ModelSource
from compressdit.io.structure import MOE, TAIL_SUM
from compressdit.models import adapter_for
from compressdit.models.driven import configure_call
from compressdit.stages.base import STAGES, PipelineState, Stage


@dataclass
class EvaluateConfig(StrictConfig):
    """YAML: ``- evaluate: {samples: 256, steps: 20, guidance: 4.0, seed: 0, baseline: bnb-int8}``

    ``baseline`` is a peer (``bnb-int8``, ``bnb-nf4``, ``torchao-int8-dynamic``, ``torchao-int8-weight``, or
    NVIDIA ModelOpt's calibrated ``modelopt-int8-sq``, ``modelopt-fp8``, ``modelopt-int4-awq``, ``modelopt-w4a8-awq``,
    calibrated on the recipe's calibration set: applied to the same layers as the candidate) or a recipe name (e.g.
    ``rtn-w8a8``) applied to the reference; ``null`` for none.
    """

    samples: int = 256
    steps: int = 20
    guidance: float = 4.0
    seed: int = 0
    baseline: str | None = None
    real_samples: int = 2000
    fidelity_samples: int = 16
    effnet: bool = True
    size: int | None = None  # a pipeline sampled through its own __call__: see calibrate.size / calibrate.call
    call: dict | None = None

    def validate(self, where: str) -> None:
        if self.size is not None and self.size <= 0:
            raise ConfigError(f"{where}.size: must be positive, got {self.size}")
        if self.samples < 2:
            raise ConfigError(f"{where}.samples: need at least 2 samples for Frechet distances, got {self.samples}")
        if self.steps <= 0:
            raise ConfigError(f"{where}.steps: must be positive, got {self.steps}")

    def settings(self) -> EvalSettings:
        return EvalSettings(samples=self.samples, steps=self.steps, guidance=self.guidance, seed=self.seed,
                            real_samples=self.real_samples, fidelity_samples=min(self.fidelity_samples, self.samples),
                            effnet=self.effnet)


def _structure(model) -> dict:
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    return getattr(config, "structure", {})


def _width_pruned(model) -> set[str]:
    """The linears whose shapes width pruning changed (the model's ``quantization_config.structure``)."""
    return set(_structure(model).get("width", {}))


def _in_replaced(model, name: str) -> bool:
    """Whether ``name`` lies inside a module Dense2MoE replaced, which has no namesake in the reference: a MoE layer,
    or a parallel MLP's fused output projection that became a ``TailSum`` (FLUX single blocks' ``proj_out.proj``)."""
    structure = _structure(model)
    return any(name.startswith(f"{layer}.") for key in (MOE, TAIL_SUM) for layer in structure.get(key, {}))


def reference_named_layers(state: PipelineState) -> list[str]:
    """The quantized layers, by names that also name the reference's layers: none after depth pruning, which
    renumbers blocks (their per-layer SQNR against the reference layer of that name would mean nothing), and
    none that width pruning reshaped (the reference layer's inputs do not fit them), none inside the modules
    Dense2MoE replaced (MoE layers, ``TailSum`` projections)."""
    if state.block_origin is not None:
        return []
    reshaped = _width_pruned(state.model)
    return sorted(name for name in state.quant_specs if name not in reshaped and not _in_replaced(state.model, name))


def run_evaluation(candidate: Entry, reference: ModelSource, config: EvaluateConfig, out_dir: Path, title: str,
                   quiet: bool = False, cache_dir: Path | None = None, notes: list[str] | None = None,
                   tables: list[dict] | None = None, figures: dict | None = None,
                   baseline: Entry | None = None) -> dict:
    """Evaluate ``candidate`` against ``reference`` (and ``baseline``, built by the orchestrator from
    ``config.baseline``) and write the report to ``out_dir``."""
    if reference.vae is None:
        raise ConfigError(f"reference {reference.name} has no VAE: pass a pipeline folder (with vae/) as reference")
    adapter = adapter_for(reference.transformer, reference.folder if reference.is_pipeline else None)
    ref_entry = Entry("reference", reference.transformer, f"{reference.name} (uncompressed)",
                      reference.transformer_folder)
    started = time.perf_counter()
    configure_call(adapter, config.size, config.call, "evaluate")
    if adapter.drives_pipeline:
        report = evaluate_driven(adapter, ref_entry, candidate, baseline, config.settings(), quiet)
    else:
        report = evaluate(adapter, ref_entry, candidate, baseline, reference.vae,
                          reference.scheduler or adapter.scheduler(reference.transformer), config.settings(), quiet,
                          cache_dir, reference.prompt_encoder)
    report["title"] = title
    report["notes"] = list(notes or []) + report.get("notes", []) + [f"evaluation took {time.perf_counter() - started:.1f} s on "
                                           f"{'CUDA' if next(candidate.model.parameters()).is_cuda else 'CPU'}"]
    report["tables"] = list(tables or [])
    report["extra_figures"] = dict(figures or {})
    write_report(report, out_dir)
    return report


class EvaluateStage(Stage):
    config_class = EvaluateConfig
    needs_checkpoint = True
    needs_baseline = True
    runs_driven = True
    runs_quantized = True

    def run(self, state: PipelineState, config: EvaluateConfig) -> None:
        reference = state.reference()
        folder = state.workdir / "transformer" if state.source.is_pipeline else state.workdir
        candidate = Entry("candidate", state.model, f"{state.recipe_name} of {state.reference_spec}", folder,
                          reference_named_layers(state))
        if state.quant_specs and state.block_origin is not None:
            state.notes.append("per-layer SQNR not measured: depth pruning renumbered the blocks, so a layer name "
                               "no longer names the reference layer it came from")
        reshaped = sorted(_width_pruned(state.model) & set(state.quant_specs))
        if reshaped and state.block_origin is None:
            state.notes.append(f"per-layer SQNR leaves out the {len(reshaped)} quantized layers width pruning "
                               "reshaped (the reference layer's inputs do not fit them)")
        if state.adapter.drives_pipeline:  # what the evaluation leaves unset, the calibration's settings fill
            config = dataclasses.replace(config, size=state.adapter.size if config.size is None else config.size,
                                         call={**state.adapter.call, **(config.call or {})})
        state.report = run_evaluation(candidate, reference, config, state.workdir / "report",
                                      f"compressdit report: {state.recipe_name} on {state.reference_spec}",
                                      state.quiet, state.cache_dir, state.notes, state.tables, state.figures,
                                      state.baseline)


STAGES.add("evaluate", EvaluateStage())
