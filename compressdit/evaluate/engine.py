"""Measure candidate, reference and baseline side by side with identical seeds."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compressdit.evaluate.features import ClassifierFeatures, EffNetLite0Features
from compressdit.evaluate.metrics import class_accuracy, frechet_distance, psnr, relative_error, sqnr_db, ssim
from compressdit.io.checkpoint import folder_bytes
from compressdit.models.base import ModelAdapter
from compressdit.models.prompt_encoders import PromptEncoder, encode_conditions, encode_null
from compressdit.models.sampling import decode_latents, guided_prediction, initial_latents, sample
from compressdit.progress import progress_bar
from compressdit.quant.kernel_registry import kernel_summary
from compressdit.quant.native_gelu import ORIGINAL
from compressdit.zoo.captions import evaluation_captions
from compressdit.zoo.data import load_fmnist
from compressdit.zoo.train_basics import load_classifier

CLASSIFIER_PATH = Path(__file__).resolve().parents[1] / "zoo" / "weights" / "fmnist-basics" / "classifier.safetensors"


@dataclass
class Entry:
    """One column of the report: a transformer, where it lives on disk, and what it is."""

    column: str
    model: nn.Module
    description: str
    folder: Path | None = None
    compressed_layers: list[str] = field(default_factory=list)
    disk_bytes: int | None = None

    def bytes_on_disk(self) -> int | None:
        return folder_bytes(self.folder) if self.folder is not None else self.disk_bytes


def logical_parameters(model: nn.Module) -> int:
    """Weights counted as in the float model, whatever packing a layer uses (ours or a peer's)."""
    total = 0
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and hasattr(module, "in_features") and hasattr(module, "out_features"):
            total += module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
        else:
            total += sum(p.numel() for p in own)
    return total


def metric_row(name: str, better: str | None, entries: list[Entry], fn, unit: str = "") -> dict:
    """One row of the report's metrics table: ``fn(entry)`` per column (``better``: "lower", "higher" or None)."""
    return {"name": name, "unit": unit, "better": better, "values": {e.column: fn(e) for e in entries}}


@dataclass
class EvalSettings:
    samples: int = 256
    steps: int = 20
    guidance: float = 4.0
    seed: int = 0
    real_samples: int = 2000
    fidelity_samples: int = 16
    timing_batch: int = 8
    effnet: bool = True


def evaluation_conditions(adapter: ModelAdapter, count: int) -> tuple[list, torch.Tensor]:
    """Balanced class ids (or one caption per class) and the class each sample should show."""
    labels = torch.arange(count) % 10
    if adapter.condition_kind == "class":
        return labels.tolist(), labels

    captions, _ = evaluation_captions()
    return [captions[int(k)] for k in labels], labels


class Feature:
    """Lazily built feature extractors and cached real-image features."""

    def __init__(self, settings: EvalSettings, cache_dir: Path | None = None) -> None:
        self.settings = settings
        self.cache_dir = cache_dir
        self._classifier = None
        self._effnet = None
        self._real: dict[str, torch.Tensor] = {}

    def classifier(self):
        if self._classifier is None:
            self._classifier = load_classifier(CLASSIFIER_PATH)
        return self._classifier

    def extractors(self) -> dict[str, object]:
        out = {"FD-FMNIST": ClassifierFeatures(self.classifier())}
        if self.settings.effnet:
            if self._effnet is None:
                self._effnet = EffNetLite0Features()
            out["FD-EffNet"] = self._effnet
        return out

    def real(self, name: str, extractor) -> torch.Tensor:
        if name in self._real:
            return self._real[name]
        cache = None
        if self.cache_dir is not None:
            cache = self.cache_dir / "features" / f"{getattr(extractor, 'name', name)}-test-{self.settings.real_samples}.pt"
            if cache.exists():
                self._real[name] = torch.load(cache, weights_only=True)
                return self._real[name]

        images, _ = load_fmnist("test")
        with torch.no_grad():
            self._real[name] = extractor(images[: self.settings.real_samples])
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self._real[name], cache)
        return self._real[name]


