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

The paper's probe targets, similarity thresholds and calibration set are not public; the cost above is our
reading of "first-order difference trend of a similarity metric", made to meet an exact block budget::

    result = ppcl_prune(model, adapter, PPCLConfig(ratio=0.5), data)   # trains students into the model
    remove_blocks(model, adapter, result.keep)
"""

from __future__ import annotations

import copy
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from compressdit.config_base import StrictConfig
from compressdit.distill.data import BatchSampler, DistillData, condition_table, select
from compressdit.distill.objectives import objective_for
from compressdit.errors import ConfigError
from compressdit.models.base import BlockStack, ModelAdapter
from compressdit.progress import progress_bar
from compressdit.prune.depth import BlockKey, block_inputs

IMAGE_STREAM = "hidden_states"


@dataclass
class PPCLConfig(StrictConfig):
    """PPCL depth pruning. YAML::

        - prune: {method: ppcl, ratio: 0.5, max_unit: 4, probe_batches: 4, steps: 200, batch_size: 64}

    ``ratio`` of each stack's blocks go (a ``keep_last`` block always stays); a unit spans at most ``max_unit``
    blocks. ``probe_batches`` x ``batch_size`` samples fit the probes; the first ``simulation_batches`` of
    them measure replaceability. ``steps`` of contiguous layer distillation (AdamW, ``lr`` after ``warmup``
    steps, cosine decay) train the student blocks. ``student_init``: ``least_replaceable`` or ``middle``.
    """

    ratio: float = 0.5
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
class PPCLResult:
    """``keep`` for :func:`~compressdit.prune.depth.remove_blocks`; per block its replaceability and probe fit
    (R^2 of the image stream); the units; the distillation loss history (total and per merged unit); per merged
    unit its student's error (:func:`unit_loss`) on the simulation batches before and after distillation."""

    keep: dict[str, list[int]]
    replaceability: dict[BlockKey, float]
    probe_r2: dict[BlockKey, float]
    units: list[Unit]
    history: list[dict[str, float]] = field(default_factory=list)
    unit_error: dict[str, tuple[float, float]] = field(default_factory=dict)


# probing ---------------------------------------------------------------------------------------------------


class _NormalEquations:
    """Accumulates ``[X, 1]^T [X, 1]``, ``[X, 1]^T Y`` and ``Y`` moments of token rows, in float64."""

    def __init__(self) -> None:
        self.xtx = self.xty = None
        self.y_sum = self.y_sq = 0.0
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).double()
        x = torch.cat([x, x.new_ones(len(x), 1)], 1)
        if self.xtx is None:
            self.xtx, self.xty = x.T @ x, x.T @ y
        else:
            self.xtx += x.T @ x
            self.xty += x.T @ y
        self.y_sum = self.y_sum + y.sum(0)
        self.y_sq = self.y_sq + (y * y).sum()
        self.rows += len(x)

    def solve(self, ridge: float) -> tuple[torch.Tensor, float]:
        """Probe weights ``[D_in + 1, D_out]`` (bias last) and the fit's R^2 on the accumulated rows."""
        dim = len(self.xtx) - 1
        scale = float(torch.diagonal(self.xtx)[:dim].mean().clamp_min(1e-12))
        eye = torch.eye(len(self.xtx), dtype=self.xtx.dtype, device=self.xtx.device)
        eye[dim, dim] = 0  # the bias is not shrunk
        weights = torch.linalg.solve(self.xtx + ridge * scale * eye, self.xty)
        # residual sum of squares from the moments: |Y|^2 - 2 tr(W^T X^T Y) + tr(W^T X^T X W)
        rss = self.y_sq - 2 * (weights * self.xty).sum() + (weights * (self.xtx @ weights)).sum()
        total = self.y_sq - (self.y_sum * self.y_sum).sum() / self.rows
        return weights, float(1 - rss / total.clamp_min(1e-30))


