"""VQ4DiT (Deng et al., AAAI'25): 2/3-bit vector quantization with zero-data block-wise calibration.

Per-layer k-means codebooks of weight sub-vectors; every sub-vector keeps its ``n`` nearest
codewords as candidates with learnable soft weights. Calibration needs no images: the quantized
student runs along the full-precision teacher's sampling trajectory from random noise and random
classes/prompts and matches each block's output (one RMSprop step per denoising step). Assignments
freeze once confident, a layer's codebook trains once 99% of its assignments are frozen, and a
regulariser pushing assignments to one-hot is switched on when the loss stops falling. The result
is a hard assignment: codeword indices + an fp16 codebook per layer.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from compressdit.calibration.sets import load_conditions, resolve_set
from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.models.prompt_encoders import encode_conditions, encode_null
from compressdit.models.sampling import sample
from compressdit.plots import plot_to_file
from compressdit.progress import progress_bar
from compressdit.quant.context import QuantContext
from compressdit.quant.formats import clamp_codebook
from compressdit.quant.methods import METHODS, MethodHandler
from compressdit.quant.transform import LayerRule, check_plan_fits, resolve_plan, set_module
from compressdit.quant.vq_calibration import SoftVQLinear, block_output_loss, record_block_outputs


@dataclass
class VQ4DiTConfig(StrictConfig):
    """YAML::

        method: vq4dit
        rules:
          - {match: "role:embedder", spec: null}
          - {match: "re:.*", spec: {format: vq, w_bits: 2}}     # d=4, k=256
        candidates: 2          # nearest codewords per sub-vector
        iterations: 60         # sampling runs along the teacher's trajectory (0 = k-means only)
        steps: 20              # denoising steps per run (one optimizer step each)
        batch: 4               # random conditions per run (with CFG)

    Learning rates follow the paper (logits 5e-2, codebook and bias 1e-4, RMSprop alpha 0.9).
    """

    rules: list[LayerRule] = field(default_factory=list)
    candidates: int = 2
    iterations: int = 60
    steps: int = 20
    batch: int = 4
    guidance: float = 4.0
    seed: int = 0
    kmeans_iterations: int = 100
    lr_logits: float = 5e-2
    lr_codebook: float = 1e-4
    lr_bias: float = 1e-4
    freeze_threshold: float = 0.99
    codebook_unfreeze: float = 0.99
    regularizer_weight: float = 0.1
    patience: int = 3

    def validate(self, where: str) -> None:
        if not self.rules:
            raise ConfigError(f"{where}.rules: at least one rule is needed")
        for rule in self.rules:
            if rule.spec is not None and rule.spec.format != "vq":
                raise ConfigError(f"{where}.rules: vq4dit quantizes with format 'vq', got {rule.spec.format!r} "
                                  f"for {rule.match!r}")
        self.require_positive(where, "candidates", "steps", "batch", "kmeans_iterations", "patience")
        if self.iterations < 0:
            raise ConfigError(f"{where}.iterations: must be >= 0, got {self.iterations}")
        for key in ("freeze_threshold", "codebook_unfreeze"):
            if not 0.5 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{where}.{key}: must be in [0.5, 1], got {getattr(self, key)}")


def _calibration_conditions(ctx: QuantContext) -> list:
    if ctx.conditions:
        return list(ctx.conditions)
    kind = ctx.adapter.condition_kind
    return load_conditions(resolve_set(None, kind), kind)


class _Calibrator:
    """Trains the soft assignments of ``student`` to follow ``teacher`` block by block."""

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: dict[str, SoftVQLinear],
                 ctx: QuantContext, config: VQ4DiTConfig) -> None:
        if ctx.adapter.drives_pipeline:  # the student's steps call the transformer outside the pipeline's loop
            raise ctx.adapter.cannot_sample()
        self.teacher, self.student, self.layers, self.ctx, self.config = teacher, student, layers, ctx, config
        groups = [{"params": [m.logits for m in layers.values()], "lr": config.lr_logits},
                  {"params": [m.codebook for m in layers.values()], "lr": config.lr_codebook}]
        biases = [m.bias for m in layers.values() if m.bias is not None]
        if biases:
            groups.append({"params": biases, "lr": config.lr_bias})
        self.optimizer = torch.optim.RMSprop(groups, alpha=0.9)
        self.teacher_blocks = [b for _, b in ctx.adapter.blocks(teacher)]
        self.student_blocks = [b for _, b in ctx.adapter.blocks(student)]
        if not self.student_blocks:
            raise ConfigError(f"{type(student).__name__}: the adapter found no transformer blocks to calibrate")
        self.regularize = False
        self.unfrozen: set[str] = set()
        self.history: list[float] = []

    def step(self, latents: torch.Tensor, t: torch.Tensor, cond, target: list | None = None) -> float:
        """One RMSprop step on the block-output loss; ``target`` = the teacher's block outputs if known."""
        adapter = self.ctx.adapter
        if target is None:
            with torch.no_grad(), record_block_outputs(self.teacher_blocks) as target:
                adapter.predict(self.teacher, latents, t, cond)
        with torch.enable_grad(), record_block_outputs(self.student_blocks) as outputs:
            adapter.predict(self.student, latents, t, cond)
            loss = block_output_loss(outputs, target)
            total = loss
            if self.regularize:
                reg = torch.stack([m.confidence_regularizer() for m in self.layers.values()]).mean()
                total = loss + self.config.regularizer_weight * reg
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
        for name, module in self.layers.items():
            module.mask_frozen_gradients()
            if name not in self.unfrozen:
                module.codebook.grad = None
        self.optimizer.step()
        for name, module in self.layers.items():
            if module.update_freezing(self.config.freeze_threshold) >= self.config.codebook_unfreeze:
                self.unfrozen.add(name)
        return float(loss.detach())

    def run(self) -> list[float]:
        config, adapter = self.config, self.ctx.adapter
        pool = _calibration_conditions(self.ctx)
        rng = random.Random(config.seed)
        best, stale = float("inf"), 0
        with progress_bar("vq4dit: calibrate", total=config.iterations * config.steps, quiet=self.ctx.quiet) as bar:
            for iteration in range(config.iterations):
                conditions = [rng.choice(pool) for _ in range(config.batch)]
                encoded = encode_conditions(adapter, self.teacher, conditions, self.ctx.prompt_encoder)
                if config.guidance != 1.0:
                    null = encode_null(adapter, self.teacher, len(conditions), self.ctx.prompt_encoder)
                    encoded = encoded.cat(null)
                losses: list[float] = []

                def on_step(i, t, latents, prediction):
                    both = torch.cat([latents, latents]) if config.guidance != 1.0 else latents
                    # the teacher's block outputs of this very step, recorded during its guided forward
                    losses.append(self.step(both, t.reshape(1), encoded, list(teacher_outputs)))
                    bar.update(1)

                with record_block_outputs(self.teacher_blocks) as teacher_outputs:
                    sample(adapter, self.teacher, conditions, self.ctx.scheduler, steps=config.steps,
                           guidance=config.guidance, seed=config.seed + 7919 * (iteration + 1), on_step=on_step,
                           prompt_encoder=self.ctx.prompt_encoder)
                mean = sum(losses) / len(losses)
                self.history.append(mean)
                if mean < best * 0.99:
                    best, stale = mean, 0
                else:
                    stale += 1
                    self.regularize = self.regularize or stale >= config.patience
        return self.history


