"""GPTQ's calibration pass: layer-input Hessians over the calibration prompts and timesteps, then rounding.

For every planned layer whose ``rounding`` needs a Hessian, the calibrate stage's sampling loop is replayed (same
conditions, steps, guidance and seed, so the same timesteps) with :func:`capture_input_hessians` hooked on a chunk
of layers whose Hessians fit :data:`HESSIAN_BUDGET_BYTES`; each layer of the chunk is quantized from its Hessian,
which is then freed. Every chunk sees the full-precision model (the new modules are swapped in afterwards), so
the result does not depend on the chunking.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from compressdit.calibration.hessian import capture_input_hessians, hessian_chunks
from compressdit.progress import progress_bar
from compressdit.quant.context import QuantContext
from compressdit.quant.formats import FORMATS
from compressdit.quant.rounding import ROUNDINGS
from compressdit.quant.spec import LinearQuantSpec

HESSIAN_BUDGET_BYTES = 1 << 30  # fp32 Hessians held at once (DiT-XL/2: about 3 sampling passes)


def layer_hessians(model: nn.Module, chunks: list[list[str]], ctx: QuantContext,
                   what: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, input Hessian)`` for each layer of ``chunks`` (from :func:`hessian_chunks`), one replay of the
    calibration sampling loop per chunk; each Hessian is the caller's to use and drop. Raises at once (not at the
    first item) when the recipe has no calibrate stage; ``what`` names the step that needs the Hessians."""
    ctx.require_calibration(what)
    return chunked_hessians(model, chunks, lambda: ctx.replay_calibration(model, what))


def chunked_hessians(model: nn.Module, chunks: list[list[str]],
                     replay: Callable[[], object]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, input Hessian)`` for each layer of ``chunks``, calling ``replay()`` (what runs ``model`` on the
    calibration inputs: the sampling loop, or a block's recorded calls) once per chunk with the chunk hooked."""
    for chunk in chunks:
        with capture_input_hessians(model, chunk) as recorder:
            replay()
        for name in chunk:
            yield name, recorder.pop(name)


def hessian_layers(plan: dict[str, LinearQuantSpec | None]) -> list[str]:
    """The planned layers whose rounding needs an input Hessian, in plan order."""
    return [n for n, s in plan.items() if s is not None and ROUNDINGS.get(s.rounding).needs_hessian]


def rounded_from_hessians(model: nn.Module, plan: dict[str, LinearQuantSpec | None],
                          hessians: Iterable[tuple[str, torch.Tensor]], absmax: dict[str, torch.Tensor],
                          bar=None) -> dict[str, nn.Module]:
    """Each layer's quantized module (not swapped in) from its input Hessian, the Hessian dropped once used: the
    step the in-memory and the streamed (:mod:`compressdit.streaming`) GPTQ share."""
    modules: dict[str, nn.Module] = {}
    for name, hessian in hessians:
        spec = plan[name]
        modules[name] = FORMATS.get(spec.format).quantize(model.get_submodule(name), spec, absmax.get(name),
                                                          hessian=hessian)
        del hessian  # before the next chunk's Hessians are captured
        if bar is not None:
            bar.update(1)
    return modules


@torch.no_grad()
def hessian_rounded_layers(model: nn.Module, plan: dict[str, LinearQuantSpec | None], ctx: QuantContext,
                           budget_bytes: int = HESSIAN_BUDGET_BYTES) -> dict[str, nn.Module]:
    """Quantized modules (not yet swapped in) for the planned layers whose rounding needs a Hessian."""
    names = hessian_layers(plan)
    if not names:
        return {}
    chunks = hessian_chunks({n: model.get_submodule(n).in_features for n in names}, budget_bytes)
    hessians = layer_hessians(model, chunks, ctx, f"rounding {plan[names[0]].rounding!r} ({names[0]} and "
                                                  f"{len(names) - 1} more layers)")
    started = time.perf_counter()
    with progress_bar("gptq: Hessians + rounding", total=len(names), quiet=ctx.quiet) as bar:
        modules = rounded_from_hessians(model, plan, hessians, ctx.input_absmax(names), bar)
    ctx.notes.append(f"gptq: {len(names)} layers rounded with second-order error compensation from input Hessians "
                     f"over {len(ctx.conditions)} calibration conditions x {ctx.calibration_config.steps} steps "
                     f"({len(chunks)} sampling pass{'es' if len(chunks) > 1 else ''}, "
                     f"{time.perf_counter() - started:.1f} s)")
    return modules
