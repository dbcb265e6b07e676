"""GPTQ's calibration pass: layer-input Hessians over the calibration prompts and timesteps, then rounding.

For every planned layer whose ``rounding`` needs a Hessian, the calibrate stage's sampling loop is replayed (same
conditions, steps, guidance and seed, so the same timesteps) with :func:`capture_input_hessians` hooked on a chunk
of layers whose Hessians fit :data:`HESSIAN_BUDGET_BYTES`; each layer of the chunk is quantized from its Hessian,
which is then freed. Every chunk sees the full-precision model (the new modules are swapped in afterwards), so
the result does not depend on the chunking.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import nn

from compressdit.calibration.hessian import capture_input_hessians, hessian_chunks
from compressdit.models.sampling import sample
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
    return _replayed_hessians(model, chunks, ctx, ctx.require_calibration(what))


def _replayed_hessians(model: nn.Module, chunks: list[list[str]], ctx: QuantContext,
                       config) -> Iterator[tuple[str, torch.Tensor]]:
    for chunk in chunks:
        with capture_input_hessians(model, chunk) as recorder:
            sample(ctx.adapter, model, ctx.conditions, ctx.scheduler, steps=config.steps, guidance=config.guidance,
                   seed=config.seed, batch_size=config.batch_size, prompt_encoder=ctx.prompt_encoder)
        for name in chunk:
            yield name, recorder.pop(name)


@torch.no_grad()
def hessian_rounded_layers(model: nn.Module, plan: dict[str, LinearQuantSpec | None], ctx: QuantContext,
                           budget_bytes: int = HESSIAN_BUDGET_BYTES) -> dict[str, nn.Module]:
    """Quantized modules (not yet swapped in) for the planned layers whose rounding needs a Hessian."""
    names = [n for n, s in plan.items() if s is not None and ROUNDINGS.get(s.rounding).needs_hessian]
    if not names:
        return {}
    chunks = hessian_chunks({n: model.get_submodule(n).in_features for n in names}, budget_bytes)
    hessians = layer_hessians(model, chunks, ctx, f"rounding {plan[names[0]].rounding!r} ({names[0]} and "
                                                  f"{len(names) - 1} more layers)")
    started = time.perf_counter()
    absmax = ctx.input_absmax(names)
    modules: dict[str, nn.Module] = {}
    with progress_bar("gptq: Hessians + rounding", total=len(names), quiet=ctx.quiet) as bar:
        for name, hessian in hessians:
            spec = plan[name]
            modules[name] = FORMATS.get(spec.format).quantize(model.get_submodule(name), spec, absmax.get(name),
                                                              hessian=hessian)
            bar.update(1)
    ctx.notes.append(f"gptq: {len(names)} layers rounded with second-order error compensation from input Hessians "
                     f"over {len(ctx.conditions)} calibration conditions x {ctx.calibration_config.steps} steps "
                     f"({len(chunks)} sampling pass{'es' if len(chunks) > 1 else ''}, "
                     f"{time.perf_counter() - started:.1f} s)")
    return modules