def _apply_vq4dit(model: nn.Module, config: VQ4DiTConfig, ctx: QuantContext) -> dict:
    plan = resolve_plan(model, ctx.adapter, config.rules)
    plan = {n: clamp_codebook(s, model.get_submodule(n)) for n, s in plan.items() if s is not None}
    check_plan_fits(model, plan)
    started = time.perf_counter()
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if config.iterations else None
    layers: dict[str, SoftVQLinear] = {}
    with progress_bar("vq4dit: k-means", total=len(plan), quiet=ctx.quiet) as bar:
        for index, (name, spec) in enumerate(plan.items()):
            layers[name] = SoftVQLinear(model.get_submodule(name), spec, config.candidates,
                                        seed=config.seed + index, kmeans_iterations=config.kmeans_iterations)
            bar.update(1)
    kmeans_s = time.perf_counter() - started
    model.requires_grad_(False)
    for name, module in layers.items():
        set_module(model, name, module)
    history: list[float] = []
    try:
        if config.iterations:
            history = _Calibrator(teacher, model, layers, ctx, config).run()
    finally:
        for name, module in layers.items():
            set_module(model, name, module.to_vq_linear())
    _report(ctx, layers, history, kmeans_s, time.perf_counter() - started - kmeans_s, config)
    return dict(plan)


def _report(ctx: QuantContext, layers: dict[str, SoftVQLinear], history: list[float], kmeans_s: float,
            calibrate_s: float, config: VQ4DiTConfig) -> None:
    ctx.notes.append(f"vq4dit: k-means of {len(layers)} layers {kmeans_s:.1f} s; calibration "
                     f"{config.iterations} runs x {config.steps} steps {calibrate_s:.1f} s"
                     + (f"; block-output loss {history[0]:.4g} -> {history[-1]:.4g}" if history else ""))
    ctx.tables.append({
        "title": "vq4dit: per-layer codebooks and assignments",
        "header": ["module", "vector dim", "codebook", "k-means rel. weight error", "assignments frozen"],
        "rows": [[name, m.spec.vector_dim, m.spec.codebook_size, round(m.kmeans_error, 5),
                  round(float(m.frozen.float().mean()), 4)] for name, m in layers.items()],
    })
    if history:
        ctx.figures["VQ4DiT calibration loss"] = _plot_history(history)


def _plot_history(history: list[float]) -> str:
    def draw(ax) -> None:
        ax.plot(range(1, len(history) + 1), history, marker=".")
        ax.set_yscale("log")
        ax.set_xlabel("calibration run")
        ax.set_ylabel("block-output rel. MSE")
        ax.set_title("VQ4DiT zero-data calibration")

    return plot_to_file(draw)


METHODS.add("vq4dit", MethodHandler(VQ4DiTConfig, _apply_vq4dit, lambda cfg: False))
