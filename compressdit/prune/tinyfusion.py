"""TinyFusion: learnable depth pruning (Fang et al., CVPR 2025, arXiv 2412.01199).

The candidate blocks of each stack (all but a ``keep_last`` block) are cut into consecutive groups of ``M`` that
keep ``N`` (``pattern: "N:M"``); groups never straddle stacks. Each sample of a batch draws a keep-pattern per
group, and a dropped block turns into the identity of the gated residual ``m * block(x) + (1 - m) * x`` on
every stream it returns. How patterns are drawn and the logits learn is the config's ``estimator``
(:mod:`~compressdit.prune.mask_estimators`): the paper's hard Gumbel-softmax over one logit per pattern
(straight-through), or score-function gradients over one logit per pattern or per block. LoRA on every
``nn.Linear`` of the blocks trains jointly with the logits on the distillation loss, so the choice favours
blocks whose removal the weights can recover from. The decision is the estimator's most probable pattern under
the EMA logits; the LoRA is then dropped (the model keeps its original weights) or, with ``merge_lora``, merged
into the blocks::

    result = tinyfusion_search(model, adapter, TinyFusionConfig(pattern="1:2", steps=300), data)
    remove_blocks(model, adapter, result.keep)
"""

from __future__ import annotations

import itertools
import math
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

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
from compressdit.prune.mask_estimators import MASK_ESTIMATORS, Group, MaskEstimator

MAX_PATTERNS = 4096  # keep-patterns per group (7:14 has 3432)

# groups and keep-patterns ---------------------------------------------------------------------------------


def parse_pattern(pattern: str, where: str = "pattern") -> tuple[int, int]:
    """``"N:M"`` -> ``(N, M)``: keep ``N`` of every ``M`` consecutive blocks."""
    match = re.fullmatch(r"(\d+):(\d+)", str(pattern).strip())
    if match is None:
        raise ConfigError(f"{where}: expected 'N:M' (keep N of every M consecutive blocks, e.g. '1:2'), "
                          f"got {pattern!r}")
    keep, size = int(match[1]), int(match[2])
    if not 1 <= keep < size:
        raise ConfigError(f"{where}: {pattern!r} must keep at least one block and fewer than all of a group "
                          "(1 <= N < M)")
    if math.comb(size, keep) > MAX_PATTERNS:
        raise ConfigError(f"{where}: {pattern!r} gives {math.comb(size, keep)} keep-patterns per group (at most "
                          f"{MAX_PATTERNS}); use smaller groups")
    return keep, size


def keep_patterns(keep: int, size: int) -> torch.Tensor:
    """All ``C(size, keep)`` 0/1 keep-vectors of a group, ``[C, size]``, ordered by their kept positions."""
    rows = [[float(i in kept) for i in range(size)] for kept in itertools.combinations(range(size), keep)]
    return torch.tensor(rows).reshape(len(rows), size)


def make_groups(model: nn.Module, adapter: ModelAdapter, keep: int, size: int) -> list[Group]:
    """Each stack's candidate blocks cut into consecutive groups of ``size`` keeping ``keep``.

    A last, shorter group of ``r`` blocks keeps ``floor(r * keep / size + 0.5)`` (at least one when it is all
    the stack has); a ``keep_last`` block is in no group and always stays.
    """
    groups = []
    for stack in adapter.block_stacks:
        candidates = len(getattr(model, stack.attribute)) - int(stack.keep_last)
        own = []
        for start in range(0, candidates, size):
            blocks = tuple(range(start, min(start + size, candidates)))
            kept = keep if len(blocks) == size else math.floor(len(blocks) * keep / size + 0.5)
            own.append(Group(stack.attribute, blocks, kept))
        if own and not stack.keep_last and sum(g.keep for g in own) == 0:
            own[-1] = Group(stack.attribute, own[-1].blocks, 1)
        groups += own
    return groups


def temperature(step: int, steps: int, start: float, end: float) -> float:
    """Gumbel-softmax temperature at ``step`` of ``steps``: linear from ``start`` to ``end`` at the last step."""
    return start + (end - start) * step / max(steps - 1, 1)


# gated residual blocks ------------------------------------------------------------------------------------