def _timed_sampling(adapter, entry: Entry, conditions, scheduler, settings: EvalSettings, vae, quiet: bool,
                    prompt_encoder: PromptEncoder | None = None):
    started = time.perf_counter()
    latents = sample(adapter, entry.model, conditions, scheduler, steps=settings.steps, guidance=settings.guidance,
                     seed=settings.seed, prompt_encoder=prompt_encoder)
    seconds = time.perf_counter() - started
    return decode_latents(vae, latents), seconds


def step_inputs(adapter, model: nn.Module, settings: EvalSettings,
                prompt_encoder: PromptEncoder | None = None) -> tuple:
    """The arguments after ``(adapter, model)`` of :func:`guided_prediction` for one CFG-batched step at
    ``timing_batch`` samples, in ``model``'s float dtype."""
    conditions, _ = evaluation_conditions(adapter, settings.timing_batch)
    cond = encode_conditions(adapter, model, conditions, prompt_encoder)
    uncond = encode_null(adapter, model, len(conditions), prompt_encoder)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = initial_latents(adapter, model, settings.timing_batch, 0).to(dtype)
    return x, torch.tensor([500]), cond.to("cpu", dtype), uncond.to("cpu", dtype), settings.guidance


@torch.no_grad()
def _step_latency(adapter, model: nn.Module, settings: EvalSettings, repeats: int = 5,
                  prompt_encoder: PromptEncoder | None = None) -> float:
    """Seconds per denoising step (one CFG-batched forward) at ``timing_batch`` samples: the mean of ``repeats``."""
    inputs = step_inputs(adapter, model, settings, prompt_encoder)
    guided_prediction(adapter, model, *inputs)
    started = time.perf_counter()
    for _ in range(repeats):
        guided_prediction(adapter, model, *inputs)
    return (time.perf_counter() - started) / repeats


def native_gelu_notes(reference: Entry, entries: list[Entry]) -> list[str]:
    """The report's note where columns run tanh GELUs in compressdit's C pass (after their quantized projections) and
    the reference runs PyTorch's: part of their step-time difference is that GELU, not the quantized layers (PyTorch's
    took ~10% of a zoo float step on an AVX2 Zen 3)."""
    def native(model: nn.Module) -> bool:
        return any(type(m) in ORIGINAL for m in model.modules())

    columns = [e.column for e in entries if e is not reference and native(e.model)]
    if not columns or native(reference.model):
        return []
    verb = "runs" if len(columns) == 1 else "run"
    return [f"{' and '.join(columns)} {verb} the tanh GELU after quantized projections in compressdit's C pass, the "
            "reference in PyTorch's: part of the time-per-step difference is that GELU (bench/e2e_speed.py's "
            "'x float (C GELU)' separates the two)"]


#: single steps per model in the report's timing, the models taken in turn: at least ``TIMING_ROUNDS`` rounds, then
#: more while the timing has taken less than ``TIMING_BUDGET_S`` seconds, up to ``TIMING_MAX_ROUNDS``
TIMING_ROUNDS, TIMING_MAX_ROUNDS, TIMING_BUDGET_S = 7, 31, 4.0


@torch.no_grad()
def step_latencies(adapter, entries: list[Entry], settings: EvalSettings, prompt_encoder: PromptEncoder | None = None,
                   rounds: int = TIMING_ROUNDS, budget_s: float = TIMING_BUDGET_S,
                   max_rounds: int = TIMING_MAX_ROUNDS) -> dict[str, float]:
    """Seconds per denoising step of each entry, by column: rounds of one CFG-batched step of every model in turn (the
    order rotated each round), each model's fastest step kept; ``rounds`` rounds, then more while the timing has taken
    less than ``budget_s`` seconds, up to ``max_rounds``. Other jobs on the machine then slow every model alike or
    show up as slow steps that are not kept, where timing one model after the other let a busy minute land on one of
    them (the README's run on a loaded 2-core machine: 0.81-1.22x over 7 repeats); on a VM whose neighbours take a
    core for seconds at a time, 7 rounds of the zoo's ~40 ms steps still put W8A8 at 0.85x or 1.07x float in two
    runs minutes apart, where more rounds give each model a quiet moment."""
    inputs = {e.column: step_inputs(adapter, e.model, settings, prompt_encoder) for e in entries}
    for entry in entries:  # warm-up: prepacks, oneDNN primitive caches
        guided_prediction(adapter, entry.model, *inputs[entry.column])
    best = {e.column: float("inf") for e in entries}
    started_all, round_index = time.perf_counter(), 0
    while round_index < rounds or (round_index < max_rounds and time.perf_counter() - started_all < budget_s):
        shift = round_index % len(entries)
        round_index += 1
        for entry in entries[shift:] + entries[:shift]:
            started = time.perf_counter()
            guided_prediction(adapter, entry.model, *inputs[entry.column])
            best[entry.column] = min(best[entry.column], time.perf_counter() - started)
    return best


