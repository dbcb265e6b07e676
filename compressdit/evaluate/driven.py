"""The report for a pipeline sampled through its own ``__call__`` (families without an adapter,
:mod:`compressdit.models.driven`): fidelity to the uncompressed pipeline at equal seeds.

Every column samples the evaluation prompts with the stock pipeline (per-sample seeds) and its decoded images
are compared with the reference's: PSNR, SSIM and, with ``effnet``, the Frechet distance of EfficientNet-Lite0
features to the reference samples. The Fashion-MNIST metrics of the zoo (class accuracy, distances to real test
images) are left out: a user's model draws other things. Per-step output error, per-layer SQNR and the time per
denoising step replay the transformer calls the reference pipeline made (their exact arguments, captured by a
forward hook at five evenly spaced steps) through each column's transformer.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_map

from compressdit.evaluate.engine import (Entry, EvalSettings, evaluation_conditions, layer_sqnr, logical_parameters,
                                         metric_row)
from compressdit.evaluate.features import EffNetLite0Features
from compressdit.evaluate.metrics import frechet_distance, psnr, relative_error, ssim
from compressdit.models.driven import DrivenAdapter, denoising_steps
from compressdit.progress import progress_bar
from compressdit.quant.kernel_registry import kernel_summary

Call = tuple[float, tuple, dict, torch.Tensor]  # timestep, args, kwargs, first output


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output[0] if isinstance(output, (tuple, list)) else output.sample


def _detached(tree):
    return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, tree)


@contextlib.contextmanager
def captured_calls(model: nn.Module, steps: int, keep: int = 5) -> Iterator[list[Call]]:
    """The transformer calls of ``keep`` evenly spaced denoising steps (of ``steps``; steps counted as
    :func:`~compressdit.models.driven.denoising_steps` counts them), with their arguments and first output, as the
    pipeline made them."""
    count = min(keep, steps)
    chosen = {round(i * (steps - 1) / max(count - 1, 1)) for i in range(count)}
    calls: list[Call] = []
    with denoising_steps(model) as counter:
        def after(module, args, kwargs, output):
            if counter.step in chosen:
                calls.append((counter.t, _detached(args), _detached(kwargs),
                              _first_tensor(output).detach().float().clone()))

        handle = model.register_forward_hook(after, with_kwargs=True)
        try:
            yield calls
        finally:
            handle.remove()


def _steps(calls: list[Call]) -> list[float]:
    """The timesteps of the captured steps, in sampling order."""
    return list(dict.fromkeys(t for t, *_ in calls))


def _replay(model: nn.Module, calls: list[Call]) -> list[torch.Tensor]:
    return [_first_tensor(model(*args, **kwargs)).float() for _, args, kwargs, _ in calls]


@torch.no_grad()
def _step_errors(entries: list[Entry], calls: list[Call]) -> dict:
    """Relative error of each column's output on the reference's calls, averaged per step."""
    timesteps = _steps(calls)
    series = {}
    for entry in entries:
        errors = [relative_error(out, ref) for out, (_, _, _, ref) in zip(_replay(entry.model, calls), calls)]
        series[entry.column] = [sum(e for e, (t, *_) in zip(errors, calls) if t == step) /
                                sum(1 for t, *_ in calls if t == step) for step in timesteps]
    return {"timesteps": timesteps, "series": series}


@torch.no_grad()
def _step_seconds(model: nn.Module, calls: list[Call], repeats: int = 3) -> float:
    """Seconds for the transformer calls of one denoising step (the middle captured one), replayed."""
    steps = _steps(calls)
    step = [call for call in calls if call[0] == steps[len(steps) // 2]]
    _replay(model, step)
    started = time.perf_counter()
    for _ in range(repeats):
        _replay(model, step)
    return (time.perf_counter() - started) / repeats


@torch.no_grad()
def evaluate_driven(adapter: DrivenAdapter, reference: Entry, candidate: Entry, baseline: Entry | None,
                    settings: EvalSettings, quiet: bool = False) -> dict:
    """Sample every column with the same prompts and seeds through the stock pipeline; the report's dict."""
    entries = [candidate, reference] + ([baseline] if baseline else [])
    pipeline_name = type(adapter.pipeline(reference.model)).__name__
    prompts, _ = evaluation_conditions(adapter, settings.samples)
    images, seconds = {}, {}
    with progress_bar("evaluate: sampling", total=len(entries), quiet=quiet) as bar:
        for entry in entries:
            started = time.perf_counter()
            pixels = adapter.drive(entry.model, prompts, settings.steps, settings.guidance, settings.seed, None,
                                   batch_size=settings.timing_batch, output_type="pt")
            seconds[entry.column] = time.perf_counter() - started
            if pixels.dim() == 5:  # video [B, F, C, H, W]: the metrics take its frames as images
                pixels = pixels.flatten(0, 1)
            images[entry.column] = pixels * 2 - 1  # [0, 1] -> the [-1, 1] the metrics take
            bar.update(1)
    fidelity = prompts[: settings.fidelity_samples]
    with captured_calls(reference.model, settings.steps) as calls:
        adapter.drive(reference.model, fidelity, settings.steps, settings.guidance, settings.seed, None,
                      batch_size=len(fidelity))
    others = [e for e in entries if e is not reference]
    ref_images = images["reference"]
    flat = bool(ref_images.flatten(1).std(dim=1).max() == 0)  # a VAE that cannot decode this size (Allegro's tiles)
    notes = [f"the reference {pipeline_name} decoded constant images at this size: image metrics left out (the "
             "per-step error and per-layer SQNR compare transformer outputs); evaluate at a size its VAE decodes"
             ] if flat else []
    metrics = []
    if settings.effnet and not flat:
        extractor = EffNetLite0Features()
        feats = {c: extractor(img) for c, img in images.items()}
        metrics.append(metric_row("FD-EffNet vs reference samples", "lower", entries, lambda e: None
                                  if e is reference else round(frechet_distance(feats[e.column], feats["reference"]), 4)))
    metrics += [
        metric_row("PSNR vs reference (same seeds)", "higher", entries,
                   lambda e: None if e is reference or flat else round(psnr(images[e.column], ref_images), 3), "dB"),
        metric_row("SSIM vs reference (same seeds)", "higher", entries,
                   lambda e: None if e is reference or flat else round(ssim(images[e.column], ref_images), 4)),
        metric_row("parameters", None, entries, lambda e: logical_parameters(e.model)),
        metric_row("weights in memory", "lower", entries, lambda e: int(e.model.get_memory_footprint()), "bytes"),
        metric_row("transformer bytes on disk", "lower", entries, lambda e: e.bytes_on_disk(), "bytes"),
        metric_row(f"time per denoising step (its transformer calls, batch {len(fidelity)})", "lower", entries,
                   lambda e: round(_step_seconds(e.model, calls) * 1000, 2), "ms"),
        metric_row("kernels (quantized layers running each)", None, entries, lambda e: kernel_summary(e.model) or None),
        metric_row(f"sampling wall time ({settings.samples} samples)", "lower", entries,
                   lambda e: round(seconds[e.column], 2), "s"),
    ]
    inner = set(_steps(calls)[1:-1]) or set(_steps(calls))  # layer SQNR: the steps between first and last
    middle = [call for call in calls if call[0] in inner]
    return {
        "metrics": metrics,
        "per_timestep_error": _step_errors(others, calls),
        "layer_sqnr": layer_sqnr(reference.model, others, lambda: _replay(reference.model, middle)),
        "images": {c: img[:40] for c, img in images.items()},
        "columns": [e.column for e in entries],
        "candidate": candidate.description, "reference": reference.description,
        "baseline": baseline.description if baseline else None,
        "settings": {"samples": settings.samples, "steps": settings.steps, "guidance": settings.guidance,
                     "seed": settings.seed, "fidelity samples": len(fidelity),
                     "sampling": f"the stock {pipeline_name}.__call__"},
        "notes": notes,
    }
