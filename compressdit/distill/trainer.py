"""Knowledge distillation of a compressed student from its uncompressed teacher, resumable, under accelerate."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import torch
from torch import nn

from compressdit.config_base import StrictConfig
from compressdit.distill.data import BatchSampler, DistillData, condition_table, select
from compressdit.distill.losses import capture_features, data_loss, feature_loss, output_loss, resolve_layer_map
from compressdit.distill.objectives import objective_for
from compressdit.errors import ConfigError, UnsupportedModelError
from compressdit.models import ModelAdapter, adapter_for
from compressdit.moe.usage import ExpertLoad, capture_routing, router_losses
from compressdit.zoo.trainer import ResumableTrainer, TrainSchedule

# feature-loss weight multiplier at ``step`` of ``steps``
FEATURE_SCHEDULES = {
    "linear": lambda step, steps: 1.0 - step / steps,  # TinyFusion's beta: linear decay to 0
    "constant": lambda step, steps: 1.0,
}


@dataclass
class DistillConfig(StrictConfig):
    """Masked knowledge distillation (TinyFusion, arXiv 2412.01199, "Masked KD"). YAML::

        - distill: {steps: 2000, batch_size: 64, lr: 1.0e-4, output_weight: 0.9, data_weight: 0.1,
                    feature_weight: 0.01, layer_map: auto, mask_massive_activations: true}

    Loss = ``output_weight`` * MSE(student, teacher prediction) + ``data_weight`` * the diffusion / flow loss
    + ``feature_weight`` * block-feature MSE (scaled by ``feature_schedule``: ``linear`` decays to 0 at the
    last step). A student with MoE layers (Dense2MoE) adds ``balance_weight`` * the load-balancing loss and
    ``router_z_weight`` * the router z-loss, means over its MoE layers and Mixture-of-Blocks groups (whose group
    feature loss is ``layer_map: groups``); its expert (or block) load per timestep is tracked.
    ``batch_size`` is the global batch (split over processes). ``condition_dropout`` replaces
    labels/captions by the null condition, identically for student and teacher.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = 50
    ema_decay: float | None = 0.999
    output_weight: float = 0.9
    feature_weight: float = 0.01
    feature_schedule: Literal["linear", "constant"] = "linear"
    data_weight: float = 0.1
    balance_weight: float = 0.0
    router_z_weight: float = 0.0
    layer_map: Union[Literal["auto", "groups"], list[int], list[list[int]]] = "auto"
    mask_massive_activations: bool = True
    condition_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 100
    max_minutes: float | None = None

    def validate(self, where: str) -> None:
        self.require_positive(where, "steps", "batch_size", "checkpoint_every")
        for key in ("lr", "weight_decay", "output_weight", "feature_weight", "data_weight", "balance_weight",
                    "router_z_weight"):
            if getattr(self, key) < 0 or (key == "lr" and self.lr == 0):
                raise ConfigError(f"{where}.{key}: must be {'positive' if key == 'lr' else '>= 0'}, "
                                  f"got {getattr(self, key)}")
        if self.output_weight + self.feature_weight + self.data_weight == 0:
            raise ConfigError(f"{where}: output_weight, feature_weight and data_weight are all 0; nothing to train")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"{where}.ema_decay: must lie in (0, 1) or be null, got {self.ema_decay}")
        if not 0 <= self.condition_dropout < 1:
            raise ConfigError(f"{where}.condition_dropout: must lie in [0, 1), got {self.condition_dropout}")
        if self.warmup < 0:
            raise ConfigError(f"{where}.warmup: must be >= 0, got {self.warmup}")

    def schedule(self) -> TrainSchedule:
        return TrainSchedule(steps=self.steps, lr=self.lr, batch_size=self.batch_size, warmup=self.warmup,
                             ema_decay=self.ema_decay, max_minutes=self.max_minutes,
                             checkpoint_every=self.checkpoint_every, seed=self.seed, weight_decay=self.weight_decay)


def check_pair(student: nn.Module, teacher: nn.Module) -> ModelAdapter:
    """The shared adapter of student and teacher; an error when they are of different families."""
    adapter = adapter_for(student)
    if adapter_for(teacher) is not adapter:
        raise UnsupportedModelError(f"the student is a {type(student).__name__} but the teacher a "
                                    f"{type(teacher).__name__}: distil within one model family")
    return adapter