@torch.no_grad()
def _trajectory_errors(adapter, reference: nn.Module, others: list[Entry], conditions, scheduler,
                       settings: EvalSettings, prompt_encoder: PromptEncoder | None = None) -> dict:
    """Relative error of each model's output on the reference trajectory, per timestep."""
    records: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    sample(adapter, reference, conditions, scheduler, steps=settings.steps, guidance=settings.guidance,
           seed=settings.seed, on_step=lambda i, t, x, pred: records.append((int(t), x.clone(), pred.clone())),
           prompt_encoder=prompt_encoder)
    cond = encode_conditions(adapter, reference, conditions, prompt_encoder)
    uncond = encode_null(adapter, reference, len(conditions), prompt_encoder)
    series = {}
    for entry in others:
        errors = []
        for t, x, ref_pred in records:
            pred = guided_prediction(adapter, entry.model, x, torch.tensor([t]), cond, uncond, settings.guidance)
            errors.append(relative_error(pred.float(), ref_pred))
        series[entry.column] = errors
    return {"timesteps": [t for t, _, _ in records], "series": series}


@torch.no_grad()
def _layer_sqnr(adapter, reference: nn.Module, entries: list[Entry], conditions,
                settings: EvalSettings, prompt_encoder: PromptEncoder | None = None) -> dict | None:
    """SQNR of each compressed layer alone on the reference's inputs at timesteps 900, 500 and 100."""
    def run_reference() -> None:
        cond = encode_conditions(adapter, reference, conditions, prompt_encoder)
        x = initial_latents(adapter, reference, len(conditions), settings.seed)
        for t in (900, 500, 100):
            adapter.predict(reference, x, torch.tensor([t]), cond)

    return layer_sqnr(reference, entries, run_reference)


@torch.no_grad()
def layer_sqnr(reference: nn.Module, entries: list[Entry], run_reference) -> dict | None:
    """SQNR of each compressed layer alone: the inputs each reference layer sees while ``run_reference()`` runs,
    through the reference and the compressed layer; None when no entry names a compressed layer (a pruned or
    distilled model: the report leaves the plot out)."""
    names = sorted({n for e in entries for n in e.compressed_layers}, key=list(dict(reference.named_modules())).index)
    if not names:
        return None
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    handles = [reference.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: captured[n].append((args[0].detach(), out.detach()))) for n in names]
    try:
        run_reference()
    finally:
        for handle in handles:
            handle.remove()
    series = {}
    for entry in entries:
        values = []
        for name in names:
            if name not in entry.compressed_layers:
                values.append(None)
                continue
            layer = entry.model.get_submodule(name)
            ref_out = torch.cat([o.reshape(-1, o.shape[-1]) for _, o in captured[name]])
            out = torch.cat([layer(i).reshape(-1, o.shape[-1]).float() for i, o in captured[name]])
            values.append(round(sqnr_db(ref_out.float(), out), 3))
        series[entry.column] = values
    return {"layers": names, "series": series}