def _probe(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    w = weights.to(x.dtype)
    return x @ w[:-1] + w[-1]


@contextmanager
def _hooks(hooks: dict[nn.Module, Callable]) -> Iterator[None]:
    handles = [module.register_forward_hook(hook, with_kwargs=True) for module, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _stacks(adapter: ModelAdapter) -> dict[str, BlockStack]:
    return {s.attribute: s for s in adapter.block_stacks}


def fit_probes(model: nn.Module, adapter: ModelAdapter, batches: list[tuple], ridge: float
               ) -> tuple[dict[BlockKey, dict[str, torch.Tensor]], dict[BlockKey, float]]:
    """Per block and returned stream a linear probe input -> output; and the image stream's R^2 per block."""
    stacks = _stacks(adapter)
    equations: dict[BlockKey, dict[str, _NormalEquations]] = {}

    def recorder(key: BlockKey) -> Callable:
        def hook(module, args, kwargs, output):
            inputs, outputs = block_inputs(module, args, kwargs), stacks[key[0]].unpack(output)
            for name, y in outputs.items():
                equations[key].setdefault(name, _NormalEquations()).add(inputs[name], y)
        return hook

    hooks = {}
    for stack, index, block in adapter.block_list(model):
        equations[(stack, index)] = {}
        hooks[block] = recorder((stack, index))
    with torch.no_grad(), _hooks(hooks):
        for x_t, timestep, cond in batches:
            adapter.predict(model, x_t, timestep, cond)
    probes, r2 = {}, {}
    for key, streams in equations.items():
        probes[key] = {}
        for name, eq in streams.items():
            probes[key][name], fit = eq.solve(ridge)
            if name == IMAGE_STREAM:
                r2[key] = fit
    return probes, r2


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations with rows as examples."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).square().sum()
    norm = (x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt()
    return float(cross / norm.clamp_min(1e-30))


def simulate(model: nn.Module, adapter: ModelAdapter, probes: dict[BlockKey, dict[str, torch.Tensor]],
             batches: list[tuple]) -> dict[BlockKey, float]:
    """Per block the linear CKA of the last block's image tokens with that block swapped for its probe."""
    stacks = _stacks(adapter)
    listed = adapter.block_list(model)
    last = listed[-1][2]
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs, output):
        captured.append(stacks[listed[-1][0]].unpack(output)[IMAGE_STREAM])

    def swap(key: BlockKey) -> Callable:
        def hook(module, args, kwargs, output):
            inputs = block_inputs(module, args, kwargs)
            return stacks[key[0]].pack({name: _probe(w, inputs[name]) for name, w in probes[key].items()})
        return hook

    def final_tokens(extra: dict[nn.Module, Callable]) -> torch.Tensor:
        captured.clear()
        with _hooks(extra), _hooks({last: capture}):
            for x_t, timestep, cond in batches:
                adapter.predict(model, x_t, timestep, cond)
        return torch.cat(captured)

    with torch.no_grad():
        reference = final_tokens({})
        return {(stack, index): linear_cka(final_tokens({block: swap((stack, index))}), reference)
                for stack, index, block in listed}


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
    stacks = _stacks(adapter)
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
    with _hooks(hooks):
        yield entering, leaving


def _student_losses(adapter: ModelAdapter, students: dict[Unit, nn.Module], entering, leaving
                    ) -> dict[Unit, torch.Tensor]:
    stacks = _stacks(adapter)
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
            history.append({"loss": loss.item(), **{_name(u): v.item() for u, v in losses.items()}})
            bar.update(1, loss=loss.item())
    return history


def _name(unit: Unit) -> str:
    return f"{unit.stack}[{unit.start}-{unit.end}]"


# the method ------------------------------------------------------------------------------------------------


def _draw_batches(sampler: BatchSampler, table, count: int, size: int, gen: torch.Generator,
                  device: torch.device, dtype: torch.dtype) -> list[tuple]:
    out = []
    for _ in range(count):
        batch = sampler.draw(size, gen)
        out.append((batch.x_t.to(device, dtype), batch.timestep.to(device), select(table, batch.condition_rows)))
    return out


def ppcl_prune(model: nn.Module, adapter: ModelAdapter, config: PPCLConfig, data: DistillData,
               scheduler_config: dict[str, Any] | None = None, quiet: bool = False) -> PPCLResult:
    """Probe, simulate, plan units and distil them; each unit's ``student`` block then holds its trained student.

    The other blocks are untouched: ``remove_blocks(model, adapter, result.keep)`` finishes the pruning. Seeded
    by ``config.seed``; the global RNG is left as it was.
    """
    config.validate("ppcl")
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    sampler = BatchSampler(data, objective_for(adapter, scheduler_config), config.condition_dropout)
    training, flags = model.training, {p: p.requires_grad for p in model.parameters()}
    model.eval().requires_grad_(False)
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), ExitStack():
            torch.manual_seed(config.seed)
            gen = torch.Generator().manual_seed(config.seed)
            table = condition_table(adapter, model, data).to(device, dtype)
            batches = _draw_batches(sampler, table, config.probe_batches, config.batch_size, gen, device, dtype)
            probes, r2 = fit_probes(model, adapter, batches, config.probe_ridge)
            replaceability = simulate(model, adapter, probes, batches[:config.simulation_batches])
            units, keep = [], {}
            for stack in adapter.block_stacks:
                count = len(getattr(model, stack.attribute))
                candidates = count - int(stack.keep_last)
                kept_units = candidates - math.floor(candidates * config.ratio + 0.5)
                scores = [replaceability[(stack.attribute, i)] for i in range(candidates)]
                planned = plan_units(scores, max(kept_units, 1), config.max_unit, config.trend_weight,
                                     stack.attribute, config.student_init) if candidates else []
                units += planned
                keep[stack.attribute] = [u.student for u in planned] + ([count - 1] if stack.keep_last else [])
            stacks = _stacks(adapter)
            students = {u: _student(model, stacks[u.stack], u).train() for u in units if u.size > 1}
            held_out = batches[:config.simulation_batches]
            error_before = unit_errors(model, adapter, students, held_out)
            history = distill_units(model, adapter, students, sampler, table, config, gen, quiet)
            error_after = unit_errors(model, adapter, students, held_out)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(training)
    with torch.no_grad():
        for unit, student in students.items():
            getattr(model, unit.stack)[unit.student].load_state_dict(student.state_dict())
    errors = {_name(u): (error_before[u], error_after[u]) for u in students}
    return PPCLResult(keep, replaceability, r2, units, history, errors)