def _broadcast(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if len(m) != len(like):
        raise ValueError(f"gate mask holds {len(m)} samples but the block sees a batch of {len(like)}")
    return m.to(like.dtype).view(-1, *[1] * (like.dim() - 1))


def _mix(m: torch.Tensor, out: Any, x: Any) -> Any:
    if out is None:
        return None
    m = _broadcast(m, out)
    return m * out + (1 - m) * x


class _FirstKept:
    """Stands in for ``stack[0].<path>`` while gating: per sample, the call of the first kept block's ``<path>``
    (what the model calls after :func:`~compressdit.prune.depth.remove_blocks`)."""

    def __init__(self, modules: list[tuple[BlockKey, nn.Module]], masks: dict[BlockKey, torch.Tensor]) -> None:
        self.modules, self.masks = modules, masks

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        total, left = 0, None  # left: 1 where no earlier block is kept
        for key, module in self.modules:
            out = module(*args, **kwargs)
            m = self.masks.get(key)
            weight = left if m is None else (m if left is None else left * m)
            total = total + (out if weight is None else _broadcast(weight, out) * out)
            if m is None:
                break
            left = 1 - m if left is None else left * (1 - m)
        return total


class _View:
    """``target`` seen from outside, with the dotted paths of ``stand_ins`` resolved to the stand-ins."""

    def __init__(self, target: Any, stand_ins: dict[str, Any], prefix: str = "") -> None:
        self._target, self._stand_ins, self._prefix = target, stand_ins, prefix

    def __getattr__(self, name: str) -> Any:
        path = self._prefix + name
        if path in self._stand_ins:
            return self._stand_ins[path]
        value = getattr(self._target, name)
        if any(p.startswith(path + ".") for p in self._stand_ins):
            return _View(value, self._stand_ins, path + ".")
        return value


class GatedBlock(nn.Module):
    """``block`` as the gated residual ``m * block(x) + (1 - m) * x`` on every stream it returns.

    ``m = masks[key]`` holds one value per sample; without an entry the block runs as is. Attributes the model
    reads from the block outside the loop are the block's, except the dotted paths in ``stand_ins``.
    """

    def __init__(self, block: nn.Module, stack: BlockStack, key: BlockKey, masks: dict[BlockKey, torch.Tensor],
                 stand_ins: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.block = block
        self.stack, self.key, self.masks, self.stand_ins = stack, key, masks, dict(stand_ins or {})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.block(*args, **kwargs)
        m = self.masks.get(self.key)
        if m is None:
            return out
        inputs = block_inputs(self.block, args, kwargs)
        return self.stack.pack({name: _mix(m, value, inputs[name]) for name, value in self.stack.unpack(out).items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(_View(self._modules["block"], self.__dict__["stand_ins"]), name)


@contextmanager
def gated_blocks(model: nn.Module, adapter: ModelAdapter, keys: Iterable[BlockKey],
                 masks: dict[BlockKey, torch.Tensor]) -> Iterator[nn.Module]:
    """Inside the ``with`` block each listed ``(stack, index)`` is a :class:`GatedBlock` reading ``masks`` (the
    caller fills it before each forward); the blocks are put back on exit, also after an exception."""
    keys = set(keys)
    known = {(stack, index) for stack, index, _ in adapter.block_list(model)}
    if keys - known:
        raise ConfigError(f"no blocks {sorted(keys - known)} in {type(model).__name__}")
    swapped: list[tuple[nn.ModuleList, int, nn.Module]] = []
    try:
        for stack in adapter.block_stacks:
            blocks = getattr(model, stack.attribute)
            originals = list(blocks)
            for i, block in enumerate(originals):
                if (stack.attribute, i) not in keys:
                    continue
                stand_ins = {} if i else {
                    path: _FirstKept([((stack.attribute, j), b.get_submodule(path)) for j, b in enumerate(originals)],
                                     masks) for path in stack.first_block_reads}
                blocks[i] = GatedBlock(block, stack, (stack.attribute, i), masks, stand_ins)
                swapped.append((blocks, i, block))
        yield model
    finally:
        for blocks, i, block in reversed(swapped):
            blocks[i] = block


# LoRA -----------------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """``base(x) + alpha / rank * B A x`` with ``base`` untouched, ``A``/``B`` in fp32, ``B`` zero at the start
    (Hu et al. 2021, arXiv 2106.09685). Other attributes are the base layer's."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.enabled = True

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``alpha / rank * B A`` into the base layer's weight (in its dtype)."""
        delta = (self.lora_b @ self.lora_a) * self.scale
        self.base.weight.add_(delta.to(self.base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        return out + (F.linear(F.linear(x.float(), self.lora_a), self.lora_b) * self.scale).to(out.dtype)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)


@contextmanager
def lora_linears(modules: Iterable[nn.Module], rank: int, alpha: float) -> Iterator[list[LoRALinear]]:
    """Inside the ``with`` block every ``nn.Linear`` inside ``modules`` carries a fresh LoRA; all are removed on
    exit (the base layers come back unchanged)."""
    swapped: list[tuple[nn.Module, str, nn.Linear, LoRALinear]] = []
    try:
        for module in modules:
            for name, child in list(module.named_modules()):
                if name and isinstance(child, nn.Linear):
                    parent, _, attr = name.rpartition(".")
                    owner = module.get_submodule(parent)
                    wrapper = LoRALinear(child, rank, alpha)
                    setattr(owner, attr, wrapper)
                    swapped.append((owner, attr, child, wrapper))
        yield [wrapper for *_, wrapper in swapped]
    finally:
        for owner, attr, child, _ in reversed(swapped):
            setattr(owner, attr, child)


@contextmanager
def _lora_off(loras: list[LoRALinear]) -> Iterator[None]:
    for lora in loras:
        lora.enabled = False
    try:
        yield
    finally:
        for lora in loras:
            lora.enabled = True


# the search -----------------------------------------------------------------------------------------------


@dataclass
class TinyFusionConfig(StrictConfig):
    """TinyFusion learnable depth pruning (Fang et al., CVPR 2025, arXiv 2412.01199). YAML::

        - prune: {method: tinyfusion, pattern: "1:2", steps: 300, batch_size: 32}

    ``pattern`` ``"N:M"`` keeps N of every M consecutive blocks. Loss per step: ``output_weight`` * MSE to the
    unpruned model's prediction + ``data_weight`` * the diffusion / flow loss. ``lora: false`` trains the logits
    alone (TinyFusion's "Frozen"). ``scaling`` multiplies the logits (100: near one-hot once they move);
    the temperature falls linearly from ``tau_start`` to ``tau_end``. ``ema_decay`` suits a few hundred steps
    (the paper: 0.999 over 10k). ``merge_lora: true`` keeps what the LoRA learnt: it is merged into the blocks'
    weights at the end (a head start for the distillation that follows), else dropped. ``estimator``
    (:mod:`~compressdit.prune.mask_estimators`): ``straight_through`` (the paper's Gumbel-softmax),
    ``score_function`` or ``plackett_luce``. A step runs ``batch_size`` rows: ``batch_size / mask_draws``
    samples, each under ``mask_draws`` independent mask draws (same noise, timestep, condition).
    """

    pattern: str = "1:2"
    steps: int = 300
    batch_size: int = 32
    lora: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lr_lora: float = 1e-4
    lr_logits: float = 1e-3
    scaling: float = 100.0
    tau_start: float = 4.0
    tau_end: float = 0.1
    logit_init: float = 0.02
    ema_decay: float = 0.99
    merge_lora: bool = False
    grad_clip: float = 1.0
    output_weight: float = 0.9
    data_weight: float = 0.1
    condition_dropout: float = 0.1
    estimator: str = "straight_through"
    mask_draws: int = 1
    seed: int = 0

    def validate(self, where: str) -> None:
        parse_pattern(self.pattern, f"{where}.pattern")
        if self.estimator not in MASK_ESTIMATORS:
            raise ConfigError(f"{where}.estimator: unknown {self.estimator!r}; known: {', '.join(MASK_ESTIMATORS)}")
        least = MASK_ESTIMATORS.get(self.estimator).min_draws
        if self.mask_draws < least:
            raise ConfigError(f"{where}.mask_draws: the {self.estimator} estimator needs at least {least}, got "
                              f"{self.mask_draws}")
        if self.batch_size % self.mask_draws:
            raise ConfigError(f"{where}.batch_size: must be a multiple of mask_draws ({self.mask_draws}), got "
                              f"{self.batch_size}")
        self.require_positive(where, "steps", "batch_size", "lora_rank", "lr_lora", "lr_logits", "scaling", "tau_end",
                              "grad_clip")
        if self.tau_start < self.tau_end:
            raise ConfigError(f"{where}.tau_start: must be >= tau_end ({self.tau_end}), got {self.tau_start}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"{where}.ema_decay: must lie in [0, 1), got {self.ema_decay}")
        if self.output_weight < 0 or self.data_weight < 0 or self.output_weight + self.data_weight == 0:
            raise ConfigError(f"{where}: output_weight and data_weight must be >= 0 and not both 0, got "
                              f"{self.output_weight} and {self.data_weight}")
        if not 0 <= self.condition_dropout < 1:
            raise ConfigError(f"{where}.condition_dropout: must lie in [0, 1), got {self.condition_dropout}")


@dataclass
class GroupDecision:
    """A group's outcome: the ``kept`` blocks and, per keep-pattern, its kept blocks and probability."""

    stack: str
    blocks: tuple[int, ...]
    kept: tuple[int, ...]
    patterns: list[tuple[int, ...]]
    probabilities: list[float]


@dataclass
class TinyFusionResult:
    """``keep`` for :func:`~compressdit.prune.depth.remove_blocks` (every stack), the decisions, the loss
    history and, per step, the keep probability of each searched block (``blocks`` order) under the EMA logits."""

    keep: dict[str, list[int]]
    decisions: list[GroupDecision]
    history: list[dict[str, float]] = field(default_factory=list)
    blocks: list[BlockKey] = field(default_factory=list)
    keep_probability: list[list[float]] = field(default_factory=list)


def _keep_probability(estimator: MaskEstimator, patterns: list[torch.Tensor], logits: list[torch.Tensor],
                      scaling: float) -> list[float]:
    return [float(p) for table, logit in zip(patterns, logits)
            for p in estimator.keep_probability(table, logit, scaling)]


def _decide(model: nn.Module, adapter: ModelAdapter, estimator: MaskEstimator, groups: list[Group],
            patterns: list[torch.Tensor], logits: list[torch.Tensor], scaling: float
            ) -> tuple[dict[str, list[int]], list[GroupDecision]]:
    """Per group the keep-pattern the estimator settles on; ``keep_last`` blocks stay."""
    keep = {s.attribute: [len(getattr(model, s.attribute)) - 1] if s.keep_last else [] for s in adapter.block_stacks}
    decisions = []
    for group, table, logit in zip(groups, patterns, logits):
        options = [tuple(index for index, bit in zip(group.blocks, row) if bit) for row in table.tolist()]
        kept = options[estimator.decide(table, logit)]
        keep[group.stack] = sorted(keep[group.stack] + list(kept))
        probabilities = [round(float(p), 6) for p in estimator.pattern_probabilities(table, logit, scaling)]
        decisions.append(GroupDecision(group.stack, group.blocks, kept, options, probabilities))
    return keep, decisions


def _per_row_mse(prediction: torch.Tensor, target: torch.Tensor, draws: int) -> torch.Tensor:
    """Squared error per row of ``prediction`` (``draws`` copies of the batch) against ``target`` (one copy)."""
    if prediction.shape[1:] != target.shape[1:]:
        raise ConfigError(f"the pruned model predicts shape {list(prediction.shape[1:])} per sample but the target "
                          f"has {list(target.shape[1:])}")
    error = prediction.float() - target.float().repeat(draws, *[1] * (target.dim() - 1))
    return error.pow(2).flatten(1).mean(1)


def tinyfusion_search(model: nn.Module, adapter: ModelAdapter, config: TinyFusionConfig, data: DistillData,
                      scheduler_config: dict[str, Any] | None = None, quiet: bool = False) -> TinyFusionResult:
    """Learn which blocks to keep (afterwards the gates and LoRA modules are gone; the weights are as before unless
    ``config.merge_lora``).

    The unpruned teacher is the same model with gates open and LoRA off, so no copy is made. Seeded by
    ``config.seed``; the global RNG is left as it was.
    """
    groups = make_groups(model, adapter, *parse_pattern(config.pattern))
    if not groups:
        raise ConfigError(f"{type(model).__name__} has no removable blocks to search")
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    patterns = [keep_patterns(g.keep, len(g.blocks)).to(device) for g in groups]
    estimator = MASK_ESTIMATORS.get(config.estimator)()
    logits = [nn.Parameter(torch.full((estimator.logit_count(p),), config.logit_init, device=device))
              for p in patterns]
    ema = [logit.detach().clone() for logit in logits]
    sampler = BatchSampler(data, objective_for(adapter, scheduler_config), config.condition_dropout)
    table = condition_table(adapter, model, data).to(device, dtype)
    masks: dict[BlockKey, torch.Tensor] = {}
    result = TinyFusionResult({}, [], blocks=[(g.stack, i) for g in groups for i in g.blocks])
    requires_grad, training = {p: p.requires_grad for p in model.parameters()}, model.training
    model.eval().requires_grad_(False)
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), ExitStack() as stack:
            torch.manual_seed(config.seed)
            gen = torch.Generator().manual_seed(config.seed)
            blocks = [block for _, _, block in adapter.block_list(model)]
            loras = stack.enter_context(lora_linears(blocks, config.lora_rank, config.lora_alpha)) if config.lora \
                else []
            stack.enter_context(gated_blocks(model, adapter, result.blocks, masks))
            lora_params = [p for lora in loras for p in (lora.lora_a, lora.lora_b)]
            optimizer = torch.optim.AdamW([{"params": logits, "lr": config.lr_logits}]
                                          + ([{"params": lora_params, "lr": config.lr_lora}] if loras else []),
                                          weight_decay=0.0)
            bar = stack.enter_context(progress_bar("tinyfusion search", total=config.steps, quiet=quiet))
            draws = config.mask_draws
            samples = config.batch_size // draws
            for step in range(config.steps):
                tau = temperature(step, config.steps, config.tau_start, config.tau_end)
                batch = sampler.draw(samples, gen)
                x_t, timestep = batch.x_t.to(device, dtype), batch.timestep.to(device)
                cond = select(table, batch.condition_rows)
                masks.clear()
                teacher = None
                if config.output_weight:
                    with torch.no_grad(), _lora_off(loras):
                        teacher = adapter.predict(model, x_t, timestep, cond)
                draw = estimator.draw(groups, patterns, logits, config.scaling, tau, config.batch_size)
                masks.update(draw.masks)
                pred = adapter.predict(model, x_t.repeat(draws, *[1] * (x_t.dim() - 1)), timestep.repeat(draws),
                                       select(table, batch.condition_rows.repeat(draws)))
                masks.clear()
                parts = {"data": _per_row_mse(pred, batch.target.to(device), draws)}
                if teacher is not None:
                    parts["output"] = _per_row_mse(pred, teacher, draws)
                losses = config.data_weight * parts["data"] + config.output_weight * parts.get("output", 0.0)
                loss = losses.mean()
                optimizer.zero_grad(set_to_none=True)
                draw.objective(losses.view(draws, samples)).backward()
                torch.nn.utils.clip_grad_norm_(logits, config.grad_clip)
                if lora_params:
                    torch.nn.utils.clip_grad_norm_(lora_params, config.grad_clip)
                optimizer.step()
                with torch.no_grad():
                    for average, logit in zip(ema, logits):
                        average.mul_(config.ema_decay).add_(logit, alpha=1 - config.ema_decay)
                parts = {name: value.mean() for name, value in parts.items()}
                result.history.append({"loss": loss.item(), **{k: v.item() for k, v in parts.items()}, "tau": tau})
                result.keep_probability.append(_keep_probability(estimator, patterns, ema, config.scaling))
                bar.update(1, loss=loss.item(), tau=tau)
            if config.merge_lora:
                for lora in loras:
                    lora.merge()
    finally:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        model.train(training)
    result.keep, result.decisions = _decide(model, adapter, estimator, groups, patterns, ema, config.scaling)
    return result
