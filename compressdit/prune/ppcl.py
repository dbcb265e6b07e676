"""PPCL: pluggable pruning with contiguous layer distillation (Ma et al., CVPR 2026, arXiv 2511.16156).

1. **Probing.** Every stream a block returns (image tokens; also text tokens in joint blocks) is fitted by a
   ridge-regularised linear probe from the block's input to its output, on the hidden states of real
   Fashion-MNIST latents noised at random timesteps (closed form from accumulated normal equations).
2. **Simulation.** One block at a time is swapped for its probe; the linear CKA between the last block's image
   tokens and the unmodified model's is the block's *replaceability* ``r_i`` along depth; its first-order
   difference ``|r_i - r_{i-1}|`` marks where the trend breaks.
3. **Units.** Each stack is cut into contiguous units, as many as the blocks it keeps, by dynamic programming:
   a unit of several blocks costs the non-replaceability ``1 - r_i`` of all its blocks but the least
   replaceable one, plus ``trend_weight`` times the trend breaks inside it; a single block costs nothing.
4. **Contiguous layer distillation.** Each unit ``[s, e]`` of several blocks becomes one student block, a copy
   of its least replaceable block (the one the unit cost assumes survives; ``student_init: middle`` takes
   ``(s + e) // 2`` as PPCL's released code does). The student takes the teacher's hidden states entering ``s`` and is
   regressed onto the teacher's states leaving ``e`` (each token L2-normalised, squared error summed over
   channels, mean over tokens, every stream). Units never see each other's outputs, so all train in one run
   and any subset can be plugged in afterwards.
5. **Plugging.** ``plug`` sets the share of blocks actually removed: the subset of trained units that removes
   the most blocks within it, least held-out error first, goes in (:func:`plug_units`); so one training
   (:func:`ppcl_train`, stored by :func:`save_training`) serves every ratio up to the planned one.

Steps 1 and 2 live in :mod:`compressdit.prune.probes`.

The paper's probe targets, similarity thresholds and calibration set are not public; the cost above is our
reading of "first-order difference trend of a similarity metric", made to meet an exact block budget::

    training = ppcl_train(model, adapter, PPCLConfig(ratio=0.5), data)
    result = plug_units(model, adapter, training, plug=0.25)   # loads the plugged students into the model
    remove_blocks(model, adapter, result.keep)
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from compressdit.config_base import StrictConfig
from compressdit.distill.data import BatchSampler, DistillData, condition_table, select
from compressdit.distill.objectives import objective_for
from compressdit.errors import ConfigError
from compressdit.models.base import BlockStack, ModelAdapter
from compressdit.progress import progress_bar
from compressdit.prune.depth import BlockKey
from compressdit.prune.probes import fit_probes, forward_hooks, simulate, stacks_by_name


@dataclass
class PPCLConfig(StrictConfig):
    """PPCL depth pruning. YAML::

        - prune: {method: ppcl, ratio: 0.5, max_unit: 4, probe_batches: 4, steps: 200, batch_size: 64}

    ``ratio`` of each stack's blocks are planned into merged units (a ``keep_last`` block always stays); a
    unit spans at most ``max_unit`` blocks. ``plug`` (at most ``ratio``; default: every merged unit) is the
    share of all candidate blocks actually removed (:func:`choose_units`); unplugged units keep their original
    blocks. ``probe_batches`` x ``batch_size`` samples fit the probes; the first ``simulation_batches`` of
    them measure replaceability. ``steps`` of contiguous layer distillation (AdamW, ``lr`` after ``warmup``
    steps, cosine decay) train the student blocks. ``student_init``: ``least_replaceable`` or ``middle``.
    """

    ratio: float = 0.5
    plug: float | None = None
    max_unit: int = 4
    trend_weight: float = 1.0
    student_init: Literal["least_replaceable", "middle"] = "least_replaceable"
    probe_batches: int = 4
    simulation_batches: int = 2
    probe_ridge: float = 1e-3
    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-4
    warmup: int = 10
    grad_clip: float = 1.0
    condition_dropout: float = 0.1
    seed: int = 0

    def validate(self, where: str) -> None:
        if not 0 < self.ratio < 1:
            raise ConfigError(f"{where}.ratio: the share of blocks to remove must lie in (0, 1), got {self.ratio}")
        if self.plug is not None and not 0 < self.plug <= self.ratio:
            raise ConfigError(f"{where}.plug: the share of blocks removed must lie in (0, ratio = {self.ratio}], got "
                              f"{self.plug}")
        self.require_positive(where, "max_unit", "probe_batches", "simulation_batches", "batch_size", "lr",
                              "grad_clip")
        if self.max_unit < 2:
            raise ConfigError(f"{where}.max_unit: a unit must be able to merge 2 blocks or more, got {self.max_unit}")
        if self.simulation_batches > self.probe_batches:
            raise ConfigError(f"{where}.simulation_batches: at most probe_batches ({self.probe_batches}), got "
                              f"{self.simulation_batches}")
        self.require_non_negative(where, "trend_weight", "probe_ridge", "steps", "warmup")
        if not 0 <= self.condition_dropout < 1:
            raise ConfigError(f"{where}.condition_dropout: must lie in [0, 1), got {self.condition_dropout}")


@dataclass(frozen=True)
class Unit:
    """Blocks ``start..end`` (inclusive) of ``stack``, replaced by one block trained from block ``student``."""

    stack: str
    start: int
    end: int
    student: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1


@dataclass
class PPCLTraining:
    """What one PPCL training yields, whatever share is then plugged in: per block its replaceability and probe
    fit (R^2 of the image stream); the units; the distillation loss history (total and per merged unit); per
    merged unit (by :func:`unit_name`) its student's error (:func:`unit_loss`) on the simulation batches before
    and after distillation, and its trained weights (the state dict of its ``student`` block)."""

    replaceability: dict[BlockKey, float]
    probe_r2: dict[BlockKey, float]
    units: list[Unit]
    history: list[dict[str, float]] = field(default_factory=list)
    unit_error: dict[str, tuple[float, float]] = field(default_factory=dict)
    students: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class PPCLResult:
    """A training with some of its units plugged in: ``keep`` for :func:`~compressdit.prune.depth.remove_blocks`
    and, per stack and kept block, the original block whose output it reproduces (a plugged unit's end)."""

    training: PPCLTraining
    plugged: list[Unit]
    keep: dict[str, list[int]]
    reproduces: dict[str, list[int]]

    @property
    def units(self) -> list[Unit]:
        return self.training.units


# units -----------------------------------------------------------------------------------------------------


def plan_units(replaceability: list[float], keep: int, max_unit: int, trend_weight: float, stack: str,
               student_init: str = "least_replaceable") -> list[Unit]:
    """Cut blocks ``0..n-1`` into exactly ``keep`` contiguous units of at most ``max_unit`` blocks, minimising
    the summed unit cost (module docstring), each with the block its student starts from. Deterministic:
    among equal costs the earlier cut (and the earlier block) wins."""
    n = len(replaceability)
    if not 1 <= keep <= n or math.ceil(n / max_unit) > keep:
        raise ConfigError(f"{stack}: cannot cut {n} blocks into {keep} units of at most {max_unit} blocks; "
                          "raise max_unit or lower the ratio")
    loss = [1.0 - r for r in replaceability]
    breaks = [0.0] + [abs(replaceability[i] - replaceability[i - 1]) for i in range(1, n)]

    def cost(start: int, end: int) -> float:
        members = loss[start:end + 1]
        return sum(members) - max(members) + trend_weight * sum(breaks[start + 1:end + 1])

    inf = float("inf")
    # best[j][u]: least cost of cutting blocks 0..j-1 into u units; back[j][u]: where the last unit starts
    best = [[inf] * (keep + 1) for _ in range(n + 1)]
    back = [[-1] * (keep + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for j in range(1, n + 1):
        for u in range(1, min(j, keep) + 1):
            for start in range(max(0, j - max_unit), j):
                value = best[start][u - 1] + cost(start, j - 1)
                if value < best[j][u] - 1e-12:
                    best[j][u], back[j][u] = value, start
    units, j, u = [], n, keep
    while j > 0:
        start, end = back[j][u], j - 1
        if student_init == "middle":
            student = (start + end) // 2
        else:
            student = min(range(start, end + 1), key=lambda i: (replaceability[i], i))
        units.append(Unit(stack, start, end, student))
        j, u = start, u - 1
    return units[::-1]


# contiguous layer distillation -----------------------------------------------------------------------------


def unit_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per stream: tokens L2-normalised, squared error summed over channels, mean over tokens; summed."""
    return sum((F.normalize(student[name].float(), dim=-1) - F.normalize(teacher[name].float(), dim=-1))
               .square().sum(-1).mean() for name in teacher)


def _student(model: nn.Module, stack: BlockStack, unit: Unit) -> nn.Module:
    """A trainable copy of the unit's ``student`` block. A unit that starts the stack also takes the first block's
    ``first_block_reads`` (frozen): after pruning the model reads them from the student."""
    blocks = getattr(model, stack.attribute)
    student = copy.deepcopy(blocks[unit.student]).requires_grad_(True)
    if unit.start == 0:
        for path in stack.first_block_reads:
            parent, _, child = path.rpartition(".")
            owner = student.get_submodule(parent) if parent else student
            setattr(owner, child, copy.deepcopy(blocks[0].get_submodule(path)).requires_grad_(False))
    return student


def _learning_rate(step: int, config: PPCLConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(config.steps - config.warmup, 1)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


@contextmanager
def _unit_io(model: nn.Module, adapter: ModelAdapter, units: list[Unit]
             ) -> Iterator[tuple[dict[Unit, tuple[tuple, dict]], dict[Unit, dict[str, torch.Tensor]]]]:
    """While inside, each forward of ``model`` records per unit the call entering its first block
    (``args, kwargs``) and the streams leaving its last block."""
    stacks = stacks_by_name(adapter)
    entering: dict[Unit, tuple[tuple, dict]] = {}
    leaving: dict[Unit, dict[str, torch.Tensor]] = {}
    hooks = {}
    for unit in units:
        blocks = getattr(model, unit.stack)

        def enter(module, args, kwargs, output, unit=unit):
            entering[unit] = (args, kwargs)

        def leave(module, args, kwargs, output, unit=unit):
            leaving[unit] = stacks[unit.stack].unpack(output)

        hooks[blocks[unit.start]] = enter
        hooks[blocks[unit.end]] = leave
    with forward_hooks(hooks):
        yield entering, leaving


def _student_losses(adapter: ModelAdapter, students: dict[Unit, nn.Module], entering, leaving
                    ) -> dict[Unit, torch.Tensor]:
    stacks = stacks_by_name(adapter)
    losses = {}
    for unit, student in students.items():
        args, kwargs = entering[unit]
        losses[unit] = unit_loss(stacks[unit.stack].unpack(student(*args, **kwargs)), leaving[unit])
    return losses


@torch.no_grad()
def unit_errors(model: nn.Module, adapter: ModelAdapter, students: dict[Unit, nn.Module], batches: list[tuple]
                ) -> dict[Unit, float]:
    """Per unit, the mean :func:`unit_loss` of its student against the teacher's unit over ``batches``."""
    totals = dict.fromkeys(students, 0.0)
    with _unit_io(model, adapter, list(students)) as (entering, leaving):
        for x_t, timestep, cond in batches:
            adapter.predict(model, x_t, timestep, cond)
            for unit, loss in _student_losses(adapter, students, entering, leaving).items():
                totals[unit] += float(loss) / len(batches)
    return totals


def distill_units(model: nn.Module, adapter: ModelAdapter, students: dict[Unit, nn.Module], sampler: BatchSampler,
                  table, config: PPCLConfig, gen: torch.Generator, quiet: bool = False) -> list[dict[str, float]]:
    """Train the student block of each unit on the teacher's (``model``'s) hidden states entering and leaving
    the unit; returns the loss history (total and per unit)."""
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    params = [p for s in students.values() for p in s.parameters() if p.requires_grad]
    history: list[dict[str, float]] = []
    if not students or not config.steps:
        return history
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    with _unit_io(model, adapter, list(students)) as (entering, leaving), \
            progress_bar("ppcl distillation", total=config.steps, quiet=quiet) as bar:
        for step in range(config.steps):
            batch = sampler.draw(config.batch_size, gen)
            with torch.no_grad():
                adapter.predict(model, batch.x_t.to(device, dtype), batch.timestep.to(device),
                                select(table, batch.condition_rows))
            losses = _student_losses(adapter, students, entering, leaving)
            loss = sum(losses.values())
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            history.append({"loss": loss.item(), **{unit_name(u): v.item() for u, v in losses.items()}})
            bar.update(1, loss=loss.item())
    return history


def unit_name(unit: Unit) -> str:
    return f"{unit.stack}[{unit.start}-{unit.end}]"


# the method ------------------------------------------------------------------------------------------------


def _draw_batches(sampler: BatchSampler, table, count: int, size: int, gen: torch.Generator,
                  device: torch.device, dtype: torch.dtype) -> list[tuple]:
    out = []
    for _ in range(count):
        batch = sampler.draw(size, gen)
        out.append((batch.x_t.to(device, dtype), batch.timestep.to(device), select(table, batch.condition_rows)))
    return out


def ppcl_train(model: nn.Module, adapter: ModelAdapter, config: PPCLConfig, data: DistillData,
               scheduler_config: dict[str, Any] | None = None, quiet: bool = False) -> PPCLTraining:
    """Probe, simulate, plan units and distil their students; the model is left as it was. Seeded by
    ``config.seed``; the global RNG is left as it was."""
    config.validate("ppcl")
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    sampler = BatchSampler(data, objective_for(adapter, scheduler_config), config.condition_dropout)
    training, flags = model.training, {p: p.requires_grad for p in model.parameters()}
    model.eval().requires_grad_(False)
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(config.seed)
            gen = torch.Generator().manual_seed(config.seed)
            table = condition_table(adapter, model, data).to(device, dtype)
            batches = _draw_batches(sampler, table, config.probe_batches, config.batch_size, gen, device, dtype)
            probes, r2 = fit_probes(model, adapter, batches, config.probe_ridge)
            replaceability = simulate(model, adapter, probes, batches[:config.simulation_batches])
            units = []
            for stack in adapter.block_stacks:
                candidates = len(getattr(model, stack.attribute)) - int(stack.keep_last)
                kept_units = candidates - math.floor(candidates * config.ratio + 0.5)
                scores = [replaceability[(stack.attribute, i)] for i in range(candidates)]
                units += plan_units(scores, max(kept_units, 1), config.max_unit, config.trend_weight,
                                    stack.attribute, config.student_init) if candidates else []
            stacks = stacks_by_name(adapter)
            students = {u: _student(model, stacks[u.stack], u).train() for u in units if u.size > 1}
            held_out = batches[:config.simulation_batches]
            error_before = unit_errors(model, adapter, students, held_out)
            history = distill_units(model, adapter, students, sampler, table, config, gen, quiet)
            error_after = unit_errors(model, adapter, students, held_out)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(training)
    return PPCLTraining(replaceability, r2, units, history,
                        {unit_name(u): (error_before[u], error_after[u]) for u in students},
                        {unit_name(u): {k: v.detach().clone() for k, v in s.state_dict().items()}
                         for u, s in students.items()})


def choose_units(training: PPCLTraining, budget: int) -> list[Unit]:
    """The merged units to plug, in training order: as many removed blocks as ``budget`` allows (each unit
    removes ``size - 1``), and among the subsets that remove that many, the least summed held-out error after
    distillation."""
    # best[c]: (summed error, units) of the cheapest subset removing exactly c blocks
    best: dict[int, tuple[float, tuple[Unit, ...]]] = {0: (0.0, ())}
    for unit in (u for u in training.units if u.size > 1):
        error = training.unit_error[unit_name(unit)][1]
        for removed, (total, chosen) in sorted(best.items(), reverse=True):
            count = removed + unit.size - 1
            if count <= budget and (count not in best or total + error < best[count][0] - 1e-12):
                best[count] = (total + error, chosen + (unit,))
    return list(best[max(best)][1])


def plug_units(model: nn.Module, adapter: ModelAdapter, training: PPCLTraining, plug: float | None = None
               ) -> PPCLResult:
    """Load the students of the units to plug into their ``student`` blocks and say which blocks stay.

    ``plug=None`` plugs every merged unit; otherwise :func:`choose_units` with at most ``plug`` of all candidate
    blocks (``keep_last`` blocks excluded) removed. Unplugged units keep all their original blocks.
    """
    candidates = sum(len(getattr(model, s.attribute)) - int(s.keep_last) for s in adapter.block_stacks)
    budget = candidates if plug is None else math.floor(candidates * plug + 0.5)
    order = choose_units(training, budget)
    plugged = set(order)
    keep: dict[str, list[int]] = {}
    reproduces: dict[str, list[int]] = {}
    for unit in training.units:
        own = [unit.student] if unit in plugged else list(range(unit.start, unit.end + 1))
        keep.setdefault(unit.stack, []).extend(own)
        reproduces.setdefault(unit.stack, []).extend([unit.end] if unit in plugged else own)
    for stack in adapter.block_stacks:
        count = len(getattr(model, stack.attribute))
        for table in (keep, reproduces):
            table.setdefault(stack.attribute, [])
            if stack.keep_last:
                table[stack.attribute].append(count - 1)
    with torch.no_grad():
        for unit in plugged:
            getattr(model, unit.stack)[unit.student].load_state_dict(training.students[unit_name(unit)])
    return PPCLResult(training, order, keep, reproduces)


def ppcl_prune(model: nn.Module, adapter: ModelAdapter, config: PPCLConfig, data: DistillData,
               scheduler_config: dict[str, Any] | None = None, quiet: bool = False) -> PPCLResult:
    """:func:`ppcl_train` then :func:`plug_units` at ``config.plug``: the plugged units' students are trained into
    their ``student`` blocks, the other blocks untouched; ``remove_blocks(model, adapter, result.keep)``
    finishes the pruning."""
    return plug_units(model, adapter, ppcl_train(model, adapter, config, data, scheduler_config, quiet), config.plug)


# one training on disk: students as safetensors, the rest as JSON ------------------------------------------


def save_training(training: PPCLTraining, folder: Path) -> None:
    """Write ``training`` to ``folder`` (``students.safetensors`` + ``training.json``)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}/{key}": value.contiguous() for name, state in training.students.items()
               for key, value in state.items()}
    save_file(tensors, str(folder / "students.safetensors"))
    facts = {"replaceability": [[*k, v] for k, v in training.replaceability.items()],
             "probe_r2": [[*k, v] for k, v in training.probe_r2.items()],
             "units": [[u.stack, u.start, u.end, u.student] for u in training.units],
             "history": training.history, "unit_error": training.unit_error}
    (folder / "training.json").write_text(json.dumps(facts))


def load_training(folder: Path) -> PPCLTraining:
    """The training :func:`save_training` wrote to ``folder``."""
    from safetensors.torch import load_file

    facts = json.loads((folder / "training.json").read_text())
    students: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(folder / "students.safetensors")).items():
        name, _, param = key.partition("/")
        students.setdefault(name, {})[param] = value
    return PPCLTraining({(s, i): v for s, i, v in facts["replaceability"]},
                        {(s, i): v for s, i, v in facts["probe_r2"]},
                        [Unit(*u) for u in facts["units"]], facts["history"],
                        {k: tuple(v) for k, v in facts["unit_error"].items()}, students)
