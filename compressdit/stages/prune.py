"""``prune``: remove the transformer blocks a registered depth-pruning method chooses; sets ``block_origin``.

Methods live in :data:`PRUNE_METHODS`, each a strict config plus a ``select(state, config)`` that returns the
``keep`` map of :func:`~compressdit.prune.depth.remove_blocks` with a table, a figure and notes for the report.
The stage then removes the other blocks in place, so the saved checkpoint reloads with stock ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from compressdit.calibration.sets import load_conditions, resolve_set
from compressdit.config_base import StrictConfig
from compressdit.distill.sources import DataSpec
from compressdit.errors import ConfigError
from compressdit.plots import plot_to_file
from compressdit.io.checkpoint import atomic_output
from compressdit.prune.depth import BlockKey, kept_indices, remove_blocks
from compressdit.prune.importance import BLOCK_IMPORTANCE, keep_lowest_score
from compressdit.prune.ppcl import (PPCLConfig, PPCLTraining, load_training, plug_units, ppcl_train, save_training,
                                    unit_name)
from compressdit.prune.tinyfusion import TinyFusionConfig, TinyFusionResult, tinyfusion_search
from compressdit.registry import Registry
from compressdit.stages.base import STAGES, MethodStage, MethodStageConfig, PipelineState, parameter_count
from compressdit.stages.distill import fingerprint, state_data


@dataclass
class Selection:
    """What a method chose: ``keep`` (every stack's kept indices) and what the report shows about it.

    ``reproduces``: per stack and kept block, the original block whose output it stands in for (default: its
    own; PPCL's student blocks reproduce the end of their unit). It becomes ``state.block_origin``, which maps
    student to teacher features in the ``distill`` stage.
    """

    keep: dict[str, list[int]]
    table: dict
    figure: str | None = None
    notes: list[str] = field(default_factory=list)
    reproduces: dict[str, list[int]] | None = None


@dataclass(frozen=True)
class PruneMethod:
    config_class: type[StrictConfig]
    select: Callable[[PipelineState, Any], Selection]


PRUNE_METHODS: Registry[PruneMethod] = Registry("depth pruning method")


def _label(key: BlockKey, single_stack: bool) -> str:
    return str(key[1]) if single_stack else f"{key[0]}.{key[1]}"


# scored baselines -----------------------------------------------------------------------------------------


@dataclass
class ImportanceConfig(StrictConfig):
    """Drop, per stack, the ``ratio`` of blocks that score lowest. YAML::

        - prune: {method: block_influence, ratio: 0.5, samples: 32, steps: 10, guidance: 4.0}

    Scores come from sampling ``samples`` conditions of the calibration ``set`` (default: the model's shipped
    set) for ``steps`` steps with guidance. ``block_influence``: ShortGPT's ``1 - cos(block in, block out)``
    (Men et al. 2024, arXiv 2403.03853); ``removal_error``: the final latents' error with the block skipped.
    """

    ratio: float = 0.5
    set: str | None = None
    samples: int = 32
    steps: int = 10
    guidance: float = 4.0
    seed: int = 1234

    def validate(self, where: str) -> None:
        if not 0 < self.ratio < 1:
            raise ConfigError(f"{where}.ratio: the share of blocks to remove must lie in (0, 1), got {self.ratio}")
        self.require_positive(where, "samples", "steps")


def _score_figure(scores: dict[BlockKey, float], keep: dict[str, list[int]], criterion: str) -> str:
    keys = list(scores)
    single = len(keep) == 1

    def draw(ax) -> None:
        kept = [key[1] in keep[key[0]] for key in keys]
        finite = [s for s in scores.values() if s != float("inf")]
        ceiling = max(finite, default=1.0) * 1.1 or 1.0
        ax.bar(range(len(keys)), [min(scores[k], ceiling) for k in keys],
               color=["tab:blue" if k else "tab:red" for k in kept])
        ax.set_xticks(range(len(keys)), [_label(k, single) for k in keys], rotation=0 if single else 90,
                      fontsize=7)
        ax.set_ylabel("score (higher = more important)")
        ax.set_title(f"{criterion}: kept (blue) and removed (red) blocks")

    return plot_to_file(draw)


def _by_importance(criterion: str) -> Callable[[PipelineState, ImportanceConfig], Selection]:
    def select(state: PipelineState, config: ImportanceConfig) -> Selection:
        kind = state.adapter.condition_kind
        conditions = load_conditions(resolve_set(config.set, kind), kind, limit=config.samples)
        scheduler = state.source.scheduler or state.adapter.scheduler(state.model)
        scores = BLOCK_IMPORTANCE.get(criterion)(state.model, state.adapter, conditions, scheduler, steps=config.steps,
                                                 guidance=config.guidance, seed=config.seed,
                                                 prompt_encoder=state.source.prompt_encoder)
        keep = keep_lowest_score(scores, state.adapter, state.model, config.ratio)
        rows = [[stack, index, round(score, 6), "kept" if index in keep[stack] else "removed"]
                for (stack, index), score in scores.items()]
        table = {"title": f"depth pruning: {criterion} per block (higher = more important)",
                 "header": ["stack", "block", "score", "decision"], "rows": rows}
        note = (f"prune scores: {criterion} from {len(conditions)} conditions x {config.steps} sampling steps "
                f"(guidance {config.guidance}); the lowest {config.ratio:.0%} of each stack removed")
        return Selection(keep, table, _score_figure(scores, keep, criterion), [note])

    return select


# TinyFusion -----------------------------------------------------------------------------------------------


@dataclass
class _DataKey:
    """``data``: the training latents (:mod:`compressdit.distill.sources`; default ``auto``: Fashion-MNIST for the
    zoo's models, the teacher's own samples for any other; cached and shared with the ``distill`` stage)."""

    data: DataSpec = field(default_factory=DataSpec)


@dataclass
class TinyFusionStageConfig(_DataKey, TinyFusionConfig):
    """Every ``TinyFusionConfig`` key plus ``data``. YAML::

        - prune: {method: tinyfusion, pattern: "1:2", steps: 300, batch_size: 32, data: auto}
    """


def _training_data(state: PipelineState, spec: DataSpec):
    """Training latents for searches that train (TinyFusion, PPCL), cached like the distill stage's."""
    return state_data(state, spec)


def _scheduler_config(state: PipelineState) -> dict | None:
    scheduler = state.source.scheduler
    return dict(scheduler.config) if scheduler is not None else None


def _decision_figure(result: TinyFusionResult) -> str:
    single = len({stack for stack, _ in result.blocks}) == 1

    def draw(ax) -> None:
        probability = [[row[j] for row in result.keep_probability] for j in range(len(result.blocks))]
        image = ax.imshow(probability, aspect="auto", interpolation="nearest", vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_yticks(range(len(result.blocks)), [_label(k, single) for k in result.blocks], fontsize=7)
        ax.set_xlabel("search step")
        ax.set_ylabel("block")
        ax.set_title("TinyFusion: keep probability per block (EMA logits)")
        ax.figure.colorbar(image, ax=ax)

    return plot_to_file(draw, height=max(3.0, 0.2 * len(result.blocks) + 1.5))


def _mean_loss(history: list[dict]) -> float:
    return sum(h["loss"] for h in history) / len(history)


def _tinyfusion(state: PipelineState, config: TinyFusionStageConfig) -> Selection:
    data = _training_data(state, config.data)
    result = tinyfusion_search(state.model, state.adapter, config, data, _scheduler_config(state), state.quiet)
    rows = []
    for d in result.decisions:
        ranked = sorted(zip(d.probabilities, d.patterns), key=lambda pair: -pair[0])[:3]
        rows.append([d.stack, f"{d.blocks[0]}-{d.blocks[-1]}", ", ".join(map(str, d.kept)) or "none",
                     "; ".join(f"[{', '.join(map(str, kept))}] {p:.3f}" for p, kept in ranked)])
    table = {"title": f"depth pruning: TinyFusion decisions ({config.pattern} per group, most probable under the "
                      "EMA logits)",
             "header": ["stack", "group", "kept blocks", "top keep-patterns (probability)"], "rows": rows}
    first, last = result.history[:10], result.history[-10:]
    weights = "LoRA merged into the blocks" if config.merge_lora and config.lora else "original block weights kept"
    note = (f"tinyfusion search: {config.steps} steps x batch {config.batch_size} "
            f"({'LoRA rank ' + str(config.lora_rank) if config.lora else 'logits only'}), {config.estimator} "
            f"estimator ({config.mask_draws} mask draws per sample), tau {config.tau_start} -> {config.tau_end}; "
            f"loss {_mean_loss(first):.4g} -> {_mean_loss(last):.4g} (mean of the first / last 10 steps); {weights}")
    return Selection(result.keep, table, _decision_figure(result), [note, f"tinyfusion data: {data.note}"])


# PPCL -----------------------------------------------------------------------------------------------------


@dataclass
class PPCLStageConfig(_DataKey, PPCLConfig):
    """Every ``PPCLConfig`` key plus ``data``. YAML::

        - prune: {method: ppcl, ratio: 0.5, max_unit: 4, probe_batches: 4, steps: 200, batch_size: 64}
    """


def _ppcl_figure(result: PPCLTraining, keep: dict[str, list[int]]) -> str:
    keys = list(result.replaceability)
    single = len({stack for stack, _ in keys}) == 1
    floor = 1e-6  # CKA of near-linear blocks sits within 1e-3 of 1: plot 1 - CKA on a log axis
    loss = [max(1.0 - result.replaceability[k], floor) for k in keys]
    steps = [abs(result.replaceability[b] - result.replaceability[a]) if a[0] == b[0] else 0.0
             for a, b in zip(keys, keys[1:])]

    def draw(ax) -> None:
        position = {key: i for i, key in enumerate(keys)}
        for n, unit in enumerate(u for u in result.units if u.size > 1):
            ax.axvspan(position[(unit.stack, unit.start)] - 0.45, position[(unit.stack, unit.end)] + 0.45,
                       color="tab:orange", alpha=0.15, label="merged unit" if n == 0 else None)
        ax.plot(range(len(keys)), loss, "o-", label="1 - replaceability (CKA with the block's probe)")
        ax.plot([i + 0.5 for i in range(len(steps))], [max(v, floor) for v in steps], "v", color="tab:gray",
                label="|first-order difference| between blocks")
        kept = [i for i, key in enumerate(keys) if key[1] in keep.get(key[0], [])]
        ax.plot(kept, [loss[i] for i in kept], "s", color="tab:green", label="kept / student block")
        ax.set_yscale("log")
        ax.set_xticks(range(len(keys)), [_label(k, single) for k in keys], rotation=0 if single else 90,
                      fontsize=7)
        ax.set_title("PPCL: how far each block is from linear, and the contiguous units")
        ax.legend(fontsize=6, loc="best")

    return plot_to_file(draw)


def _cached_training(state: PipelineState, config: PPCLStageConfig) -> tuple[PPCLTraining, str | None]:
    """The PPCL training of this model and config (``plug`` aside), and where its data came from (None: from the
    cache, which an earlier run made)."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("plug", "method")}
    key = json.dumps({"config": settings, "model": fingerprint(state.model)}, sort_keys=True)
    folder = state.cache_folder() / "ppcl-runs" / hashlib.sha1(key.encode()).hexdigest()[:16]
    if (folder / "training.json").exists():
        return load_training(folder), None
    data = _training_data(state, config.data)
    training = ppcl_train(state.model, state.adapter, config, data, _scheduler_config(state), state.quiet)
    with atomic_output(folder, overwrite=True) as tmp:
        save_training(training, tmp)
    return training, data.note


def _ppcl(state: PipelineState, config: PPCLStageConfig) -> Selection:
    training, data_note = _cached_training(state, config)
    cached = data_note is None
    result = plug_units(state.model, state.adapter, training, config.plug)
    plugged = set(result.plugged)
    unit_of = {(u.stack, i): u for u in training.units for i in range(u.start, u.end + 1)}
    rows = []
    for key, score in training.replaceability.items():
        unit = unit_of.get(key)
        if unit is None:
            decision, span = "kept (last block)", "-"
        elif unit.size == 1:
            decision, span = "kept", str(key[1])
        else:
            span = f"{unit.start}-{unit.end}"
            if unit not in plugged:
                decision = "kept (unit not plugged)"
            else:
                decision = "student of its unit" if key[1] == unit.student else "merged away"
        rows.append([key[0], key[1], round(training.probe_r2.get(key, float("nan")), 4), round(score, 4), span,
                     decision])
    table = {"title": "depth pruning: PPCL probes, replaceability and contiguous units",
             "header": ["stack", "block", "probe R^2 (image)", "replaceability (CKA)", "unit", "decision"],
             "rows": rows}
    merged = [u for u in training.units if u.size > 1]
    notes = [f"ppcl: probes from {config.probe_batches} x {config.batch_size} noised latents, replaceability from "
             f"{config.simulation_batches} batches; {len(merged)} units merged "
             f"({', '.join(unit_name(u) for u in merged) or 'none'})"]
    if training.history:
        first, last = training.history[:10], training.history[-10:]
        errors = ", ".join(f"{name} {before:.4g} -> {after:.4g}"
                           for name, (before, after) in training.unit_error.items())
        notes.append(f"ppcl contiguous layer distillation: {config.steps} steps x batch {config.batch_size}, loss "
                     f"{_mean_loss(first):.4g} -> {_mean_loss(last):.4g} (mean of the first / last 10 steps); "
                     f"held-out unit error (initial -> trained student): {errors}"
                     + ("; training reused from an earlier run with the same model and settings" if cached else ""))
    if data_note:
        notes.append(f"ppcl data: {data_note}")
    removed = sum(u.size - 1 for u in result.plugged)
    notes.append(f"ppcl plugging: {len(result.plugged)} of {len(merged)} trained units plugged in "
                 f"({', '.join(unit_name(u) for u in result.plugged) or 'none'}), {removed} blocks removed (plug "
                 f"{config.plug if config.plug is not None else 'all'}); the others keep their original blocks")
    return Selection(result.keep, table, _ppcl_figure(training, result.keep), notes, result.reproduces)


PRUNE_METHODS.add("block_influence", PruneMethod(ImportanceConfig, _by_importance("block_influence")))
PRUNE_METHODS.add("removal_error", PruneMethod(ImportanceConfig, _by_importance("removal_error")))
PRUNE_METHODS.add("tinyfusion", PruneMethod(TinyFusionStageConfig, _tinyfusion))
PRUNE_METHODS.add("ppcl", PruneMethod(PPCLStageConfig, _ppcl))


# the stage ------------------------------------------------------------------------------------------------


class PruneConfig(MethodStageConfig):
    """``- prune: {method: NAME, ...method keys}``; the keys are checked by the method's config."""


class PruneStage(MethodStage):
    config_class = PruneConfig
    methods = PRUNE_METHODS

    def run(self, state: PipelineState, config: PruneConfig) -> None:
        if state.quant_specs:
            raise ConfigError("prune: the model already has quantized layers; put the prune stage before quantize "
                              "(removing blocks renumbers the layers the quantization specs name)")
        started = time.perf_counter()
        adapter, model = state.adapter, state.model
        counts = {s.attribute: len(getattr(model, s.attribute)) for s in adapter.block_stacks}
        before = parameter_count(model)
        selection = PRUNE_METHODS.get(config.method).select(state, config.options)
        keep = kept_indices(model, adapter, selection.keep)
        remove_blocks(model, adapter, keep)
        origin = state.block_origin or {}

        def original(stack: str, indices: list[int]) -> list[int]:
            return [origin[stack][i] for i in indices] if stack in origin else list(indices)

        reproduces = selection.reproduces or keep
        state.block_origin = {stack: original(stack, reproduces[stack]) for stack in keep}
        kept_text = "; ".join(f"{stack}: {len(kept)}/{counts[stack]} kept {original(stack, kept)}"
                              + (f" (reproducing {state.block_origin[stack]})" if state.block_origin[stack] !=
                                 original(stack, kept) else "") for stack, kept in keep.items())
        after = parameter_count(model)
        state.notes.append(f"prune ({config.method}): {kept_text}; parameters {before:,} -> {after:,} "
                           f"({after / before:.1%})")
        state.notes.extend(selection.notes)
        state.tables.append(selection.table)
        if selection.figure is not None:
            state.figures[f"Depth pruning ({config.method})"] = selection.figure
        state.timings["prune_s"] = round(time.perf_counter() - started, 2)


STAGES.add("prune", PruneStage())