def evaluate(adapter: ModelAdapter, reference: Entry, candidate: Entry, baseline: Entry | None, vae: nn.Module,
             scheduler, settings: EvalSettings, quiet: bool = False, cache_dir: Path | None = None,
             prompt_encoder: PromptEncoder | None = None) -> dict:
    """Sample every entry with the same seeds and compute the report's metrics; prompts (and the null prompt)
    go through ``prompt_encoder`` when the models have their own text encoder."""
    entries = [candidate, reference] + ([baseline] if baseline else [])
    conditions, labels = evaluation_conditions(adapter, settings.samples)
    features = Feature(settings, cache_dir)
    images, seconds = {}, {}
    with progress_bar("evaluate: sampling", total=len(entries), quiet=quiet) as bar:
        for entry in entries:
            images[entry.column], seconds[entry.column] = _timed_sampling(adapter, entry, conditions, scheduler,
                                                                          settings, vae, quiet, prompt_encoder)
            bar.update(1)
    metrics = []

    def metric(name, better, fn, unit=""):
        metrics.append(metric_row(name, better, entries, fn, unit))

    # the zoo's Fashion-MNIST metrics (classifier, real test images) read grayscale images; a user's model that
    # decodes colour draws other things: its report compares it with its reference only, as the driven one does
    fashion = all(img.shape[1] == 1 for img in images.values())
    notes = [] if fashion else [f"the reference decodes {images['reference'].shape[1]}-channel images: the "
                                "Fashion-MNIST metrics (class accuracy, distances to real test images) are left out"]
    for fd_name, extractor in features.extractors().items():
        if not fashion and fd_name == "FD-FMNIST":
            continue
        with torch.no_grad():
            feats = {c: extractor(img) for c, img in images.items()}
        if fashion:
            real = features.real(fd_name, extractor)
            metric(f"{fd_name} vs real test images", "lower",
                   lambda e: round(frechet_distance(feats[e.column], real), 4))
        metric(f"{fd_name} vs reference samples", "lower",
               lambda e: None if e is reference else round(frechet_distance(feats[e.column], feats["reference"]), 4))
    if fashion:
        classifier = features.classifier()
        with torch.no_grad():
            logits = {c: classifier(img) for c, img in images.items()}
        metric("class accuracy", "higher", lambda e: round(class_accuracy(logits[e.column], labels), 4))
    metric("PSNR vs reference (same seeds)", "higher",
           lambda e: None if e is reference else round(psnr(images[e.column], images["reference"]), 3), "dB")
    metric("SSIM vs reference (same seeds)", "higher",
           lambda e: None if e is reference else round(ssim(images[e.column], images["reference"]), 4))
    metric("parameters", None, lambda e: logical_parameters(e.model))
    metric("weights in memory", "lower", lambda e: int(e.model.get_memory_footprint()), "bytes")
    metric("transformer bytes on disk", "lower",
           lambda e: e.bytes_on_disk(), "bytes")
    latency = step_latencies(adapter, entries, settings, prompt_encoder)
    metric("time per denoising step (CFG, batch %d; fastest of %d-%d, models in turn)"
           % (settings.timing_batch, TIMING_ROUNDS, TIMING_MAX_ROUNDS), "lower",
           lambda e: round(latency[e.column] * 1000, 2), "ms")
    notes += native_gelu_notes(reference, entries)
    metric("kernels (quantized layers running each)", None, lambda e: kernel_summary(e.model) or None)
    metric("sampling wall time (%d samples)" % settings.samples, "lower", lambda e: round(seconds[e.column], 2), "s")
    fidelity_conditions = conditions[: settings.fidelity_samples]
    others = [e for e in entries if e is not reference]
    return {
        "metrics": metrics,
        "per_timestep_error": _trajectory_errors(adapter, reference.model, others, fidelity_conditions, scheduler,
                                                 settings, prompt_encoder),
        "layer_sqnr": _layer_sqnr(adapter, reference.model, others, fidelity_conditions, settings, prompt_encoder),
        "images": {c: img[:40] for c, img in images.items()},
        "columns": [e.column for e in entries],
        "candidate": candidate.description, "reference": reference.description,
        "baseline": baseline.description if baseline else None,
        "settings": {"samples": settings.samples, "steps": settings.steps, "guidance": settings.guidance,
                     "seed": settings.seed, "real test images": settings.real_samples if fashion else 0,
                     "fidelity samples": settings.fidelity_samples},
        "notes": notes,
    }