def _broadcast_parameters(model: nn.Module, accelerator) -> None:
    """Every process starts from the main process's weights."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast

    params = list(model.parameters())
    flat = broadcast(torch.cat([p.data.reshape(-1) for p in params]).to(accelerator.device), from_process=0)
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def distill(student: nn.Module, teacher: nn.Module, adapter: ModelAdapter, config: DistillConfig, workdir: Path,
            data: DistillData, *, origin: dict[str, Sequence[int]] | Sequence[int] | None = None,
            scheduler_config: dict[str, Any] | None = None, accelerator=None, quiet: bool = False,
            stop_at: int | None = None) -> dict:
    """Train ``student`` (in place) towards the frozen ``teacher``; state in ``workdir`` resumes a stopped run.

    ``origin``: the teacher block each student block came from (``layer_map: auto``). ``stop_at``: stop (with a
    checkpoint) once that step is reached, as a time cap would. On completion the student holds the EMA
    weights (when ``ema_decay`` is set). Returns steps, times, layer map, the loss history and final losses.
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())  # CPU: gloo across processes
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise ConfigError(f"batch_size {config.batch_size} does not split over {world} processes; use a multiple")
    if check_pair(student, teacher).family != adapter.family:
        raise UnsupportedModelError(f"adapter {adapter.family!r} does not fit a {type(student).__name__}")
    pairs = resolve_layer_map(adapter, student, teacher, config.layer_map, origin) if config.feature_weight else []
    device = accelerator.device
    home, t_home = next(student.parameters()).device, next(teacher.parameters()).device
    student.to(device)
    teacher.to(device).eval().requires_grad_(False)
    _broadcast_parameters(student, accelerator)
    dtype = next(p.dtype for p in student.parameters() if p.is_floating_point())
    t_dtype = next(p.dtype for p in teacher.parameters() if p.is_floating_point())
    sampler = BatchSampler(data, objective_for(adapter, scheduler_config), config.condition_dropout)
    table = condition_table(adapter, student, data).to(device, dtype)
    # eval mode: the trainer drops conditions itself, identically for both models (DiT's embedder would not)
    trainer = ResumableTrainer(student, config.schedule(), workdir, "distill", accelerator, train_mode=False)
    s_blocks, t_blocks = [s for s, _ in pairs], [t for _, t in pairs]
    names = [f"student block {s} <-> teacher block {t}" for s, t in pairs]
    needs_teacher = config.output_weight > 0 or config.feature_weight > 0
    load = ExpertLoad()  # expert load per timestep of a MoE student (steps run by this process since its start)

    def loss_fn(gen: torch.Generator):
        batch = sampler.draw(config.batch_size, gen).part(rank, world)
        x_t, timestep, cond = batch.x_t.to(device), batch.timestep.to(device), select(table, batch.condition_rows)
        with capture_features(student, adapter, s_blocks) as s_feats, capture_routing(student) as routing:
            pred = adapter.predict(student, x_t.to(dtype), timestep, cond)
        parts = {"data": data_loss(pred, batch.target.to(device)), **router_losses(routing)}
        load.add(routing, timestep)
        if needs_teacher:
            with torch.no_grad(), capture_features(teacher, adapter, t_blocks) as t_feats:
                t_pred = adapter.predict(teacher, x_t.to(t_dtype), timestep, cond.to(device, t_dtype))
            parts["output"] = output_loss(pred, t_pred)
        beta = config.feature_weight * FEATURE_SCHEDULES[config.feature_schedule](trainer.step, config.steps)
        if pairs:
            parts["feature"] = feature_loss([s_feats[s] for s in s_blocks], [t_feats[t] for t in t_blocks],
                                            config.mask_massive_activations, names)
        weights = {"data": config.data_weight, "output": config.output_weight, "feature": beta,
                   "balance": config.balance_weight, "router_z": config.router_z_weight}
        total = sum(weights[k] * v for k, v in parts.items())
        return total, {**{k: float(v.detach()) for k, v in parts.items()}, "feature_weight": beta}

    started = time.monotonic()
    try:
        completed = trainer.run(loss_fn, quiet=quiet, stop_at=stop_at)
        if completed and trainer.ema is not None:
            student.load_state_dict(trainer.ema.state_dict())
    finally:
        student.to(home).eval()
        teacher.to(t_home)
    history = trainer.history
    tail = history[-10:]
    return {"completed": completed, "steps": trainer.step, "target_steps": config.steps,
            "batch_size": config.batch_size, "processes": world, "wall_s": round(time.monotonic() - started, 2),
            "train_s": round(trainer.train_seconds, 2), "layer_map": [list(p) for p in pairs],
            "initial": dict(history[0]) if history else {},
            "final": {k: sum(h[k] for h in tail) / len(tail) for k in tail[0]} if tail else {},
            "history": history, "workdir": str(workdir), "expert_load": load.summary()}
