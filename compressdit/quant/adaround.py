"""Scale-aware AdaRound for minifloat weights (FP4DiT, arXiv 2503.15465; AdaRound, Nagel et al. ICML'20).

Each scaled weight ``x = w / s`` lies between two points of the element format's grid, ``lower <= x <= upper``
(:func:`compressdit.quant.fp_weights.grid_neighbours`); AdaRound learns, per weight, which one to take::

    w_soft = s * (lower + h(V) * (upper - lower)),   h(V) = clip(sigmoid(V / d) * (zeta - gamma) + gamma, 0, 1)

with ``zeta, gamma = 1.1, -0.1`` and ``d = upper - lower`` the width of the weight's bin. Dividing by ``d`` is
FP4DiT's scale-aware variant: a minifloat's bins grow with the exponent (E2M1: 0.5 near zero, 2 at the top), and
without it ``dw / dV`` is proportional to the bin width, so large weights learn at another pace than small ones.
``V`` starts where ``h`` reproduces the float weight exactly. The loss is the relative squared error of a block's
outputs (all the block's float output tensors) plus ``reg_weight * mean(1 - |2h - 1|^beta)`` with ``beta``
annealed from ``beta_start`` to ``beta_end`` after a ``warmup`` fraction of the iterations without it, which
drives every ``h`` to 0 or 1. The final weights take ``upper`` where ``h >= 0.5``: codes and scales are plain
:class:`FPQuantized`, the same layout as round-to-nearest.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.quant.activations import quantize_input
from compressdit.quant.fp_weights import FPQuantized, expand_scale, grid_neighbours, quantize_weight_fp
from compressdit.quant.minifloat import MINIFLOATS
from compressdit.quant.spec import LinearQuantSpec

ZETA, GAMMA = 1.1, -0.1


@dataclass
class AdaRoundSettings(StrictConfig):
    """Optimisation of the rounding variables, per block. YAML (under ``method: fp4dit``)::

        adaround: {iters: 500, lr: 0.05, reg_weight: 0.01, beta_start: 20.0, beta_end: 2.0, warmup: 0.2,
                   batch_size: 8, seed: 0}

    ``batch_size``: calibration conditions per recorded block call (each iteration runs one call, both guidance
    branches); the calibration samples are replayed in batches of this size.
    """

    iters: int = 500
    lr: float = 0.05
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    batch_size: int = 8
    scale_aware: bool = True
    seed: int = 0

    def validate(self, where: str) -> None:
        self.require_positive(where, "iters", "lr", "beta_start", "beta_end", "batch_size")
        self.require_non_negative(where, "reg_weight")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"{where}.warmup: a fraction of the iterations in [0, 1), got {self.warmup}")


class SoftRoundedLinear(nn.Module):
    """A linear whose weight is ``s * (lower + h(V) * width)`` (``mode`` ``soft``), its hard rounding (``hard``)
    or round-to-nearest (``rtn``); inputs fake-quantized as ``spec`` says. Used only while reconstructing."""

    def __init__(self, linear: nn.Linear, spec: LinearQuantSpec, scale_aware: bool = True) -> None:
        super().__init__()
        self.spec, self.mode = spec, "soft"
        self.element = MINIFLOATS.get(spec.format)
        weight = linear.weight.detach().float()
        self.rtn = quantize_weight_fp(weight, self.element, spec.group_size, spec.w_range)
        scale = expand_scale(self.rtn.scale, weight.shape[1])
        lower, upper = grid_neighbours(weight / scale, self.element)
        width = upper - lower
        self.register_buffer("scale", scale)
        self.register_buffer("lower", lower)
        self.register_buffer("width", width)
        self.register_buffer("bin", torch.where(width > 0, width, torch.ones_like(width)) if scale_aware
                             else torch.ones_like(width))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        frac = torch.where(width > 0, (weight / scale - lower) / width.clamp_min(1e-12), torch.zeros_like(width))
        frac = frac.clamp(0, 1)
        v = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)  # h(v) == frac
        self.v = nn.Parameter(v * self.bin)

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.v / self.bin) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def weight(self) -> torch.Tensor:
        if self.mode == "rtn":
            return self.rtn.dequantized()
        h = self.h() if self.mode == "soft" else (self.v >= 0).float()
        return self.scale * (self.lower + h * self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_input(x, self.spec)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).mean()

    def hard_quantized(self) -> FPQuantized:
        """Codes of the hard rounding (exact grid values) with the round-to-nearest scales."""
        value = self.lower + (self.v.detach() >= 0).float() * self.width
        rows, cols = value.shape
        codes = self.element.encode(value).reshape(rows, cols)
        return FPQuantized(codes, self.rtn.scale, self.element, self.spec.group_size)


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@contextmanager
def swapped(root: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """``root``'s submodules replaced by ``modules`` (relative names) and its own parameters frozen inside the
    block; both restored on exit."""
    originals = {name: root.get_submodule(name) for name in modules}
    frozen = [p for p in root.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        for name, module in modules.items():
            _set(root, name, module)
        yield
    finally:
        for name, module in originals.items():
            _set(root, name, module)
        for p in frozen:
            p.requires_grad_(True)


def _float_leaves(output) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def relative_error(output, target) -> torch.Tensor:
    """Mean over output tensors of ``||out - target||^2 / ||target||^2``."""
    pairs = list(zip(_float_leaves(output), _float_leaves(target), strict=True))
    return sum((o.float() - t.float()).square().sum() / t.float().square().sum().clamp_min(1e-12)
               for o, t in pairs) / len(pairs)


def _run(block: nn.Module, call) -> object:
    args, kwargs = call
    return block(*args, **kwargs)


def _mean_error(block: nn.Module, calls: list, targets: list) -> float:
    with torch.no_grad():
        return sum(relative_error(_run(block, c), t).item() for c, t in zip(calls, targets)) / len(calls)


def reconstruct_block(block: nn.Module, layers: dict[str, LinearQuantSpec], calls: list, targets: list,
                      settings: AdaRoundSettings) -> tuple[dict[str, FPQuantized], dict]:
    """AdaRound of ``layers`` (names relative to ``block``) jointly, on the block's recorded ``calls``
    (``(args, kwargs)``) against its float outputs ``targets``. Returns the hard codes per layer and a summary
    (relative block-output error of round-to-nearest and of AdaRound over all calls). Where AdaRound's hard
    rounding is not better than round-to-nearest on the calls, the round-to-nearest codes are returned."""
    soft = {name: SoftRoundedLinear(block.get_submodule(name), spec, settings.scale_aware)
            for name, spec in layers.items()}
    params = [m.v for m in soft.values()]
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    warm = int(settings.warmup * settings.iters)
    with swapped(block, soft):
        for m in soft.values():
            m.mode = "rtn"
        rtn_error = _mean_error(block, calls, targets)
        for m in soft.values():
            m.mode = "soft"
        with torch.enable_grad():
            for it in range(settings.iters):
                index = int(torch.randint(len(calls), (1,), generator=generator))
                loss = relative_error(_run(block, calls[index]), targets[index])
                if it >= warm:
                    progress = (it - warm) / max(settings.iters - warm, 1)
                    beta = settings.beta_end + 0.5 * (settings.beta_start - settings.beta_end) * (
                        1 + math.cos(progress * math.pi))
                    loss = loss + settings.reg_weight * sum(m.regularizer(beta) for m in soft.values()) / len(soft)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        for m in soft.values():
            m.mode = "hard"
        ada_error = _mean_error(block, calls, targets)
    kept = ada_error < rtn_error
    result = {name: (m.hard_quantized() if kept else m.rtn) for name, m in soft.items()}
    return result, {"rtn_error": rtn_error, "adaround_error": ada_error, "kept": kept}
