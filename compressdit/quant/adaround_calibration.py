"""AdaRound's calibration pass: record every block's inputs over the calibration timesteps, then reconstruct.

For the planned layers with ``rounding: adaround``, the calibrate stage's sampling loop is replayed once (same
conditions, steps, guidance and seed, so the same timesteps) with self-removing pre-hooks recording each
transformer block's call arguments (all prompts, timesteps and both guidance branches), in batches of
``AdaRoundSettings.batch_size`` conditions (the samples do not depend on the batch size), one call per iteration. Each block's float outputs
on those inputs are the targets; :func:`compressdit.quant.adaround.reconstruct_block` then learns the rounding of
the block's planned layers jointly (block-output reconstruction, BRECQ-style, with the float model's inputs).
A planned layer outside every block (the adapter's blocks) is reconstructed alone on its own recorded inputs.
Memory: every block's inputs over one calibration pass are held at once, and one block's float outputs at a time
(dit-fmnist, 32 conditions x 10 steps in calls of 8: 40 calls x 12 blocks, about 65 MB of inputs).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_map

from compressdit.errors import CalibrationError
from compressdit.progress import progress_bar
from compressdit.quant.adaround import AdaRoundSettings, reconstruct_block
from compressdit.quant.context import QuantContext
from compressdit.quant.fp_layer import MinifloatLinear
from compressdit.quant.rounding import ROUNDINGS
from compressdit.quant.spec import LinearQuantSpec


class _Single(nn.Module):
    """One linear as a reconstruction unit (a planned layer outside every block)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _detached(value):
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, value)


@contextlib.contextmanager
def record_calls(modules: dict[str, nn.Module]) -> Iterator[dict[str, list]]:
    """Every call's ``(args, kwargs)`` of the named modules (cloned), hooks removed on exit."""
    calls: dict[str, list] = {name: [] for name in modules}
    handles = []
    try:
        for name, module in modules.items():
            def hook(mod, args, kwargs, name=name):
                calls[name].append((_detached(args), _detached(kwargs)))
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _units(model: nn.Module, names: list[str], plan: dict[str, LinearQuantSpec], ctx: QuantContext):
    """``{unit name: (unit, {relative layer name: spec})}``: blocks holding planned layers, then lone layers (each
    wrapped as a unit of its own, its layer named ``layer``)."""
    units: dict[str, tuple[nn.Module, dict[str, LinearQuantSpec]]] = {}
    placed: set[str] = set()
    for block_name, block in ctx.adapter.blocks(model):
        inside = {n[len(block_name) + 1:]: plan[n] for n in names if n.startswith(block_name + ".")}
        if inside:
            units[block_name] = (block, inside)
            placed.update(f"{block_name}.{n}" for n in inside)
    for name in names:
        if name not in placed:
            units[name] = (_Single(model.get_submodule(name)), {"layer": plan[name]})
    return units


@torch.no_grad()
def reconstructed_layers(model: nn.Module, plan: dict[str, LinearQuantSpec | None], ctx: QuantContext,
                         settings: AdaRoundSettings | None = None) -> dict[str, nn.Module]:
    """Quantized modules (not yet swapped in) for the planned layers whose rounding reconstructs blocks."""
    names = [n for n, s in plan.items() if s is not None and ROUNDINGS.get(s.rounding).reconstructs_blocks]
    if not names:
        return {}
    what = f"rounding {plan[names[0]].rounding!r} ({names[0]} and {len(names) - 1} more layers)"
    config = ctx.require_calibration(what)  # before the units are built
    settings = settings or AdaRoundSettings()
    started = time.perf_counter()
    units = _units(model, names, plan, ctx)
    hooked = {name: unit.layer if isinstance(unit, _Single) else unit for name, (unit, _) in units.items()}
    with record_calls(hooked) as calls:
        ctx.replay_calibration(model, what, batch_size=settings.batch_size)
    modules: dict[str, nn.Module] = {}
    summary = []
    with progress_bar("adaround: block reconstruction", total=len(units), quiet=ctx.quiet) as bar:
        for unit_name, (unit, layers) in units.items():
            unit_calls = calls.pop(unit_name)
            if not unit_calls:
                raise CalibrationError(f"{unit_name} saw no input during calibration; use rounding: rtn for its "
                                       "layers")
            targets = [unit(*args, **kwargs) for args, kwargs in unit_calls]
            codes, stats = reconstruct_block(unit, layers, unit_calls, targets, settings)
            for rel, q in codes.items():
                full = unit_name if isinstance(unit, _Single) else f"{unit_name}.{rel}"
                modules[full] = MinifloatLinear.from_quantized(unit.get_submodule(rel), layers[rel], q)
            summary.append([unit_name, len(layers), len(unit_calls), round(stats["rtn_error"], 6),
                            round(stats["adaround_error"], 6), "adaround" if stats["kept"] else "rtn"])
            bar.update(1)
    elapsed = time.perf_counter() - started
    kept = sum(row[-1] == "adaround" for row in summary)
    ctx.tables.append({"title": "adaround: relative block-output error over the calibration inputs",
                       "header": ["block", "layers", "calls", "rtn error", "adaround error", "kept"],
                       "rows": summary})
    ctx.notes.append(f"adaround: {len(names)} layers in {len(units)} blocks reconstructed ({settings.iters} "
                     f"iterations each) over {len(ctx.conditions)} calibration conditions x {config.steps} steps; "
                     f"AdaRound kept in {kept}/{len(units)} blocks (round-to-nearest elsewhere, where it was not "
                     f"worse); {elapsed:.1f} s")
    return modules
